"""Command line: convert a ViT checkpoint between formats.

    python -m checkpoints.convert SRC DST [--to npz|orbax] [--layout vit_jax|big_vision]
                                  [--variant L/16] [--num_heads 16]

SRC is anything `checkpoints.load` reads (orbax, coyo-vit TensorFlow, vit_jax / big_vision
.npz). DST is an .npz file (vit_jax layout by default: what timm and Hugging Face read) or a
new orbax checkpoint directory. `--to` defaults from DST's suffix. An existing DST is an error
unless --overwrite (an .npz is replaced atomically; an orbax directory is never overwritten).
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
    parser.add_argument("--to", choices=("npz", "orbax"), default=None,
                        help="output format (default: npz when DST ends in .npz, else orbax)")
    parser.add_argument("--layout", choices=LAYOUTS, default=VIT_JAX, help=".npz layout (default vit_jax)")
    parser.add_argument("--variant", default=None, help="ViT variant such as L/16, for sizes shapes cannot tell")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing .npz DST (orbax directories are never overwritten)")
    parser.add_argument("--num_heads", type=int, default=None,
                        help="attention heads, for TF checkpoints of non-standard width")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {} if args.num_heads is None else {"num_heads": args.num_heads}
    target = args.to or ("npz" if args.dst.endswith(".npz") else "orbax")
    if os.path.exists(args.dst) and (target == "orbax" or not args.overwrite):
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
    else:
        from checkpoints.orbax_io import save_params  # Lazy: only orbax output needs it.

        save_params(args.dst, params, model_kwargs)
        print(f"wrote orbax checkpoint {args.dst}; model: {model_kwargs}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
