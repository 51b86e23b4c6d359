"""Exponential moving average (EMA) of parameters, for the 512px fine-tuning recipe (decay 0.9999).

Convention (TensorFlow's `ExponentialMovingAverage(num_updates=...)`, which the Keras recipe
used): the average starts as a copy of the parameters, and the update with index `step`
(0 for the first update) uses

    decay_t = min(decay, (1 + step) / (10 + step))        (warmup=True, the default)
    ema     = decay_t * ema + (1 - decay_t) * params

so early averages follow the fast-moving weights instead of clinging to the initialisation
(at decay 0.9999 a plain EMA would still be ~37% initial weights after 10k steps). Starting from
a copy instead of zeros means no debiasing is needed. With warmup=False, decay_t = decay.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def init_ema(params: Any) -> Any:
    """The EMA before any update: a float32 copy of the parameters."""
    return jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)


def ema_decay(decay: float | jax.Array, step: int | jax.Array, warmup: bool = True) -> jax.Array:
    """The decay used by update number `step` (0-based); see the module docstring."""
    decay = jnp.asarray(decay, jnp.float32)
    if not warmup:
        return decay
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(ema: Any, params: Any, decay: float | jax.Array, step: int | jax.Array,
               warmup: bool = True) -> Any:
    """One EMA update after training step `step` (0-based count of earlier updates).

    Pure and jit-friendly (`step` may be traced); keep `ema` sharded like the parameters.
    `decay` must lie in [0, 1]; a Python float outside raises.
    """
    if isinstance(decay, (int, float)) and not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay!r} (the recipe uses 0.9999)")
    d = ema_decay(decay, step, warmup)
    return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p.astype(jnp.float32), ema, params)
