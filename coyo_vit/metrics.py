"""Per-example metrics computed on device; sums are reduced on the host."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def precision_at_1(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """1.0 where the highest-scoring class is a positive label (target > 0) of the example."""
    top1 = jnp.argmax(logits, axis=-1)
    return (jnp.take_along_axis(targets, top1[:, None], axis=-1)[:, 0] > 0).astype(jnp.float32)
