"""ImageNet class lists shipped inside the package (coyo_vit/data/*.tsv).

COYO-Labeled-300M labels index the 21,841 ImageNet-21k (fall 2011) synsets sorted by WordNet
id; fine-tuned models use the 1,000 ImageNet-1k classes. The 1k table also maps each class to
its 21k index (-1 where the synset is absent from the 21k list, e.g. teddy bear).
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import io
from collections.abc import Sequence
from importlib import resources

# Class counts, spelled once: configs, the label ops, the damage checks and the evaluators
# import them from here (this module imports nothing of the project, so anything may).
NUM_IMAGENET21K_CLASSES = 21841
NUM_IMAGENET1K_CLASSES = 1000
NUM_COYO_CLASSES = NUM_IMAGENET21K_CLASSES  # COYO-Labeled-300M labels index the 21k synsets

IMAGENET21K = "imagenet21k"
IMAGENET1K = "imagenet1k"
_FILES = {IMAGENET21K: "imagenet21k_classes.tsv", IMAGENET1K: "imagenet1k_classes.tsv"}
_SIZES = {NUM_IMAGENET21K_CLASSES: IMAGENET21K, NUM_IMAGENET1K_CLASSES: IMAGENET1K}


@dataclasses.dataclass(frozen=True)
class ClassList:
    """One label space: WordNet ids and human-readable names, by class index."""

    name: str
    wnids: tuple[str, ...]
    names: tuple[str, ...]
    index21k: tuple[int, ...] | None = None  # Only for ImageNet-1k: each class's 21k index or -1.

    def __len__(self) -> int:
        return len(self.names)


@functools.cache
def load_class_list(name: str) -> ClassList:
    """Reads a shipped class table ("imagenet21k" or "imagenet1k")."""
    if name not in _FILES:
        raise ValueError(f"Unknown class list {name!r}; valid: {sorted(_FILES)}.")
    text = resources.files("coyo_vit").joinpath("data", _FILES[name]).read_text(encoding="utf-8")
    rows = list(csv.DictReader(io.StringIO(text), delimiter="\t"))
    indices = [int(row["index"]) for row in rows]
    if indices != list(range(len(rows))):
        raise ValueError(f"{_FILES[name]} is damaged: class indices are not 0..{len(rows) - 1} in order.")
    index21k = tuple(int(row["index21k"]) for row in rows) if "index21k" in rows[0] else None
    return ClassList(name, tuple(row["wnid"] for row in rows), tuple(row["name"] for row in rows), index21k)


def class_list_for(num_classes: int | None) -> ClassList | None:
    """The shipped list matching a head size (21841 -> ImageNet-21k, 1000 -> 1k), else None."""
    name = _SIZES.get(int(num_classes or 0))
    return load_class_list(name) if name else None


# --------------------------------------------------------------------------- a run's class names

CLASS_NAMES_FILE = "class_names.txt"
"""A run's class names, one per line in class-index order: saved in its workdir at the first
start (coyo_vit/training/workdir.py), read by predict and the exports, written beside exports."""


def format_class_names(names: Sequence[str]) -> str:
    """class_names.txt's text; a name that is empty or spans lines could not be read back."""
    for index, name in enumerate(names):
        if not name or "\n" in name or "\r" in name:
            raise ValueError(f"class {index} has name {name!r}; a class name must be one "
                             f"non-empty line")
    return "".join(f"{name}\n" for name in names)


def parse_class_names(text: str) -> tuple[str, ...]:
    """The names of a class_names.txt (one per line; a missing final newline is fine)."""
    text = text.replace("\r\n", "\n")
    return tuple(text[:-1].split("\n") if text.endswith("\n") else text.split("\n")) if text else ()


def readable_names(names: Sequence[str] | None, num_classes: int | None) -> tuple[str, ...] | None:
    """The names worth saving for a run: the data's own, except that the WordNet ids of the
    shipped lists (TFDS imagenet2012's label names) become the shipped human-readable names;
    without data names, the shipped list of the head's size (COYO / ImageNet-21k, 1k); None
    when neither names the classes."""
    if names:
        shipped = class_list_for(len(names))
        if shipped is not None and tuple(names) == shipped.wnids:
            return shipped.names
        return tuple(names)
    shipped = class_list_for(num_classes)
    return shipped.names if shipped is not None else None


def class_list_of(names: Sequence[str]) -> ClassList:
    """Saved names as a ClassList: the shipped list itself (WordNet ids too) when they are its
    names, else the names alone (wnids empty strings)."""
    shipped = class_list_for(len(names))
    if shipped is not None and tuple(names) == shipped.names:
        return shipped
    return ClassList("saved", ("",) * len(names), tuple(names))
