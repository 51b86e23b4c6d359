"""Folders of the PyTorch ecosystem: transformers and timm ViTs as `model.safetensors` + configs.

Export writes what `transformers.ViTForImageClassification.from_pretrained(OUT)` or
`timm.create_model("local-dir:OUT", pretrained=True)` load with our logits; import reads such
folders (or a bare `model.safetensors`) the way they are downloaded from the hub. The tensor
renaming is `checkpoints.torch_layouts`; this module handles configs, pixel normalisation and
files. Only `safetensors` is needed (imported lazily: torch, transformers and timm are not, which
keeps them out of the training path); its numpy API writes the files torch reads.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax.linen import meta

from checkpoints import torch_layouts
from checkpoints.adapt import posemb_grid, unstack_blocks
from checkpoints.npz_layouts import POSEMB_KEY, flatten_tree
from coyo_vit.class_names import class_list_for

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
PREPROCESSOR = "preprocessor_config.json"
INSTALL_HINT = 'pip install -e ".[torch]"'
# Our pixels: (x - 127.5) / 127.5, i.e. rescale by 1/255 then normalise with mean = std = 0.5.
OUR_MEAN = OUR_STD = (0.5, 0.5, 0.5)
# transformers' names for the two GELUs our Model has (gelu_fast / gelu_new are the tanh form too).
HF_GELU_EXACT = ("gelu", "gelu_python")
HF_GELU_TANH = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")
TIMM_GELU = {"gelu": False, "gelu_tanh": True}  # act_layer -> gelu_approximate
TIMM_LAYER_NORM_EPS = 1e-6  # timm's ViT LayerNorm; not a model argument
HF_DEFAULT_LAYER_NORM_EPS = 1e-12  # ViTConfig's default, used by google/vit-* on the hub
SINGLE_LABEL, MULTI_LABEL = "single_label_classification", "multi_label_classification"


def _safetensors():
    try:
        import safetensors.numpy  # Lazy: only the PyTorch formats need it (see module docstring).
    except ImportError:
        raise ImportError(f"the PyTorch formats need the safetensors package: {INSTALL_HINT}") from None
    return safetensors.numpy


# --- export --------------------------------------------------------------------------------

def _export_flat(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    flat = flatten_tree(jax.device_get(meta.unbox(dict(params))))
    return {k: np.asarray(v) for k, v in unstack_blocks(flat).items()}


def _image_size(flat: Mapping[str, Any], kwargs: Mapping[str, Any]) -> int:
    grid = posemb_grid(np.shape(flat[POSEMB_KEY])[1], kwargs["pool_type"] == "tok")
    return grid[0] * int(kwargs["patch_size"])


def _labels(num_classes: int, class_names: Sequence[str] | None) -> list[str]:
    """Class names for the head: the caller's, else the shipped ImageNet lists by head size."""
    if class_names is None:
        shipped = class_list_for(num_classes)
        class_names = shipped.names if shipped else [f"LABEL_{i}" for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names given for a head of {num_classes} classes")
    return list(class_names)


def _check_exportable(flat: Mapping[str, Any], kwargs: Mapping[str, Any], target: str) -> None:
    if POSEMB_KEY not in flat:
        raise ValueError(f"{target} ViTs learn their position embedding and this model uses posemb='sincos2d'; "
                         "use --to npz --layout big_vision")
    if kwargs.get("rep_size"):
        raise ValueError(f"{target}'s ViT has no pre-logits layer before its head and this model has one "
                         f"(rep_size={kwargs['rep_size']}); load it with rep_size=None and fine-tune a new head, "
                         "or use --to npz")


def _write_folder(out: Path, files: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> Path:
    """Writes JSON `files` and `model.safetensors` into a temp folder, then renames it to `out`."""
    st = _safetensors()
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        for name, content in files.items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
        # "format": "pt" is what transformers requires of a safetensors file's metadata.
        st.save_file(dict(tensors), str(tmp / WEIGHTS), metadata={"format": "pt"})
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def export_hf(params: Mapping[str, Any], out: str | Path, model_kwargs: Mapping[str, Any],
              class_names: Sequence[str] | None = None, problem_type: str | None = None) -> Path:
    """Writes a transformers ViTForImageClassification folder (weights, config, preprocessor).

    `problem_type`: SINGLE_LABEL / MULTI_LABEL (sigmoid heads); None: multi-label for 21,841-class
    (COYO-pretrained) heads, as `coyo_vit.tools.predict` scores them.
    """
    flat = _export_flat(params)
    pool = model_kwargs["pool_type"]
    if pool != "tok":
        raise ValueError(f"transformers' ViTForImageClassification classifies from the CLS token only and this "
                         f"model pools with pool_type={pool!r}; use --to timm (gap, map) or --to npz")
    _check_exportable(flat, model_kwargs, "transformers")
    num_classes = model_kwargs.get("num_classes")
    if not num_classes:
        raise ValueError("this model has no head (num_classes=None); ViTForImageClassification needs one: "
                         "load it with num_classes=N")
    if problem_type is None:
        problem_type = MULTI_LABEL if num_classes == 21841 else SINGLE_LABEL
    if problem_type not in (SINGLE_LABEL, MULTI_LABEL):
        raise ValueError(f"problem_type={problem_type!r}; valid: {[SINGLE_LABEL, MULTI_LABEL]}")
    labels = _labels(num_classes, class_names)
    size = _image_size(flat, model_kwargs)
    width = int(model_kwargs["width"])
    config = {
        "architectures": ["ViTForImageClassification"], "model_type": "vit",
        "hidden_size": width, "num_hidden_layers": int(model_kwargs["depth"]),
        "num_attention_heads": int(model_kwargs["num_heads"]), "intermediate_size": int(model_kwargs["mlp_dim"]),
        "hidden_act": "gelu_pytorch_tanh" if model_kwargs.get("gelu_approximate", True) else "gelu",
        "layer_norm_eps": float(model_kwargs.get("layer_norm_eps", 1e-6)),
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
        "image_size": size, "patch_size": int(model_kwargs["patch_size"]), "num_channels": 3,
        "qkv_bias": True, "encoder_stride": int(model_kwargs["patch_size"]),
        "id2label": {str(i): name for i, name in enumerate(labels)},
        "label2id": {name: i for i, name in enumerate(labels)},
        "problem_type": problem_type, "torch_dtype": "float32",
    }
    preprocessor = {
        "image_processor_type": "ViTImageProcessor", "do_resize": True,
        "size": {"height": size, "width": size}, "resample": 2,  # PIL bilinear
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(OUR_MEAN), "image_std": list(OUR_STD),
    }
    out = _write_folder(Path(out), {CONFIG: config, PREPROCESSOR: preprocessor}, torch_layouts.ours_to_hf(flat))
    log.info("Exported a transformers ViTForImageClassification to %s.", out)
    return out


def export_timm(params: Mapping[str, Any], out: str | Path, model_kwargs: Mapping[str, Any],
                class_names: Sequence[str] | None = None) -> Path:
    """Writes a timm VisionTransformer folder (config.json with model_args + model.safetensors).

    Pooling: tok -> global_pool "token"; gap -> "avg" with fc_norm=False (timm's default for
    avg normalises after pooling, ours before); map -> "map" (timm's AttentionPoolLatent).
    """
    flat = _export_flat(params)
    _check_exportable(flat, model_kwargs, "timm")
    eps = float(model_kwargs.get("layer_norm_eps", 1e-6))
    if eps != TIMM_LAYER_NORM_EPS:
        raise ValueError(f"timm's ViT LayerNorms use eps {TIMM_LAYER_NORM_EPS} and this model {eps}; use --to hf")
    width, mlp_dim = int(model_kwargs["width"]), int(model_kwargs["mlp_dim"])
    mlp_ratio = mlp_dim / width
    if int(width * mlp_ratio) != mlp_dim:
        raise ValueError(f"mlp_dim={mlp_dim} is not int(width * mlp_ratio) for any float mlp_ratio (width {width})")
    pool = {"tok": "token", "gap": "avg", "map": "map"}[model_kwargs["pool_type"]]
    num_classes = int(model_kwargs.get("num_classes") or 0)
    size = _image_size(flat, model_kwargs)
    model_args = {
        "img_size": size, "patch_size": int(model_kwargs["patch_size"]), "embed_dim": width,
        "depth": int(model_kwargs["depth"]), "num_heads": int(model_kwargs["num_heads"]), "mlp_ratio": mlp_ratio,
        "num_classes": num_classes, "global_pool": pool, "class_token": pool == "token", "fc_norm": False,
        "qkv_bias": True, "act_layer": "gelu_tanh" if model_kwargs.get("gelu_approximate", True) else "gelu",
    }
    config = {
        # The entry point only names a family: model_args override every size it sets.
        "architecture": "vit_base_patch16_224", "num_classes": num_classes, "num_features": width,
        "global_pool": pool, "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [3, size, size], "fixed_input_size": True, "interpolation": "bilinear",
            "crop_pct": 1.0, "crop_mode": "center", "mean": list(OUR_MEAN), "std": list(OUR_STD),
            "num_classes": num_classes, "first_conv": "patch_embed.proj", "classifier": "head"},
    }
    if num_classes:
        config["label_names"] = _labels(num_classes, class_names)
    out = _write_folder(Path(out), {CONFIG: config}, torch_layouts.ours_to_timm(flat))
    log.info("Exported a timm VisionTransformer (global_pool=%s) to %s.", pool, out)
    return out


# --- import --------------------------------------------------------------------------------

def find_weights(path: Path) -> list[Path] | None:
    """The safetensors file(s) of a folder or file path; None when it is not one."""
    if path.is_file():
        return [path] if path.suffix == ".safetensors" else None
    if not path.is_dir():
        return None
    if (path / WEIGHTS).is_file():
        return [path / WEIGHTS]
    if (path / WEIGHTS_INDEX).is_file():  # Sharded: {"weight_map": {tensor: file}}.
        index = json.loads((path / WEIGHTS_INDEX).read_text(encoding="utf-8"))
        return [path / name for name in sorted(set(index["weight_map"].values()))]
    return None


def _read_tensors(files: Sequence[Path]) -> dict[str, np.ndarray]:
    st = _safetensors()
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        try:
            tensors.update(st.load_file(str(file)))
        except Exception as err:  # numpy has no bfloat16: read through jax's ml_dtypes instead.
            if "BF16" not in str(err) and "bf16" not in str(err).lower():
                raise
            import safetensors.flax  # Lazy, as above; jax is our own dependency.

            tensors.update({k: np.asarray(v, np.float32) for k, v in safetensors.flax.load_file(str(file)).items()})
    return {k: np.asarray(v, np.float32) if np.asarray(v).dtype != np.float32 else np.asarray(v)
            for k, v in tensors.items()}


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def fold_pixel_normalization(flat: dict[str, np.ndarray], mean: Sequence[float], std: Sequence[float]) -> None:
    """Makes a model trained on (x/255 - mean) / std take our (x - 127.5) / 127.5, exactly.

    The patch embedding is linear in the pixels, so the change of input scale and shift folds
    into its kernel (per input channel) and bias. mean = std = 0.5 (most ViTs) changes nothing.
    """
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    if mean.shape != (3,) or std.shape != (3,) or np.any(std <= 0):
        raise ValueError(f"pixel mean {mean.tolist()} / std {std.tolist()} are not 3 channels with std > 0")
    if np.allclose(mean, OUR_MEAN, rtol=0, atol=1e-7) and np.allclose(std, OUR_STD, rtol=0, atol=1e-7):
        return
    kernel = flat["embedding/kernel"].astype(np.float64)  # [p, p, 3, D]
    scale, shift = OUR_STD / std, (np.asarray(OUR_MEAN) - mean) / std  # theirs = ours * scale + shift
    flat["embedding/bias"] = (flat["embedding/bias"] + np.einsum("hwcd,c->d", kernel, shift)).astype(np.float32)
    flat["embedding/kernel"] = (kernel * scale[None, None, :, None]).astype(np.float32)
    log.info("Folded pixel normalisation mean=%s std=%s into the patch embedding.", mean.tolist(), std.tolist())


def _hf_model_kwargs(config: Mapping[str, Any]) -> tuple[dict[str, Any], int | None]:
    model_type = config.get("model_type", "vit")
    if model_type != "vit":
        raise ValueError(f"config.json says model_type={model_type!r}; only transformers' 'vit' is supported")
    act = config.get("hidden_act", "gelu")
    if act not in HF_GELU_EXACT + HF_GELU_TANH:
        raise ValueError(f"hidden_act={act!r} is not a GELU our ViT has; valid: {list(HF_GELU_EXACT + HF_GELU_TANH)}")
    if config.get("pooler_act", "tanh") != "tanh":
        raise ValueError(f"pooler_act={config['pooler_act']!r}: our pre-logits layer is tanh")
    kwargs = {"gelu_approximate": act in HF_GELU_TANH,
              "layer_norm_eps": float(config.get("layer_norm_eps", HF_DEFAULT_LAYER_NORM_EPS))}
    return kwargs, config.get("num_attention_heads")


def _timm_model_kwargs(config: Mapping[str, Any]) -> tuple[dict[str, Any], int | None]:
    args = config.get("model_args", {})
    act = args.get("act_layer", "gelu")
    arch = str(config.get("architecture", ""))
    if act not in TIMM_GELU or "quickgelu" in arch:
        raise ValueError(f"timm act_layer={act!r} (architecture {arch!r}) is not a GELU our ViT has; "
                         f"valid: {list(TIMM_GELU)}")
    for name in ("pre_norm", "reg_tokens", "init_values", "qk_norm", "dynamic_img_size"):
        if args.get(name):
            raise ValueError(f"timm model_args {name}={args[name]!r} has no counterpart in our ViT")
    return {"gelu_approximate": TIMM_GELU[act], "layer_norm_eps": TIMM_LAYER_NORM_EPS}, args.get("num_heads")


def read_torch_checkpoint(path: Path, heads_for_width: Callable[[int], int]
                          ) -> tuple[dict[str, np.ndarray], dict[str, Any], str]:
    """A transformers or timm ViT folder / safetensors file -> (our flat params, Model kwargs the
    shapes cannot tell: GELU form and LayerNorm eps, format name)."""
    files = find_weights(path)
    if files is None:
        raise ValueError("no model.safetensors (or *.safetensors file)")
    folder = path if path.is_dir() else path.parent
    tensors = _read_tensors(files)
    config = _read_json(folder / CONFIG)
    if torch_layouts.is_hf_state(tensors):
        kwargs, heads = _hf_model_kwargs(config)
        preprocessor = _read_json(folder / PREPROCESSOR)
        mean, std = preprocessor.get("image_mean", OUR_MEAN), preprocessor.get("image_std", OUR_STD)
        if not preprocessor.get("do_normalize", True):
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        convert, name = torch_layouts.hf_to_ours, "transformers ViT"
        width = int(next(v for k, v in tensors.items() if k.endswith("embeddings.cls_token")).shape[-1])
    elif torch_layouts.is_timm_state(tensors):
        kwargs, heads = _timm_model_kwargs(config)
        pretrained_cfg = config.get("pretrained_cfg", {})
        mean, std = pretrained_cfg.get("mean", OUR_MEAN), pretrained_cfg.get("std", OUR_STD)
        convert, name = torch_layouts.timm_to_ours, "timm ViT"
        width = int(tensors["patch_embed.proj.weight"].shape[0])
    else:
        raise ValueError(f"safetensors without transformers' or timm's ViT tensor names "
                         f"(found {sorted(tensors)[:5]})")
    flat = convert(tensors, int(heads) if heads else heads_for_width(width))
    fold_pixel_normalization(flat, mean, std)
    return flat, kwargs, name
