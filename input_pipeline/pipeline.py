"""Train and eval tf.data pipelines over img2dataset TFRecord shards.

Training is reproducible and resumable to the record: the raw record stream of a process
(files shuffled per epoch, interleaved, records shuffled per epoch) depends only on the seed,
and each record carries `_index`, its position in that stream. Augmentation seeds come from
(seed, process_index, _index), so `start_position=k` continues exactly where a run that had
consumed k raw records stopped, whatever the parallelism.

Keep `data.files`, `holdout`, `shuffle_buffer` and `cycle_length` fixed across a resume: they
define the stream. `num_parallel_calls`, `prefetch` and `ram_budget_gb` do not. The shuffle
buffer holds serialized records (tens of KB each for img2dataset's 512px shards), shuffled
before decoding as in big_vision; examples do not cross epochs in the buffer.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import tensorflow as tf

from input_pipeline import pp_parser, sources

_INT64_MAX = 2**63 - 1
# Constants folded into the seed so each use of randomness gets its own stream.
_FILE_ORDER_STREAM = 1
_SHUFFLE_STREAM = 2
_EVAL_SPLITS = ("holdout", "all")


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

    @classmethod
    def from_config(cls, config: Any) -> "InputConfig":
        """Reads an ml_collections ConfigDict or a dict; unknown keys are errors."""
        values = _as_dict(config, "input config")
        _check_keys(values, {"data", "holdout", "pp_train", "pp_eval", "shuffle_buffer",
                             "cycle_length", "num_parallel_calls", "prefetch", "ram_budget_gb"},
                    "input config")
        data = _as_dict(values.pop("data", None), "input config 'data'")
        _check_keys(data, {"files"}, "input config 'data'")
        if not data.get("files"):
            raise ValueError("input config needs data.files: a glob, comma-separated globs, a list "
                             "or a directory of TFRecord shards")
        holdout = _as_dict(values.pop("holdout", None) or {}, "input config 'holdout'")
        _check_keys(holdout, {"files", "examples"}, "input config 'holdout'")
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
        for name, minimum in (("shuffle_buffer", 1), ("cycle_length", 1), ("prefetch", 0)):
            _check_int(getattr(self, name), name, minimum)
        calls = self.num_parallel_calls
        if calls != -1:
            _check_int(calls, "num_parallel_calls (-1 = AUTOTUNE)", 1)
        if self.ram_budget_gb is not None and not (
                isinstance(self.ram_budget_gb, (int, float)) and self.ram_budget_gb > 0):
            raise ValueError(f"ram_budget_gb must be a positive number or None, "
                             f"got {self.ram_budget_gb!r}")


def build_train_dataset(input_config: Any, *, batch_size: int, seed: int, process_index: int = 0,
                        process_count: int = 1, start_position: int = 0) -> tf.data.Dataset:
    """Endless batches {image f32 [b,H,W,3], labels f32 [b,C], _index int64 [b]} for this process.

    `_index` counts raw records of this process's stream, so max(_index) + 1 of the last batch a
    trainer consumed is the `start_position` that resumes right after it (records dropped for
    decode errors or empty labels just leave gaps).
    """
    cfg = InputConfig.from_config(input_config)
    if not cfg.pp_train:
        raise ValueError("input config needs pp_train, e.g. "
                         "'decode_jpeg_and_inception_crop(224)|flip_lr|value_range(-1, 1)|"
                         "coyo_labels(\"threshold\", 0.1)'")
    _check_int(batch_size, "batch_size", 1)
    _check_int(start_position, "start_position", 0)
    _check_seed(seed)
    _check_process(process_index, process_count)
    train_sources, _ = sources.split_holdout(sources.list_files(_files_spec(cfg)),
                                             cfg.holdout_files, cfg.holdout_examples)
    mine = train_sources[process_index::process_count]
    if not mine:
        raise ValueError(f"process_index={process_index} of process_count={process_count} gets no "
                         f"training file: there are only {len(train_sources)} after the holdout; "
                         f"use at most {len(train_sources)} processes or split the data into "
                         f"more shards")
    if not any(tf.io.gfile.stat(s.path).length > 0 for s in mine):
        raise ValueError(f"all training files of process {process_index} are empty: {mine}")

    base_seed = tf.constant([seed, process_index], tf.int64)
    preprocess = pp_parser.parse(cfg.pp_train)

    def process_record(index: tf.Tensor, serialized: tf.Tensor) -> dict[str, tf.Tensor]:
        features = sources.parse_example(serialized)
        features["rng"] = tf.random.experimental.stateless_fold_in(base_seed, index)
        out = _model_inputs(preprocess(features), "pp_train")
        out["_index"] = index
        return out

    ds = _raw_train_stream(mine, base_seed, cfg, start_position)
    ds = ds.map(process_record, num_parallel_calls=cfg.num_parallel_calls, deterministic=True)
    ds = ds.ignore_errors()  # undecodable images, bad label lists: drop the record, keep going
    ds = ds.filter(lambda ex: ex["_keep"]).map(_without("_keep"))
    ds = ds.batch(batch_size, drop_remainder=True)
    return ds.prefetch(cfg.prefetch).with_options(_options(cfg))


def build_eval_dataset(input_config: Any, *, split: str = "holdout", batch_size: int,
                       process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
    """One pass of batches {image, labels, _mask bool [b]}, each padded to `batch_size`.

    Records are dealt round-robin to processes (record i goes to process i % process_count), so
    shares differ by at most one record. Every process yields the same number of batches,
    ceil(ceil(N / process_count) / batch_size) for N records (counted from the TFRecord headers),
    topping up with all-masked batches; records that fail to decode are dropped and show up as
    padding. Images whose labels op sets `_keep` False are masked, not dropped. Note that each
    process reads (not decodes) every record of the split, which suits held-out sets; split="all"
    is meant for small datasets.
    """
    cfg = InputConfig.from_config(input_config)
    if not cfg.pp_eval:
        raise ValueError("input config needs pp_eval, e.g. "
                         "'decode|resize_small(256)|central_crop(224)|value_range(-1, 1)|"
                         "coyo_labels(\"threshold\", 0.1)'")
    _check_int(batch_size, "batch_size", 1)
    _check_process(process_index, process_count)
    files = sources.list_files(_files_spec(cfg))
    if split == "holdout":
        if not (cfg.holdout_files or cfg.holdout_examples):
            raise ValueError("split='holdout' but the input config has no holdout: set "
                             "holdout.files or holdout.examples, or use split='all'")
        _, eval_sources = sources.split_holdout(files, cfg.holdout_files, cfg.holdout_examples)
    elif split == "all":
        eval_sources = [sources.FileSlice(f) for f in files]
    else:
        raise ValueError(f"unknown eval split {split!r}; valid: {', '.join(_EVAL_SPLITS)}")
    total = sources.count_records(eval_sources)
    if total == 0:
        raise ValueError(f"eval split {split!r} has no records in {len(eval_sources)} files")
    num_batches = math.ceil(math.ceil(total / process_count) / batch_size)

    preprocess = pp_parser.parse(cfg.pp_eval)

    def process_record(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
        out = _model_inputs(preprocess(sources.parse_example(serialized)), "pp_eval")
        out["_mask"] = out.pop("_keep")
        return out

    ds = _read_slices(eval_sources, cfg)
    ds = ds.shard(process_count, process_index)
    ds = ds.map(process_record, num_parallel_calls=cfg.num_parallel_calls, deterministic=True)
    ds = ds.ignore_errors()
    ds = ds.batch(batch_size).map(lambda b: _pad_batch(b, batch_size))
    empty = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), ds.element_spec)
    ds = ds.concatenate(tf.data.Dataset.from_tensors(empty).repeat()).take(num_batches)
    return ds.prefetch(cfg.prefetch).with_options(_options(cfg))


def count_records(files: Any) -> int:
    """Number of records in a file spec (see sources.list_files) or a list of paths/FileSlices."""
    if isinstance(files, str) or (isinstance(files, (list, tuple))
                                  and all(isinstance(f, str) for f in files)):
        files = sources.list_files(files)
    return sources.count_records(files)


def _raw_train_stream(mine: list[sources.FileSlice], base_seed: tf.Tensor, cfg: InputConfig,
                      start_position: int) -> tf.data.Dataset:
    """Endless (index, serialized record) stream, starting at raw record `start_position`."""
    paths = tf.constant([s.path for s in mine])
    starts = tf.constant([s.start for s in mine], tf.int64)
    file_seed = tf.random.experimental.stateless_fold_in(base_seed, _FILE_ORDER_STREAM)
    shuffle_seed = tf.random.experimental.stateless_fold_in(base_seed, _SHUFFLE_STREAM)

    def epoch_records(epoch: tf.Tensor) -> tf.data.Dataset:
        order = tf.random.experimental.stateless_shuffle(
            tf.range(len(mine)), tf.random.experimental.stateless_fold_in(file_seed, epoch))
        files = tf.data.Dataset.from_tensor_slices((tf.gather(paths, order),
                                                    tf.gather(starts, order)))
        records = files.interleave(lambda path, start: tf.data.TFRecordDataset(path).skip(start),
                                   cycle_length=min(cfg.cycle_length, len(mine)), block_length=1,
                                   num_parallel_calls=cfg.num_parallel_calls, deterministic=True)
        epoch_shuffle_seed = tf.random.stateless_uniform(
            [], tf.random.experimental.stateless_fold_in(shuffle_seed, epoch), minval=None,
            maxval=None, dtype=tf.int64)
        return records.shuffle(cfg.shuffle_buffer, seed=epoch_shuffle_seed)

    # Whole epochs are skipped arithmetically (one header count of this process's files); only
    # the rest of the last epoch is read through, and it is never parsed or decoded.
    start_epoch, skip = 0, start_position
    if start_position:
        epoch_length = sources.count_records(mine)
        start_epoch, skip = divmod(start_position, epoch_length)
    ds = tf.data.Dataset.range(start_epoch, _INT64_MAX).flat_map(epoch_records)
    return ds.enumerate(start=start_position - skip).skip(skip)


def _read_slices(slices: list[sources.FileSlice], cfg: InputConfig) -> tf.data.Dataset:
    """Records of each FileSlice, interleaved in a fixed order."""
    paths = tf.constant([s.path for s in slices])
    starts = tf.constant([s.start for s in slices], tf.int64)
    takes = tf.constant([-1 if s.stop is None else s.stop - s.start for s in slices], tf.int64)

    def read(path: tf.Tensor, start: tf.Tensor, take: tf.Tensor) -> tf.data.Dataset:
        return tf.data.TFRecordDataset(path).skip(start).take(take)

    return tf.data.Dataset.from_tensor_slices((paths, starts, takes)).interleave(
        read, cycle_length=min(cfg.cycle_length, len(slices)), block_length=1,
        num_parallel_calls=cfg.num_parallel_calls, deterministic=True)


def _model_inputs(features: dict[str, tf.Tensor], pp_name: str) -> dict[str, tf.Tensor]:
    """Picks image, labels and _keep from the pp output and checks they can be batched."""
    missing = [k for k in ("image", "labels") if k not in features]
    if missing:
        raise ValueError(f"{pp_name} must produce {missing}; it produced {sorted(features)}")
    image, labels = features["image"], features["labels"]
    if image.shape.rank != 3 or not image.shape.is_fully_defined():
        raise ValueError(f"{pp_name} must produce a fixed-size image [H, W, C] (end with a resize "
                         f"or crop to a size), got shape {image.shape}")
    if labels.dtype != tf.float32 or labels.shape.rank != 1 or not labels.shape.is_fully_defined():
        raise ValueError(f"{pp_name} must produce float32 labels [num_classes] (e.g. coyo_labels), "
                         f"got {labels.dtype.name} {labels.shape}")
    return {"image": tf.cast(image, tf.float32), "labels": labels,
            "_keep": tf.convert_to_tensor(features.get("_keep", True), tf.bool)}


def _pad_batch(batch: dict[str, tf.Tensor], batch_size: int) -> dict[str, tf.Tensor]:
    """Zero-pads a (last, partial) batch to batch_size; padded rows have _mask False."""
    missing = batch_size - tf.shape(batch["_mask"])[0]
    padded = {}
    for name, value in batch.items():
        paddings = [[0, missing]] + [[0, 0]] * (value.shape.rank - 1)
        padded[name] = tf.pad(value, paddings, constant_values=tf.zeros([], value.dtype))
        padded[name].set_shape([batch_size] + value.shape[1:].as_list())
    return padded


def _without(key: str):
    return lambda ex: {k: v for k, v in ex.items() if k != key}


def _options(cfg: InputConfig) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    if cfg.ram_budget_gb is not None:
        options.autotune.ram_budget = int(cfg.ram_budget_gb * 2**30)
    return options


def _files_spec(cfg: InputConfig) -> str | list[str]:
    return cfg.files if isinstance(cfg.files, str) else list(cfg.files)


def _as_dict(value: Any, what: str) -> dict[str, Any]:
    if hasattr(value, "to_dict"):  # ml_collections ConfigDict / FrozenConfigDict
        value = value.to_dict()
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a ConfigDict or dict, got {type(value).__name__}")
    return dict(value)


def _check_keys(values: Mapping[str, Any], valid: set[str], what: str) -> None:
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(f"{what} has unknown keys {unknown}; valid keys: {sorted(valid)}")


def _check_int(value: Any, name: str, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_seed(seed: Any) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or not -2**63 <= seed < 2**63:
        raise ValueError(f"seed must be an int that fits in int64, got {seed!r}")


def _check_process(process_index: int, process_count: int) -> None:
    _check_int(process_count, "process_count", 1)
    if not isinstance(process_index, int) or not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index!r}")
