"""Pieces shared by the configs: argument parsing, the model, input, optimizer and run-control
sections, and the class count."""
from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from typing import Any

import ml_collections
from ml_collections import config_dict

from coyo_vit.class_names import NUM_COYO_CLASSES  # noqa: F401  (configs read it from here)
from coyo_vit.models import vit

_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _did_you_mean(name: str, valid: Any) -> str:
    close = difflib.get_close_matches(name, sorted(valid), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def parse_args(arg: str | None, defaults: dict[str, Any], bare: str | None = None) -> dict[str, Any]:
    """A config's `k=v,k=v` argument (`configs/x.py:k=v,k=v`), each value typed as its default.

    One parser for every config, so each takes the same syntax and fails the same way: an
    unknown key lists the valid ones (and the closest), a value that does not parse as its
    default's type (bool, int, float or str) names the key and the type. `bare` names the key an
    item without `=` sets (`configs/demo.py:60` is `steps=60`).
    """
    args = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep and bare is not None:
            key, sep, value = bare, "=", key
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"Unknown config argument {key!r}; valid: {sorted(defaults)}."
                             + _did_you_mean(key, defaults))
        if not sep:
            raise ValueError(f"Config argument {key!r} needs a value: {key}=<value>.")
        args[key] = _typed(key, value.strip(), defaults[key])
    return args


def _typed(key: str, value: str, default: Any) -> Any:
    """`value` as the type of `default`: bool, int or float; anything else stays a str."""
    kind = type(default)
    try:
        if kind is bool:
            return _BOOLS[value.lower()]
        if kind in (int, float):
            return kind(value)
    except (KeyError, ValueError):
        article = "an" if kind is int else "a"
        raise ValueError(f"Config argument {key}={value!r} is not {article} {kind.__name__}.") from None
    return value


@functools.cache
def _model_fields() -> dict[str, tuple[Any, type]]:
    """Every `Model` field a config can set: name -> (the model's default, its type)."""
    hints = typing.get_type_hints(vit.Model)
    fields = {}
    for field in dataclasses.fields(vit.Model):
        if field.name in ("num_classes", "parent", "name"):  # num_classes: config.num_classes
            continue
        kinds = [t for t in typing.get_args(hints[field.name]) or (hints[field.name],)
                 if isinstance(t, type) and t is not type(None)]
        fields[field.name] = (field.default, kinds[0])
    return fields


def model_config(**changes: Any) -> ml_collections.ConfigDict:
    """`config.model`: every field of coyo_vit.models.vit.Model at the model's own defaults,
    updated by `changes`, which a config names only when it differs from them.

    Listing every field is what lets `--config.model.<field>=...` set any of them on the command
    line (ml_collections only overrides fields that exist); a field whose default is None is a
    typed placeholder, so `--config.model.rep_size=768` parses as an int. The defaults live on
    the model, so a changed default reaches every config.
    """
    fields = _model_fields()
    unknown = sorted(set(changes) - set(fields))
    if unknown:
        raise ValueError(f"model_config() got unknown Model fields {unknown}; valid: {sorted(fields)}."
                         + _did_you_mean(unknown[0], fields))
    model = {}
    for name, (default, kind) in fields.items():
        value = changes.get(name, default)
        model[name] = config_dict.placeholder(kind) if value is None else value
    return ml_collections.ConfigDict(model)


def input_config(*, files: str, pp_train: str, pp_eval: str, shuffle_buffer: int,
                 holdout_files: int = 0, holdout_examples: int = 0) -> ml_collections.ConfigDict:
    """The `config.input` section read by input_pipeline.pipeline."""
    return ml_collections.ConfigDict(dict(
        data=dict(files=files),                  # glob, comma list, list or directory; gs:// works
        holdout=dict(files=holdout_files, examples=holdout_examples),  # never seen by training
        pp_train=pp_train,
        pp_eval=pp_eval,
        shuffle_buffer=shuffle_buffer,
        cycle_length=16,                          # shards read in parallel per process
        num_parallel_calls=-1,                    # -1 = tf.data AUTOTUNE
        prefetch=4,                               # batches prefetched by tf.data
        ram_budget_gb=config_dict.placeholder(float),  # tf.data's RAM budget; None = its own
        exclude_keys_file=config_dict.placeholder(str),  # keys/urls never to train on (decontamination)
        strict=False,                             # True: stop at the first damaged record
    ))


def run_control(config: ml_collections.ConfigDict, *, log_every: int, eval_every: int,
                checkpoint_every: int, keep: int = 3) -> None:
    config.log_every_steps = log_every
    config.eval_every_steps = eval_every          # 0 disables holdout evaluation
    config.checkpoint_every_steps = checkpoint_every
    config.keep_checkpoints = keep
    config.checkpoint_compression = False         # zstd: a little smaller, much slower writes
                                                  # (docs/performance.md)
    config.device_prefetch = 2                    # global batches built ahead on the devices
    config.compilation_cache_dir = ""             # keep compiled steps here (path or gs://): restarts
                                                  # skip compiling; "" = JAX_COMPILATION_CACHE_DIR or none
    config.mesh = dict(data=-1, fsdp=1, model=1)  # -1 = all remaining devices
    # Both are tuples so the command line can set them, e.g.
    # --config.sharding_rules='(("embed", "fsdp"), ("mlp", "model"))'.
    config.sharding_rules = config_dict.placeholder(tuple)  # None = sharding.DEFAULT_RULES
    config.param_sharding = ()                    # (regex, placement) overrides, see sharding.param_shardings
