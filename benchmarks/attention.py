"""Attention alone, forward + backward, per implementation: time and error against float32 XLA.

    PYTHONPATH=. python -m benchmarks.attention --variant B/16 --batch 256 --out /tmp/attn.json
    # CPU smoke run (cuDNN rows report that they need a GPU):
    python -m benchmarks.attention --variant Ti/16 --batch 2 --image_size 32 --iters 2

At ViT sizes (197 tokens, 64-wide heads) XLA's attention writes the [batch, heads, 197, 197]
scores and probabilities to memory several times per layer and transposes q/k/v into the
layout its batched matrix products want; cuDNN's fused kernel keeps them on chip. This
isolates that difference from the rest of the step (benchmarks/accelerator.py times the whole
step). Rows: `xla` (jax.nn.dot_product_attention's XLA path), `cudnn` (as is: cuDNN refuses
197 tokens in training), `cudnn_padN` (lengths padded to a multiple of N, padded keys masked;
N = 64 is coyo_vit's path). Error = ||out - ref|| / ||ref|| for the output and each input gradient,
against XLA in float32 on the same inputs. No TensorFlow.
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import report
from coyo_vit.models.attention_backends import padded_dot_product_attention
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


def forward_backward(attention: Callable[[Array, Array, Array], Array]) -> Callable:
    """jit(q, k, v, cotangent) -> (output, (dq, dk, dv)): what one training step asks of it."""
    def run(q, k, v, cotangent):
        out, pullback = jax.vjp(attention, q, k, v)
        return out, pullback(cotangent)
    return jax.jit(run)


def relative_error(got: Array, ref: Array) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


def bench(name: str, attention: Callable, inputs: tuple[Array, ...], reference: tuple[Any, ...],
          iters: int) -> dict[str, Any]:
    fn = forward_backward(attention)
    row: dict[str, Any] = {"implementation": name}
    try:
        started = time.perf_counter()
        out = jax.block_until_ready(fn(*inputs))
        row["compile_s"] = time.perf_counter() - started
    except Exception as err:  # cuDNN refusing a shape, or no GPU: a row that says why
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        return row
    times = []
    for _ in range(iters):
        started = time.perf_counter()
        jax.block_until_ready(fn(*inputs))
        times.append(time.perf_counter() - started)
    row["ms"] = 1e3 * report.median(times)
    got_out, got_grads = out
    ref_out, ref_grads = reference
    row["err_out"] = relative_error(got_out, ref_out)
    row["err_grad"] = max(relative_error(g, r) for g, r in zip(got_grads, ref_grads))
    return row


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
                              ("tflops_per_s", "TFLOP/s"), ("err_out", "rel. err out"),
                              ("err_grad", "rel. err grads (max)"), ("compile_s", "compile s"),
                              ("error", "error")]))
    report.write_json(args.out, {"benchmark": "attention", "variant": args.variant,
                                 "batch": args.batch, "tokens": length, "dtype": args.dtype,
                                 "device_kind": device.device_kind, "rows": rows,
                                 "tensorflow_imported": "tensorflow" in sys.modules})
    return rows


if __name__ == "__main__":
    main()
