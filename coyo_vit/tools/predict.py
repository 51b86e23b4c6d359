"""Top-k predictions of a ViT checkpoint on image files.

    python -m coyo_vit.tools.predict --checkpoint PATH [--top_k 5] [--num_heads N]
                                     [--class_names FILE] IMAGE...

PATH is anything `checkpoints.load` reads. Images are decoded with PIL and resized (aspect
ratio not kept) to the resolution the position embedding was trained at exactly as the
fine-tuning eval's `resize` op does it (bilinear with half-pixel centres, no antialiasing,
rounded to whole pixel values), then scaled to [-1, 1]. Scores are sigmoid probabilities for
21,841-class (multi-label, COYO-pretrained) heads and softmax probabilities otherwise. Class
names are those saved with the checkpoint (a training workdir's class_names.txt: image-folder
directories, TFDS label names, the 21k / 1k lists; an export's names beside or inside it), else
the ImageNet-21k / 1k lists shipped in the package, chosen by the class count, else none (the
index alone).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from PIL import Image

from coyo_vit.class_names import (
    NUM_IMAGENET21K_CLASSES,
    ClassList,
    class_list_for,
    class_list_of,
    parse_class_names,
)
from coyo_vit.models import Model

_DEFAULT_SIZE = 224  # For sincos2d models, whose parameters do not fix a resolution.


@dataclasses.dataclass(frozen=True)
class Prediction:
    index: int
    score: float
    wnid: str | None = None
    name: str | None = None

    def __str__(self) -> str:
        label = "".join(f" {part}" for part in (self.wnid, self.name) if part)
        return f"{self.score:.4f}  {self.index:>5d}{label}"


def load_image(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """Decodes an image file to float32 [height, width, 3] in [-1, 1].

    PIL's own bilinear resize would antialias when shrinking, which the eval pipeline's
    tf.image.resize(antialias=False) does not: up to 0.49 apart in [-1, 1] on a 1024x512 photo.
    jax.image.resize without antialiasing samples like TensorFlow's op.
    """
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    if pixels.shape[:2] != tuple(size):
        pixels = np.asarray(jax.image.resize(pixels, (*size, 3), "bilinear", antialias=False))
        pixels = np.floor(pixels + 0.5)  # the pipeline's uint8 rounding (half up)
    return (pixels - 127.5) / 127.5


def native_image_size(params: Mapping[str, Any], model_kwargs: Mapping[str, Any]) -> tuple[int, int]:
    """The resolution a checkpoint's learned position embedding was trained for."""
    from checkpoints.adapt import posemb_grid  # Lazy: keeps `coyo_vit` importable on its own.

    posemb = params.get("Transformer", {}).get("posembed_input", {}).get("pos_embedding")
    if posemb is None:
        return _DEFAULT_SIZE, _DEFAULT_SIZE
    grid = posemb_grid(np.shape(posemb)[1], model_kwargs["pool_type"] == "tok")
    return grid[0] * model_kwargs["patch_size"], grid[1] * model_kwargs["patch_size"]


def predict(params: Mapping[str, Any], model_kwargs: Mapping[str, Any], images: np.ndarray,
            top_k: int = 5, class_names: Sequence[str] | None = None) -> list[list[Prediction]]:
    """Top-k classes per image, best first; named by `class_names` (the checkpoint's saved
    names), else by the shipped list of the head's size."""
    num_classes = model_kwargs.get("num_classes")
    if not num_classes:
        raise ValueError("this checkpoint has no classification head (num_classes is None); nothing to predict.")
    logits = np.asarray(jax.jit(Model(**model_kwargs).apply)({"params": params}, images))
    if num_classes == NUM_IMAGENET21K_CLASSES:  # the sigmoid head of COYO pretraining
        scores = 1.0 / (1.0 + np.exp(-logits))
    else:
        scores = np.asarray(jax.nn.softmax(logits, axis=-1))
    classes = _class_list(class_names, num_classes)
    results = []
    for row in scores:
        best = np.argsort(-row, kind="stable")[:top_k]
        results.append([
            Prediction(int(i), float(row[i]), classes.wnids[i] if classes else None,
                       classes.names[i] if classes else None) for i in best])
    return results


def _class_list(class_names: Sequence[str] | None, num_classes: int) -> ClassList | None:
    """Saved names that fit the head (a saved 21k / 1k list keeps its WordNet ids), else the
    shipped list by class count, else None."""
    if class_names is not None and len(class_names) == num_classes:
        return class_list_of(class_names)
    if class_names is not None:
        print(f"warning: {len(class_names)} class names saved with the checkpoint for a head of "
              f"{num_classes} classes; not used", file=sys.stderr)
    return class_list_for(num_classes)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coyo_vit.tools.predict", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint path (any format checkpoints.load reads)")
    parser.add_argument("--top_k", type=int, default=5)
    parser.add_argument("--variant", default=None, help="ViT variant (e.g. L/16) when shapes cannot tell")
    parser.add_argument("--num_heads", type=int, default=None, help="heads, for TF checkpoints of odd width")
    parser.add_argument("--class_names", default=None,
                        help="text file with one class name per line (default: those saved with the checkpoint)")
    parser.add_argument("images", nargs="+", help="image files")
    args = parser.parse_args(argv)

    from checkpoints import load  # Lazy: the library must not depend on the checkpoint tools.
    from checkpoints.class_names_files import find_class_names  # Lazy, like load.

    overrides = {} if args.num_heads is None else {"num_heads": args.num_heads}
    try:
        params, model_kwargs = load(args.checkpoint, variant=args.variant, **overrides)
        size = native_image_size(params, model_kwargs)
        images = np.stack([load_image(path, size) for path in args.images])
        if args.class_names:
            names = parse_class_names(Path(args.class_names).read_text(encoding="utf-8"))
        else:
            names = find_class_names(args.checkpoint)
    except (OSError, ValueError) as err:  # Missing/unreadable files, bad checkpoints.
        print(f"error: {err}", file=sys.stderr)
        return 1
    for path, preds in zip(args.images, predict(params, model_kwargs, images, args.top_k, names)):
        print(path)
        for rank, pred in enumerate(preds, 1):
            print(f"  {rank}. {pred}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
