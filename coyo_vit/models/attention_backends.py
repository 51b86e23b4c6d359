"""Which kernel computes attention's score/softmax/value product, and the padding cuDNN needs.

`attend` is what `attention.Attention` calls between its projections: XLA's attention, or cuDNN's
fused (flash) kernel on GPUs, with the sequence padded to a length cuDNN accepts and the padded
keys masked; `pad_once_multiple` is the length the model pads its tokens to before the blocks,
so that no block has to. Pure functions of [batch, length, heads, head_dim] arrays; no
parameters.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

Array = jax.Array

# None / "xla": XLA's attention; "cudnn": cuDNN's fused kernel (GPU only, fails elsewhere);
# "auto": cuDNN on GPUs where it accepts the shapes, XLA everywhere else.
IMPLEMENTATIONS = (None, "xla", "cudnn", "auto")

# jax (0.10, 0.11) refuses odd sequence lengths for cuDNN's fused attention in training: its
# check counts the empty placeholder it passes for "no bias" as a bias, and with a bias cuDNN
# needs even lengths. So 197 tokens (ViT's 14x14 patches + class token) are padded to 198, the
# padded key masked. On an H100 (B/16, batch 256, forward + backward) attention padded to 198
# took 1.61 ms, to 208 1.62 ms, to 256 1.79 ms; XLA's 3.45 ms. A multiple of 64 stays as the
# last resort for versions that would want whole tiles.
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
        kv_lengths = nn.with_logical_constraint(
            jnp.full((query.shape[0],), kv_length, jnp.int32), ("batch",))
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
