"""Renaming between our parameter tree and the two public flat .npz layouts.

Both layouts are "/"-joined key -> array files. They differ from our tree (which uses
vit_jax's module names) in only a few places, so conversion is renaming plus one
position-embedding convention:

* vit_jax (google-research/vision_transformer): our names exactly. Very old files came from
  pre-Linen flax, whose module counters run across types inside a block (`LayerNorm_0`,
  `MultiHeadDotProductAttention_1`, `LayerNorm_2`, `MlpBlock_3`) - the names we use. Files
  written by Linen code count per type (`..._0`, `LayerNorm_1`, `MlpBlock_0`).
* big_vision: Linen block names, optionally scan-stacked under `Transformer/encoderblock`,
  optionally under a `params/` prefix next to optimizer state, and `pos_embedding` at the top
  level covering the patches only (big_vision adds it before prepending the class token).

Everything here is numpy only: no jax, no TensorFlow.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

VIT_JAX = "vit_jax"
BIG_VISION = "big_vision"
LAYOUTS = (VIT_JAX, BIG_VISION)

POSEMB_KEY = "Transformer/posembed_input/pos_embedding"
_BLOCK_RE = re.compile(r"^Transformer/(encoderblock(?:_\d+)?)/([^/]+)/(.*)$")

# Module names inside one encoder block: Linen per-type counters -> ours (pre-Linen).
_LINEN_TO_OURS = {
    "LayerNorm_0": "LayerNorm_0",
    "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
    "LayerNorm_1": "LayerNorm_2",
    "MlpBlock_0": "MlpBlock_3",
}
_OURS_TO_LINEN = {ours: linen for linen, ours in _LINEN_TO_OURS.items()}
_INLINED_MAP_MODULES = ("probe", "MlpBlock_0", "MultiHeadDotProductAttention_0", "LayerNorm_0")


def flatten_tree(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a/b/c": leaf}; the key form every .npz layout uses."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_tree(value, name + "/"))
        else:
            flat[name] = value
    return flat


def unflatten_tree(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"a/b/c": leaf} -> nested dict (the form `Model.apply` takes)."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"Parameter name {name!r} nests under a leaf {part!r}.")
        node[leaf] = value
    return tree


def detect_layout(keys: list[str] | set[str]) -> str:
    """Which public layout a flat key set is in; ValueError naming what is missing."""
    keys = set(keys)
    if POSEMB_KEY in keys:
        return VIT_JAX
    if "pos_embedding" in keys or "Transformer/pos_embedding" in keys:
        return BIG_VISION
    if any(k.startswith("Transformer/encoderblock") for k in keys) and "embedding/kernel" in keys:
        # No learned position embedding: big_vision's sincos2d models (vit_jax has none).
        return BIG_VISION
    sample = sorted(keys)[:5]
    raise ValueError(
        "not a ViT .npz: expected 'embedding/kernel' and 'Transformer/encoderblock...' keys "
        f"(vit_jax or big_vision layout); first keys found: {sample}")


def strip_params_prefix(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keeps only the `params/` subtree when there is one (big_vision saves opt state beside it)."""
    if any(k.startswith("params/") for k in arrays):
        return {k[len("params/"):]: v for k, v in arrays.items() if k.startswith("params/")}
    return dict(arrays)


def _uses_linen_block_names(keys: list[str]) -> bool:
    for key in keys:
        match = _BLOCK_RE.match(key)
        if match and match[2] == "MultiHeadDotProductAttention_0":
            return True
    return False


def _rename_block_modules(flat: Mapping[str, Any], table: Mapping[str, str]) -> dict[str, Any]:
    out = {}
    for key, value in flat.items():
        match = _BLOCK_RE.match(key)
        if match and match[2] in table:
            key = f"Transformer/{match[1]}/{table[match[2]]}/{match[3]}"
        out[key] = value
    return out


def _is_square(n: int) -> bool:
    return n >= 1 and int(round(np.sqrt(n))) ** 2 == n


def npz_to_ours(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Any vit_jax / big_vision flat dict -> our flat names (pos-emb with the cls slot for "tok")."""
    flat = strip_params_prefix(arrays)
    layout = detect_layout(list(flat))
    if _uses_linen_block_names(list(flat)):
        flat = _rename_block_modules(flat, _LINEN_TO_OURS)
    if "probe" in flat:
        # Early big_vision MAP models kept the head's modules at the top level.
        for key in [k for k in flat if k.split("/")[0] in _INLINED_MAP_MODULES]:
            flat[f"MAPHead_0/{key}"] = flat.pop(key)
    if layout == BIG_VISION:
        posemb = flat.pop("pos_embedding", None)
        if posemb is None:
            posemb = flat.pop("Transformer/pos_embedding", None)
        if posemb is not None:
            tokens = posemb.shape[1]
            already_has_slot = _is_square(tokens - 1) and not _is_square(tokens)
            if "cls" in flat and not already_has_slot:
                # big_vision adds pos-emb to patches only: the cls token's slot is zero.
                posemb = np.concatenate([np.zeros_like(posemb[:, :1]), posemb], axis=1)
            flat[POSEMB_KEY] = posemb
    return flat


def ours_to_npz(flat: Mapping[str, Any], layout: str) -> dict[str, np.ndarray]:
    """Our flat names -> the given layout's names (scan-stacked trees stay stacked)."""
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown .npz layout {layout!r}; valid layouts: {list(LAYOUTS)}.")
    flat = {k: np.asarray(v) for k, v in flat.items()}
    if layout == VIT_JAX:
        return flat
    flat = _rename_block_modules(flat, _OURS_TO_LINEN)
    posemb = flat.pop(POSEMB_KEY, None)
    if posemb is not None:
        if "cls" in flat:
            # cls + pos[0] is exactly what the cls position sees, so folding it keeps the model.
            flat["cls"] = flat["cls"] + posemb[:, :1]
            posemb = posemb[:, 1:]
        flat["pos_embedding"] = posemb
    return flat
