"""Command line: convert a ViT checkpoint between formats.

    python -m checkpoints.convert SRC DST [--to npz|orbax|hf|timm] [--layout vit_jax|big_vision]
                                  [--variant L/16] [--num_heads 16] [--class_names FILE]

SRC is anything `checkpoints.load` reads (orbax, coyo-vit TensorFlow, vit_jax / big_vision
.npz, transformers / timm safetensors). DST is an .npz file (vit_jax layout by default), a new
orbax checkpoint directory, or a new folder for transformers (`--to hf`:
ViTForImageClassification) or timm (`--to timm`: VisionTransformer). `--to` defaults from
DST's suffix (npz or orbax). An existing DST is an error unless --overwrite (an .npz is replaced
atomically; directories are never overwritten).

Class names go with the export: `--class_names FILE`, else those saved with SRC (a training
workdir's class_names.txt, an export's). An .npz gets them beside it (`vit.class_names.txt`),
an orbax directory inside (`class_names.txt`), transformers / timm folders in their config.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from checkpoints.class_names_files import find_class_names, write_class_names_beside
from checkpoints.export import export_npz
from checkpoints.load import load
from checkpoints.npz_layouts import LAYOUTS, VIT_JAX


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m checkpoints.convert", description=__doc__.split("\n")[0])
    parser.add_argument("src", help="checkpoint to read (any format checkpoints.load knows)")
    parser.add_argument("dst", help="output .npz file or new orbax directory")
    parser.add_argument("--to", choices=("npz", "orbax", "hf", "timm"), default=None,
                        help="output format (default: npz when DST ends in .npz, else orbax); hf: a "
                             "transformers ViTForImageClassification folder, timm: a timm VisionTransformer folder")
    parser.add_argument("--layout", choices=LAYOUTS, default=VIT_JAX, help=".npz layout (default vit_jax)")
    parser.add_argument("--variant", default=None, help="ViT variant such as L/16, for sizes shapes cannot tell")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing .npz DST (orbax directories are never overwritten)")
    parser.add_argument("--num_heads", type=int, default=None,
                        help="attention heads, for TF checkpoints of non-standard width")
    parser.add_argument("--class_names", default=None,
                        help="text file with one class name per line (default: the names saved with "
                             "SRC, e.g. a workdir's class_names.txt; for hf/timm else the shipped "
                             "ImageNet-21k / 1k names for 21,841 / 1,000 classes, else LABEL_i)")
    parser.add_argument("--problem_type", choices=("single_label_classification", "multi_label_classification"),
                        default=None, help="hf: softmax or sigmoid head (default: multi-label for 21,841 classes)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {} if args.num_heads is None else {"num_heads": args.num_heads}
    target = args.to or ("npz" if args.dst.endswith(".npz") else "orbax")
    if os.path.exists(args.dst) and (target != "npz" or not args.overwrite):
        # Checked before loading SRC, which can take minutes for a large checkpoint.
        hint = "; pass --overwrite to replace it" if target == "npz" else "; choose a new directory"
        print(f"error: {args.dst} exists{hint}", file=sys.stderr)
        return 1
    try:
        params, model_kwargs = load(args.src, variant=args.variant, **overrides)
        names = _class_names(args.class_names, args.src, model_kwargs.get("num_classes"))
    except (FileNotFoundError, ValueError) as err:  # Bad input: the message says what and why.
        print(f"error: {err}", file=sys.stderr)
        return 1
    if target == "npz":
        export_npz(params, args.dst, layout=args.layout, class_names=names)
        print(f"wrote {args.dst} ({args.layout} layout){_named(names)}; model: {model_kwargs}")
    elif target in ("hf", "timm"):
        from checkpoints import pytorch_io  # Lazy: needs the safetensors package.

        try:
            if target == "hf":
                pytorch_io.export_hf(params, args.dst, model_kwargs, names, args.problem_type)
            else:
                pytorch_io.export_timm(params, args.dst, model_kwargs, names)
        except (ImportError, OSError, ValueError) as err:  # What the model or the environment lacks.
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(f"wrote {target} folder {args.dst}; model: {model_kwargs}")
    else:
        from checkpoints.orbax_io import save_params  # Lazy: only orbax output needs it.

        save_params(args.dst, params, model_kwargs)
        if names is not None:
            write_class_names_beside(args.dst, names)
        print(f"wrote orbax checkpoint {args.dst}{_named(names)}; model: {model_kwargs}")
    return 0


def _class_names(names_file: str | None, src: str, num_classes: int | None) -> list[str] | None:
    """--class_names FILE, else the names saved with SRC; a count other than the head's is an
    error for a file given, and ignored (with a warning) for names found beside SRC."""
    if names_file:
        with open(names_file, encoding="utf-8") as handle:
            names = [line.rstrip("\n") for line in handle if line.strip()]
        if num_classes is not None and len(names) != num_classes:
            raise ValueError(f"--class_names {names_file} lists {len(names)} names; the head has "
                             f"{num_classes} classes")
        return names
    found = find_class_names(src)
    if found is None or num_classes is None:
        return None
    if len(found) != num_classes:
        logging.warning("class names saved with %s ignored: %d names for a head of %d classes",
                        src, len(found), num_classes)
        return None
    return list(found)


def _named(names: list[str] | None) -> str:
    return f", with {len(names)} class names" if names else ""


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
