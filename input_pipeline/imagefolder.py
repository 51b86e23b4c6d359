"""Image-folder datasets: ROOT/<split>/<class>/<image>, the layout torchvision and timm read.

Class index = position of the class directory name in the sorted union of the class names of
all splits under ROOT, so train and test agree on indices even if one split lacks a class (every
directory directly under ROOT counts as a split). Images are the files with an image extension;
hidden files and other files are ignored. Paths are sorted, so a listing is the same on every
machine and process.
"""
from __future__ import annotations

import dataclasses
import os

import tensorflow as tf

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


@dataclasses.dataclass(frozen=True)
class FolderSplit:
    """One split of an image folder: its classes and the (path, label) of each image."""
    root: str
    split: str
    classes: tuple[str, ...]
    paths: tuple[str, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.paths)


def _visible_dirs(path: str) -> list[str]:
    return sorted(name.rstrip("/") for name in tf.io.gfile.listdir(path)
                  if not name.startswith(".") and tf.io.gfile.isdir(os.path.join(path, name)))


def list_splits(root: str) -> list[str]:
    """The split directories under `root` (sorted); errors when root is not a directory."""
    if not tf.io.gfile.isdir(root):
        raise FileNotFoundError(f"image folder root {root!r} is not a directory; expected "
                                f"ROOT/<split>/<class>/<image>")
    return _visible_dirs(root)


def list_classes(root: str) -> tuple[str, ...]:
    """Sorted union of the class directory names of every split under `root`."""
    return tuple(sorted({c for s in list_splits(root) for c in _visible_dirs(os.path.join(root, s))}))


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_split(root: str, split: str) -> FolderSplit:
    """Lists ROOT/<split>/<class>/<image>; errors name a missing split (and the valid ones) or a
    split without images."""
    splits = list_splits(root)
    if split not in splits:
        raise ValueError(f"image folder {root!r} has no split {split!r}; splits found: "
                         f"{splits or 'none'}")
    classes = list_classes(root)
    index = {name: i for i, name in enumerate(classes)}
    paths: list[str] = []
    labels: list[int] = []
    split_dir = os.path.join(root, split)
    for name in _visible_dirs(split_dir):
        class_dir = os.path.join(split_dir, name)
        images = sorted(f for f in tf.io.gfile.listdir(class_dir) if _is_image(f))
        paths.extend(os.path.join(class_dir, f) for f in images)
        labels.extend([index[name]] * len(images))
    if not paths:
        raise ValueError(f"image folder split {split_dir!r} holds no images: expected "
                         f"{split_dir}/<class>/<image> with extensions {', '.join(IMAGE_EXTENSIONS)}")
    return FolderSplit(root, split, classes, tuple(paths), tuple(labels))


def class_counts(folder: FolderSplit) -> dict[str, int]:
    """Images per class name, e.g. for logs and tests."""
    counts = {name: 0 for name in folder.classes}
    for label in folder.labels:
        counts[folder.classes[label]] += 1
    return counts

