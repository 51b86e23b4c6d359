"""Command line: convert a ViT checkpoint between formats.

    python -m checkpoints.convert SRC DST [--to npz|orbax|hf|timm] [--layout vit_jax|big_vision]
                                  [--variant L/16] [--num_heads 16] [--class_names FILE]

SRC is anything `checkpoints.load` reads (orbax, coyo-vit TensorFlow, vit_jax / big_vision
.npz, transformers / timm safetensors). DST is an .npz file (vit_jax layout by default), a new
orbax checkpoint directory, or a new folder for transformers (`--to hf`:
ViTForImageClassification) or timm (`--to timm`: VisionTransformer). `--to` defaults from
DST's suffix (npz or orbax). An existing DST is an error unless --overwrite (an .npz is replaced
atomically; directories are never overwritten).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

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
                        help="hf/timm: text file with one class name per line (default: the shipped "
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
    except (FileNotFoundError, ValueError) as err:  # Bad input: the message says what and why.
        print(f"error: {err}", file=sys.stderr)
        return 1
    if target == "npz":
        export_npz(params, args.dst, layout=args.layout)
        print(f"wrote {args.dst} ({args.layout} layout); model: {model_kwargs}")
    elif target in ("hf", "timm"):
        from checkpoints import pytorch_io  # Lazy: needs the safetensors package.

        try:
            names = None
            if args.class_names:
                with open(args.class_names, encoding="utf-8") as handle:
                    names = [line.rstrip("\n") for line in handle if line.strip()]
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
        print(f"wrote orbax checkpoint {args.dst}; model: {model_kwargs}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
