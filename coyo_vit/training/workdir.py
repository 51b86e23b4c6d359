"""A workdir's record of its run: `config.json`, written at the first start and checked on
resume, and `class_names.txt`, the names of the classes the run's head predicts.

A resume may change only the keys in `SAFE_RESUME_KEYS`. Any other difference from the first
start's `config.json` (the model, the classes, the image size, the loss, the preprocessing, the
optimizer and schedule, the batch...) stops the run before anything is written, naming each key
with the checkpoint's value and this run's. An allowed change is written beside the first
config as `config.<step>.json` (the step resumed from); `config.json` itself is never rewritten
once the workdir holds a checkpoint. `class_names.txt` is written once (also into a workdir of
an older version that lacks it) and never replaced: names that differ stop the run.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from coyo_vit import file_access
from coyo_vit.class_names import CLASS_NAMES_FILE, format_class_names, parse_class_names, readable_names
from coyo_vit.config_keys import ConfigError

SAFE_RESUME_KEYS = (
    "total_steps", "batch_size", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
    "checkpoint_compression", "eval_every_steps", "eval_batch_size", "evals",
    "compilation_cache_dir", "device_prefetch", "mesh", "sharding_rules", "param_sharding", "init",
    "demo_data.out_dir", "demo_digits.out_dir", "input.data.files", "input.data.root",
    "input.data.data_dir", "input.data.manual_dir", "input.num_parallel_calls", "input.prefetch",
    "input.ram_budget_gb",
)
"""Config keys (a key names its whole section) that a resume may change: how long the run goes,
how often it logs, evaluates and checkpoints, what it evaluates, where its files are (moved
data, caches), how the state is laid out on the devices, and `init` (read only at the first
start). None of them changes what the saved state means. `batch_size` may change too, so that a
run can continue on a slice of another size (docs/scaling.md); the log notes it."""

CONFIG_FILE = "config.json"


def _gfile():
    """tf.io.gfile (gs:// workdirs too), imported late: this module loads without TensorFlow."""
    import tensorflow as tf
    return tf.io.gfile


def is_safe(key: str) -> bool:
    """Whether a resume may change the dotted config key `key` (see SAFE_RESUME_KEYS)."""
    return any(key == safe or key.startswith(safe + ".") for safe in SAFE_RESUME_KEYS)


def as_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as config.json stores it (tuples as lists, references resolved)."""
    return json.loads(config.to_json_best_effort())


def differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (saved value, current value)} of every leaf that differs; a key missing on
    one side has the value `_ABSENT` there."""
    flat_saved, flat_current = _flatten(saved), _flatten(current)
    return {key: (flat_saved.get(key, _ABSENT), flat_current.get(key, _ABSENT))
            for key in sorted(flat_saved.keys() | flat_current.keys())
            if flat_saved.get(key, _ABSENT) != flat_current.get(key, _ABSENT)}


def check_resume(workdir: str, config: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
    """Compares this run's config with `workdir`'s config.json (the first start's) before a
    resume; raises ValueError naming every key a resume may not change; returns the (allowed)
    differences. A workdir without config.json has nothing to compare: {}."""
    path = os.path.join(workdir, CONFIG_FILE)
    fs = file_access.for_path(path)  # no TensorFlow import for a local workdir
    if not fs.exists(path):
        return {}
    with fs.open(path) as f:
        saved = json.load(f)
    changed = differences(saved, as_json(config))
    refused = {key: values for key, values in changed.items() if not is_safe(key)}
    if refused:
        listed = "; ".join(f"{key} {_show(old)} (checkpoint) vs {_show(new)} (this run)"
                           for key, (old, new) in refused.items())
        raise ConfigError(
            f"{CONFIG_FILE} of {workdir} differs: {listed}. Resume with the checkpoint's values, "
            f"or train in a new --workdir; a resume may change only "
            f"{', '.join(SAFE_RESUME_KEYS)} (coyo_vit/training/workdir.py)")
    return changed


def write_config(workdir: str, config: ml_collections.ConfigDict, resumed_step: int | None) -> str:
    """Writes config.json at the first start (resumed_step None), config.<step>.json on a
    resume; written whole and renamed, so an interrupted write leaves no partial file."""
    name = CONFIG_FILE if resumed_step is None else f"config.{resumed_step}.json"
    path = os.path.join(workdir, name)
    gfile = _gfile()
    with gfile.GFile(path + ".tmp", "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    gfile.rename(path + ".tmp", path, overwrite=True)
    return path


def write_class_names(workdir: str, data_names: Sequence[str] | None, num_classes: int | None
                      ) -> str | None:
    """Saves the names of the run's classes as `workdir`/class_names.txt (process 0), so that
    predict, the exports and evaluate.py name classes instead of numbering them.

    `data_names` are the training data's (image-folder directories, TFDS label names; None for
    COYO shards, whose class count picks the shipped 21k / 1k list). Returns the file's path, or
    None when nothing names the classes or the names do not fit the head. An existing file with
    other names stops the run (ConfigError) before it writes anything else.
    """
    names = readable_names(data_names, num_classes)
    if names is None:
        return None
    if num_classes is not None and len(names) != num_classes:
        logging.warning("class names not saved: the data has %d classes, config.num_classes is %d",
                        len(names), num_classes)
        return None
    path = os.path.join(workdir, CLASS_NAMES_FILE)
    gfile = _gfile()
    if gfile.exists(path):
        with gfile.GFile(path, "r") as f:
            saved = parse_class_names(f.read())
        if saved != tuple(names):
            first = next((i for i, (a, b) in enumerate(zip(saved, names)) if a != b),
                         min(len(saved), len(names)))
            raise ConfigError(
                f"{path} names {len(saved)} classes and this run's data {len(names)}; they first "
                f"differ at class {first}: {_name_at(saved, first)} (saved) vs "
                f"{_name_at(names, first)} (this run). Train in a new --workdir, or move the file "
                f"away if the data's names are right")
        return path
    with gfile.GFile(path + ".tmp", "w") as f:
        f.write(format_class_names(names))
    gfile.rename(path + ".tmp", path, overwrite=False)
    return path


def _name_at(names: Sequence[str], index: int) -> str:
    return repr(names[index]) if index < len(names) else "(none)"


def saved_config_file(workdir: str, step: int) -> str | None:
    """The config `workdir`'s run had in force at checkpoint `step`: the config.<k>.json of the
    latest resume from a step k <= `step` (a resume from k restores checkpoint k under it), else
    config.json; None when the workdir holds neither."""
    fs = file_access.for_path(workdir)  # no TensorFlow import for a local workdir
    if not fs.isdir(workdir):
        return None
    names = set(fs.listdir(workdir))
    resumed = [int(name[len("config."):-len(".json")]) for name in names
               if name.startswith("config.") and name.endswith(".json")
               and name[len("config."):-len(".json")].isdigit()]
    applicable = [k for k in resumed if k <= step]
    if applicable:
        return os.path.join(workdir, f"config.{max(applicable)}.json")
    return os.path.join(workdir, CONFIG_FILE) if CONFIG_FILE in names else None


def read_config(path: str) -> ml_collections.ConfigDict:
    """A saved config.json (or config.<step>.json) as a ConfigDict; its placeholders are None."""
    with file_access.for_path(path).open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


_ABSENT = _Absent()


def _show(value: Any) -> str:
    return repr(value)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
