"""Registry of preprocessing ops, so pp strings can name ops without importing them by hand.

An op factory takes the op's arguments (as written in the pp string) and returns
`fn(features: dict) -> dict` working on one example of tf tensors.
"""
from __future__ import annotations

from typing import Any, Callable

Features = dict[str, Any]
OpFn = Callable[[Features], Features]
OpFactory = Callable[..., OpFn]

_OPS: dict[str, OpFactory] = {}


def register(name: str) -> Callable[[OpFactory], OpFactory]:
    """Decorator registering an op factory under `name` (names must be unique identifiers)."""
    if not name.isidentifier():
        raise ValueError(f"pp op name {name!r} must be a Python identifier so pp strings can use it")

    def decorate(factory: OpFactory) -> OpFactory:
        if name in _OPS and _OPS[name] is not factory:
            raise ValueError(f"pp op {name!r} is already registered by {_OPS[name].__module__}")
        _OPS[name] = factory
        return factory

    return decorate


def get(name: str) -> OpFactory:
    """Returns the factory of op `name`; the error for an unknown name lists the registered ops."""
    _load_builtin_ops()
    try:
        return _OPS[name]
    except KeyError:
        raise ValueError(f"unknown pp op {name!r}; registered ops: {', '.join(names())}") from None


def names() -> list[str]:
    """Sorted names of all registered ops."""
    _load_builtin_ops()
    return sorted(_OPS)


def _load_builtin_ops() -> None:
    # Imported here, not at the top: the op modules import this module to register themselves.
    from input_pipeline import ops_classification, ops_image, ops_labels  # noqa: F401
