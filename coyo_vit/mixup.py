"""Mixup (Zhang et al. 2018) of a batch of images and dense label vectors, in jnp.

One mixing weight per batch, drawn from Beta(alpha, alpha) and folded to >= 0.5 so each mixed
example stays mostly itself; example i is mixed with example i-1 (a roll of the batch by one),
as in big_vision. Runs inside jit on global batches sharded over the mesh of
`coyo_vit.sharding.make_mesh` (Auto axes: the roll becomes a collective permute).
Callers fold the step into the rng (`jax.random.fold_in(rng, step)`), so a resumed run mixes
exactly as an uninterrupted one. `alpha == 0` means "off" and returns the inputs unchanged.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from coyo_vit.models import pixels


def mixup(rng: jax.Array, images: jax.Array, labels: jax.Array, alpha: float
          ) -> tuple[jax.Array, jax.Array]:
    """Returns (mixed images, mixed labels): lam * x + (1 - lam) * roll(x, 1) for both.

    images [B, ...], labels [B, C] float (one-hot or multi-hot); `alpha` a Python float >= 0.
    Label rows that sum to 1 still sum to 1 after mixing. uint8 images are first mapped to the
    model's float range (models/pixels.py): rounding mixed pixels back to uint8 would lose detail.
    """
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha < 0:
        raise ValueError(f"mixup alpha must be a number >= 0 (0 = off), got {alpha!r}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"images {images.shape} and labels {labels.shape} differ in batch size")
    if alpha == 0:
        return images, labels
    images = pixels.to_model_range(images)
    lam = jax.random.beta(rng, alpha, alpha)
    lam = jnp.maximum(lam, 1.0 - lam)

    def mix(x: jax.Array) -> jax.Array:
        mixed = lam * x.astype(jnp.float32) + (1.0 - lam) * jnp.roll(x, 1, axis=0).astype(jnp.float32)
        return mixed.astype(x.dtype)

    return mix(images), mix(labels)


def mixup_batch(rng: jax.Array, batch: dict[str, jax.Array], alpha: float) -> dict[str, jax.Array]:
    """`mixup` applied to batch["image"] and batch["labels"]; other entries pass through."""
    images, labels = mixup(rng, batch["image"], batch["labels"], alpha)
    return {**batch, "image": images, "labels": labels}
