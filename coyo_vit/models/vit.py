"""Vision Transformer (Flax linen) with vit_jax / big_vision parameter names.

Parameter names and shapes follow google-research/vision_transformer (per-layer
`encoderblock_{i}`) and big_vision (`encoderblock` stacked under `nn.scan`, `MAPHead_0`), so
importing or exporting their checkpoints is a renaming, never a reshaping. Every parameter is
created boxed with logical axis names and every large activation is annotated, so the same
module shards by config on a pod and runs unchanged on one CPU. The layers it is made of (input
range, axis names, GELU, attention and its kernels) are layers.py.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from coyo_vit.models import layers
from coyo_vit.models.layers import HIDDEN, LOGITS, TOKENS, Attention, boxed, constrain

Array = jax.Array

# Sizes from the ViT papers (Dosovitskiy et al. 2021; Zhai et al. 2022 for g and G).
VARIANTS: dict[str, dict[str, int]] = {
    "Ti": dict(width=192, depth=12, mlp_dim=768, num_heads=3),
    "S": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "M": dict(width=512, depth=12, mlp_dim=2048, num_heads=8),
    "B": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
    "L": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
    "H": dict(width=1280, depth=32, mlp_dim=5120, num_heads=16),
    "g": dict(width=1408, depth=40, mlp_dim=6144, num_heads=16),
    "G": dict(width=1664, depth=48, mlp_dim=8192, num_heads=16),
}

POOL_TYPES = ("tok", "gap", "map")
POSEMB_TYPES = ("learn", "sincos2d")
ATTENTION_IMPLS = layers.IMPLEMENTATIONS
# Model fields that change speed and memory but not the parameters (nor, but for rounding, the
# values): evaluating a checkpoint takes them from the config, the rest from the checkpoint.
SPEED_OPTIONS = ("attention_impl", "attention_pad_multiple", "gelu_recompute")

# "none" means no rematerialisation at all; every other name is a jax.checkpoint policy
# ("full" is the usual alias for saving nothing, i.e. recomputing the whole block).
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}

_VARIANT_RE = re.compile(r"^(?P<name>[A-Za-z]+)/(?P<patch>[1-9][0-9]*)$")

def decode_variant(variant: str) -> dict[str, int]:
    """Turns "<name>/<patch>" (e.g. "L/16") into width, depth, mlp_dim, num_heads, patch_size."""
    match = _VARIANT_RE.match(variant) if isinstance(variant, str) else None
    if match is None or match["name"] not in VARIANTS:
        raise ValueError(
            f"Unknown ViT variant {variant!r}: expected '<name>/<patch size>' with name in "
            f"{sorted(VARIANTS)}, e.g. 'B/16' or 'L/14'.")
    return dict(VARIANTS[match["name"]], patch_size=int(match["patch"]))


def count_params(params: Any) -> int:
    """Number of scalars in a parameter tree; boxed, plain and `jax.eval_shape` trees alike."""
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))


def posemb_sincos_2d(height: int, width: int, dim: int, temperature: float = 10_000.0) -> Array:
    """Fixed 2-D sin-cos position embedding [1, height*width, dim] (row-major patch order).

    A quarter of the channels each hold sin/cos of the column and of the row index, at
    geometrically spaced frequencies, so resolution changes need no interpolated parameter.
    """
    if dim % 4:
        raise ValueError(f"posemb='sincos2d' needs a width divisible by 4, got width={dim}.")
    quarter = dim // 4
    rows, cols = np.mgrid[:height, :width]
    omega = np.arange(quarter) / max(quarter - 1, 1)
    omega = 1.0 / temperature**omega
    angle_x = cols.reshape(-1)[:, None] * omega[None, :]
    angle_y = rows.reshape(-1)[:, None] * omega[None, :]
    table = np.concatenate(
        [np.sin(angle_x), np.cos(angle_x), np.sin(angle_y), np.cos(angle_y)], axis=1)
    return jnp.asarray(table[None], dtype=jnp.float32)


class MlpBlock(nn.Module):
    """Dense -> GELU(tanh) -> Dropout -> Dense -> Dropout, as in vit_jax.

    `gelu_recompute`: the GELU's backward pass keeps only its input (layers.gelu_recomputed).
    `gelu_approximate=False`: the exact erf GELU instead, as PyTorch ViTs (timm, HF) use.
    """

    mlp_dim: int
    dropout: float = 0.0
    dtype: Any = jnp.float32
    gelu_recompute: bool = True
    gelu_approximate: bool = True

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        width = x.shape[-1]
        x = nn.Dense(
            self.mlp_dim, dtype=self.dtype, param_dtype=jnp.float32,
            kernel_init=boxed(nn.initializers.xavier_uniform(), ("embed", "mlp")),
            bias_init=boxed(nn.initializers.normal(stddev=1e-6), ("mlp",)), name="Dense_0")(x)
        x = constrain(x, HIDDEN)
        if not self.gelu_approximate:
            x = jax.nn.gelu(x, approximate=False)
        else:
            x = (layers.gelu_recomputed if self.gelu_recompute else layers.gelu)(x)
        x = nn.Dropout(rate=self.dropout)(x, deterministic)
        x = nn.Dense(
            width, dtype=self.dtype, param_dtype=jnp.float32,
            kernel_init=boxed(nn.initializers.xavier_uniform(), ("mlp", "embed")),
            bias_init=boxed(nn.initializers.normal(stddev=1e-6), ("embed",)), name="Dense_1")(x)
        x = constrain(x, TOKENS)
        return nn.Dropout(rate=self.dropout)(x, deterministic)


def _layer_norm(name: str, dtype: Any, epsilon: float = 1e-6) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=epsilon, dtype=dtype, param_dtype=jnp.float32,
        scale_init=boxed(nn.initializers.ones, ("embed",)),
        bias_init=boxed(nn.initializers.zeros, ("embed",)), name=name)


def _drop_path(module: nn.Module, x: Array, rate: Array | float) -> Array:
    """Drops whole residual branches per example, rescaling the survivors (stochastic depth).

    `rate` may be traced: under `nn.scan` each layer receives its own rate as a scanned input.
    """
    keep = 1.0 - jnp.asarray(rate, jnp.float32)
    mask = jax.random.bernoulli(module.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros((), x.dtype))


class Encoder1DBlock(nn.Module):
    """Pre-LN transformer block; `drop_path_rate` is this layer's stochastic-depth rate."""

    mlp_dim: int
    num_heads: int
    dropout: float = 0.0
    use_drop_path: bool = False
    dtype: Any = jnp.float32
    attention_impl: str | None = None
    kv_length: int | None = None  # tokens from here on are padding that attention must ignore
    gelu_recompute: bool = True
    gelu_approximate: bool = True
    layer_norm_eps: float = 1e-6

    @nn.compact
    def __call__(self, x: Array, drop_path_rate: Array | float, deterministic: bool) -> tuple[Array, None]:
        x = constrain(x, TOKENS)
        drop_path = self.use_drop_path and not deterministic

        y = _layer_norm("LayerNorm_0", self.dtype, self.layer_norm_eps)(x)
        y = Attention(num_heads=self.num_heads, dtype=self.dtype, implementation=self.attention_impl,
                      kv_length=self.kv_length, name="MultiHeadDotProductAttention_1")(y, y)
        y = nn.Dropout(rate=self.dropout)(y, deterministic)
        if drop_path:
            y = _drop_path(self, y, drop_path_rate)
        x = x + y

        y = _layer_norm("LayerNorm_2", self.dtype, self.layer_norm_eps)(x)
        y = MlpBlock(mlp_dim=self.mlp_dim, dropout=self.dropout, dtype=self.dtype,
                     gelu_recompute=self.gelu_recompute, gelu_approximate=self.gelu_approximate,
                     name="MlpBlock_3")(y, deterministic)
        if drop_path:
            y = _drop_path(self, y, drop_path_rate)
        x = constrain(x + y, TOKENS)
        # The (carry, output) pair is what nn.scan expects; the loop path ignores the None.
        return x, None


class Encoder(nn.Module):
    """Position embedding, dropout, the block stack and the final LayerNorm ("Transformer")."""

    depth: int
    mlp_dim: int
    num_heads: int
    posemb: str = "learn"
    grid: tuple[int, int] = (1, 1)
    has_cls: bool = True
    dropout: float = 0.0
    stoch_depth: float = 0.0
    scan: bool = False
    remat_policy: str = "none"
    dtype: Any = jnp.float32
    attention_impl: str | None = None
    pad_multiple: int | None = None  # pad the tokens once to a multiple of this (see Model)
    gelu_recompute: bool = True
    gelu_approximate: bool = True
    layer_norm_eps: float = 1e-6

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        x = x + self._position_embedding(x.shape[1], x.shape[2]).astype(self.dtype)
        x = nn.Dropout(rate=self.dropout)(x, deterministic)
        length = x.shape[1]
        extra = -length % self.pad_multiple if self.pad_multiple else 0
        if extra:  # padded tokens run through the blocks, are never attended to, then dropped
            x = jnp.pad(x, ((0, 0), (0, extra), (0, 0)))

        # timm/big_vision convention: rate grows linearly from 0 (first block) to stoch_depth.
        rates = np.linspace(0.0, self.stoch_depth, self.depth, dtype=np.float32)
        block_kwargs = dict(mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout=self.dropout,
                            use_drop_path=self.stoch_depth > 0, dtype=self.dtype,
                            attention_impl=self.attention_impl,
                            kv_length=length if self.pad_multiple else None,
                            gelu_recompute=self.gelu_recompute,
                            gelu_approximate=self.gelu_approximate, layer_norm_eps=self.layer_norm_eps)
        block_cls = Encoder1DBlock
        policy = REMAT_POLICIES[self.remat_policy]
        if self.remat_policy != "none":
            # static_argnums counts `self` as 0: argument 3 is `deterministic`. Under scan the
            # loop already blocks CSE, so prevent_cse would only cost speed.
            block_cls = nn.remat(Encoder1DBlock, policy=policy, prevent_cse=not self.scan,
                                 static_argnums=(3,))

        if self.scan:
            stack = nn.scan(
                block_cls, variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast), length=self.depth,
                metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = stack(name="encoderblock", **block_kwargs)(x, jnp.asarray(rates), deterministic)
        else:
            for i in range(self.depth):
                x, _ = block_cls(name=f"encoderblock_{i}", **block_kwargs)(
                    x, float(rates[i]), deterministic)

        return _layer_norm("encoder_norm", self.dtype, self.layer_norm_eps)(x[:, :length])

    def _position_embedding(self, length: int, width: int) -> Array:
        if self.posemb == "learn":
            return PositionEmbedding(name="posembed_input")(length, width)
        table = posemb_sincos_2d(*self.grid, width)
        if self.has_cls:  # the class token gets no position signal
            table = jnp.concatenate([jnp.zeros((1, 1, width), table.dtype), table], axis=1)
        return table


class PositionEmbedding(nn.Module):
    """Learned position embedding; kept as its own scope for the `posembed_input` name."""

    @nn.compact
    def __call__(self, length: int, width: int) -> Array:
        return self.param(
            "pos_embedding", boxed(nn.initializers.normal(stddev=0.02), (None, "length", "embed")),
            (1, length, width), jnp.float32)


class MAPHead(nn.Module):
    """Multihead attention pooling (big_vision): a learned probe attends over all tokens."""

    mlp_dim: int
    num_heads: int
    dtype: Any = jnp.float32
    attention_impl: str | None = None
    gelu_approximate: bool = True
    layer_norm_eps: float = 1e-6

    @nn.compact
    def __call__(self, x: Array) -> Array:
        batch, _, width = x.shape
        probe = self.param("probe", boxed(nn.initializers.xavier_uniform(), (None, None, "embed")),
                           (1, 1, width), jnp.float32)
        probe = jnp.tile(probe.astype(self.dtype), (batch, 1, 1))
        x = Attention(num_heads=self.num_heads, dtype=self.dtype, implementation=self.attention_impl,
                      name="MultiHeadDotProductAttention_0")(probe, x)
        y = _layer_norm("LayerNorm_0", self.dtype, self.layer_norm_eps)(x)
        x = x + MlpBlock(mlp_dim=self.mlp_dim, dtype=self.dtype, gelu_approximate=self.gelu_approximate,
                         name="MlpBlock_0")(y)
        return x[:, 0]


@dataclasses.dataclass(frozen=True)
class ViTDims:
    """The architecture sizes once `variant` and explicit overrides are merged."""

    patch_size: int
    width: int
    depth: int
    mlp_dim: int
    num_heads: int


class Model(nn.Module):
    """ViT classifier over NHWC images in [-1, 1], or uint8 pixels it maps there
    (layers.to_model_range).

    `attention_impl="auto"` (the default) runs attention in cuDNN's fused kernel on GPUs, with
    the tokens padded once to an even length for it (a much faster training step than XLA's
    attention on GPUs, docs/performance.md section 3), and in XLA elsewhere; the parameters and
    values are the same either way.

    The defaults here are the speed options' defaults too: configs build `config.model` from
    them (configs/common.py:model_config) and name only what they change.

    `__call__(images, train=False, return_features=False)` returns float32 logits
    [batch, num_classes], or `(logits, features)` where features are the pooled
    representation right before the head (after pre-logits when `rep_size` is set). With
    `num_classes` 0/None there is no head: the features are returned in place of logits.
    """

    num_classes: int | None = 1000
    variant: str | None = None
    patch_size: int | None = None
    width: int | None = None
    depth: int | None = None
    mlp_dim: int | None = None
    num_heads: int | None = None
    pool_type: str = "tok"
    rep_size: int | bool | None = None
    dropout: float = 0.0
    stoch_depth: float = 0.0
    head_kernel_init: float = 0.0
    head_bias_init: float = 0.0
    posemb: str = "learn"
    scan: bool = False
    remat_policy: str = "none"
    dtype: str | Any = "float32"
    attention_impl: str | None = "auto"
    # Pads the token sequence once, before the blocks, to a multiple of this (padded tokens are
    # masked as keys and dropped after the blocks), so cuDNN's attention gets a length it accepts
    # without every block padding and slicing q/k/v. None (default): 2 where cuDNN attention is
    # used (GPU, 16-bit dtype; 197 -> 198 tokens), no padding elsewhere; 1: never pad once (blocks
    # pad for cuDNN themselves). What padding once saves: docs/performance.md, section 3.
    # Dropout masks are drawn over the padded shape, so runs with dropout differ from unpadded ones
    # (by default: GPU runs from CPU runs, and from runs before the padding existed).
    attention_pad_multiple: int | None = None
    # The GELU's backward pass recomputes tanh from its input instead of keeping it
    # (layers.gelu_recomputed): the same values and parameters, less device memory, and on GPUs,
    # with the steps' compiler options (coyo_vit/training/step.py), the bias and GELU fold into
    # the GEMM's cuBLASLt epilogue, a faster step. Measured: docs/performance.md, section 3.
    gelu_recompute: bool = True
    # The numerics of imported PyTorch ViTs (checkpoints/ sets them from the checkpoint's config):
    # timm and Hugging Face use the exact erf GELU, and HF's ViT LayerNorms default to eps 1e-12.
    # Ours, vit_jax's and big_vision's: tanh GELU, eps 1e-6.
    gelu_approximate: bool = True
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        # Validate at construction so a bad config fails before any tracing or compilation.
        _check_choice("pool_type", self.pool_type, POOL_TYPES)
        _check_choice("posemb", self.posemb, POSEMB_TYPES)
        _check_choice("remat_policy", self.remat_policy, tuple(REMAT_POLICIES))
        _check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
        for field in ("scan", "gelu_recompute", "gelu_approximate"):
            if not isinstance(getattr(self, field), (bool, np.bool_)):
                raise ValueError(f"{field} must be True or False, got {getattr(self, field)!r}.")
        for field in ("dropout", "stoch_depth"):
            rate = getattr(self, field)
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"{field} must be in [0, 1), got {rate!r}.")
        if isinstance(self.layer_norm_eps, bool) or not (
                isinstance(self.layer_norm_eps, (int, float, np.floating)) and self.layer_norm_eps > 0):
            raise ValueError(f"layer_norm_eps must be a positive float, got {self.layer_norm_eps!r}.")
        dims = self.dims
        if dims.width % dims.num_heads:
            raise ValueError(f"width={dims.width} is not divisible by num_heads={dims.num_heads}.")
        if self.attention_pad_multiple is not None and (
                isinstance(self.attention_pad_multiple, bool)
                or not isinstance(self.attention_pad_multiple, (int, np.integer))
                or self.attention_pad_multiple < 1):
            raise ValueError(f"attention_pad_multiple must be None or a positive int, got "
                             f"{self.attention_pad_multiple!r}.")
        if not isinstance(self.rep_size, (bool, type(None))) and (
                not isinstance(self.rep_size, (int, np.integer)) or self.rep_size <= 0):
            raise ValueError(f"rep_size must be None, True (= width) or a positive int, got {self.rep_size!r}.")
        try:
            jnp.dtype(self.dtype)
        except TypeError as err:
            raise ValueError(f"dtype={self.dtype!r} is not a dtype; use e.g. 'float32' or 'bfloat16'.") from err
        super().__post_init__()

    @property
    def dims(self) -> ViTDims:
        """Sizes from `variant`, each overridable by the field of the same name."""
        base = decode_variant(self.variant) if self.variant is not None else {}
        sizes = {}
        for field in ("patch_size", "width", "depth", "mlp_dim", "num_heads"):
            value = getattr(self, field)
            value = base.get(field) if value is None else value
            if value is None:
                raise ValueError(
                    f"Model needs `{field}`: set variant (one of {sorted(VARIANTS)} + '/<patch>', "
                    f"e.g. 'B/16') or pass {field}= explicitly.")
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{field} must be a positive int, got {value!r}.")
            sizes[field] = int(value)
        return ViTDims(**sizes)

    @property
    def token_pad_multiple(self) -> int | None:
        """What the encoder pads the tokens to a multiple of (None: nothing): the configured
        `attention_pad_multiple`, or when unset what the attention backend wants."""
        if self.attention_pad_multiple is not None:
            return self.attention_pad_multiple
        return layers.pad_once_multiple(self.attention_impl, self.dtype)

    @property
    def representation_size(self) -> int | None:
        """Pre-logits width: None (no layer), or an int; `True` means the encoder width."""
        if self.rep_size is None or self.rep_size is False:
            return None
        return self.dims.width if self.rep_size is True else int(self.rep_size)

    @nn.compact
    def __call__(self, images: Array, train: bool = False,
                 return_features: bool = False) -> Array | tuple[Array, Array]:
        if images.ndim != 4:
            raise ValueError(f"images must be NHWC [batch, height, width, channels], got shape {images.shape}.")
        dims = self.dims
        dtype = jnp.dtype(self.dtype)
        deterministic = not train
        patch = dims.patch_size
        if images.shape[1] % patch or images.shape[2] % patch:
            raise ValueError(f"Image size {images.shape[1]}x{images.shape[2]} is not a multiple of "
                             f"patch_size={patch}.")

        x = nn.Conv(
            dims.width, (patch, patch), strides=(patch, patch), padding="VALID",
            dtype=dtype, param_dtype=jnp.float32,
            kernel_init=boxed(nn.initializers.lecun_normal(), ("patch_h", "patch_w", "channels", "embed")),
            bias_init=boxed(nn.initializers.zeros, ("embed",)),
            name="embedding")(layers.to_model_range(images, dtype))
        batch, grid_h, grid_w, width = x.shape
        x = constrain(jnp.reshape(x, (batch, grid_h * grid_w, width)), TOKENS)

        if self.pool_type == "tok":
            cls = self.param("cls", boxed(nn.initializers.zeros, (None, None, "embed")),
                             (1, 1, width), jnp.float32)
            x = jnp.concatenate([jnp.tile(cls.astype(dtype), (batch, 1, 1)), x], axis=1)

        x = Encoder(
            depth=dims.depth, mlp_dim=dims.mlp_dim, num_heads=dims.num_heads, posemb=self.posemb,
            grid=(grid_h, grid_w), has_cls=self.pool_type == "tok", dropout=self.dropout,
            stoch_depth=self.stoch_depth, scan=self.scan, remat_policy=self.remat_policy,
            dtype=dtype, attention_impl=self.attention_impl,
            pad_multiple=self.token_pad_multiple, gelu_recompute=self.gelu_recompute,
            gelu_approximate=self.gelu_approximate,
            layer_norm_eps=self.layer_norm_eps, name="Transformer")(x, deterministic)

        if self.pool_type == "tok":
            x = x[:, 0]
        elif self.pool_type == "gap":
            x = jnp.mean(x, axis=1)
        else:
            x = MAPHead(mlp_dim=dims.mlp_dim, num_heads=dims.num_heads, dtype=dtype,
                        attention_impl=self.attention_impl, gelu_approximate=self.gelu_approximate,
                        layer_norm_eps=self.layer_norm_eps, name="MAPHead_0")(x)

        feature_axis = "embed"
        rep = self.representation_size
        if rep is not None:
            x = nn.Dense(rep, dtype=dtype, param_dtype=jnp.float32,
                         kernel_init=boxed(nn.initializers.lecun_normal(), ("embed", "rep")),
                         bias_init=boxed(nn.initializers.zeros, ("rep",)), name="pre_logits")(x)
            x = jnp.tanh(x)
            feature_axis = "rep"
        features = x.astype(jnp.float32)

        if not self.num_classes:
            return (features, features) if return_features else features

        # The head runs in float32 whatever the compute dtype: sigmoid losses summed over 21k
        # classes are sensitive to bf16 logit rounding (step 0.0625 around the -10 bias).
        logits = nn.Dense(
            self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32,
            kernel_init=boxed(nn.initializers.constant(self.head_kernel_init), (feature_axis, "classes")),
            bias_init=boxed(nn.initializers.constant(self.head_bias_init), ("classes",)),
            name="head")(features)
        logits = constrain(logits, LOGITS)
        return (logits, features) if return_features else logits


def _check_choice(field: str, value: Any, valid: tuple[Any, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{field}={value!r} is not supported; valid values: {list(valid)}.")
