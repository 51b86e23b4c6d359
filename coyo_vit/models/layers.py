"""The layers the ViT is made of: its input range, axis names, GELU and attention.

`vit.py` assembles these into the model; nothing here knows the model's sizes or its config.

- Pixels: every released ViT checkpoint expects images mapped to [-1, 1] as (x - 127.5) / 127.5.
  The training pipelines send uint8 images (4x fewer bytes to copy, batch and transfer than
  float32, and no per-pixel float work on the host) and `to_model_range` converts them on the
  device. Float images are taken as already in the model's range, so a pp ending in
  value_range(-1, 1) (or any custom range) keeps working unchanged.
- Logical axes: every parameter is created boxed with its axis names and every large activation
  is annotated; `coyo_vit.training.sharding`'s rules map these names to mesh axes. Outside a mesh
  and rules context the annotations do nothing, so the same modules run unchanged on one CPU.
- GELU: `gelu` is flax's `nn.gelu`; `gelu_recomputed` has the same values and gradients but a
  backward pass that keeps only its input (`Model.gelu_recompute`).
- Attention: projections with the parameter layout of released checkpoints (`Attention`), and
  the score/softmax/value product in XLA or cuDNN's fused kernel (`attend`), with the padding
  cuDNN needs.

What each speed option measured is in docs/performance.md, section 3.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

Array = jax.Array

# ----------------------------------------------------------------------------------------------
# Pixels: the model's input range.

PIXEL_MAX = 255.0


def to_model_range(images: Array, dtype: jnp.dtype | None = None) -> Array:
    """Integer pixels in [0, 255] (the pipelines send uint8) -> [-1, 1]; floats pass through as
    they are. The result has `dtype`, or by default float32 for pixels and the input's own
    dtype for floats."""
    if jnp.issubdtype(images.dtype, jnp.integer):
        scale = 2.0 / PIXEL_MAX
        images = images.astype(jnp.float32) * scale - 1.0
    return images if dtype is None else images.astype(dtype)


# ----------------------------------------------------------------------------------------------
# Logical axis names, the only names sharding sees.

# Activation layouts named once so that sharding rules only ever see these tuples.
TOKENS = ("batch", "length", "embed")
HIDDEN = ("batch", "length", "mlp")
HEADS = ("batch", "length", "heads", "kv")
LOGITS = ("batch", "classes")


def boxed(init: Callable[..., Any], names: tuple[str | None, ...]) -> Callable[..., Any]:
    """Attaches logical axis names to an initializer (what the sharding rules match on)."""
    return nn.with_logical_partitioning(init, names)


def constrain(x: Array, names: tuple[str | None, ...]) -> Array:
    """Asks the partitioner to lay `x` out as the rules map `names`."""
    return nn.with_logical_constraint(x, names)


# ----------------------------------------------------------------------------------------------
# The MLP's GELU, in the two forms whose backward passes keep different tensors.
#
# Under autodiff `gelu`'s backward pass reads the tanh that the forward pass saved next to the
# output. `gelu_recomputed` keeps only its input and recomputes tanh in the backward pass: per
# MLP one [tokens, mlp_dim] tensor less written by the forward pass and read by the backward
# pass, and a GELU whose intermediates have one user each, the form XLA's GEMM rewriter folds
# into a cuBLASLt epilogue with the bias. On GPUs that fold (with Triton's GEMM fusion off, as
# coyo_vit/training/step.py compiles the steps) is where the time comes from; the recompute
# alone, with the bias add left outside the GEMM, saves memory but no time.


def gelu(x: Array) -> Array:
    """tanh-approximate GELU, exactly flax's `nn.gelu` default (as vit_jax and big_vision train)."""
    return jax.nn.gelu(x, approximate=True)


@jax.custom_vjp
def gelu_recomputed(x: Array) -> Array:
    """`gelu` whose backward pass keeps only `x` and recomputes tanh from it."""
    return gelu(x)


def _gelu_forward(x: Array) -> tuple[Array, Array]:
    return gelu(x), x


def _gelu_backward(x: Array, cotangent: Array) -> tuple[Array]:
    # Without the barrier XLA's common-subexpression pass merges the recomputed tanh with the
    # forward pass's, and the forward fusion writes it out again (seen in the compiled HLO).
    x = jax.lax.optimization_barrier(x)
    return jax.vjp(gelu, x)[1](cotangent)


gelu_recomputed.defvjp(_gelu_forward, _gelu_backward)


# ----------------------------------------------------------------------------------------------
# Attention kernels: which one computes the score/softmax/value product, and the padding cuDNN
# needs. Pure functions of [batch, length, heads, head_dim] arrays; no parameters.

# None / "xla": XLA's attention; "cudnn": cuDNN's fused kernel (GPU only, fails elsewhere);
# "auto": cuDNN on GPUs where it accepts the shapes, XLA everywhere else.
IMPLEMENTATIONS = (None, "xla", "cudnn", "auto")

# jax (0.10, 0.11) refuses odd sequence lengths for cuDNN's fused attention in training: its
# check counts the empty placeholder it passes for "no bias" as a bias, and with a bias cuDNN
# needs even lengths. So 197 tokens (ViT's 14x14 patches + class token) are padded to 198, the
# padded key masked: the smallest accepted length was also the fastest measured
# (docs/performance.md, section 3). A multiple of 64 stays as the last resort for versions that
# would want whole tiles.
CUDNN_SEQUENCE_MULTIPLE = 2
_CUDNN_FALLBACK_MULTIPLE = 64


def padded_dot_product_attention(query: Array, key: Array, value: Array, multiple: int,
                                 implementation: str | None = None,
                                 kv_length: int | None = None) -> Array:
    """`jax.nn.dot_product_attention` over [batch, length, heads, head_dim] inputs whose query
    and key lengths are padded up to `multiple`; keys from `kv_length` on (default: the key
    length, i.e. only the padding) are masked out, padded queries are dropped from the output,
    so the result and its gradients equal the unpadded attention's over the first `kv_length`
    keys."""
    q_len, kv_len = query.shape[1], key.shape[1]
    kv_length = kv_len if kv_length is None else kv_length

    def pad(x: Array, length: int) -> Array:
        extra = -length % multiple
        return jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0))) if extra else x

    key, value = pad(key, kv_len), pad(value, kv_len)
    kv_lengths = None
    if kv_length < key.shape[1]:  # laid out like the batch, as the sharded kernels expect
        kv_lengths = constrain(jnp.full((query.shape[0],), kv_length, jnp.int32), ("batch",))
    out = jax.nn.dot_product_attention(pad(query, q_len), key, value,
                                       key_value_seq_lengths=kv_lengths, implementation=implementation)
    return out[:, :q_len]


def cudnn_attention_is_default() -> bool:
    """Whether "auto" tries cuDNN: CUDA GPUs of compute capability 8.0 (Ampere) or newer, where
    its fused bf16/fp16 kernels exist; older GPUs, ROCm, CPUs and TPUs keep XLA's attention."""
    if jax.default_backend() != "gpu":
        return False
    capability = getattr(jax.devices()[0], "compute_capability", None)
    try:
        return capability is not None and float(capability) >= 8.0
    except ValueError:
        return False


def pad_once_multiple(implementation: str | None, dtype: Any) -> int | None:
    """The multiple `vit.Model` pads its token sequence to once, before the blocks, when left to
    choose: CUDNN_SEQUENCE_MULTIPLE where cuDNN's attention will be tried (a 16-bit dtype, and
    "cudnn", or "auto" on a GPU that has it), so no block pads and slices q/k/v; else None."""
    wants_cudnn = implementation == "cudnn" or (implementation == "auto" and cudnn_attention_is_default())
    sixteen_bit_float = jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize == 2
    return CUDNN_SEQUENCE_MULTIPLE if wants_cudnn and sixteen_bit_float else None


def _cudnn_training_checks(query: Array, key: Array, value: Array, multiple: int,
                           kv_length: int | None) -> None:
    """Runs cuDNN's forward-for-training rule on abstract inputs, now: under nn.scan or remat the
    real one only runs when the step is differentiated, too late for the fallback to see it."""
    def forward(q, k, v):
        return jax.vjp(lambda *qkv: padded_dot_product_attention(*qkv, multiple, "cudnn", kv_length),
                       q, k, v)[0]
    jax.eval_shape(forward, *(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (query, key, value)))


def attend(query: Array, key: Array, value: Array, implementation: str | None,
           kv_length: int | None = None) -> Array:
    """Attention over the first `kv_length` keys (None: all) with the requested implementation.

    cuDNN is tried on the sequence as given first (already padded once by the model, or a length
    this jax accepts), then padded here to CUDNN_SEQUENCE_MULTIPLE, then to a multiple of 64.
    "auto" falls back to XLA when cuDNN refuses while tracing (dtype, shape, version; the
    training checks are run up front); a refusal when XLA compiles the step has no fallback and
    needs `attention_impl="xla"`.
    """
    def xla() -> Array:
        return padded_dot_product_attention(query, key, value, 1, "xla", kv_length)

    if implementation in (None, "xla") or (implementation == "auto" and not cudnn_attention_is_default()):
        return xla()
    first_refusal: Exception | None = None
    for multiple in dict.fromkeys((1, CUDNN_SEQUENCE_MULTIPLE, _CUDNN_FALLBACK_MULTIPLE)):
        try:
            _cudnn_training_checks(query, key, value, multiple, kv_length)
            return padded_dot_product_attention(query, key, value, multiple, "cudnn", kv_length)
        except (NotImplementedError, RuntimeError) as refusal:
            first_refusal = first_refusal or refusal
    if implementation == "cudnn":  # asked for cuDNN alone: its refusal of the shapes as given
        raise first_refusal
    return xla()


# ----------------------------------------------------------------------------------------------
# Multi-head attention with the parameter layout of released ViT checkpoints: query/key/value
# kernels [D, H, D/H] and output kernel [H, D/H, D], as flax's MultiHeadDotProductAttention
# stores them (and vit_jax / big_vision checkpoints with it), so importing a checkpoint is a
# renaming.


class SplitHeadsDense(nn.Module):
    """[..., D] -> [..., H, D/H] projection with a [D, H, D/H] kernel (query/key/value).

    Written out rather than using nn.DenseGeneral: DenseGeneral calls the initializer on a
    flattened 2-D kernel, and a 3-name logical box on a 2-D value fails as soon as a global
    mesh is set (`jax.set_mesh`). Here the initializer sees the real shape; its fans are
    computed over the grouped axes, so the distribution is the one DenseGeneral would give.
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

    The projections keep the [D, H, D/H] kernels that released checkpoints store; the
    score/softmax/value product between them is `attend` (XLA's, or cuDNN's fused kernel on
    GPUs, padded to a length it accepts).
    """

    num_heads: int
    dtype: Any = jnp.float32
    implementation: str | None = None
    kv_length: int | None = None  # keys from here on are padding (the encoder padded once)

    @nn.compact
    def __call__(self, inputs_q: Array, inputs_kv: Array) -> Array:
        width = inputs_q.shape[-1]
        head_dim = width // self.num_heads
        query, key, value = (
            constrain(SplitHeadsDense(x.shape[-1], self.num_heads, head_dim, dtype=self.dtype, name=name)(x), HEADS)
            for name, x in (("query", inputs_q), ("key", inputs_kv), ("value", inputs_kv)))
        out = constrain(attend(query, key, value, self.implementation, self.kv_length), HEADS)
        out = MergeHeadsDense(width, dtype=self.dtype, name="out")(out)
        return constrain(out, TOKENS)
