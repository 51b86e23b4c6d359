"""Alternatives for the memory-bound parts of a ViT step, each alone, forward + backward.

    PYTHONPATH=. python -m benchmarks.block_parts --variant B/16 --batch 256 --out /tmp/parts.json
    # CPU smoke run:
    python -m benchmarks.block_parts --variant Ti/16 --batch 2 --image_size 32 --iters 2

On an H100 the B/16 step's non-matmul fusions run near the HBM's bandwidth (docs/performance.md,
section 3), so only moving fewer bytes makes them faster. Candidates, timed against what the
model does now before any is adopted (a reshaped patch embedding that looked cheaper on paper
cost 10 ms a step there):

- `mlp`: Dense -> GELU(tanh) -> Dense with biases. `autodiff` is the model's block: its backward
  pass reads the tanh that the forward fusion wrote next to the GELU output. `recompute_gelu`
  keeps only the GELU's input (a custom VJP) and recomputes tanh in the backward fusion: per
  block one [tokens, mlp_dim] tensor less written and read.
- `qkv`: the query/key/value projections. `separate` is the model's three [D, H, D/H] einsums
  plus bias adds; `fused` concatenates the three kernels and biases and runs one matrix product
  of three times the width (same parameters, so checkpoints would not change). Measured in the
  whole step it gave nothing, and the model's option for it was removed (docs/performance.md).

- `head`: the 21,841-class head on the pre-logits features (batch x 1024). `float32` is the
  model's (float32 operands, kept so bf16 rounding cannot move the logits near the -10 bias);
  `bf16_operands` rounds the operands to bfloat16 and accumulates and returns float32, as TPUs do
  for a float32 product at default precision. Not the same values: its error column is the cost.

Errors are relative to the first row of each part (the model's form) run in float32 on the same
inputs, for the output and each input gradient. No TensorFlow.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import report
from benchmarks.fwd_bwd import RESULT_COLUMNS, bench, forward_backward, write_rows
from coyo_vit.class_names import NUM_COYO_CLASSES
from coyo_vit.models.layers import gelu, gelu_recomputed
from coyo_vit.models.vit import decode_variant

Array = jax.Array


def mlp(activation: Callable[[Array], Array]) -> Callable[..., Array]:
    """The block's MLP as the model computes it: float32 parameters cast to the input's dtype."""
    def fn(x, w1, b1, w2, b2):
        dtype = x.dtype
        h = activation(x @ w1.astype(dtype) + b1.astype(dtype))
        return h @ w2.astype(dtype) + b2.astype(dtype)
    return fn


def qkv_separate(x, wq, bq, wk, bk, wv, bv):
    """Three [D, H, K] projections, as layers.SplitHeadsDense computes each; stacked for the VJP."""
    dtype = x.dtype
    return jnp.stack([jnp.einsum("...d,dhk->...hk", x, w.astype(dtype)) + b.astype(dtype)
                      for w, b in ((wq, bq), (wk, bk), (wv, bv))])


def qkv_fused(x, wq, bq, wk, bk, wv, bv):
    """One [D, 3, H, K] product over the concatenated kernels, the same result as `qkv_separate`."""
    dtype = x.dtype
    kernel = jnp.stack([wq, wk, wv], axis=1).astype(dtype)
    bias = jnp.stack([bq, bk, bv]).astype(dtype)
    y = jnp.einsum("...d,dshk->s...hk", x, kernel)
    return y + bias.reshape(3, *([1] * (x.ndim - 1)), *bias.shape[1:])


def head_float32(features, kernel, bias):
    """The model's head: float32 whatever the compute dtype."""
    return features.astype(jnp.float32) @ kernel + bias


def head_bf16_operands(features, kernel, bias):
    """bf16 operands, float32 accumulation and logits."""
    return jnp.dot(features.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16),
                   preferred_element_type=jnp.float32) + bias


PARTS: dict[str, dict[str, Callable[..., Array]]] = {
    "mlp": {"autodiff": mlp(gelu),
            "recompute_gelu": mlp(gelu_recomputed)},
    "qkv": {"separate": qkv_separate, "fused": qkv_fused},
    "head": {"float32": head_float32, "bf16_operands": head_bf16_operands},
}


def part_inputs(part: str, tokens: tuple[int, int], width: int, mlp_dim: int, heads: int,
                dtype: str, rng: np.random.Generator, rep_size: int = 1024,
                classes: int = NUM_COYO_CLASSES) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """(inputs in `dtype` with float32 parameters, the same all in float32), cotangent last."""
    def normal(*shape, scale=1.0):
        return jnp.asarray(scale * rng.standard_normal(shape, dtype=np.float32))

    if part == "head":  # tanh'd pre-logits in, float32 logits out, whatever `dtype`
        features = jnp.tanh(normal(tokens[0], rep_size))
        f32 = (features, normal(rep_size, classes, scale=rep_size ** -0.5),
               normal(classes, scale=0.1) - 10.0, normal(tokens[0], classes))
        return (f32[0].astype(dtype), *f32[1:]), f32
    x = normal(*tokens, width)
    if part == "mlp":
        params = (normal(width, mlp_dim, scale=width ** -0.5), normal(mlp_dim, scale=0.1),
                  normal(mlp_dim, width, scale=mlp_dim ** -0.5), normal(width, scale=0.1))
        cotangent = normal(*tokens, width)
    else:
        head_dim = width // heads
        params = tuple(p for _ in range(3) for p in (
            normal(width, heads, head_dim, scale=width ** -0.5), normal(heads, head_dim, scale=0.1)))
        cotangent = normal(3, *tokens, heads, head_dim)
    f32 = (x, *params, cotangent)
    cast = (x.astype(dtype), *params, cotangent.astype(dtype))
    return cast, f32


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.block_parts",
        description="Forward+backward time of a ViT block's MLP and q/k/v projections, and of the "
                    "classifier head, each alone, as the model computes them and in a candidate "
                    "form (fewer bytes moved; bf16 head operands).")
    parser.add_argument("--variant", default="B/16", help="ViT variant: sets width, MLP width, heads")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--tokens", type=int, default=0,
                        help="tokens per image; 0 = patches + class token, padded to an even count "
                             "as the model does on GPUs")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--parts", default="mlp,qkv,head", help=f"comma-separated, of {sorted(PARTS)}")
    parser.add_argument("--num_classes", type=int, default=NUM_COYO_CLASSES, help="classes of the head part")
    parser.add_argument("--rep_size", type=int, default=1024, help="pre-logits width of the head part")
    parser.add_argument("--iters", type=int, default=20, help="timed calls; the median is reported")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        parser.error(f"--parts {args.parts!r}: unknown {unknown}; valid: {sorted(PARTS)}")

    dims = decode_variant(args.variant)
    length = args.tokens or (args.image_size // dims["patch_size"]) ** 2 + 1
    length += 0 if args.tokens else length % 2
    tokens = (args.batch, length)
    rng = np.random.default_rng(0)
    device = jax.devices()[0]
    print(f"{args.variant} block parts: batch {args.batch} x {length} tokens, width {dims['width']}, "
          f"MLP {dims['mlp_dim']}, {dims['num_heads']} heads, {args.dtype}; device {device.device_kind}")
    rows = []
    for part in parts:
        inputs, f32 = part_inputs(part, tokens, dims["width"], dims["mlp_dim"], dims["num_heads"],
                                  args.dtype, rng, args.rep_size, args.num_classes)
        baseline = next(iter(PARTS[part].values()))
        reference = forward_backward(baseline)(*f32)
        part_rows = [dict(bench(name, fn, inputs, reference, args.iters), part=part)
                     for name, fn in PARTS[part].items()]
        print(report.table(part_rows, [("part", "part"), ("implementation", "implementation"),
                                       ("ms", "fwd+bwd ms"), *RESULT_COLUMNS]))
        rows += part_rows
    write_rows(args.out, "block_parts", rows, variant=args.variant, batch=args.batch,
               tokens=length, dtype=args.dtype)
    return rows


if __name__ == "__main__":
    main()
