"""Logical axis names of the model's parameters and activations, the only names sharding sees.

Every parameter is created boxed with its axis names and every large activation is annotated;
`coyo_vit.sharding`'s rules map these names to mesh axes. Outside a mesh and rules context the
annotations do nothing, so the same modules run unchanged on one CPU.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import linen as nn

# Activation layouts named once so that sharding rules only ever see these tuples.
TOKENS = ("batch", "length", "embed")
HIDDEN = ("batch", "length", "mlp")
HEADS = ("batch", "length", "heads", "kv")
LOGITS = ("batch", "classes")


def boxed(init: Callable[..., Any], names: tuple[str | None, ...]) -> Callable[..., Any]:
    """Attaches logical axis names to an initializer (what the sharding rules match on)."""
    return nn.with_logical_partitioning(init, names)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Asks the partitioner to lay `x` out as the rules map `names`."""
    return nn.with_logical_constraint(x, names)
