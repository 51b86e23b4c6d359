"""Parses preprocessing strings such as `decode|resize(224)|flip_lr|value_range(-1, 1)`.

The big_vision-style string keeps configs plain and sweepable. A pp string happens to be a valid
Python expression (ops joined by the `|` operator), so it is parsed with `ast`: separators inside
string arguments are handled for free, and arguments are read with `ast.literal_eval`, never
evaluated as code.
"""
from __future__ import annotations

import ast
import inspect
from typing import Any, Callable

from input_pipeline import registry

Features = registry.Features


def parse(pp: str) -> Callable[[Features], Features]:
    """Builds the function applying the ops of `pp` in order to one example dict."""
    ops = [_build_op(node, pp) for node in _split_ops(pp)]

    def preprocess(features: Features) -> Features:
        for op in ops:
            features = op(dict(features))
        return features

    preprocess.__doc__ = f"Applies pp string {pp!r}."
    preprocess.__name__ = "preprocess"
    return preprocess


def op_names(pp: str) -> list[str]:
    """The op names of `pp`, left to right, read the way `parse` reads them (nothing is built)."""
    return [_op_name(node, pp) for node in _split_ops(pp)]


def _op_name(node: ast.expr, pp: str) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        return node.func.id
    raise ValueError(f"pp string {pp!r}: {ast.unparse(node)!r} is not an op name or "
                     "`name(args)` call")


def _split_ops(pp: str) -> list[ast.expr]:
    """Returns the node of each op of the `|`-chain, left to right."""
    if not isinstance(pp, str) or not pp.strip():
        raise ValueError(f"pp string must be a non-empty string of ops joined by '|', got {pp!r}")
    try:
        tree = ast.parse(pp.strip(), mode="eval").body
    except SyntaxError as e:
        raise ValueError(f"pp string {pp!r} is not `op|op(args)|...`: {e.msg} at column {e.offset}"
                         ) from None
    nodes: list[ast.expr] = []
    while isinstance(tree, ast.BinOp) and isinstance(tree.op, ast.BitOr):
        nodes.append(tree.right)
        tree = tree.left
    nodes.append(tree)
    nodes.reverse()
    return nodes


def op_arguments(pp: str, name: str) -> list[dict[str, Any]]:
    """Every argument, defaults included, of each op `name` in `pp`, left to right (nothing is
    built): e.g. the class count a `coyo_labels(...)` op checks labels against."""
    calls = []
    for node in _split_ops(pp):
        if _op_name(node, pp) == name:
            bound = _bind(node, pp)[1]
            bound.apply_defaults()
            calls.append(dict(bound.arguments))
    return calls


def _bind(node: ast.expr, pp: str) -> tuple[str, inspect.BoundArguments]:
    """The op's registered name and its literal arguments bound to its factory's signature."""
    name, args, kwargs = _op_name(node, pp), [], {}
    if isinstance(node, ast.Call):
        args = [_literal(a, name, pp) for a in node.args]
        for kw in node.keywords:
            if kw.arg is None:
                raise ValueError(f"pp op {name!r} in {pp!r}: `**kwargs` is not supported")
            kwargs[kw.arg] = _literal(kw.value, name, pp)
    factory = registry.get(name)
    try:
        return name, inspect.signature(factory).bind(*args, **kwargs)
    except TypeError as e:
        raise ValueError(f"pp op {name!r} got bad arguments {_show(args, kwargs)}: {e}; "
                         f"signature: {name}{inspect.signature(factory)}") from None


def _build_op(node: ast.expr, pp: str) -> registry.OpFn:
    """Looks the op up in the registry and calls its factory with the literal arguments."""
    name, bound = _bind(node, pp)
    factory = registry.get(name)
    args, kwargs = bound.args, bound.kwargs
    try:
        return factory(*args, **kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"pp op {name!r} got bad arguments {_show(args, kwargs)}: {e}") from None


def _literal(node: ast.expr, op_name: str, pp: str) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise ValueError(f"pp op {op_name!r} in {pp!r}: argument {ast.unparse(node)!r} is not a "
                         "Python literal (numbers, strings, tuples, lists, None, True/False)"
                         ) from None


def _show(args: list[Any], kwargs: dict[str, Any]) -> str:
    parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    return "(" + ", ".join(parts) + ")"
