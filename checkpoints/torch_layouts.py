"""Renaming between our parameter tree and the PyTorch ViTs of transformers and timm.

Both keep PyTorch's conventions: Linear weights are [out, in] (ours [in, out]), the patch
embedding is a Conv2d [D, 3, p, p] (ours HWIO [p, p, 3, D]), and attention projections are
plain [D, D] matrices whose rows are head-major (ours [D, H, D/H]), so heads must be known to
import and are flattened away on export. Everything else is renaming:

* transformers `ViTForImageClassification` (and `ViTModel`, whose pooler is a Dense + tanh on the
  CLS token: our pre-logits layer). transformers 4 names (`vit.encoder.layer.{i}.attention.
  attention.query`, as on the hub) and transformers 5 names (`vit.layers.{i}.attention.q_proj`)
  are both read; 5 still loads 4's, so we write 4's. A bare `ViTModel` has no `vit.` prefix.
* timm `VisionTransformer`: fused `attn.qkv` ([3D, D], rows q | k | v), `cls_token`,
  `pos_embed`, `head`; MAP pooling is `attn_pool` (latent probe, fused `kv`).

Numpy only: no torch, transformers or timm needed to convert.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from checkpoints.npz_layouts import POSEMB_KEY

_ATT = "MultiHeadDotProductAttention_1"
_BLOCK = "Transformer/encoderblock_{i}"

# Per-block tensors that are a plain rename + transpose (kind: "dense" = Linear, "norm" = LayerNorm).
# Ours (module path inside a block) -> (HF 4 name, HF 5 name, timm name) inside a layer.
_BLOCK_SIMPLE = {
    "LayerNorm_0": ("norm", "layernorm_before", "layernorm_before", "norm1"),
    "LayerNorm_2": ("norm", "layernorm_after", "layernorm_after", "norm2"),
    f"{_ATT}/out": ("att_out", "attention.output.dense", "attention.o_proj", "attn.proj"),
    "MlpBlock_3/Dense_0": ("dense", "intermediate.dense", "mlp.fc1", "mlp.fc1"),
    "MlpBlock_3/Dense_1": ("dense", "output.dense", "mlp.fc2", "mlp.fc2"),
}
_HF_QKV = {"query": ("attention.attention.query", "attention.q_proj"),
           "key": ("attention.attention.key", "attention.k_proj"),
           "value": ("attention.attention.value", "attention.v_proj")}
_HF_TOP = {"embedding": "embeddings.patch_embeddings.projection", "cls": "embeddings.cls_token",
           POSEMB_KEY: "embeddings.position_embeddings", "Transformer/encoder_norm": "layernorm",
           "pre_logits": "pooler.dense"}
_TIMM_TOP = {"embedding": "patch_embed.proj", "cls": "cls_token", POSEMB_KEY: "pos_embed",
             "Transformer/encoder_norm": "norm", "head": "head"}
_TIMM_MAP_SIMPLE = {"MAPHead_0/MultiHeadDotProductAttention_0/out": ("att_out", "attn_pool.proj"),
                    "MAPHead_0/LayerNorm_0": ("norm", "attn_pool.norm"),
                    "MAPHead_0/MlpBlock_0/Dense_0": ("dense", "attn_pool.mlp.fc1"),
                    "MAPHead_0/MlpBlock_0/Dense_1": ("dense", "attn_pool.mlp.fc2")}
HF_LAYER_RE = re.compile(r"^(?:vit\.)?(?:encoder\.layer|layers)\.(\d+)\.(.+)$")
TIMM_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def depth_of(flat: Mapping[str, Any]) -> int:
    """Encoder blocks in our loop-layout flat dict."""
    return len({k.split("/")[1] for k in flat if k.startswith("Transformer/encoderblock_")})


# --- tensors: ours <-> torch ---------------------------------------------------------------

def _to_torch(kind: str, name: str, ours: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """One module of ours -> {"weight"|"bias": torch-layout array}."""
    if kind == "norm":
        return {"weight": ours["scale"], "bias": ours["bias"]}
    if kind == "dense":
        return {"weight": np.asarray(ours["kernel"]).T, "bias": ours["bias"]}
    if kind == "split":  # [D, H, D/H] -> [H*D/H, D]
        kernel = np.asarray(ours["kernel"])
        return {"weight": kernel.reshape(kernel.shape[0], -1).T, "bias": np.asarray(ours["bias"]).reshape(-1)}
    if kind == "att_out":  # [H, D/H, D] -> [D, H*D/H]
        kernel = np.asarray(ours["kernel"])
        return {"weight": kernel.reshape(-1, kernel.shape[-1]).T, "bias": ours["bias"]}
    if kind == "conv":  # HWIO -> OIHW
        return {"weight": np.asarray(ours["kernel"]).transpose(3, 2, 0, 1), "bias": ours["bias"]}
    raise AssertionError(f"unknown kind {kind} for {name}")


def _from_torch(kind: str, torch_params: Mapping[str, np.ndarray], num_heads: int) -> dict[str, np.ndarray]:
    """Inverse of `_to_torch`; `torch_params` holds "weight" and (maybe) "bias"."""
    weight = np.asarray(torch_params["weight"])
    bias = torch_params.get("bias")
    if bias is None:  # qkv_bias=False models: a zero bias is the same function.
        bias = np.zeros(weight.shape[0], weight.dtype)
    bias = np.asarray(bias)
    if kind == "norm":
        return {"scale": weight, "bias": bias}
    if kind == "dense":
        return {"kernel": weight.T, "bias": bias}
    if kind == "split":
        out_dim, in_dim = weight.shape
        return {"kernel": weight.T.reshape(in_dim, num_heads, out_dim // num_heads),
                "bias": bias.reshape(num_heads, out_dim // num_heads)}
    if kind == "att_out":
        out_dim, in_dim = weight.shape
        return {"kernel": weight.T.reshape(num_heads, in_dim // num_heads, out_dim), "bias": bias}
    if kind == "conv":
        return {"kernel": weight.transpose(2, 3, 1, 0), "bias": bias}
    raise AssertionError(f"unknown kind {kind}")


def _module(flat: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix) + 1:]: v for k, v in flat.items() if k.startswith(prefix + "/")}


def _put(out: dict[str, Any], torch_name: str, tensors: Mapping[str, Any]) -> None:
    for leaf, value in tensors.items():
        out[f"{torch_name}.{leaf}"] = np.ascontiguousarray(np.asarray(value, np.float32))


def _take(state: dict[str, np.ndarray], torch_name: str) -> dict[str, np.ndarray]:
    """Pops `torch_name.weight` / `.bias` out of `state` (KeyError when the weight is absent)."""
    weight = state.pop(f"{torch_name}.weight")
    out = {"weight": weight}
    if f"{torch_name}.bias" in state:
        out["bias"] = state.pop(f"{torch_name}.bias")
    return out


def _put_ours(flat: dict[str, Any], ours_name: str, params: Mapping[str, np.ndarray]) -> None:
    for leaf, value in params.items():
        flat[f"{ours_name}/{leaf}"] = np.asarray(value, np.float32)


def _unknown_error(what: str, keys: list[str]) -> ValueError:
    return ValueError(f"{what} has tensors our ViT does not describe: {sorted(keys)[:8]}"
                      f"{' ...' if len(keys) > 8 else ''}")


# --- transformers --------------------------------------------------------------------------

def ours_to_hf(flat: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Our flat params (loop layout, tok pooling, no pre-logits) -> ViTForImageClassification's
    state dict in transformers 4 names (which 4 and 5 both load)."""
    out: dict[str, np.ndarray] = {}
    _put(out, "vit.embeddings.patch_embeddings.projection", _to_torch("conv", "embedding", _module(flat, "embedding")))
    out["vit.embeddings.cls_token"] = np.ascontiguousarray(np.asarray(flat["cls"], np.float32))
    out["vit.embeddings.position_embeddings"] = np.ascontiguousarray(np.asarray(flat[POSEMB_KEY], np.float32))
    for i in range(depth_of(flat)):
        block = _BLOCK.format(i=i)
        layer = f"vit.encoder.layer.{i}"
        for ours, (kind, hf4, _, _) in _BLOCK_SIMPLE.items():
            _put(out, f"{layer}.{hf4}", _to_torch(kind, ours, _module(flat, f"{block}/{ours}")))
        for ours, (hf4, _) in _HF_QKV.items():
            _put(out, f"{layer}.{hf4}", _to_torch("split", ours, _module(flat, f"{block}/{_ATT}/{ours}")))
    _put(out, "vit.layernorm", _to_torch("norm", "encoder_norm", _module(flat, "Transformer/encoder_norm")))
    if "head/kernel" in flat:
        _put(out, "classifier", _to_torch("dense", "head", _module(flat, "head")))
    return out


def hf_to_ours(state: Mapping[str, np.ndarray], num_heads: int) -> dict[str, np.ndarray]:
    """A transformers ViT state dict (4 or 5 names, with or without the `vit.` prefix) -> our
    flat names. A `ViTModel` pooler becomes the pre-logits layer when there is no classifier
    (ViTForImageClassification never runs it)."""
    state = {k: np.asarray(v) for k, v in state.items()}
    prefix = "vit." if any(k.startswith("vit.") for k in state) else ""
    flat: dict[str, np.ndarray] = {}
    try:
        _put_ours(flat, "embedding", _from_torch("conv", _take(state, f"{prefix}{_HF_TOP['embedding']}"), num_heads))
        flat["cls"] = state.pop(f"{prefix}embeddings.cls_token").astype(np.float32)
        flat[POSEMB_KEY] = state.pop(f"{prefix}embeddings.position_embeddings").astype(np.float32)
        _put_ours(flat, "Transformer/encoder_norm", _from_torch("norm", _take(state, f"{prefix}layernorm"), num_heads))
    except KeyError as err:
        raise ValueError(f"not a transformers ViT state dict: it lacks {err.args[0]!r}") from None
    state.pop(f"{prefix}embeddings.mask_token", None)  # ViTForMaskedImageModeling: unused at inference.
    layers = sorted({int(m[1]) for m in map(HF_LAYER_RE.match, state) if m})
    if layers != list(range(len(layers))) or not layers:
        raise ValueError(f"transformers ViT layers are not numbered 0..N-1: found {layers}")
    for i in layers:
        block = _BLOCK.format(i=i)
        names = [n for n in (f"{prefix}encoder.layer.{i}", f"{prefix}layers.{i}")
                 if any(k.startswith(n + ".") for k in state)]
        if len(names) != 1:
            raise ValueError(f"layer {i} appears in both transformers 4 and 5 key namings")
        layer = names[0]
        v5 = layer.startswith(f"{prefix}layers.")
        try:
            for ours, (kind, hf4, hf5, _) in _BLOCK_SIMPLE.items():
                _put_ours(flat, f"{block}/{ours}", _from_torch(kind, _take(state, f"{layer}.{hf5 if v5 else hf4}"),
                                                               num_heads))
            for ours, (hf4, hf5) in _HF_QKV.items():
                _put_ours(flat, f"{block}/{_ATT}/{ours}",
                          _from_torch("split", _take(state, f"{layer}.{hf5 if v5 else hf4}"), num_heads))
        except KeyError as err:
            raise ValueError(f"transformers ViT layer {i} lacks {err.args[0]!r}") from None
    pooler = f"{prefix}pooler.dense"
    if "classifier.weight" in state:
        _put_ours(flat, "head", _from_torch("dense", _take(state, "classifier"), num_heads))
        for key in (f"{pooler}.weight", f"{pooler}.bias"):
            state.pop(key, None)  # ViTForImageClassification has no pooler: transformers ignores it too.
    elif f"{pooler}.weight" in state:
        _put_ours(flat, "pre_logits", _from_torch("dense", _take(state, pooler), num_heads))
    if state:
        raise _unknown_error("transformers ViT checkpoint", list(state))
    return flat


# --- timm ----------------------------------------------------------------------------------

def ours_to_timm(flat: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Our flat params (loop layout; tok, gap or map pooling; no pre-logits) -> timm
    VisionTransformer's state dict (`fc_norm=False`: the final norm runs before pooling, as ours)."""
    out: dict[str, np.ndarray] = {}
    _put(out, "patch_embed.proj", _to_torch("conv", "embedding", _module(flat, "embedding")))
    if "cls" in flat:
        out["cls_token"] = np.ascontiguousarray(np.asarray(flat["cls"], np.float32))
    out["pos_embed"] = np.ascontiguousarray(np.asarray(flat[POSEMB_KEY], np.float32))
    for i in range(depth_of(flat)):
        block = _BLOCK.format(i=i)
        for ours, (kind, _, _, timm_name) in _BLOCK_SIMPLE.items():
            _put(out, f"blocks.{i}.{timm_name}", _to_torch(kind, ours, _module(flat, f"{block}/{ours}")))
        qkv = [_to_torch("split", p, _module(flat, f"{block}/{_ATT}/{p}")) for p in ("query", "key", "value")]
        _put(out, f"blocks.{i}.attn.qkv", {leaf: np.concatenate([t[leaf] for t in qkv]) for leaf in ("weight", "bias")})
    _put(out, "norm", _to_torch("norm", "encoder_norm", _module(flat, "Transformer/encoder_norm")))
    if "MAPHead_0/probe" in flat:
        out["attn_pool.latent"] = np.ascontiguousarray(np.asarray(flat["MAPHead_0/probe"], np.float32))
        att = "MAPHead_0/MultiHeadDotProductAttention_0"
        _put(out, "attn_pool.q", _to_torch("split", "query", _module(flat, f"{att}/query")))
        kv = [_to_torch("split", p, _module(flat, f"{att}/{p}")) for p in ("key", "value")]
        _put(out, "attn_pool.kv", {leaf: np.concatenate([t[leaf] for t in kv]) for leaf in ("weight", "bias")})
        for ours, (kind, timm_name) in _TIMM_MAP_SIMPLE.items():
            _put(out, timm_name, _to_torch(kind, ours, _module(flat, ours)))
    if "head/kernel" in flat:
        _put(out, "head", _to_torch("dense", "head", _module(flat, "head")))
    return out


def timm_to_ours(state: Mapping[str, np.ndarray], num_heads: int) -> dict[str, np.ndarray]:
    """timm VisionTransformer state dict -> our flat names.

    Raises ValueError for timm features our ViT lacks (the message names the tensors): norm after
    pooling (`fc_norm`, timm's default for avg pooling), `norm_pre` (CLIP), register tokens,
    layer scale, q/k norms.
    """
    state = {k: np.asarray(v) for k, v in state.items()}
    if "fc_norm.weight" in state:
        raise ValueError("this timm ViT normalises after pooling (fc_norm, timm's default for global_pool='avg'); "
                         "ours normalises the tokens before pooling, so it cannot be imported exactly")
    flat: dict[str, np.ndarray] = {}
    try:
        _put_ours(flat, "embedding", _from_torch("conv", _take(state, "patch_embed.proj"), num_heads))
        posemb = state.pop("pos_embed").astype(np.float32)
        _put_ours(flat, "Transformer/encoder_norm", _from_torch("norm", _take(state, "norm"), num_heads))
    except KeyError as err:
        raise ValueError(f"not a timm VisionTransformer state dict: it lacks {err.args[0]!r}") from None
    if "cls_token" in state:
        flat["cls"] = state.pop("cls_token").astype(np.float32)
        side = int(round(np.sqrt(posemb.shape[1])))
        if side * side == posemb.shape[1]:  # no_embed_class=True: the class token gets no position.
            posemb = np.concatenate([np.zeros_like(posemb[:, :1]), posemb], axis=1)
    flat[POSEMB_KEY] = posemb
    blocks = sorted({int(m[1]) for m in map(TIMM_BLOCK_RE.match, state) if m})
    if blocks != list(range(len(blocks))) or not blocks:
        raise ValueError(f"timm ViT blocks are not numbered 0..N-1: found {blocks}")
    try:
        for i in blocks:
            block = _BLOCK.format(i=i)
            for ours, (kind, _, _, timm_name) in _BLOCK_SIMPLE.items():
                _put_ours(flat, f"{block}/{ours}", _from_torch(kind, _take(state, f"blocks.{i}.{timm_name}"), num_heads))
            qkv = _take(state, f"blocks.{i}.attn.qkv")
            for j, name in enumerate(("query", "key", "value")):
                part = {leaf: np.split(value, 3)[j] for leaf, value in qkv.items()}
                _put_ours(flat, f"{block}/{_ATT}/{name}", _from_torch("split", part, num_heads))
        if "attn_pool.latent" in state:
            flat["MAPHead_0/probe"] = state.pop("attn_pool.latent").astype(np.float32)
            att = "MAPHead_0/MultiHeadDotProductAttention_0"
            _put_ours(flat, f"{att}/query", _from_torch("split", _take(state, "attn_pool.q"), num_heads))
            kv = _take(state, "attn_pool.kv")
            for j, name in enumerate(("key", "value")):
                part = {leaf: np.split(value, 2)[j] for leaf, value in kv.items()}
                _put_ours(flat, f"{att}/{name}", _from_torch("split", part, num_heads))
            for ours, (kind, timm_name) in _TIMM_MAP_SIMPLE.items():
                _put_ours(flat, ours, _from_torch(kind, _take(state, timm_name), num_heads))
    except KeyError as err:
        raise ValueError(f"timm ViT lacks {err.args[0]!r}") from None
    if "head.weight" in state:
        _put_ours(flat, "head", _from_torch("dense", _take(state, "head"), num_heads))
    if state:
        raise _unknown_error("timm ViT checkpoint", list(state))
    return flat


def is_hf_state(keys: set[str] | list[str]) -> bool:
    """Whether tensor names are transformers ViT's (either naming, with or without `vit.`)."""
    return any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in keys)


def is_timm_state(keys: set[str] | list[str]) -> bool:
    """Whether tensor names are timm VisionTransformer's."""
    return "patch_embed.proj.weight" in set(keys) and any(TIMM_BLOCK_RE.match(k) for k in keys)
