"""Attention alone, forward + backward, per implementation: time and error against float32 XLA.

    PYTHONPATH=. python -m benchmarks.attention --variant B/16 --batch 256 --out /tmp/attn.json
    # CPU smoke run (cuDNN rows report that they need a GPU):
    python -m benchmarks.attention --variant Ti/16 --batch 2 --image_size 32 --iters 2

At ViT sizes (197 tokens, 64-wide heads) XLA's attention writes the [batch, heads, 197, 197]
scores and probabilities to memory several times per layer and transposes q/k/v into the
layout its batched matrix products want; cuDNN's fused kernel keeps them on chip. This
isolates that difference from the rest of the step (benchmarks/accelerator.py times the whole
step). Rows: `xla` (jax.nn.dot_product_attention's XLA path), `cudnn` (as is: jax refuses
197 tokens in training), `cudnn_padN` (lengths padded to a multiple of N, padded keys masked;
the model pads its tokens once to an even length, N = 2). Error = ||out - ref|| / ||ref|| for
the output and each input gradient, against XLA in float32 on the same inputs. No TensorFlow.
"""
from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import report
from benchmarks.fwd_bwd import RESULT_COLUMNS, bench, forward_backward, write_rows
from coyo_vit.models.layers import padded_dot_product_attention
from coyo_vit.models.vit import decode_variant

Array = jax.Array


PAD_MULTIPLES = (2, 16, 64)  # 198, 208 and 256 tokens at 197


def implementations() -> dict[str, Callable[[Array, Array, Array], Array]]:
    """xla, cudnn as is, and cudnn on lengths padded to each multiple (which ones cuDNN accepts,
    and whether a shorter padding runs faster, decides whether padding once per model would do)."""
    rows: dict[str, Callable[[Array, Array, Array], Array]] = {
        "xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"),
        "cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"),
    }
    for multiple in PAD_MULTIPLES:
        rows[f"cudnn_pad{multiple}"] = functools.partial(
            padded_dot_product_attention, multiple=multiple, implementation="cudnn")
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.attention",
        description="Forward+backward time of attention alone (XLA vs cuDNN, padded) at a ViT's "
                    "sizes, with the error against float32 XLA.")
    parser.add_argument("--variant", default="B/16", help="ViT variant: sets heads and head width")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--iters", type=int, default=20, help="timed calls; the median is reported")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)

    dims = decode_variant(args.variant)
    length = (args.image_size // dims["patch_size"]) ** 2 + 1
    heads, head_dim = dims["num_heads"], dims["width"] // dims["num_heads"]
    shape = (args.batch, length, heads, head_dim)
    rng = np.random.default_rng(0)
    f32 = [jnp.asarray(rng.standard_normal(shape, dtype=np.float32)) for _ in range(4)]
    inputs = tuple(x.astype(args.dtype) for x in f32)
    reference = forward_backward(implementations()["xla"])(*(x.astype(jnp.float32) for x in inputs))

    rows = [bench(name, fn, inputs, reference, args.iters) for name, fn in implementations().items()]
    fwd_flops = 4 * args.batch * heads * length * length * head_dim  # two matmuls, 2 FLOPs per MAC
    for row in rows:
        if "ms" in row:  # forward + backward = 3 x forward, as in the step's MFU convention
            row["tflops_per_s"] = 3 * fwd_flops / (row["ms"] * 1e-3) / 1e12
    device = jax.devices()[0]
    print(f"attention of {args.variant} @ {args.image_size}px: batch {args.batch}, {length} tokens, "
          f"{heads} heads x {head_dim}, {args.dtype}; device {device.device_kind}")
    print(report.table(rows, [("implementation", "implementation"), ("ms", "fwd+bwd ms"),
                              ("tflops_per_s", "TFLOP/s"), *RESULT_COLUMNS]))
    write_rows(args.out, "attention", rows, variant=args.variant, batch=args.batch, tokens=length,
               dtype=args.dtype)
    return rows


if __name__ == "__main__":
    main()
