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

Damaged data never stops training and never becomes a wrong target: every raw record either
trains or is skipped for a reason from `damage.SKIP_REASONS` (a JPEG that does not decode, a
truncated or corrupt TFRecord file, labels outside the class range, a listed key from
`exclude_keys_file`, ...). Skips leave gaps in `_index`; with `skip_counts=True` each batch also
carries `_skipped`, the per-reason counts so far (see `skip_accounting.SkipCounter`). With `strict=True` the first
damaged record stops the pipeline with an error naming the reason, the file and the record.
Files, `exclude_keys_file` and `strict` join the settings to keep fixed across a resume.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import tensorflow as tf

# InputConfig is parsed TensorFlow-free (run_config checks configs before TF is imported); it
# stays importable from here.
from coyo_vit.input_config import InputConfig, check_int
from input_pipeline import damage, pp_parser, relayout, sources
from input_pipeline.dataset_common import (
    as_written,
    check_process,
    check_seed,
    dataset_options,
    errors_before_progress,
    model_inputs,
    pad_batch,
    shuffle_by_seed,
)
from input_pipeline.skip_accounting import SkipScan

_INT64_MAX = 2**63 - 1
# Constants folded into the seed so each use of randomness gets its own stream.
_FILE_ORDER_STREAM = 1
_SHUFFLE_STREAM = 2
_EVAL_SPLITS = ("holdout", "all")


def build_train_dataset(input_config: Any, *, batch_size: int, seed: int, process_index: int = 0,
                        process_count: int = 1, start_position: int = 0,
                        skip_counts: bool = False, epoch_length: int | None = None,
                        layout: relayout.Layout | None = None) -> tf.data.Dataset:
    """Endless batches {image [b,H,W,3], labels f32 [b,C], _index int64 [b]} for this process;
    images are uint8 unless the pp ends in a float op such as value_range (then float32).

    `_index` counts raw records of this process's stream, so max(_index) + 1 of the last batch a
    trainer consumed is the `start_position` that resumes right after it (skipped records just
    leave gaps). With `skip_counts`, batches also hold `_skipped` int64 [b, len(SKIP_REASONS)]:
    row i counts, per reason, the records skipped since `start_position` up to example i.
    `epoch_length`: raw records per epoch of this process, for resuming past the first epoch;
    by default counted from the record headers, which is exact unless a file has a bad checksum
    mid-file (its headers promise records that cannot be read). A trainer that has counted
    `damaged_file` skips passes `train_epoch_length(..., read_payloads=True)` instead.
    `layout`: after a resume on another process count (input_pipeline.relayout), this process
    reads its prelude first, then its own files from the layout's base epoch.
    """
    cfg = InputConfig.from_config(input_config)
    if not cfg.pp_train:
        raise ValueError("input config needs pp_train, e.g. "
                         "'decode_jpeg_and_inception_crop(224)|flip_lr|"
                         "coyo_labels(\"threshold\", 0.1)'")
    check_int(batch_size, "batch_size", 1)
    check_int(start_position, "start_position", 0)
    check_seed(seed)
    if epoch_length is not None:
        check_int(epoch_length, "epoch_length", 1)
    mine = _training_sources(cfg, process_index, process_count)

    base_seed = tf.constant([seed, process_index], tf.int64)
    process = _record_processor(cfg.pp_train, "pp_train", _exclusion(cfg), cfg.strict, base_seed)
    if not cfg.strict:
        _check_records_process(mine, process, cfg)
    raw, start_epoch = _raw_train_stream(cfg, seed, mine, process_index, process_count,
                                         start_position, epoch_length, layout)
    ds = raw.map(process, num_parallel_calls=cfg.num_parallel_calls, deterministic=True)
    if not cfg.strict:
        # Drops records that are not a tf.Example or whose image does not decode (counted as
        # `unreadable` by SkipCounter); every other problem has a reason and reaches the scan.
        ds = ds.ignore_errors()
    ds = ds.scan(SkipScan.initial(start_epoch), SkipScan.step)
    ds = ds.filter(as_written(lambda ex: tf.equal(ex["_reason"], 0)))
    dropped = {"_reason", "_epoch"} | (set() if skip_counts else {"_skipped"})
    ds = ds.batch(batch_size, drop_remainder=True)
    # Dropping bookkeeping keys once per batch, not per record, is measurably cheaper (~7-30%).
    ds = ds.map(as_written(lambda batch: {k: v for k, v in batch.items() if k not in dropped}))
    return ds.prefetch(cfg.prefetch).with_options(dataset_options(cfg.ram_budget_gb))


def train_epoch_length(input_config: Any, *, process_index: int = 0, process_count: int = 1,
                       read_payloads: bool = False) -> int:
    """Raw records in one epoch of this process's training stream (damage markers included).

    From the record headers, or with `read_payloads` by reading every record as the stream does
    (checksums verified): exact also for a file with a bad checksum mid-file, at the cost of
    reading all of this process's data once.
    """
    cfg = InputConfig.from_config(input_config)
    return sources.count_records(_training_sources(cfg, process_index, process_count),
                                 allow_damaged=not cfg.strict, read_payloads=read_payloads)


# Records of the first files tried through the record processor before training starts.
_PROBE_RECORDS = 32


def _check_records_process(mine: list[sources.FileSlice], process: Callable, cfg: InputConfig
                           ) -> None:
    """Raises if the first records of this process's files all fail in the record processor.

    Outside strict mode a record whose processing raises is dropped before the skip-count scan,
    so a pp that fails on every record (a central_crop larger than every image, ...) would leave
    the endless stream spinning with no example and no error. Data damaged that thoroughly is
    reported here too. Reads the first records in file order, unshuffled: no buffer to fill.
    """
    probe = _read_slices(mine, cfg).map(
        as_written(lambda raw: {**raw, "_epoch": tf.constant(0, tf.int64)}))
    errors = errors_before_progress(probe.enumerate().take(_PROBE_RECORDS).map(process))
    if errors:
        raise ValueError(f"pp_train failed on each of the first {len(errors)} records of "
                         f"{mine[0].path} and the files after it, so training would wait forever "
                         f"for an example. pp_train: {cfg.pp_train!r}. The first error: {errors[0][:2000]}")


def _training_sources(cfg: InputConfig, process_index: int, process_count: int
                      ) -> list[sources.FileSlice]:
    """This process's training files (round-robin after the holdout), with clear errors."""
    check_process(process_index, process_count)
    train_sources, _ = sources.split_holdout(sources.list_files(_files_spec(cfg)),
                                             cfg.holdout_files, cfg.holdout_examples,
                                             allow_damaged=not cfg.strict)
    mine = train_sources[process_index::process_count]
    if not mine:
        raise ValueError(f"process_index={process_index} of process_count={process_count} gets no "
                         f"training file: there are only {len(train_sources)} after the holdout; "
                         f"use at most {len(train_sources)} processes or split the data into "
                         f"more shards")
    if not any(tf.io.gfile.stat(s.path).length > 0 for s in mine):
        raise ValueError(f"all training files of process {process_index} are empty: {mine}")
    return mine


def build_eval_dataset(input_config: Any, *, split: str = "holdout", batch_size: int,
                       process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
    """One pass of batches {image, labels, _mask bool [b]}, each padded to `batch_size`.

    Records are dealt round-robin to processes (record i goes to process i % process_count), so
    shares differ by at most one record. Every process yields the same number of batches,
    ceil(ceil(N / process_count) / batch_size) for N records (counted from the TFRecord headers),
    topping up with all-masked batches; skipped records (damaged or excluded) are dropped and show
    up as padding, or stop the pipeline in strict mode. Images whose label mode keeps no label are
    masked, not dropped. Note that each process reads (not decodes) every record of the split,
    which suits held-out sets; split="all" is meant for small datasets.
    """
    cfg = InputConfig.from_config(input_config)
    if not cfg.pp_eval:
        raise ValueError("input config needs pp_eval, e.g. "
                         "'decode|resize_small(256)|central_crop(224)|"
                         "coyo_labels(\"threshold\", 0.1)'")
    check_int(batch_size, "batch_size", 1)
    check_process(process_index, process_count)
    files = sources.list_files(_files_spec(cfg))
    if split == "holdout":
        if not (cfg.holdout_files or cfg.holdout_examples):
            raise ValueError("split='holdout' but the input config has no holdout: set "
                             "holdout.files or holdout.examples, or use split='all'")
        _, eval_sources = sources.split_holdout(files, cfg.holdout_files, cfg.holdout_examples,
                                                allow_damaged=not cfg.strict)
    elif split == "all":
        eval_sources = [sources.FileSlice(f) for f in files]
    else:
        raise ValueError(f"unknown eval split {split!r}; valid: {', '.join(_EVAL_SPLITS)}")
    total = sources.count_records(eval_sources, allow_damaged=not cfg.strict)
    if total == 0:
        raise ValueError(f"eval split {split!r} has no records in {len(eval_sources)} files")
    num_batches = math.ceil(math.ceil(total / process_count) / batch_size)

    process = _record_processor(cfg.pp_eval, "pp_eval", _exclusion(cfg), cfg.strict)
    no_positive = damage.code("no_positive_label")

    @as_written
    def to_eval(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return {"image": ex["image"], "labels": ex["labels"],
                "_mask": tf.equal(ex["_reason"], 0)}

    ds = _read_slices(eval_sources, cfg)
    ds = ds.shard(process_count, process_index)
    ds = ds.map(process, num_parallel_calls=cfg.num_parallel_calls, deterministic=True)
    if not cfg.strict:
        ds = ds.ignore_errors()
    ds = ds.filter(as_written(lambda ex: tf.logical_or(tf.equal(ex["_reason"], 0),
                                                       tf.equal(ex["_reason"], no_positive))))
    ds = ds.map(to_eval)
    ds = ds.batch(batch_size).map(as_written(lambda b: pad_batch(b, batch_size)))
    empty = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), ds.element_spec)
    ds = ds.concatenate(tf.data.Dataset.from_tensors(empty).repeat()).take(num_batches)
    return ds.prefetch(cfg.prefetch).with_options(dataset_options(cfg.ram_budget_gb))


def count_records(files: Any) -> int:
    """Number of records in a file spec (see sources.list_files) or a list of paths/FileSlices."""
    if isinstance(files, str) or (isinstance(files, (list, tuple))
                                  and all(isinstance(f, str) for f in files)):
        files = sources.list_files(files)
    return sources.count_records(files)


def stream_records(input_config: Any, *, seed: int, process_index: int = 0,
                   process_count: int = 1, start: int = 0, stop: int,
                   epoch_length: int | None = None, layout: relayout.Layout | None = None
                   ) -> list[tuple[str, int, int]]:
    """(file, record number in the file, epoch) of the raw records [start, stop) of a process's
    training stream, in the order training reads them; a prelude's records carry the epoch they
    were owed to. Reads the records, decodes nothing: for auditing which records a run trained
    (everything below a process's checkpointed position), e.g. across an elastic resume.
    """
    cfg = InputConfig.from_config(input_config)
    mine = _training_sources(cfg, process_index, process_count)
    raw, _ = _raw_train_stream(cfg, seed, mine, process_index, process_count, start, epoch_length,
                               layout, mark_prelude=False)
    return [(r["_path"].decode(), int(r["_record"]), int(r["_epoch"]))
            for _, r in raw.take(stop - start).as_numpy_iterator()]


def _epoch_reader(mine: list[sources.FileSlice], base_seed: tf.Tensor, cfg: InputConfig
                  ) -> Callable[[tf.Tensor], tf.data.Dataset]:
    """`epoch -> raw records of that epoch` of a stream over the files `mine`: the files
    shuffled per epoch, interleaved, the records shuffled per epoch, all by `base_seed`."""
    paths = tf.constant([s.path for s in mine])
    starts = tf.constant([s.start for s in mine], tf.int64)
    file_seed = tf.random.experimental.stateless_fold_in(base_seed, _FILE_ORDER_STREAM)
    shuffle_seed = tf.random.experimental.stateless_fold_in(base_seed, _SHUFFLE_STREAM)

    @as_written
    def epoch_records(epoch: tf.Tensor) -> tf.data.Dataset:
        order = tf.random.experimental.stateless_shuffle(
            tf.range(len(mine)), tf.random.experimental.stateless_fold_in(file_seed, epoch))
        files = tf.data.Dataset.from_tensor_slices((tf.gather(paths, order),
                                                    tf.gather(starts, order)))
        records = files.interleave(
            as_written(lambda path, start: sources.read_file_records(path, {"_epoch": epoch})
                       .skip(start)),
            cycle_length=min(cfg.cycle_length, len(mine)), block_length=1,
            num_parallel_calls=cfg.num_parallel_calls, deterministic=True)
        epoch_shuffle_seed = tf.random.stateless_uniform(
            [], tf.random.experimental.stateless_fold_in(shuffle_seed, epoch), minval=None,
            maxval=None, dtype=tf.int64)
        return shuffle_by_seed(records, cfg.shuffle_buffer, epoch_shuffle_seed)

    return epoch_records


def _prelude(cfg: InputConfig, seed: int, pieces: tuple[relayout.StreamPiece, ...]
             ) -> tf.data.Dataset:
    """The raw records of a prelude: each piece read from its old process's stream, as that
    process would have read it (its files, its seed, its epoch), in order."""
    readers: dict[tuple[int, int], Callable[[tf.Tensor], tf.data.Dataset]] = {}
    parts = []
    for piece in pieces:
        key = (piece.process_index, piece.process_count)
        if key not in readers:
            readers[key] = _epoch_reader(_training_sources(cfg, *key), tf.constant(
                [seed, piece.process_index], tf.int64), cfg)
        parts.append(tf.data.Dataset.from_tensors(tf.constant(piece.epoch, tf.int64))
                     .flat_map(readers[key]).skip(piece.start).take(piece.length))
    return functools.reduce(tf.data.Dataset.concatenate, parts)


def _raw_train_stream(cfg: InputConfig, seed: int, mine: list[sources.FileSlice],
                      process_index: int, process_count: int,
                      start_position: int, epoch_length: int | None = None,
                      layout: relayout.Layout | None = None, mark_prelude: bool = True
                      ) -> tuple[tf.data.Dataset, int]:
    """Endless (index, raw record dict) stream from raw record `start_position`, and its first
    epoch, over this process's files `mine` (`_training_sources`). Raw records are
    `sources.read_file_records` dicts plus `_epoch`. With a `layout`, the
    process's prelude comes first; its records have `_epoch` -1 (one pseudo-epoch, so the
    empty-epoch guard never fires on a short piece) unless not `mark_prelude`."""
    layout = layout or relayout.Layout(process_count)
    if layout.process_count != process_count:
        raise ValueError(f"a layout of {layout.process_count} processes cannot serve process "
                         f"{process_index} of {process_count}")
    epoch_records = _epoch_reader(mine, tf.constant([seed, process_index], tf.int64), cfg)
    prelude_length = layout.prelude_length(process_index)
    if start_position < prelude_length:
        prelude = _prelude(cfg, seed, layout.preludes[process_index])
        if mark_prelude:
            prelude = prelude.map(as_written(lambda raw: {**raw, "_epoch": tf.constant(-1, tf.int64)}))
        ds = prelude.concatenate(tf.data.Dataset.range(layout.base_epoch, _INT64_MAX)
                                 .flat_map(epoch_records))
        return ds.enumerate().skip(start_position), -1
    # Whole epochs are skipped arithmetically (one header count of this process's files, unless
    # the caller knows the exact length); only the rest of the last epoch is read through, and it
    # is never parsed or decoded. A damaged file counts as its good records plus one, as
    # read_file_records yields it.
    start_epoch, skip = 0, start_position - prelude_length
    if skip:
        if epoch_length is None:
            epoch_length = sources.count_records(mine, allow_damaged=not cfg.strict)
        start_epoch, skip = divmod(skip, epoch_length)
    start_epoch += layout.base_epoch
    ds = tf.data.Dataset.range(start_epoch, _INT64_MAX).flat_map(epoch_records)
    return ds.enumerate(start=start_position - skip).skip(skip), start_epoch


def _read_slices(slices: list[sources.FileSlice], cfg: InputConfig) -> tf.data.Dataset:
    """Raw record dicts of each FileSlice, interleaved in a fixed order."""
    paths = tf.constant([s.path for s in slices])
    starts = tf.constant([s.start for s in slices], tf.int64)
    takes = tf.constant([-1 if s.stop is None else s.stop - s.start for s in slices], tf.int64)
    return tf.data.Dataset.from_tensor_slices((paths, starts, takes)).interleave(
        sources.read_slice, cycle_length=min(cfg.cycle_length, len(slices)), block_length=1,
        num_parallel_calls=cfg.num_parallel_calls, deterministic=True)


def _exclusion(cfg: InputConfig) -> Callable[[dict[str, tf.Tensor]], tf.Tensor] | None:
    """`features -> bool` for records listed in exclude_keys_file, or None without a list."""
    if cfg.exclude_keys_file is None:
        return None
    if not tf.io.gfile.exists(cfg.exclude_keys_file):
        raise FileNotFoundError(f"input.exclude_keys_file {cfg.exclude_keys_file!r} does not exist")
    field, values = sources.read_exclusion_list(cfg.exclude_keys_file)
    if not values:
        return None
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(values, tf.string),
                                            tf.ones([len(values)], tf.int64)), default_value=0)
    return as_written(lambda features: tf.equal(table.lookup(features[field]), 1))


def _record_processor(pp: str, pp_name: str,
                      excluded: Callable[[dict[str, tf.Tensor]], tf.Tensor] | None, strict: bool,
                      base_seed: tf.Tensor | None = None) -> Callable:
    """Maps a raw record to {image, labels, _reason, ...} with the pp string `pp`.

    `_reason` is 0 for a usable example, else the code of the first problem found (damage.py):
    a damaged file, an excluded key, missing or non-image bytes, bad label lists (all checked
    without running the pp, which is skipped for them; labels against the class count of the
    pp's `coyo_labels`), or a label mode that keeps no label.
    `image` and `labels` are zeros when skipped. With `base_seed`, random pp ops get their seed
    from (base_seed, index).

    Two failures can only be found by trying: a record that is not a tf.Example, and image bytes
    that do not decode. By default they raise, and the caller's ignore_errors drops them (they show
    as `_index` gaps not covered by `_skipped`: SkipCounter reports them as `unreadable`). In strict
    mode each try is isolated (damage.try_apply, about 1 ms a record) so the error can name the
    file and record; strict mode then fails on every damage reason.
    """
    preprocess = pp_parser.parse(pp)
    label_classes = min([op["num_classes"] for op in pp_parser.op_arguments(pp, "coyo_labels")],
                        default=damage.NUM_CLASSES)

    def to_model_inputs(features: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return model_inputs(preprocess(features), pp_name, "coyo_labels")

    # Plain TF ops and Python-level ifs only: AutoGraph would just re-transpile it on every build.
    @tf.autograph.experimental.do_not_convert
    def process(*args: Any) -> dict[str, tf.Tensor]:
        index, raw = args if len(args) == 2 else (None, args[0])
        if strict:
            parsed, features = damage.try_apply(sources.parse_example, raw["_serialized"])
        else:
            parsed, features = tf.constant(True), sources.parse_example(raw["_serialized"])
        data = features["jpg"]
        reason = damage.first_reason([
            (raw["_damaged"], "damaged_file"),
            (tf.logical_not(parsed), "not_an_example"),
            (excluded(features) if excluded else tf.constant(False), "excluded"),
            (tf.equal(tf.strings.length(data), 0), "no_image"),
            (tf.logical_not(damage.looks_like_image(data)), "not_an_image"),
            *damage.label_conditions(features["labels"], features["label_probs"], label_classes),
        ])
        if index is not None:
            features["rng"] = tf.random.experimental.stateless_fold_in(base_seed, index)
        usable = tf.equal(reason, 0)
        if strict:
            ran, out = damage.try_apply(to_model_inputs, features, run=usable)
        else:
            ran = tf.constant(True)
            traced: dict[str, Any] = {}

            def run() -> dict[str, tf.Tensor]:
                traced["out"] = to_model_inputs(features)
                return traced["out"]

            def skip() -> dict[str, tf.Tensor]:  # traced after run(): zeros of its shapes
                return tf.nest.map_structure(lambda t: tf.zeros(t.shape, t.dtype), traced["out"])

            out = tf.cond(usable, run, skip)
        reason = tf.where(usable, damage.first_reason([
            (tf.logical_not(ran), "undecodable_image"),
            (tf.logical_not(out["_keep"]), "no_positive_label")]), reason)
        if strict:
            reason = _assert_not_damaged(reason, raw)
        result = {"image": out["image"], "labels": out["labels"], "_reason": reason}
        if index is not None:
            result.update(_index=index, _epoch=raw["_epoch"])
        return result

    return process


def _assert_not_damaged(reason: tf.Tensor, raw: dict[str, tf.Tensor]) -> tf.Tensor:
    """Strict mode: fails on a damaged record, naming the reason, the file and the record."""
    allowed = [0] + [damage.code(r) for r in damage.NOT_DAMAGE]
    ok = tf.reduce_any(tf.equal(reason, tf.constant(allowed, tf.int32)))

    def fail() -> tf.Tensor:
        message = tf.strings.join([
            "input.strict: ", damage.reason_name(reason), " in ", raw["_path"], " record ",
            tf.strings.as_string(raw["_record"]), " (run python -m input_pipeline.tools.validate_shards "
            "on the file; set input.strict=False to skip and count such records)"])
        with tf.control_dependencies([tf.debugging.Assert(False, [message])]):
            return tf.identity(reason)

    return tf.cond(ok, lambda: reason, fail)


def _files_spec(cfg: InputConfig) -> str | list[str]:
    return cfg.files if isinstance(cfg.files, str) else list(cfg.files)


