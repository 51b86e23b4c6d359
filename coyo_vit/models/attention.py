"""Multi-head attention with the parameter layout of released ViT checkpoints.

The query/key/value kernels are [D, H, D/H] and the output kernel [H, D/H, D], as flax's
MultiHeadDotProductAttention stores them (and vit_jax / big_vision checkpoints with it), so
importing a checkpoint is a renaming. The score/softmax/value product in between is
`attention_backends.attend`: XLA's, or cuDNN's fused kernel on GPUs.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from coyo_vit.models import attention_backends
from coyo_vit.models.logical_axes import HEADS, TOKENS, boxed, constrain

Array = jax.Array


class SplitHeadsDense(nn.Module):
    """[..., D] -> [..., H, D/H] projection with a [D, H, D/H] kernel (query/key/value).

    Written out rather than using nn.DenseGeneral: DenseGeneral calls the initializer on a
    flattened 2-D kernel, and a 3-name logical box on a 2-D value fails as soon as a global
    mesh is set (`jax.set_mesh`). Here the initializer sees the real shape; its fans are
    computed over the grouped axes, so the distribution is the one DenseGeneral would give.
    The parameters are made in `setup`, so `Attention` can read `kernel` and `bias` of all three
    projections and run them as one product (`fused_qkv`) under the same parameter names.
    """

    in_features: int
    num_heads: int
    head_dim: int
    dtype: Any = jnp.float32

    def setup(self) -> None:
        self.kernel = self.param(
            "kernel", boxed(nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2)), ("embed", "heads", "kv")),
            (self.in_features, self.num_heads, self.head_dim), jnp.float32)
        self.bias = self.param("bias", boxed(nn.initializers.zeros, ("heads", "kv")),
                               (self.num_heads, self.head_dim), jnp.float32)

    def __call__(self, x: Array) -> Array:
        y = jnp.einsum("...d,dhk->...hk", x.astype(self.dtype), self.kernel.astype(self.dtype))
        return y + self.bias.astype(self.dtype)


class MergeHeadsDense(nn.Module):
    """[..., H, D/H] -> [..., D] projection with a [H, D/H, D] kernel (the attention output)."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param(
            "kernel", boxed(nn.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2), ("heads", "kv", "embed")),
            (x.shape[-2], x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", boxed(nn.initializers.zeros, ("embed",)), (self.features,), jnp.float32)
        y = jnp.einsum("...hk,hkd->...d", x.astype(self.dtype), kernel.astype(self.dtype))
        return y + bias.astype(self.dtype)


class Attention(nn.Module):
    """Multi-head attention with flax's MultiHeadDotProductAttention parameter layout.

    The score/softmax/value product is `attention_backends.attend` (XLA's, or cuDNN's fused
    kernel on GPUs, padded to a length it accepts); the projections keep the [D, H, D/H]
    kernels that released checkpoints store. With `fused_qkv`, self-attention computes query,
    key and value as one product over the three kernels stacked (same parameters, same values
    up to rounding order): one GEMM of three times the width and one bias add instead of three.
    """

    num_heads: int
    dtype: Any = jnp.float32
    implementation: str | None = None
    kv_length: int | None = None  # keys from here on are padding (the encoder padded once)
    fused_qkv: bool = False

    @nn.compact
    def __call__(self, inputs_q: Array, inputs_kv: Array) -> Array:
        width = inputs_q.shape[-1]
        head_dim = width // self.num_heads
        query, key, value = (
            SplitHeadsDense(x.shape[-1], self.num_heads, head_dim, dtype=self.dtype, name=name)
            for name, x in (("query", inputs_q), ("key", inputs_kv), ("value", inputs_kv)))
        if self.fused_qkv and inputs_q is inputs_kv:
            # A 2-D product with a 1-D bias along its minor axis: the form XLA's GEMM rewriter can
            # fold into a cuBLASLt bias epilogue (it does not take the [H, D/H] bias of the
            # unfused projections). Heads outermost ([D, H, 3, D/H]): a head-sharded kernel stays
            # sharded through the reshape; with q/k/v outermost, XLA gathers the whole kernel on
            # every device.
            kernel = jnp.stack([p.kernel for p in (query, key, value)], axis=2)
            bias = jnp.stack([p.bias for p in (query, key, value)], axis=1).reshape(-1)
            qkv = inputs_q.astype(self.dtype) @ kernel.reshape(width, -1).astype(self.dtype)
            qkv = (qkv + bias.astype(self.dtype)).reshape(*qkv.shape[:-1], self.num_heads, 3, head_dim)
            query, key, value = (constrain(qkv[..., :, i, :], HEADS) for i in range(3))
        else:
            query, key, value = (constrain(p(x), HEADS) for p, x in (
                (query, inputs_q), (key, inputs_kv), (value, inputs_kv)))
        out = attention_backends.attend(query, key, value, self.implementation, self.kv_length)
        out = constrain(out, HEADS)
        out = MergeHeadsDense(width, dtype=self.dtype, name="out")(out)
        return constrain(out, TOKENS)
