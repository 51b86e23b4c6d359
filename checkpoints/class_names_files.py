"""Where a checkpoint's class names live, so predict and the exports name classes.

A training workdir saves them as `class_names.txt` (coyo_vit/training/workdir.py); the
exports carry them on: an .npz gets `<stem>.class_names.txt` beside it, an orbax checkpoint
directory a `class_names.txt` inside, transformers / timm folders their config's labels.
`find_class_names` reads whichever a checkpoint path has.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

from etils import epath

from checkpoints.orbax_io import CHECKPOINT_SUBDIR
from coyo_vit.class_names import CLASS_NAMES_FILE, format_class_names, parse_class_names


def names_file_for(path: str | os.PathLike) -> epath.Path:
    """Where the class names of a checkpoint at `path` are: inside a directory, beside a file
    (`vit.npz` -> `vit.class_names.txt`)."""
    path = epath.Path(os.fspath(path))
    if path.is_dir():
        return path / CLASS_NAMES_FILE
    return path.parent / f"{path.name.rsplit('.', 1)[0] if '.' in path.name else path.name}.{CLASS_NAMES_FILE}"


def find_class_names(path: str | os.PathLike) -> tuple[str, ...] | None:
    """The class names saved with the checkpoint at `path`, or None: a workdir's (also for its
    checkpoints/ directory or one of its steps), an export's file beside or inside it, or the
    labels of a transformers (`id2label`) / timm (`label_names`) folder's config.json."""
    root = epath.Path(os.fspath(path))
    if not root.exists():
        return None
    candidates = [names_file_for(root)]
    if root.is_dir() and root.name == CHECKPOINT_SUBDIR:  # WORKDIR/checkpoints
        candidates.append(root.parent / CLASS_NAMES_FILE)
    if root.is_dir() and root.name.isdigit() and root.parent.name == CHECKPOINT_SUBDIR:  # a step
        candidates.append(root.parent.parent / CLASS_NAMES_FILE)
    for candidate in candidates:
        if candidate.is_file():
            return parse_class_names(candidate.read_text(encoding="utf-8"))
    return _torch_config_labels(root / "config.json") if root.is_dir() else None


def write_class_names_beside(export_path: str | os.PathLike, names: Sequence[str]) -> epath.Path:
    """Writes `names` where `find_class_names(export_path)` finds them (whole, then renamed)."""
    target = names_file_for(export_path)
    temporary = target.parent / f".{target.name}.tmp"
    temporary.write_text(format_class_names(names), encoding="utf-8")
    temporary.rename(target)
    return target


def _torch_config_labels(config_path: epath.Path) -> tuple[str, ...] | None:
    """Labels of a transformers / timm config.json, unless they are only placeholders
    (transformers' LABEL_i); our workdir's config.json has neither key."""
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    if not isinstance(config, dict):
        return None
    if isinstance(config.get("label_names"), list):
        names = tuple(str(name) for name in config["label_names"])
    elif isinstance(config.get("id2label"), dict):
        try:
            labels = {int(k): str(v) for k, v in config["id2label"].items()}
        except ValueError:
            return None
        names = tuple(labels.get(i, f"LABEL_{i}") for i in range(len(labels)))
    else:
        return None
    if all(name == f"LABEL_{i}" for i, name in enumerate(names)):
        return None
    return names or None
