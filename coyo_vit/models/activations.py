"""The MLP's GELU, in the two forms whose backward passes keep different tensors.

`gelu` is flax's `nn.gelu` (tanh approximation, as vit_jax and big_vision train with). Under
autodiff its backward pass reads the tanh that the forward pass saved next to the output.
`gelu_recomputed` computes the same values and gradients but keeps only its input and recomputes
tanh in the backward pass: per MLP one [tokens, mlp_dim] tensor less written by the forward pass
and read by the backward pass, and a GELU whose intermediates have one user each, the form
XLA's GEMM rewriter folds into a cuBLASLt epilogue with the bias. On an H100 that fold (with
Triton's GEMM fusion off, coyo_vit/compiler_options.py) is where the time comes from: B/16 bf16
batch 256, 76.5 -> 73.4 ms; the recompute alone, with the bias add left outside the GEMM, saved
memory (19.5 -> 16.0 GiB) but no time (docs/performance.md, section 3).
"""
from __future__ import annotations

import jax

Array = jax.Array


def gelu(x: Array) -> Array:
    """tanh-approximate GELU, exactly flax's `nn.gelu` default."""
    return jax.nn.gelu(x, approximate=True)


@jax.custom_vjp
def gelu_recomputed(x: Array) -> Array:
    """`gelu` whose backward pass keeps only `x` (see the module docstring)."""
    return gelu(x)


def _forward(x: Array) -> tuple[Array, Array]:
    return gelu(x), x


def _backward(x: Array, cotangent: Array) -> tuple[Array]:
    # Without the barrier XLA's common-subexpression pass merges the recomputed tanh with the
    # forward pass's, and the forward fusion writes it out again (seen in the compiled HLO).
    x = jax.lax.optimization_barrier(x)
    return jax.vjp(gelu, x)[1](cotangent)


gelu_recomputed.defvjp(_forward, _backward)
