"""The model's input range, and the on-device conversion of uint8 pixels into it.

Every released ViT checkpoint expects pixels mapped to [-1, 1] as (x - 127.5) / 127.5. The
training pipelines send uint8 images (4x fewer bytes to copy, batch and transfer than float32,
and no per-pixel float work on the host) and the model converts them here, on the device.
Float images are taken as already in the model's range, so a pp ending in value_range(-1, 1)
(or any custom range) keeps working unchanged.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

PIXEL_MAX = 255.0


def to_model_range(images: jax.Array, dtype: jnp.dtype | None = None) -> jax.Array:
    """Integer pixels in [0, 255] (the pipelines send uint8) -> [-1, 1]; floats pass through as
    they are. The result has `dtype`, or by default float32 for pixels and the input's own
    dtype for floats."""
    if jnp.issubdtype(images.dtype, jnp.integer):
        scale = 2.0 / PIXEL_MAX
        images = images.astype(jnp.float32) * scale - 1.0
    return images if dtype is None else images.astype(dtype)
