"""The input section of a run config, parsed into typed, checked objects without TensorFlow.

`run_config.parse` checks a whole config before anything runs; importing TensorFlow (~10 s of
CPU) only to find a misspelled input key would make every such error slow. It sits here, in the
bottom layer beside config_keys, and not in `input_pipeline/`, because importing that package
imports TensorFlow (its `__init__` hides the accelerators from TF). The tf.data builders in
`input_pipeline/pipeline.py` and `classification_data.py` take these objects and keep their
names importable (`pipeline.InputConfig`, `classification_data.ClassificationInputConfig`, ...).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from coyo_vit.config_keys import check_keys

SOURCES = ("tfds", "imagefolder")
_DATA_KEYS = {
    "tfds": ("name", "tfds_name", "split", "data_dir", "manual_dir", "image_key", "label_key",
             "file_name_key"),
    "imagefolder": ("name", "root", "split"),
}
_INPUT_KEYS = ("data", "pp_train", "pp_eval", "shuffle_buffer", "cycle_length",
               "num_parallel_calls", "prefetch", "ram_budget_gb", "strict")


def as_dict(value: Any, what: str) -> dict[str, Any]:
    """A ConfigDict / FrozenConfigDict / dict section as a plain dict; anything else is an error."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a ConfigDict or dict, got {type(value).__name__}")
    return dict(value)


def check_int(value: Any, name: str, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_reading_options(cfg: Any) -> None:
    """The tf.data settings both input configs share, checked before any file is opened (e.g. a
    0 cycle_length that tf.data would misread, or a RAM budget that is not a positive number)."""
    for name, minimum in (("shuffle_buffer", 1), ("cycle_length", 1), ("prefetch", 0)):
        check_int(getattr(cfg, name), name, minimum)
    if cfg.num_parallel_calls != -1:
        check_int(cfg.num_parallel_calls, "num_parallel_calls (-1 = AUTOTUNE)", 1)
    budget = cfg.ram_budget_gb
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                               or not budget > 0):
        raise ValueError(f"ram_budget_gb must be a positive number or None, got {budget!r}")


@dataclasses.dataclass(frozen=True)
class InputConfig:
    """The input section of a training config, validated once."""
    files: str | tuple[str, ...]
    holdout_files: int = 0
    holdout_examples: int = 0
    pp_train: str | None = None
    pp_eval: str | None = None
    shuffle_buffer: int = 10_000
    cycle_length: int = 16
    num_parallel_calls: int = -1
    prefetch: int = 2
    ram_budget_gb: float | None = None
    exclude_keys_file: str | None = None  # records to leave out (decontaminate's output)
    strict: bool = False                  # stop at the first damaged record instead of skipping

    @classmethod
    def from_config(cls, config: Any) -> "InputConfig":
        """Reads an ml_collections ConfigDict or a dict; unknown keys are errors. An
        InputConfig passes through unchanged: builders take either, and a run parses once."""
        if isinstance(config, cls):
            return config
        values = as_dict(config, "input config")
        check_keys(values, {"data", "holdout", "pp_train", "pp_eval", "shuffle_buffer",
                             "cycle_length", "num_parallel_calls", "prefetch", "ram_budget_gb",
                             "exclude_keys_file", "strict"},
                    "input config")
        data = as_dict(values.pop("data", None), "input config 'data'")
        check_keys(data, {"files"}, "input config 'data'")
        if not data.get("files"):
            raise ValueError("input config needs data.files: a glob, comma-separated globs, a list "
                             "or a directory of TFRecord shards")
        holdout = as_dict(values.pop("holdout", None) or {}, "input config 'holdout'")
        check_keys(holdout, {"files", "examples"}, "input config 'holdout'")
        files = data["files"]
        config_obj = cls(
            files=files if isinstance(files, str) else tuple(files),
            holdout_files=holdout.get("files", 0) or 0,
            holdout_examples=holdout.get("examples", 0) or 0,
            **{k: v for k, v in values.items() if v is not None})
        config_obj.validate()
        return config_obj

    def validate(self) -> None:
        """Rejects values tf.data would misread (e.g. a 0 cycle_length) before any file is opened."""
        check_reading_options(self)
        if not isinstance(self.strict, bool):
            raise ValueError(f"strict must be True or False, got {self.strict!r}")
        if self.exclude_keys_file is not None and not (
                isinstance(self.exclude_keys_file, str) and self.exclude_keys_file):
            raise ValueError(f"exclude_keys_file must be a path or None, got "
                             f"{self.exclude_keys_file!r}")


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """The `data` section: where examples come from (see the module docstring for keys)."""
    name: str
    split: str
    tfds_name: str | None = None
    data_dir: str | None = None
    manual_dir: str | None = None
    image_key: str = "image"
    label_key: str = "label"
    file_name_key: str = "file_name"
    root: str | None = None

    @classmethod
    def from_config(cls, data: Any) -> "DataSpec":
        if isinstance(data, cls):
            return data
        values = as_dict(data, "input config 'data'")
        name = values.get("name")
        if name not in SOURCES:
            raise ValueError(f"input data name {name!r} is not a classification source; valid: "
                             f"{', '.join(SOURCES)} (COYO shards use input_pipeline.pipeline)")
        check_keys(values, _DATA_KEYS[name], f"input config 'data' (name={name!r})")
        if not isinstance(values.get("split"), str) or not values["split"]:
            raise ValueError(f"input data needs split, e.g. 'train' or 'validation', got "
                             f"{values.get('split')!r}")
        required = "tfds_name" if name == "tfds" else "root"
        if not isinstance(values.get(required), str) or not values[required]:
            raise ValueError(f"input data with name={name!r} needs {required}, got "
                             f"{values.get(required)!r}")
        return cls(**{k: v for k, v in values.items() if v is not None})

    def with_split(self, split: str | None) -> "DataSpec":
        return self if split is None else dataclasses.replace(self, split=split)


@dataclasses.dataclass(frozen=True)
class ClassificationInputConfig:
    """The input section of a fine-tuning config, validated once; unknown keys are errors."""
    data: DataSpec
    pp_train: str | None = None
    pp_eval: str | None = None
    shuffle_buffer: int = 10_000
    cycle_length: int = 16
    num_parallel_calls: int = -1
    prefetch: int = 2
    ram_budget_gb: float | None = None
    strict: bool = False  # stop at the first damaged image instead of skipping it

    @classmethod
    def from_config(cls, config: Any) -> "ClassificationInputConfig":
        if isinstance(config, cls):  # already parsed (a run parses its input once)
            return config
        values = as_dict(config, "input config")
        check_keys(values, _INPUT_KEYS, "input config")
        data = DataSpec.from_config(values.pop("data", None))
        cfg = cls(data=data, **{k: v for k, v in values.items() if v is not None})
        check_reading_options(cfg)
        if not isinstance(cfg.strict, bool):
            raise ValueError(f"strict must be True or False, got {cfg.strict!r}")
        return cfg


def is_classification_data(data: Any) -> bool:
    """True when a `data` section names a source of this module (else: COYO shards)."""
    return as_dict(data, "input config 'data'").get("name") in SOURCES


def parse_input(section: Any) -> InputConfig | ClassificationInputConfig:
    """The input section as its typed, checked config (shards, or TFDS / image folder)."""
    if is_classification_data(section["data"]):
        return ClassificationInputConfig.from_config(section)
    return InputConfig.from_config(section)
