"""Training losses over dense float targets [batch, classes]."""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax


def sigmoid_xent(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-example binary cross-entropy SUMMED over classes (the COYO recipe; mean over batch later)."""
    return optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets).sum(axis=-1)


def softmax_xent(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy against (one-hot or smoothed) target distributions."""
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


LOSSES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "sigmoid_xent": sigmoid_xent,
    "softmax_xent": softmax_xent,
}


def get_loss(name: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    if name not in LOSSES:
        raise ValueError(f"Unknown loss {name!r}; valid: {sorted(LOSSES)}.")
    return LOSSES[name]
