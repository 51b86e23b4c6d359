"""Reads kakaobrain/coyo-vit TensorFlow checkpoints into our parameter names.

Their trainer saves `tf.train.Checkpoint(model, backbone, optimizer, ckpt_saved_iterations)`,
so variables carry object-graph names (`backbone/enc_layers/3/att/query_dense/kernel/...`).
We read them with `tf.train.load_checkpoint`, which needs neither Keras nor their model code.
TensorFlow is imported inside `read_variables` only: everything else here is numpy.

Their attention projections are plain 2-D Dense kernels; heads are split by reshaping the
D outputs into [H, D/H], so the kernel reshapes to our [D, H, D/H] (and the output
projection's [D, D] to [H, D/H, D]). H is not recoverable from shapes: callers supply it.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
_IGNORED_PREFIXES = ("optimizer/", "ckpt_saved_iterations", "save_counter", "_CHECKPOINTABLE_OBJECT_GRAPH")
_LAYER_RE = re.compile(r"^backbone/enc_layers/(\d+)/(.+)$")

_TOP_LEVEL = {
    "backbone/class_emb": "cls",
    "backbone/pos_emb": "Transformer/posembed_input/pos_embedding",
    "backbone/embedding/kernel": "embedding/kernel",
    "backbone/embedding/bias": "embedding/bias",
    "backbone/norm/gamma": "Transformer/encoder_norm/scale",
    "backbone/norm/beta": "Transformer/encoder_norm/bias",
    "backbone/representation/kernel": "pre_logits/kernel",
    "backbone/representation/bias": "pre_logits/bias",
    "model/layer_with_weights-1/kernel": "head/kernel",
    "model/layer_with_weights-1/bias": "head/bias",
}
_IN_LAYER = {
    "layernorm1/gamma": "LayerNorm_0/scale",
    "layernorm1/beta": "LayerNorm_0/bias",
    "layernorm2/gamma": "LayerNorm_2/scale",
    "layernorm2/beta": "LayerNorm_2/bias",
    "mlp/layer_with_weights-0/kernel": "MlpBlock_3/Dense_0/kernel",
    "mlp/layer_with_weights-0/bias": "MlpBlock_3/Dense_0/bias",
    "mlp/layer_with_weights-1/kernel": "MlpBlock_3/Dense_1/kernel",
    "mlp/layer_with_weights-1/bias": "MlpBlock_3/Dense_1/bias",
}
_ATTENTION = "MultiHeadDotProductAttention_1"
_PROJECTIONS = {"query_dense": "query", "key_dense": "key", "value_dense": "value"}


def find_checkpoint_prefix(path: str | Path) -> str:
    """The checkpoint prefix for a prefix or a directory holding one; ValueError says why not.

    A directory is resolved through TF's `checkpoint` state file when present, otherwise it
    must hold exactly one `*.index` file.
    """
    path = Path(path)
    if Path(f"{path}.index").is_file():
        return str(path)
    if not path.is_dir():
        raise ValueError(f"no '{path.name}.index' file beside it and it is not a directory")
    state = path / "checkpoint"
    if state.is_file():
        match = re.search(r'^model_checkpoint_path:\s*"([^"]+)"', state.read_text(), re.M)
        if match:
            prefix = Path(match[1]) if Path(match[1]).is_absolute() else path / match[1]
            if Path(f"{prefix}.index").is_file():
                return str(prefix)
    indexes = sorted(path.glob("*.index"))
    if len(indexes) == 1:
        return str(indexes[0].with_suffix(""))
    if not indexes:
        raise ValueError(f"directory {path} holds no '*.index' file")
    raise ValueError(f"directory {path} holds several checkpoints ({[p.name for p in indexes]}); "
                     "pass one prefix, e.g. " + str(indexes[-1].with_suffix("")))


def read_variables(prefix: str, stand_in: Callable[[Any, Any], np.ndarray] | None = None
                   ) -> dict[str, np.ndarray]:
    """All model variables of a TF checkpoint, names without the object-graph suffix.

    Optimizer slots, step counters and the object graph itself are skipped. With `stand_in`
    (shape, numpy dtype) -> array, only the checkpoint's index is read: each variable is
    `stand_in(shape, dtype)`.
    """
    import tensorflow as tf  # Lazy: only this format needs TensorFlow.

    reader = tf.train.load_checkpoint(prefix)
    dtypes = reader.get_variable_to_dtype_map()
    variables = {}
    for name, shape in reader.get_variable_to_shape_map().items():
        if name.startswith(_IGNORED_PREFIXES):
            continue
        short = name[: -len(_SUFFIX)] if name.endswith(_SUFFIX) else name
        variables[short] = (np.asarray(reader.get_tensor(name)) if stand_in is None
                            else stand_in(shape, dtypes[name].as_numpy_dtype))
    return variables


def is_coyo_layout(variables: Mapping[str, np.ndarray]) -> bool:
    """Whether the variable names are coyo-vit's (`backbone/...` with an embedding)."""
    return "backbone/embedding/kernel" in variables


def width_of(variables: Mapping[str, np.ndarray]) -> int:
    """Encoder width D: the patch embedding's output channels."""
    return int(variables["backbone/embedding/bias"].shape[-1])


def coyo_to_ours(variables: Mapping[str, np.ndarray], num_heads: int) -> dict[str, np.ndarray]:
    """coyo-vit variable names -> our flat names, splitting attention heads.

    Unknown variables are an error rather than silently dropped: they would mean a model this
    importer does not describe.
    """
    width = width_of(variables)
    if num_heads <= 0 or width % num_heads:
        raise ValueError(f"num_heads={num_heads} does not divide the checkpoint's width {width}.")
    head_dim = width // num_heads
    flat: dict[str, np.ndarray] = {}
    unknown = []
    for name, value in variables.items():
        if name in _TOP_LEVEL:
            flat[_TOP_LEVEL[name]] = value
            continue
        match = _LAYER_RE.match(name)
        if match is None:
            unknown.append(name)
            continue
        block = f"Transformer/encoderblock_{int(match[1])}"
        rest = match[2]
        if rest in _IN_LAYER:
            flat[f"{block}/{_IN_LAYER[rest]}"] = value
            continue
        module, _, kind = rest.removeprefix("att/").partition("/")
        if not rest.startswith("att/") or kind not in ("kernel", "bias"):
            unknown.append(name)
        elif module in _PROJECTIONS:
            shape = (width, num_heads, head_dim) if kind == "kernel" else (num_heads, head_dim)
            flat[f"{block}/{_ATTENTION}/{_PROJECTIONS[module]}/{kind}"] = value.reshape(shape)
        elif module == "combine_heads":
            out = value.reshape(num_heads, head_dim, width) if kind == "kernel" else value
            flat[f"{block}/{_ATTENTION}/out/{kind}"] = out
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"coyo-vit checkpoint has variables this importer does not know: {sorted(unknown)[:8]}")
    return flat
