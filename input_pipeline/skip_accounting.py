"""Counting the training records the pipeline skips, per reason, exactly across resumes.

`SkipScan` runs in the tf.data stream (cumulative per-reason counts on every record, and a guard
against an epoch with no usable record); `SkipCounter` is the trainer's side, reading those
counts off the consumed batches into the checkpoint and the metrics.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import tensorflow as tf

from coyo_vit.input_config import check_int
from input_pipeline import damage


class SkipCounter:
    """Per-reason totals of skipped training records, across resumes: the trainer's hook.

    Build the train dataset with `skip_counts=True` and the same `start_position`, call
    `update(host_batch)` for every batch consumed; `totals()` goes into the checkpoint metadata
    and back into `SkipCounter(position, restored)` on resume, `scalars()` into the metric writer.
    Reasons are `damage.SKIP_REASONS` plus `unreadable`: records that are not a tf.Example or whose
    image does not decode, found as the `_index` gaps the other counts do not explain. Counts are
    exact: a record skipped after a batch's last example is counted with the next batch, and a
    resumed run reads it again from `start_position`.
    """

    REASONS = damage.SKIP_REASONS + ("unreadable",)

    def __init__(self, start_position: int = 0, restored: Mapping[str, int] | None = None):
        check_int(start_position, "start_position", 0)
        unknown = sorted(set(restored or {}) - set(self.REASONS))
        if unknown:
            raise ValueError(f"restored skip counts have unknown reasons {unknown}; valid: "
                             f"{', '.join(self.REASONS)}")
        self._restored = {r: int((restored or {}).get(r, 0)) for r in self.REASONS}
        self._start = start_position
        self._position = start_position
        self._examples = 0
        self._counted = np.zeros(len(damage.SKIP_REASONS), np.int64)

    def update(self, host_batch: Mapping[str, np.ndarray]) -> None:
        """Takes in a consumed batch of a dataset built with skip_counts=True."""
        if "_skipped" not in host_batch or "_index" not in host_batch:
            raise KeyError("batch needs '_skipped' and '_index': build the train dataset with "
                           "skip_counts=True")
        index = np.asarray(host_batch["_index"])
        self._examples += len(index)
        self._position = int(index.max()) + 1
        self._counted = np.asarray(host_batch["_skipped"])[-1].astype(np.int64)

    def totals(self) -> dict[str, int]:
        """Records skipped per reason since the first run started (restored counts included)."""
        counted = dict(zip(damage.SKIP_REASONS, (int(n) for n in self._counted)))
        counted["unreadable"] = (self._position - self._start - self._examples
                                 - int(self._counted.sum()))
        return {r: self._restored[r] + counted[r] for r in self.REASONS}

    def scalars(self, prefix: str = "data/skipped/") -> dict[str, float]:
        return {prefix + r: float(n) for r, n in self.totals().items()}


class SkipScan:
    """tf.data scan state: cumulative skips per reason, and a guard against an all-skip stream.

    Without the guard, a stream in which every record is skipped (shards without labels, a
    threshold no label reaches) would spin forever on the endless repeat, looking like a hang.
    A whole epoch (not the first, possibly partial, one) without an example is an error instead.
    """

    @staticmethod
    def initial(start_epoch: int) -> tuple[tf.Tensor, ...]:
        return (tf.zeros([len(damage.SKIP_REASONS)], tf.int64),    # skips since start
                tf.constant(start_epoch, tf.int64),                 # epoch of the last record
                tf.constant(start_epoch, tf.int64),                 # first (partial) epoch
                tf.constant(0, tf.int64))                           # examples in that epoch

    @staticmethod
    @tf.autograph.experimental.do_not_convert
    def step(state: tuple[tf.Tensor, ...], ex: dict[str, tf.Tensor]
             ) -> tuple[tuple[tf.Tensor, ...], dict[str, tf.Tensor]]:
        counts, epoch, first_epoch, kept = state
        new_epoch = tf.not_equal(ex["_epoch"], epoch)
        empty_epoch = new_epoch & tf.not_equal(epoch, first_epoch) & tf.equal(kept, 0)

        def fail() -> tf.Tensor:  # in a cond, so the message is only built when it is needed
            summary = tf.strings.reduce_join(tf.strings.join(
                [tf.constant(list(damage.SKIP_REASONS)), tf.strings.as_string(counts)], "="),
                separator=", ")
            message = tf.strings.join([
                "input: a whole epoch of this process's training records gave no example. "
                "Records skipped so far by reason: ", summary, ". Shards without labels need "
                "python -m input_pipeline.tools.join_labels; otherwise check the label mode and run "
                "python -m input_pipeline.tools.validate_shards (image folders and TFDS data: "
                "check their images)"])
            with tf.control_dependencies([tf.debugging.Assert(False, [message])]):
                return tf.zeros([], tf.int64)

        guard = tf.cond(empty_epoch, fail, lambda: tf.zeros([], tf.int64))
        is_skip = tf.not_equal(ex["_reason"], 0)
        # one_hot of -1 is all zeros: usable examples add nothing. `guard` is 0; adding it makes
        # the check run before any count is reported.
        counts = counts + tf.one_hot(ex["_reason"] - 1, len(damage.SKIP_REASONS),
                                     dtype=tf.int64) + guard
        kept = tf.where(new_epoch, tf.constant(0, tf.int64), kept) + tf.cast(
            tf.logical_not(is_skip), tf.int64)
        return (counts, ex["_epoch"], first_epoch, kept), {**ex, "_skipped": counts}


class SkipNames:
    """tf.data scan state: the reason and name (`_name`) of the first `LOG_FIRST` damaged records
    of a stream, handed to the host on the next usable example as `_skipped_names` (one
    "reason: name" line each; "" on most examples), so the trainer can log them.

    Runs after `SkipScan`, before the filter on `_reason`. Reasons in `damage.NOT_DAMAGE` are not
    named. Records dropped before it (`_index` gaps: `unreadable`) are named from `_recent`, the
    names of the `LOG_FIRST` raw records before each one, when the stream carries it. Naming
    stops at `LOG_FIRST`, so the strings stay small.
    """

    LOG_FIRST = 5

    @staticmethod
    def initial(start_position: int = 0) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        # named so far, names not yet handed on, the last `_index` seen
        return (tf.constant(0, tf.int64), tf.constant(""),
                tf.constant(start_position - 1, tf.int64))

    @staticmethod
    @tf.autograph.experimental.do_not_convert
    def step(state: tuple[tf.Tensor, tf.Tensor, tf.Tensor], ex: dict[str, tf.Tensor]
             ) -> tuple[tuple[tf.Tensor, tf.Tensor, tf.Tensor], dict[str, tf.Tensor]]:
        named, pending, last = state
        if "_recent" in ex:  # the records dropped right before this one: the last `gap` names
            size = SkipNames.LOG_FIRST
            gap = tf.minimum(ex["_index"] - last - 1, size)
            take = tf.maximum(tf.minimum(gap, SkipNames.LOG_FIRST - named), 0)
            names = ex["_recent"][size - gap:size - gap + take]
            pending = tf.strings.join([pending, tf.strings.reduce_join(
                tf.strings.join(["unreadable: ", names, "\n"]))])
            named += take
        reason = ex["_reason"]
        not_damage = tf.constant([0] + [damage.code(r) for r in damage.NOT_DAMAGE], tf.int32)
        is_damage = tf.logical_not(tf.reduce_any(tf.equal(reason, not_damage)))
        add = is_damage & (named < SkipNames.LOG_FIRST)
        line = tf.strings.join([damage.reason_name(reason), ": ", ex["_name"], "\n"])
        pending = tf.where(add, tf.strings.join([pending, line]), pending)
        usable = tf.equal(reason, 0)
        out = {**ex, "_skipped_names": tf.where(usable, pending, "")}
        return (named + tf.cast(add, tf.int64), tf.where(usable, "", pending),
                ex["_index"]), out
