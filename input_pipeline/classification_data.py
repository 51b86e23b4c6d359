"""Train and eval tf.data pipelines for classification data: TFDS datasets and image folders.

Same contract as `input_pipeline.pipeline` (the COYO shards), so the train loop and evaluators
treat both alike:

- `build_train_dataset(...)`: endless batches {image [b,H,W,3] (uint8, or float32 after a
  float op such as value_range), labels f32 [b,C], _index int64 [b]}. The raw example stream of a process depends only on the seed; `_index` is
  each example's position in it, augmentation seeds come from (seed, process_index, _index),
  and `start_position=max(_index) + 1` of the last consumed batch resumes exactly after it.
- `build_eval_dataset(...)`: one pass of batches {image, labels, label int32 [b],
  file_name string [b], _mask bool [b]}, padded to the batch size; every process yields the
  same number of batches. `label` is the dataset's integer class and `file_name` the image's
  file name (TFDS `file_name` feature, or the file's base name in an image folder; "" when the
  dataset has none): evaluators use them for top-k and ImageNet-ReaL. Pick the keys you send
  to devices: `file_name` is a string.

The input config (`config.input`):

    data=dict(name="tfds", tfds_name="imagenet2012", split="train", data_dir=None,
              manual_dir=None, image_key="image", label_key="label", file_name_key="file_name")
    data=dict(name="imagefolder", root="/data/digits", split="train")
    pp_train="decode_jpeg_and_inception_crop(384)|flip_lr|onehot(1000)",
    pp_eval="decode|resize(384)|onehot(1000)", strict=False,
    shuffle_buffer=25_000, cycle_length=16, num_parallel_calls=-1, prefetch=2, ram_budget_gb=None

`split` is a TFDS split string (slices like "train[:99%]" work) or an image-folder split
directory. The pp receives {image (encoded bytes), label, file_name} and must produce a
fixed-size `image` and float32 `labels` with as many classes as the dataset has (checked).
TFDS datasets must be prepared first (`prepare(data)`, on one process): pipelines never
download, so a multi-host job cannot race on the preparation.

Shuffling: an image folder is listed in memory, so each epoch is a full stateless permutation
and a resume skips arithmetically. A TFDS split is read in its stored file order (TFDS
shuffles examples when it prepares a dataset) through a per-epoch-seeded shuffle buffer of
serialized examples; a resume reads through (without decoding) the rest of its epoch.
Processes read disjoint contiguous parts of the split (`tfds.even_splits`, or ranges of the
sorted folder listing). Keep data, pp_train, shuffle_buffer and cycle_length fixed across a
resume: they define the stream.

Damaged images are skipped and counted like damaged COYO shard records: bytes that are no image
get the reason `not_an_image`; an image that does not decode (e.g. a truncated JPEG) is dropped
and counted as `unreadable` (an `_index` gap; in strict mode and eval, where each pp runs
isolated with `damage.try_apply`, it is `undecodable_image`). With
`skip_counts=True` batches carry `_skipped` (per-reason counts, `skip_accounting.SkipCounter`)
and `_skipped_names` (the reason and file of the first few skipped images, for the log; a
folder's full path, TFDS's `file_name` or the example's stream index). Skips leave `_index`
gaps, so a resume stays exact. `strict=True` stops at the first one with an error naming the
file. Eval batches mask damaged images (`_mask` False) and mark them in `_damaged`.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping

import tensorflow as tf

from coyo_vit import input_config
from coyo_vit.input_config import ClassificationInputConfig, DataSpec, check_int
from input_pipeline import (
    damage,
    imagefolder,
    ops_classification,  # noqa: F401  (registers `onehot`)
    pp_parser,
    relayout,
)
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
from input_pipeline.skip_accounting import SkipNames, SkipScan

# The input section is parsed TensorFlow-free in coyo_vit/input_config.py (run_config checks a
# whole config before TensorFlow is imported); these names stay importable from here.
SOURCES = input_config.SOURCES
is_classification_data = input_config.is_classification_data
_INT64_MAX = 2**63 - 1
_SHUFFLE_STREAM = 2  # folded into the seed: the stream of per-epoch shuffle seeds


def prepare(data: Any) -> None:
    """Downloads and prepares a TFDS dataset (a no-op for image folders and prepared datasets).

    Run it on one process before building pipelines. Datasets that need a manual download
    (imagenet2012) read their archives from data.manual_dir; an unprepared one without
    manual_dir is an error (also under tfds.testing.mock_data, which fakes only reading:
    give any existing directory there).
    """
    spec = DataSpec.from_config(data)
    if spec.name != "tfds":
        return
    import tensorflow_datasets as tfds

    builder = _tfds_builder(spec.tfds_name, spec.data_dir)
    if builder.is_prepared():  # nothing to do, and no manual_dir needed any more
        return
    manual = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    if manual and not spec.manual_dir:
        raise ValueError(f"TFDS dataset {spec.tfds_name!r} needs a manual download: set "
                         f"data.manual_dir to the directory holding its archives. TFDS says: "
                         f"{' '.join(manual.split())}")
    if spec.manual_dir and not tf.io.gfile.isdir(spec.manual_dir):
        raise FileNotFoundError(f"data.manual_dir {spec.manual_dir!r} is not a directory")
    config = tfds.download.DownloadConfig(manual_dir=spec.manual_dir)
    builder.download_and_prepare(download_config=config)


def num_classes(data: Any) -> int | None:
    """The dataset's class count (TFDS ClassLabel or image-folder classes); None if unknown."""
    return _make_source(DataSpec.from_config(data)).num_classes


def class_names(data: Any) -> tuple[str, ...] | None:
    """The dataset's class names in label order: an image folder's class directories (sorted,
    as labelled; digits' "0".."9" too), a TFDS ClassLabel's names; None when the label feature
    has none or only numbers them (`ClassLabel(num_classes=N)` names class i "i"). Lists only
    directories (no images) and reads only TFDS's dataset info."""
    spec = DataSpec.from_config(data)
    if spec.name == "imagefolder":
        return imagefolder.list_classes(spec.root)
    features = _tfds_builder(spec.tfds_name, spec.data_dir).info.features
    names = getattr(features[spec.label_key], "names", None) if spec.label_key in features else None
    if not names or list(names) == [str(i) for i in range(len(names))]:
        return None
    return tuple(names)


def count_examples(data: Any, split: str | None = None) -> int:
    """Examples in the split (data.split unless `split` is given)."""
    source = _make_source(DataSpec.from_config(data).with_split(split))
    return source.total


def build_train_dataset(input_config: Any, *, batch_size: int, seed: int, process_index: int = 0,
                        process_count: int = 1, start_position: int = 0,
                        skip_counts: bool = False, layout: relayout.Layout | None = None
                        ) -> tf.data.Dataset:
    """Endless batches {image, labels, _index} of this process (see the module docstring); with
    `skip_counts` also `_skipped` and `_skipped_names`. `layout`: after a resume on another
    process count (input_pipeline.relayout), this process reads its prelude first."""
    cfg = ClassificationInputConfig.from_config(input_config)
    if not cfg.pp_train:
        raise ValueError("input config needs pp_train, e.g. 'decode_jpeg_and_inception_crop(224)|"
                         "flip_lr|onehot(1000)'")
    check_int(batch_size, "batch_size", 1)
    check_int(start_position, "start_position", 0)
    check_seed(seed)
    check_process(process_index, process_count)
    source = _make_source(cfg.data)
    base_seed = tf.constant([seed, process_index], tf.int64)
    raw, epoch_length = _train_stream(source, cfg, seed, process_index, process_count,
                                      start_position, layout)
    preprocess = pp_parser.parse(cfg.pp_train)

    def to_model_inputs(features: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return model_inputs(preprocess(features), "pp_train", "onehot(num_classes)")

    @tf.autograph.experimental.do_not_convert  # TF ops only
    def process(index: tf.Tensor, example: dict[str, tf.Tensor], recent: tf.Tensor
                ) -> dict[str, tf.Tensor]:
        features = dict(example, rng=tf.random.experimental.stateless_fold_in(base_seed, index))
        name = _example_name(example, index)
        if cfg.strict:
            reason, out = _checked_pp(to_model_inputs, features)
            reason = _assert_not_damaged(reason, name, source.description)
        else:  # an image that does not decode raises: dropped below, named from `_recent`
            reason, out = _guarded_pp(to_model_inputs, features)
        return {"image": out["image"], "labels": out["labels"], "_index": index,
                "_reason": reason, "_epoch": index // epoch_length, "_name": name,
                "_recent": recent}

    if not cfg.strict:
        _check_stream_progresses(source, process, cfg, process_index, process_count)
    ds = raw.scan(tf.fill([SkipNames.LOG_FIRST], ""), _remember_names)
    ds = ds.map(process, num_parallel_calls=cfg.num_parallel_calls, deterministic=True)
    _check_num_classes(ds.element_spec, source, "pp_train")
    if not cfg.strict:
        # Drops images that do not decode (counted as `unreadable` by SkipCounter from the
        # `_index` gaps); isolating each decode instead (damage.try_apply, as strict mode does)
        # cost 1.3-2 ms per 224px image here, about 40% of the pipeline.
        ds = ds.ignore_errors()
    ds = ds.scan(SkipScan.initial(start_position // epoch_length), SkipScan.step)
    ds = ds.scan(SkipNames.initial(start_position), SkipNames.step)
    ds = ds.filter(as_written(lambda ex: tf.equal(ex["_reason"], 0)))
    dropped = {"_reason", "_epoch", "_name", "_recent"} | (
        set() if skip_counts else {"_skipped", "_skipped_names"})
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds.map(as_written(lambda batch: {k: v for k, v in batch.items() if k not in dropped}))
    return ds.prefetch(cfg.prefetch).with_options(dataset_options(cfg.ram_budget_gb))


def build_eval_dataset(input_config: Any, *, split: str | None = None, batch_size: int,
                       process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
    """One padded pass {image, labels, label, file_name, _mask} over `split` (default data.split).

    Process p reads the p-th contiguous part of the split; every process yields
    ceil(ceil(N / process_count) / batch_size) batches, topping up with all-masked ones.
    Examples whose pp sets `_keep` False are masked, not dropped; so are damaged images
    (bytes that are no image or do not decode), which `_damaged` marks, with `_name` naming
    them (a folder image's path, else `file_name`); strict: an error.
    """
    cfg = ClassificationInputConfig.from_config(input_config)
    if not cfg.pp_eval:
        raise ValueError("input config needs pp_eval, e.g. 'decode|resize(384)|"
                         "onehot(1000)'")
    check_int(batch_size, "batch_size", 1)
    check_process(process_index, process_count)
    source = _make_source(cfg.data.with_split(split))
    most = math.ceil(source.total / process_count)
    num_batches = math.ceil(most / batch_size)
    preprocess = pp_parser.parse(cfg.pp_eval)

    def to_model_inputs(features: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return model_inputs(preprocess(features), "pp_eval", "onehot(num_classes)")

    @tf.autograph.experimental.do_not_convert  # TF ops only
    def process(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        reason, out = _checked_pp(to_model_inputs, dict(example))
        if cfg.strict:
            reason = _assert_not_damaged(reason, _example_name(example), source.description)
        damaged = tf.not_equal(reason, 0) & tf.not_equal(reason, _NOT_KEPT)
        return {"image": out["image"], "labels": out["labels"], "label": example["label"],
                "file_name": example["file_name"], "_mask": tf.equal(reason, 0),
                "_damaged": damaged, "_name": _example_name(example)}

    ds = source.examples(process_index, process_count, cfg)
    ds = ds.map(process, num_parallel_calls=cfg.num_parallel_calls, deterministic=True)
    _check_num_classes(ds.element_spec, source, "pp_eval")
    ds = ds.batch(batch_size).map(as_written(lambda b: pad_batch(b, batch_size)))
    empty = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), ds.element_spec)
    ds = ds.concatenate(tf.data.Dataset.from_tensors(empty).repeat()).take(num_batches)
    return ds.prefetch(cfg.prefetch).with_options(dataset_options(cfg.ram_budget_gb))


# --------------------------------------------------------------------------- sources


class _FolderSource:
    """An image-folder split, listed in memory."""

    def __init__(self, spec: DataSpec):
        self.folder = imagefolder.list_split(spec.root, spec.split)
        self.num_classes: int | None = len(self.folder.classes)
        self.total = len(self.folder)
        self.description = f"image folder {spec.root!r} split {spec.split!r}"

    def _share(self, process_index: int, process_count: int) -> tuple[list[str], list[int]]:
        start = self.total * process_index // process_count
        stop = self.total * (process_index + 1) // process_count
        return list(self.folder.paths[start:stop]), list(self.folder.labels[start:stop])

    @staticmethod
    @as_written
    def _read(path: tf.Tensor, label: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"image": tf.io.read_file(path), "label": tf.cast(label, tf.int32),
                "file_name": tf.strings.split(path, "/")[-1], "_path": path}

    def examples(self, process_index: int, process_count: int,
                 cfg: ClassificationInputConfig) -> tf.data.Dataset:
        paths, labels = self._share(process_index, process_count)
        ds = tf.data.Dataset.from_tensor_slices((tf.constant(paths, tf.string),
                                                 tf.constant(labels, tf.int64)))
        return ds.map(self._read, num_parallel_calls=cfg.num_parallel_calls, deterministic=True)

    def epoch_reader(self, process_index: int, process_count: int, seed: int,
                     cfg: ClassificationInputConfig) -> tuple[EpochReader, int]:
        """`(epoch, start, take) -> examples` of the process's share, and its length: epoch e is
        a stateless permutation of the share seeded by (seed, process, e); skipping slices the
        permutation, nothing is read."""
        paths, labels = self._share(process_index, process_count)
        if not paths:
            raise ValueError(f"process {process_index} of {process_count} gets no example of "
                             f"{self.description} ({self.total} images); use fewer processes")
        paths_t = tf.constant(paths, tf.string)
        labels_t = tf.constant(labels, tf.int64)
        shuffle_seed = tf.random.experimental.stateless_fold_in(
            tf.constant([seed, process_index], tf.int64), _SHUFFLE_STREAM)

        @as_written
        def read(e: tf.Tensor, start: tf.Tensor, take: tf.Tensor) -> tf.data.Dataset:
            order = tf.random.experimental.stateless_shuffle(
                tf.range(len(paths), dtype=tf.int64),
                tf.random.experimental.stateless_fold_in(shuffle_seed, e))
            order = order[start:] if take is None else order[start:start + take]
            return tf.data.Dataset.from_tensor_slices(
                (tf.gather(paths_t, order), tf.gather(labels_t, order))).map(
                self._read, num_parallel_calls=cfg.num_parallel_calls, deterministic=True)

        return read, len(paths)


class _TfdsSource:
    """A split of a prepared TFDS dataset, read as encoded images (no decoding here)."""

    def __init__(self, spec: DataSpec):
        self.spec = spec
        self.builder = _tfds_builder(spec.tfds_name, spec.data_dir)
        features = self.builder.info.features
        for role in ("image_key", "label_key"):
            if getattr(spec, role) not in features:
                raise ValueError(f"TFDS dataset {spec.tfds_name!r} has no feature "
                                 f"{getattr(spec, role)!r} (data.{role}); features: "
                                 f"{sorted(features.keys())}")
        self.num_classes = getattr(features[spec.label_key], "num_classes", None)
        self.description = f"TFDS {spec.tfds_name!r} split {spec.split!r}"
        known = list(self.builder.info.splits.keys())
        if known:  # empty for a dataset that is not prepared (then as_dataset says so below)
            try:
                self.builder.info.splits[spec.split]
            except (ValueError, KeyError) as e:
                raise ValueError(f"TFDS dataset {spec.tfds_name!r} has no split {spec.split!r} "
                                 f"({e}); splits: {sorted(known)}") from None
        self.total = self._count(self._read(spec.split, 16))

    def _read(self, split: Any, cycle_length: int) -> tf.data.Dataset:
        import tensorflow_datasets as tfds

        features = self.builder.info.features
        decoders = ({self.spec.image_key: tfds.decode.SkipDecoding()}
                    if isinstance(features[self.spec.image_key], tfds.features.Image) else None)
        read_config = tfds.ReadConfig(interleave_cycle_length=cycle_length, try_autocache=False)
        try:
            return self.builder.as_dataset(split=split, shuffle_files=False, decoders=decoders,
                                           read_config=read_config)
        except AssertionError as e:  # TFDS's "dataset not found at data_dir"
            raise ValueError(self._not_prepared_message(e)) from None

    def _not_prepared_message(self, error: Exception) -> str:
        message = (f"TFDS dataset {self.spec.tfds_name!r} is not prepared in data_dir "
                   f"{self.spec.data_dir!r} ({' '.join(str(error).split())[:300]}). Prepare it once "
                   f"with input_pipeline.classification_data.prepare(config.input.data)")
        if getattr(self.builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
            if not self.spec.manual_dir:
                message += (f"; it needs a manual download: set data.manual_dir to the directory "
                            f"holding its archives ({' '.join(self.builder.MANUAL_DOWNLOAD_INSTRUCTIONS.split())})")
            else:
                message += f" (archives from data.manual_dir={self.spec.manual_dir!r})"
        return message

    def _count(self, ds: tf.data.Dataset) -> int:
        count = int(ds.cardinality())
        if count < 0:
            raise ValueError(f"cannot count the examples of {self.description}")
        return count

    def _process_split(self, process_index: int, process_count: int) -> Any:
        import tensorflow_datasets as tfds

        if process_count == 1:
            return self.spec.split
        return tfds.even_splits(self.spec.split, n=process_count)[process_index]

    def examples(self, process_index: int, process_count: int,
                 cfg: ClassificationInputConfig) -> tf.data.Dataset:
        ds = self._read(self._process_split(process_index, process_count), cfg.cycle_length)
        if self._count(ds) > math.ceil(self.total / process_count):
            raise ValueError(f"{self.description}: process {process_index} got more than its share "
                             f"of {self.total} examples")
        spec = self.spec
        has_name = spec.file_name_key in self.builder.info.features

        @as_written
        def rename(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            return {"image": ex[spec.image_key], "label": tf.cast(ex[spec.label_key], tf.int32),
                    "file_name": ex[spec.file_name_key] if has_name else tf.constant("")}

        return ds.map(rename)

    def epoch_reader(self, process_index: int, process_count: int, seed: int,
                     cfg: ClassificationInputConfig) -> tuple[EpochReader, int]:
        """`(epoch, start, take) -> examples` of the process's part, and its length: epoch e is
        the part in stored order through a shuffle buffer seeded by (seed, process, e)."""
        base = self.examples(process_index, process_count, cfg)
        length = self._count(base)
        if length == 0:
            raise ValueError(f"process {process_index} of {process_count} gets no example of "
                             f"{self.description} ({self.total} examples); use fewer processes")
        shuffle_seed = tf.random.experimental.stateless_fold_in(
            tf.constant([seed, process_index], tf.int64), _SHUFFLE_STREAM)

        @as_written
        def read(e: tf.Tensor, start: tf.Tensor, take: tf.Tensor) -> tf.data.Dataset:
            epoch_seed = tf.random.stateless_uniform(
                [], tf.random.experimental.stateless_fold_in(shuffle_seed, e), minval=None,
                maxval=None, dtype=tf.int64)
            ds = shuffle_by_seed(base, cfg.shuffle_buffer, epoch_seed).skip(start)
            return ds if take is None else ds.take(take)

        return read, length


EpochReader = Callable[[tf.Tensor, tf.Tensor, Any], tf.data.Dataset]
"""`(epoch, start, take) -> examples [start, start + take) of that epoch of a process's stream`
(take None: to the end of the epoch); call it inside a dataset function (shuffle_by_seed)."""


def train_epoch_length(data: Any, *, process_index: int = 0, process_count: int = 1) -> int:
    """Examples in one epoch of a process's training stream (its share of the split)."""
    source = _make_source(DataSpec.from_config(data))
    if isinstance(source, _FolderSource):
        return len(source._share(process_index, process_count)[0])
    return source._count(source._read(source._process_split(process_index, process_count), 16))


def _train_stream(source: Any, cfg: ClassificationInputConfig, seed: int, process_index: int,
                  process_count: int, start_position: int, layout: relayout.Layout | None
                  ) -> tuple[tf.data.Dataset, int]:
    """(index, example) from `start_position`, and the epoch length of the process's own share.
    With a `layout`, the process's prelude (pieces of the old processes' epochs, each read as
    that process would have) comes first, then its own epochs from the layout's base epoch."""
    layout = layout or relayout.Layout(process_count)
    read, length = source.epoch_reader(process_index, process_count, seed, cfg)
    prelude_length = layout.prelude_length(process_index)
    if start_position < prelude_length:
        readers: dict[tuple[int, int], EpochReader] = {}
        parts = []
        for piece in layout.preludes[process_index]:
            key = (piece.process_index, piece.process_count)
            if key not in readers:
                readers[key] = source.epoch_reader(*key, seed, cfg)[0]
            parts.append(tf.data.Dataset.from_tensors(tf.constant(piece.epoch, tf.int64)).flat_map(
                as_written(lambda e, r=readers[key], p=piece: r(e, p.start, p.length))))
        own = tf.data.Dataset.range(layout.base_epoch, _INT64_MAX).flat_map(
            as_written(lambda e: read(e, 0, None)))
        ds = functools.reduce(tf.data.Dataset.concatenate, parts).concatenate(own)
        return ds.enumerate().skip(start_position), length
    start_epoch, skip = divmod(start_position - prelude_length, length)
    start_epoch += layout.base_epoch
    ds = tf.data.Dataset.range(start_epoch, _INT64_MAX).flat_map(
        as_written(lambda e: read(e, tf.where(tf.equal(e, start_epoch), tf.constant(skip, tf.int64),
                                              tf.constant(0, tf.int64)), None)))
    return ds.enumerate(start=start_position), length


def _make_source(spec: DataSpec) -> _FolderSource | _TfdsSource:
    return _FolderSource(spec) if spec.name == "imagefolder" else _TfdsSource(spec)


@functools.lru_cache(maxsize=16)
def _tfds_builder(name: str, data_dir: str | None):
    """The TFDS builder (cached: evaluators rebuild pipelines at every evaluation)."""
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        first_line = str(e).strip().splitlines()[0]
        raise ValueError(f"unknown TFDS dataset {name!r} (data.tfds_name): {first_line}; see "
                         f"tfds.list_builders() for the valid names") from None


# --------------------------------------------------------------------------- damaged images

_NOT_KEPT = damage.code("no_positive_label")  # the pp's own `_keep` False: not damage


def _checked_pp(to_model_inputs: Any, features: dict[str, tf.Tensor]
                ) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
    """(reason code, pp output): 0, `not_an_image` (bytes no decoder takes, not decoded),
    `undecodable_image` (the pp failed on them: a truncated or corrupt image), or
    `no_positive_label` when the pp set `_keep` False. The pp runs isolated (damage.try_apply),
    so a failure keeps the example and its file name instead of stopping the pipeline."""
    image = features["image"]
    looks = damage.looks_like_image(image) if image.dtype == tf.string else tf.constant(True)
    ran, out = damage.try_apply(to_model_inputs, features, run=looks)
    reason = damage.first_reason([(tf.logical_not(looks), "not_an_image"),
                                  (tf.logical_not(ran), "undecodable_image"),
                                  (tf.logical_not(out["_keep"]), "no_positive_label")])
    return reason, out


def _guarded_pp(to_model_inputs: Any, features: dict[str, tf.Tensor]
                ) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
    """`_checked_pp` without the isolation: bytes that are no image get `not_an_image` (and are
    not decoded), an image that does not decode raises."""
    image = features["image"]
    looks = damage.looks_like_image(image) if image.dtype == tf.string else tf.constant(True)
    traced: dict[str, Any] = {}

    def run() -> dict[str, tf.Tensor]:
        traced["out"] = to_model_inputs(features)
        return traced["out"]

    def skip() -> dict[str, tf.Tensor]:  # traced after run(): zeros of its shapes
        return tf.nest.map_structure(lambda t: tf.zeros(t.shape, t.dtype), traced["out"])

    out = tf.cond(looks, run, skip)
    reason = damage.first_reason([(tf.logical_not(looks), "not_an_image"),
                                  (tf.logical_not(out["_keep"]), "no_positive_label")])
    return reason, out


@tf.autograph.experimental.do_not_convert
def _remember_names(recent: tf.Tensor, *element: Any) -> tuple[tf.Tensor, tuple]:
    """Scan over the raw (index, example) stream: each element gets the names of the
    `SkipNames.LOG_FIRST` raw examples before it, so the ones that fail to decode (and are
    dropped) can still be named."""
    index, example = element if len(element) == 2 else element[0]
    name = _example_name(example, index)
    return tf.concat([recent[1:], [name]], 0), (index, example, recent)


_PROBE_EXAMPLES = 32


def _check_stream_progresses(source: Any, process: Any, cfg: ClassificationInputConfig,
                             process_index: int, process_count: int) -> None:
    """Raises if the first examples (unshuffled) of this process all fail in `process`: an
    image that does not decode is dropped before the skip-count scan, so data that damaged (or
    a pp that fails on every image) would leave the endless stream spinning with no error."""
    probe = source.examples(process_index, process_count, cfg).take(_PROBE_EXAMPLES).enumerate()
    probe = probe.map(as_written(lambda index, ex: process(index, ex, tf.fill([SkipNames.LOG_FIRST], ""))))
    for _ in probe.ignore_errors().take(1):  # quietly: TF logs each error an iterator raises
        return
    errors = errors_before_progress(probe)
    if errors:
        raise ValueError(f"pp_train failed on each of the first {len(errors)} images of "
                         f"{source.description}, so training would wait forever for an example "
                         f"(damaged images, or a pp that fails on them). pp_train: {cfg.pp_train!r}. "
                         f"The first error: {errors[0][:2000]}")


def _example_name(example: dict[str, tf.Tensor], index: tf.Tensor | None = None) -> tf.Tensor:
    """What names an example in logs and errors: a folder image's path, else the TFDS
    `file_name`, else its position in the stream."""
    if "_path" in example:
        return example["_path"]
    if index is None:
        return example["file_name"]
    return tf.where(tf.equal(tf.strings.length(example["file_name"]), 0),
                    tf.strings.join(["example ", tf.strings.as_string(index)]),
                    example["file_name"])


def _assert_not_damaged(reason: tf.Tensor, name: tf.Tensor, description: str) -> tf.Tensor:
    """Strict mode: fails on a damaged image, naming the reason and the file."""
    ok = tf.logical_or(tf.equal(reason, 0), tf.equal(reason, _NOT_KEPT))

    def fail() -> tf.Tensor:
        message = tf.strings.join([
            "input.strict: ", damage.reason_name(reason), " ", name, " (", description,
            "; set input.strict=False to skip and count damaged images)"])
        with tf.control_dependencies([tf.debugging.Assert(False, [message])]):
            return tf.identity(reason)

    return tf.cond(ok, lambda: reason, fail)


# --------------------------------------------------------------------------- checks and helpers


def _check_num_classes(spec: Mapping[str, tf.TensorSpec], source: Any, pp_name: str) -> None:
    produced = spec["labels"].shape[-1]
    if source.num_classes is not None and produced != source.num_classes:
        raise ValueError(f"{pp_name} produces labels over {produced} classes but "
                         f"{source.description} has {source.num_classes}; fix onehot(num_classes)")


