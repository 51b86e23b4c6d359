"""Pieces both dataset builders share (COYO shards and classification data): strict config
reading, argument checks, tf.data options, and padding of the last eval batch."""
from __future__ import annotations

from typing import Any

import tensorflow as tf

from coyo_vit.input_config import check_int

# tf.data hands every function it is given to autograph, whose source-to-source conversion cost
# ~1.4 s of each train.py start. The pipelines' functions use TF ops and plain Python only, never
# Python control flow on a tensor, so they are marked to be traced as written.
as_written = tf.autograph.experimental.do_not_convert


def errors_before_progress(probe: tf.data.Dataset) -> list[str]:
    """The error messages of `probe`'s elements up to its first that processes, or [] when one
    does (a skip with a reason counts: the stream makes progress). The start-up checks of both
    training streams read their first examples through it: a pp that fails on every one would
    otherwise leave the endless stream spinning with no error."""
    iterator = iter(probe)
    errors = []
    while True:
        try:
            next(iterator)
            return []
        except StopIteration:
            return errors
        except tf.errors.OpError as e:
            errors.append(e.message)


def check_seed(seed: Any) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or not -2**63 <= seed < 2**63:
        raise ValueError(f"seed must be an int that fits in int64, got {seed!r}")


def check_process(process_index: int, process_count: int) -> None:
    check_int(process_count, "process_count", 1)
    if not isinstance(process_index, int) or not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index!r}")


def dataset_options(ram_budget_gb: float | None) -> tf.data.Options:
    """Deterministic order always (resume and multi-host equality depend on it); one thread per
    op invocation, so parallelism comes from running many records at once (num_parallel_calls),
    which scales better than splitting one small image op across threads."""
    options = tf.data.Options()
    options.deterministic = True
    options.threading.max_intra_op_parallelism = 1
    if ram_budget_gb is not None:
        options.autotune.ram_budget = int(ram_budget_gb * 2**30)
    return options


@as_written
def shuffle_by_seed(ds: tf.data.Dataset, buffer_size: int, seed: tf.Tensor) -> tf.data.Dataset:
    """`ds.shuffle(buffer_size, seed=seed)` in an order that depends on `seed` alone.

    Dataset.shuffle combines its seed with the global one (tf.random.set_seed, which launchers
    and keras.utils.set_random_seed call): the data order, and so a resume, would depend on it.
    The global seed reaches the op through its graph's seed, so call this where the dataset is
    built in a graph (a flat_map or interleave function, as the pipelines do).
    """
    graph = tf.compat.v1.get_default_graph()
    if tf.executing_eagerly():
        raise RuntimeError("shuffle_by_seed must build its dataset inside a dataset function")
    saved, graph.seed = graph.seed, None
    try:
        return ds.shuffle(buffer_size, seed=seed)
    finally:
        graph.seed = saved


@as_written
def pad_batch(batch: dict[str, tf.Tensor], batch_size: int) -> dict[str, tf.Tensor]:
    """Pads a (last, partial) batch to batch_size with zeros / "" ; padded rows have _mask False."""
    missing = batch_size - tf.shape(batch["_mask"])[0]
    padded = {}
    for name, value in batch.items():
        paddings = [[0, missing]] + [[0, 0]] * (value.shape.rank - 1)
        fill = tf.constant("") if value.dtype == tf.string else tf.zeros([], value.dtype)
        padded[name] = tf.pad(value, paddings, constant_values=fill)
        padded[name].set_shape([batch_size] + value.shape[1:].as_list())
    return padded


def model_inputs(features: dict[str, tf.Tensor], pp_name: str, label_op: str) -> dict[str, tf.Tensor]:
    """Picks image, labels and _keep from a pp output and checks they can be batched.

    `label_op` names the pp op that makes the labels, for the error message.
    """
    missing = [k for k in ("image", "labels") if k not in features]
    if missing:
        raise ValueError(f"{pp_name} must produce {missing}; it produced {sorted(features)} "
                         f"(end it with e.g. {label_op})")
    image, labels = features["image"], features["labels"]
    if image.shape.rank != 3 or not image.shape.is_fully_defined():
        raise ValueError(f"{pp_name} must produce a fixed-size image [H, W, C] (end with a resize "
                         f"or crop to a size), got shape {image.shape}")
    if labels.dtype != tf.float32 or labels.shape.rank != 1 or not labels.shape.is_fully_defined():
        raise ValueError(f"{pp_name} must produce float32 labels [num_classes] (e.g. {label_op}), "
                         f"got {labels.dtype.name} {labels.shape}")
    # uint8 pixels stay uint8 (the model maps them to [-1, 1] on the device, models/layers.py:to_model_range);
    # anything else becomes float32, taken as already in the model's range.
    if image.dtype != tf.uint8:
        image = tf.cast(image, tf.float32)
    return {"image": image, "labels": labels,
            "_keep": tf.convert_to_tensor(features.get("_keep", True), tf.bool)}
