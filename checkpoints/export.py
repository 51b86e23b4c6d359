"""Exports our parameter tree as a flat .npz that vit_jax, big_vision, timm and HF can read.

timm's and Hugging Face's ViT converters read the vit_jax layout; big_vision reads its own
(and, through its fix-ups, vit_jax's). Files are written to a temporary name in the target
directory and renamed into place, so a crash never leaves a half-written checkpoint.
"""
from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax.linen import meta

from checkpoints.adapt import unstack_blocks
from checkpoints.class_names_files import write_class_names_beside
from checkpoints.npz_layouts import LAYOUTS, POSEMB_KEY, VIT_JAX, flatten_tree, ours_to_npz

log = logging.getLogger(__name__)


def export_npz(params: Mapping[str, Any], path: str | Path, layout: str = VIT_JAX,
               class_names: Sequence[str] | None = None) -> Path:
    """Writes `params` (our tree, boxed or not, loop or scan) to `path` in `layout`.

    vit_jax files always get per-layer blocks (that is all vit_jax and timm understand);
    big_vision files keep the tree's loop or scan layout. `class_names` (one per head class)
    go beside it as `<stem>.class_names.txt`, where predict and convert find them: .npz has no
    place for them that vit_jax or timm would read.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown .npz layout {layout!r}; valid layouts: {list(LAYOUTS)}.")
    flat = flatten_tree(jax.device_get(meta.unbox(dict(params))))
    if layout == VIT_JAX:
        if any(k.startswith("MAPHead_0/") for k in flat):
            raise ValueError("vit_jax layout has no MAP head (pool_type='map'); export with layout='big_vision'.")
        if POSEMB_KEY not in flat:
            raise ValueError("vit_jax layout needs a learned position embedding and this model uses "
                             "posemb='sincos2d'; export with layout='big_vision'.")
        flat = unstack_blocks(flat)
    arrays = ours_to_npz(flat, layout)
    head = arrays.get("head/bias")
    if class_names is not None and head is not None and len(class_names) != np.shape(head)[0]:
        raise ValueError(f"{len(class_names)} class names given for a head of {np.shape(head)[0]} classes")
    path = Path(path)
    write_npz_atomically(arrays, path)
    if class_names is not None:
        write_class_names_beside(path, class_names)
    log.info("Exported %d arrays to %s (%s layout).", len(arrays), path, layout)
    return path


def write_npz_atomically(arrays: Mapping[str, np.ndarray], path: Path) -> None:
    """np.savez to a temp file beside `path`, fsync, then rename over `path`.

    The file gets the permissions a plain open() would give it (mkstemp's are owner-only, which
    would leave a checkpoint meant for sharing unreadable to others).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)  # Converts each value as it writes it.
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
