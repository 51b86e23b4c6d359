"""Adapting imported parameters to the model a caller wants to fine-tune.

Fine-tuning a released checkpoint changes three things (the ViT recipe): the head (new class
count, zero-initialised), the pre-logits layer (usually dropped), and the position embedding
(resized to the new patch grid). Scan <-> loop restacking is here too: it changes layout,
not values. Functions work on our flat "/"-joined parameter dicts and log every change.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from checkpoints.npz_layouts import POSEMB_KEY

log = logging.getLogger(__name__)

_LOOP_RE = re.compile(r"^Transformer/encoderblock_(\d+)/(.+)$")
_SCAN_PREFIX = "Transformer/encoderblock/"


def stack_blocks(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Per-layer `encoderblock_{i}` params -> one `encoderblock` with a leading [depth] axis."""
    per_name: dict[str, dict[int, Any]] = {}
    out = {}
    for key, value in flat.items():
        match = _LOOP_RE.match(key)
        if match:
            per_name.setdefault(match[2], {})[int(match[1])] = value
        else:
            out[key] = value
    for name, layers in per_name.items():
        if sorted(layers) != list(range(len(layers))):
            raise ValueError(f"encoder blocks for {name!r} are not numbered 0..N-1: {sorted(layers)}")
        out[_SCAN_PREFIX + name] = np.stack([np.asarray(layers[i]) for i in range(len(layers))])
    return out


def unstack_blocks(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Scan-stacked `encoderblock` params -> per-layer `encoderblock_{i}` params."""
    out = {}
    for key, value in flat.items():
        if key.startswith(_SCAN_PREFIX):
            name = key[len(_SCAN_PREFIX):]
            for i, layer in enumerate(np.asarray(value)):
                out[f"Transformer/encoderblock_{i}/{name}"] = layer
        else:
            out[key] = value
    return out


def posemb_grid(num_tokens: int, has_cls: bool) -> tuple[int, int]:
    """The (square) patch grid a position embedding of `num_tokens` rows was trained on."""
    patches = num_tokens - int(has_cls)
    side = int(round(np.sqrt(max(patches, 0))))
    if side < 1 or side * side != patches:
        raise ValueError(f"position embedding with {num_tokens} tokens (cls slot: {has_cls}) is not a "
                         "square patch grid; cannot infer its grid")
    return side, side


def resize_posemb(posemb: Any, new_grid: tuple[int, int], has_cls: bool) -> np.ndarray:
    """Bilinear resize of a [1, T, D] position embedding onto `new_grid`; the cls slot is kept.

    Uses jax.image.resize (half-pixel centres, antialiased when shrinking).
    """
    import jax  # Lazy: keeps the rest of this module numpy-only.

    posemb = np.asarray(posemb)
    old_grid = posemb_grid(posemb.shape[1], has_cls)
    if tuple(new_grid) == old_grid:
        return posemb
    cls_slot, patches = (posemb[:, :1], posemb[:, 1:]) if has_cls else (posemb[:, :0], posemb)
    grid = patches.reshape(*old_grid, -1)
    resized = jax.image.resize(grid.astype(np.float32), (*new_grid, grid.shape[-1]), method="bilinear")
    resized = np.asarray(resized, dtype=posemb.dtype).reshape(1, new_grid[0] * new_grid[1], -1)
    return np.concatenate([cls_slot, resized], axis=1)


def image_grid(image_size: int | tuple[int, int], patch_size: int) -> tuple[int, int]:
    """Patch grid for an image size; ValueError when the size is not a patch multiple."""
    size = (image_size, image_size) if isinstance(image_size, (int, np.integer)) else tuple(image_size)
    if len(size) != 2 or any(int(s) <= 0 or int(s) % patch_size for s in size):
        raise ValueError(f"image_size={image_size!r} must be a positive multiple of patch_size={patch_size} "
                         "(an int or a (height, width) pair)")
    return int(size[0]) // patch_size, int(size[1]) // patch_size


def set_scan(flat: dict[str, Any], kwargs: dict[str, Any], scan: bool) -> None:
    """Restacks blocks in place so the tree matches `Model(scan=scan)`."""
    if bool(scan) == bool(kwargs.get("scan")):
        return
    flat_new = stack_blocks(flat) if scan else unstack_blocks(flat)
    flat.clear()
    flat.update(flat_new)
    kwargs["scan"] = bool(scan)
    log.info("Restacked %d encoder blocks for scan=%s.", kwargs["depth"], bool(scan))


def set_image_size(flat: dict[str, Any], kwargs: dict[str, Any], image_size: int | tuple[int, int]) -> None:
    """Resizes the learned position embedding in place for `image_size` inputs."""
    new_grid = image_grid(image_size, kwargs["patch_size"])
    if POSEMB_KEY not in flat:  # sincos2d: computed for any grid.
        return
    has_cls = kwargs["pool_type"] == "tok"
    old = np.asarray(flat[POSEMB_KEY])
    flat[POSEMB_KEY] = resize_posemb(old, new_grid, has_cls)
    if flat[POSEMB_KEY].shape != old.shape:
        log.info("Resized position embedding %s -> %s (grid %s -> %s, cls slot kept: %s).", old.shape,
                 flat[POSEMB_KEY].shape, posemb_grid(old.shape[1], has_cls), new_grid, has_cls)


def set_rep_size(flat: dict[str, Any], kwargs: dict[str, Any], rep_size: int | bool | None) -> None:
    """Keeps (same size) or drops (None/0/False) the pre-logits layer, in place."""
    current = kwargs.get("rep_size")
    wanted = kwargs["width"] if rep_size is True else (int(rep_size) if rep_size else None)
    if wanted == current:
        return
    if wanted is not None:
        have = f"one of size {current}" if current else "none"
        raise ValueError(f"rep_size={rep_size!r} would need a new pre-logits layer, but the checkpoint has "
                         f"{have}; valid: rep_size=None (drop it) or the checkpoint's own size ({current}).")
    del flat["pre_logits/kernel"], flat["pre_logits/bias"]
    kwargs["rep_size"] = None
    log.info("Dropped the pre-logits layer (size %d).", current)


def set_num_classes(flat: dict[str, Any], kwargs: dict[str, Any], num_classes: int | None,
                    kernel_init: float = 0.0, bias_init: float = 0.0) -> None:
    """Keeps the head when it still fits, else replaces it with a constant-initialised one.

    The head must change when the class count differs or when its input (the pre-logits
    output, or the encoder width once pre-logits are dropped) changed size.
    """
    features = kwargs["rep_size"] or kwargs["width"]
    old_kernel = flat.get("head/kernel")
    num_classes = int(num_classes) if num_classes else None
    if old_kernel is not None and tuple(np.shape(old_kernel)) == (features, num_classes):
        return
    flat.pop("head/kernel", None)
    flat.pop("head/bias", None)
    old = "no head" if old_kernel is None else f"head {tuple(np.shape(old_kernel))}"
    kwargs["num_classes"] = num_classes
    if num_classes is None:
        log.info("Removed the head (%s): the model returns features.", old)
        return
    flat["head/kernel"] = np.full((features, num_classes), kernel_init, np.float32)
    flat["head/bias"] = np.full((num_classes,), bias_init, np.float32)
    log.info("Replaced %s with a new (%d, %d) head (kernel %g, bias %g).", old, features, num_classes,
             kernel_init, bias_init)
