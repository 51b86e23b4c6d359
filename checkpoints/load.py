"""`load`: any supported ViT checkpoint -> (our parameter tree, Model keyword arguments).

Formats, tried in this order: our orbax checkpoints (via `checkpoints.orbax_io`), coyo-vit
TensorFlow checkpoints (prefix or directory), flat .npz files in the vit_jax or big_vision
layout, and transformers / timm ViT folders or their `model.safetensors` (`checkpoints.pytorch_io`). Each reader only parses; sizes are then inferred from shapes, the caller's overrides
applied (see `checkpoints.adapt` for head / pre-logits / position-embedding changes), and the
result is checked against the shapes `Model(**kwargs).init` would create, so a checkpoint is
either loaded whole or rejected with the names and shapes that disagree.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import meta

from checkpoints import adapt, npz_layouts, tf_coyo
from checkpoints.npz_layouts import POSEMB_KEY, flatten_tree, unflatten_tree
from coyo_vit.models import VARIANTS, Model, decode_variant

log = logging.getLogger(__name__)

# Overrides that change the parameters (handled by checkpoints.adapt), not just the Model.
_ADAPTING = ("num_classes", "rep_size", "image_size", "scan")
_MODEL_FIELDS = frozenset(f.name for f in dataclasses.fields(Model)) - {"parent", "name", "variant"}
# Head counts of the standard ViT sizes, for formats whose kernels do not store heads.
STANDARD_HEADS = {sizes["width"]: sizes["num_heads"] for sizes in VARIANTS.values()}
_SHOWN = 5


class CheckpointFormatError(ValueError):
    """No reader accepted the path; the message lists each format tried and why it failed."""


class HeadCountUnknown(ValueError):
    """The checkpoint does not store its head count and its width is not a standard ViT's."""

    def __init__(self, message: str, width: int):
        super().__init__(message)
        self.width = width


class _NotThisFormat(Exception):
    """A reader's reason for rejecting a path (collected into CheckpointFormatError)."""


def load(path: str | Path, variant: str | None = None, **overrides: Any) -> tuple[dict, dict]:
    """Reads a checkpoint into `(params, model_kwargs)` for `Model(**model_kwargs)`.

    `variant` (e.g. "L/16") and Model-field overrides (e.g. num_heads=4, dtype="bfloat16")
    supply what shapes cannot tell. Fine-tuning overrides: `num_classes` (new head when it
    differs; None = no head), `rep_size` (None drops pre-logits), `image_size` (position
    embedding resized to the new grid), `scan` (restack the blocks).
    """
    unknown = sorted(set(overrides) - _MODEL_FIELDS - set(_ADAPTING))
    if unknown:
        raise TypeError(f"load() got unknown overrides {unknown}; valid: {sorted(_MODEL_FIELDS | set(_ADAPTING))}")
    sizes = decode_variant(variant) if variant is not None else {}
    flat, saved_kwargs = _read_any(Path(path), lambda width: _num_heads(width, variant, sizes, overrides))
    # Shapes are facts; saved kwargs add what shapes cannot hold (dtype, dropout, head inits).
    kwargs = {**saved_kwargs, **infer_model_kwargs(flat), **sizes}
    kwargs.update({k: v for k, v in overrides.items() if k not in _ADAPTING})

    if "scan" in overrides:
        adapt.set_scan(flat, kwargs, overrides["scan"])
    if "rep_size" in overrides:
        adapt.set_rep_size(flat, kwargs, overrides["rep_size"])
    if "num_classes" in overrides or "rep_size" in overrides:
        adapt.set_num_classes(flat, kwargs, overrides.get("num_classes", kwargs["num_classes"]),
                              kernel_init=kwargs.get("head_kernel_init", 0.0),
                              bias_init=kwargs.get("head_bias_init", 0.0))
    if overrides.get("image_size") is not None:
        adapt.set_image_size(flat, kwargs, overrides["image_size"])
        grid = adapt.image_grid(overrides["image_size"], kwargs["patch_size"])
    elif POSEMB_KEY in flat:
        grid = adapt.posemb_grid(np.shape(flat[POSEMB_KEY])[1], kwargs["pool_type"] == "tok")
    else:
        grid = (1, 1)
    check_against_model(flat, kwargs, grid)
    return unflatten_tree(flat), kwargs


def describe(path: str | Path, variant: str | None = None, num_heads: int | None = None) -> dict:
    """The Model kwargs of the checkpoint at `path`, as `load` would return them without
    overrides, read from its shapes and metadata only (no parameter values are read, but for
    transformers / timm folders).

    `variant` / `num_heads` supply the head count where the format does not store it (coyo-vit
    TensorFlow and timm checkpoints of a non-standard width: HeadCountUnknown otherwise).
    """
    sizes = decode_variant(variant) if variant is not None else {}
    overrides = {} if num_heads is None else {"num_heads": num_heads}
    flat, saved_kwargs = _read_any(Path(path), lambda width: _num_heads(width, variant, sizes, overrides),
                                   shapes_only=True)
    return {**saved_kwargs, **infer_model_kwargs(flat)}


def infer_model_kwargs(flat: dict[str, Any]) -> dict[str, Any]:
    """Model sizes read off parameter shapes (our flat names, loop or scan layout)."""
    try:
        patch_h, patch_w, _, width = np.shape(flat["embedding/kernel"])
    except KeyError:
        raise ValueError("checkpoint has no patch embedding 'embedding/kernel'; "
                         f"first parameters found: {sorted(flat)[:_SHOWN]}") from None
    if patch_h != patch_w:
        raise ValueError(f"non-square patches {patch_h}x{patch_w} are not supported by Model")
    scan = any(k.startswith("Transformer/encoderblock/") for k in flat)
    block = "Transformer/encoderblock" if scan else "Transformer/encoderblock_0"
    query = f"{block}/MultiHeadDotProductAttention_1/query/kernel"
    mlp = f"{block}/MlpBlock_3/Dense_0/kernel"
    for key in (query, mlp):
        if key not in flat:
            raise ValueError(f"checkpoint lacks {key!r}, needed to tell the encoder's sizes")
    if scan:
        depth = int(np.shape(flat[query])[0])
    else:
        depth = len({k.split("/")[1] for k in flat if k.startswith("Transformer/encoderblock_")})
    head = flat.get("head/kernel")
    rep = flat.get("pre_logits/kernel")
    pool = "map" if "MAPHead_0/probe" in flat else "tok" if "cls" in flat else "gap"
    return dict(
        num_classes=None if head is None else int(np.shape(head)[-1]),
        patch_size=int(patch_h), width=int(width), depth=depth,
        mlp_dim=int(np.shape(flat[mlp])[-1]), num_heads=int(np.shape(flat[query])[-2]),
        pool_type=pool, rep_size=None if rep is None else int(np.shape(rep)[-1]),
        posemb="learn" if POSEMB_KEY in flat else "sincos2d", scan=scan)


def check_against_model(flat: dict[str, Any], kwargs: dict[str, Any], grid: tuple[int, int]) -> None:
    """Raises ValueError unless `flat` has exactly the parameters and shapes the Model creates."""
    model = Model(**kwargs)
    image = jax.ShapeDtypeStruct((1, grid[0] * kwargs["patch_size"], grid[1] * kwargs["patch_size"], 3),
                                 jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), image)
    expected = {k: tuple(v.shape) for k, v in flatten_tree(meta.unbox(variables["params"])).items()}
    bad = [f"{k}: checkpoint {tuple(np.shape(flat[k]))} vs model {shape}"
           for k, shape in expected.items() if k in flat and tuple(np.shape(flat[k])) != shape]
    if bad:
        raise ValueError(f"shape mismatch between checkpoint and model (kwargs {kwargs}); first "
                         "mismatching parameters:\n  " + "\n  ".join(bad[:_SHOWN]))
    missing = [k for k in expected if k not in flat]
    if missing:
        raise ValueError(
            f"checkpoint lacks parameters the model needs: {missing[:_SHOWN]}"
            f"{' ...' if len(missing) > _SHOWN else ''} (model kwargs {kwargs}). Only the head can be "
            "re-initialised, by passing num_classes=.")
    extra = sorted(k for k in flat if k not in expected)
    if extra:
        raise ValueError(f"checkpoint has parameters the model does not use: {extra[:_SHOWN]} "
                         f"(model kwargs {kwargs}); check pool_type / rep_size / posemb.")


def _num_heads(width: int, variant: str | None, sizes: dict, overrides: dict) -> int:
    """Head count for formats that do not store it: override > variant > standard table."""
    if overrides.get("num_heads") is not None:
        return int(overrides["num_heads"])
    if "num_heads" in sizes:
        return sizes["num_heads"]
    if width in STANDARD_HEADS:
        return STANDARD_HEADS[width]
    raise HeadCountUnknown(
        f"cannot tell the head count of width-{width} attention kernels (variant={variant!r}): pass "
        f"num_heads= or variant=; the standard ViT table knows widths {STANDARD_HEADS}", width)


def _read_any(path: Path, heads_for_width: Callable[[int], int],
              shapes_only: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Runs each reader; returns the first success as (our flat params, saved kwargs).

    `shapes_only`: the arrays are stand-ins of the right shapes and dtypes that hold no memory
    (zero strides), where the format can tell the shapes without reading the values.
    """
    if not path.exists() and not Path(f"{path}.index").exists():
        raise FileNotFoundError(f"checkpoint path does not exist: {path}")
    readers = (("orbax", lambda p: _read_orbax(p, shapes_only)),
               ("coyo-vit TensorFlow", lambda p: _read_tf(p, heads_for_width, shapes_only)),
               (".npz (vit_jax / big_vision)", lambda p: _read_npz(p, shapes_only)),
               ("transformers / timm safetensors", lambda p: _read_torch(p, heads_for_width)))
    reasons = []
    for name, reader in readers:
        try:
            flat, saved = reader(path)
        except _NotThisFormat as err:
            reasons.append(f"{name}: {err}")
            continue
        log.info("Read %s as a %s checkpoint (%d arrays).", path, name, len(flat))
        return flat, saved
    raise CheckpointFormatError(f"could not read {path} as a checkpoint. Tried:\n  " + "\n  ".join(reasons))


def _stand_in(shape: Any, dtype: Any) -> np.ndarray:
    """An array of `shape` and `dtype` that holds one element (all strides 0)."""
    return np.broadcast_to(np.zeros((), dtype), tuple(shape))


def _read_orbax(path: Path, shapes_only: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        from checkpoints import orbax_io  # pylint: disable=import-outside-toplevel
    except ImportError as err:
        raise _NotThisFormat(f"checkpoints.orbax_io is unavailable ({err})") from None
    if not orbax_io.is_orbax_checkpoint(path):
        raise _NotThisFormat("not an orbax checkpoint directory, step or workdir")
    try:
        params, saved = orbax_io.restore_params(path, shapes_only=shapes_only)
    except Exception as err:  # Damaged checkpoints surface as many error types.
        raise _NotThisFormat(f"restore failed: {type(err).__name__}: {err}") from None
    saved = dict(saved or {})
    sizes = decode_variant(saved.pop("variant")) if saved.get("variant") else {}
    saved = {k: v for k, v in saved.items() if k in _MODEL_FIELDS and (v is not None or k not in sizes)}
    flat = flatten_tree(meta.unbox(params))
    if shapes_only:
        flat = {k: _stand_in(v.shape, v.dtype) for k, v in flat.items()}
    return flat, {**sizes, **saved}


def _read_tf(path: Path, heads_for_width: Callable[[int], int],
             shapes_only: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        prefix = tf_coyo.find_checkpoint_prefix(path)
    except ValueError as err:
        raise _NotThisFormat(str(err)) from None
    try:
        variables = tf_coyo.read_variables(prefix, stand_in=_stand_in if shapes_only else None)
    except ImportError as err:
        raise _NotThisFormat(f"TensorFlow is needed to read it and is not installed ({err})") from None
    except Exception as err:  # TF raises its own error classes for damaged files.
        raise _NotThisFormat(f"reading {prefix} failed: {type(err).__name__}: {err}") from None
    if not tf_coyo.is_coyo_layout(variables):
        raise _NotThisFormat(f"a TF checkpoint without coyo-vit's 'backbone/embedding' variables "
                             f"(found {sorted(variables)[:_SHOWN]})")
    return tf_coyo.coyo_to_ours(variables, heads_for_width(tf_coyo.width_of(variables))), {}


def _read_npz(path: Path, shapes_only: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    if not path.is_file():
        raise _NotThisFormat("not a file")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as err:  # Not a numpy file at all, or a truncated / corrupt one.
        raise _NotThisFormat(f"{type(err).__name__}: {err}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise _NotThisFormat("a single .npy array, not an .npz archive")
    try:
        with data:
            if shapes_only:  # each member's .npy header only
                arrays = {key: _stand_in(*_npy_header(data.zip, key)) for key in data.files}
            else:
                arrays = {key: data[key] for key in data.files}
    except Exception as err:  # Damaged members: bad CRC, truncated data, zlib errors.
        raise _NotThisFormat(f"damaged archive: {type(err).__name__}: {err}") from None
    try:
        return npz_layouts.npz_to_ours(arrays), {}
    except ValueError as err:
        raise _NotThisFormat(str(err)) from None


def _npy_header(archive: Any, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from the header of the .npy member `key` of an open .npz zip."""
    with archive.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read(f)
    return shape, dtype


def _read_torch(path: Path, heads_for_width: Callable[[int], int]) -> tuple[dict[str, Any], dict[str, Any]]:
    from checkpoints import pytorch_io  # Lazy: needs the safetensors package, only for these formats.

    if pytorch_io.find_weights(path) is None:
        raise _NotThisFormat("no model.safetensors (or *.safetensors file)")
    try:
        flat, saved, name = pytorch_io.read_torch_checkpoint(path, heads_for_width)
    except ImportError as err:
        raise _NotThisFormat(str(err)) from None
    except ValueError as err:
        raise _NotThisFormat(str(err)) from None
    log.info("%s is a %s checkpoint.", path, name)
    return flat, saved
