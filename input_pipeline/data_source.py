"""A run's training data as one object: its parsed input section, its batches and its resume state.

The train loop talks to a `DataSource` and never asks which kind it has:

    source = open_source(config.input)           # parsed and checked once, nothing read yet
    source.prepare()                             # process 0: e.g. TFDS download_and_prepare
    source.restore(meta, process_index)          # on resume: position, skip counts, epoch length, layout
    for batch in source.batches(batch_size, seed): ... source.observe(host_fields)
    meta.update(source.checkpoint_meta(gathered_states))

`state()` is this process's bookkeeping as flat ints (the same keys on every process), so the
loop gathers it over processes in one collective and the source lays the gathered lists out in
the checkpoint metadata. COYO shards (`ShardSource`) also count skipped records per reason and,
once a damaged file was met, the epoch length read off the data; classification data
(`ClassificationSource`: TFDS or an image folder) counts skipped (damaged) images per reason
too, and logs the first few by file name. Both continue a checkpoint written by another number
of processes by `input_pipeline.relayout`'s rule (the rest of the started epochs split over the
new processes, then each its own share); the layout goes into the checkpoint as `data_layout`.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from coyo_vit.input_config import parse_input  # noqa: F401  (the input section's parser, TF-free)
from input_pipeline import classification_data, pipeline, relayout, sources
from input_pipeline.skip_accounting import SkipCounter, SkipNames


class ShardSource:
    """img2dataset TFRecord shards with COYO labels (input_pipeline.pipeline)."""

    def __init__(self, input_config: pipeline.InputConfig, process_index: int, process_count: int):
        self.config = input_config
        self._process = dict(process_index=process_index, process_count=process_count)
        self.position = 0  # raw records of this process's stream consumed so far
        self.skipped = 0
        self._epoch_length = 0  # counted by reading (0: the record headers are trusted)
        self._reasons = SkipCounter(0)
        self.layout = relayout.Layout(process_count)
        self.resumed: relayout.Relayout | None = None  # set by a resume on another process count

    @property
    def num_classes(self) -> int | None:
        return None  # the pp decides (coyo_labels' class count)

    def class_names(self) -> tuple[str, ...] | None:
        """None: shards store class indices only (the run's class count picks the shipped list)."""
        return None

    def prepare(self) -> None:
        """Fails fast: a pattern that matches nothing stops here, before anything compiles."""
        sources.list_files(self.config.files)

    def restore(self, meta: Mapping[str, Any], process_index: int) -> None:
        """Continues from a checkpoint's metadata: this process's position when the checkpoint
        was written by as many processes as this run, else the start of its prelude under the
        new layout (input_pipeline.relayout), with the skip counts summed onto process 0."""
        reasons = meta.get("skipped_by_reason") or [{}] * len(meta["data_positions"])
        damage_seen = any(r.get("damaged_file", 0) > 0 for r in reasons)

        def old_epoch_length(p: int, count: int) -> int:
            if damage_seen:
                return self._counted_epoch_length(meta, p, count)
            return pipeline.train_epoch_length(self.config, process_index=p, process_count=count)

        _restore_progress(self, meta, process_index, old_epoch_length)
        if self.resumed is None and reasons[process_index].get("damaged_file", 0) > 0:
            self._epoch_length = self._counted_epoch_length(meta, process_index,
                                                            self._process["process_count"])
        elif self.resumed is not None and damage_seen:
            self._epoch_length = pipeline.train_epoch_length(self.config, read_payloads=True,
                                                             **self._process)

    def _counted_epoch_length(self, meta: Mapping[str, Any], process_index: int,
                              process_count: int) -> int:
        """A process's epoch length once a damaged file was met: record headers may promise
        records that cannot be read (bad checksum), so the epoch is counted by reading, once;
        checkpoints keep the count."""
        saved = int((meta.get("epoch_lengths") or [0] * process_count)[process_index])
        if saved:
            return saved
        logging.info("Counting process %d's epoch by reading its files (damage seen)", process_index)
        return pipeline.train_epoch_length(self.config, read_payloads=True,
                                           process_index=process_index, process_count=process_count)

    def batches(self, batch_size: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
        """Endless numpy batches of this process from the current position."""
        return pipeline.build_train_dataset(
            self.config, batch_size=batch_size, seed=seed, start_position=self.position,
            skip_counts=True, epoch_length=self._epoch_length or None, layout=self.layout,
            **self._process).as_numpy_iterator()

    def observe(self, host: Mapping[str, np.ndarray]) -> None:
        """Bookkeeping after a batch was consumed (its host fields `_index`, `_skipped`)."""
        consumed = int(host["_index"].max()) + 1
        self.skipped += consumed - self.position - len(host["_index"])
        self.position = consumed
        self._reasons.update(host)

    def state(self) -> dict[str, int]:
        return {"position": self.position, "skipped": self.skipped,
                "epoch_length": self._epoch_length,
                **{f"skipped/{reason}": n for reason, n in self._reasons.totals().items()}}

    def checkpoint_meta(self, gathered: Mapping[str, Sequence[int]]) -> dict[str, Any]:
        """The gathered `state()` of every process, as the checkpoint metadata stores it."""
        reasons = [key.split("/", 1)[1] for key in gathered if key.startswith("skipped/")]
        count = len(gathered["position"])
        return {"data_positions": list(gathered["position"]),
                "skipped_records": list(gathered["skipped"]),
                "epoch_lengths": list(gathered["epoch_length"]),
                "skipped_by_reason": [{r: gathered[f"skipped/{r}"][i] for r in reasons}
                                      for i in range(count)],
                "data_layout": self.layout.to_meta()}


class ClassificationSource:
    """A TFDS dataset or an image folder (input_pipeline.classification_data)."""

    def __init__(self, input_config: classification_data.ClassificationInputConfig,
                 process_index: int, process_count: int):
        self.config = input_config
        self._process = dict(process_index=process_index, process_count=process_count)
        self.position = 0
        self.skipped = 0
        self._reasons = SkipCounter(0)
        self._named = 0  # damaged images logged by name by this process
        self.layout = relayout.Layout(process_count)
        self.resumed: relayout.Relayout | None = None  # set by a resume on another process count

    @property
    def num_classes(self) -> int | None:
        return None

    def class_names(self) -> tuple[str, ...] | None:
        """The folder's class directories or the TFDS label names, in label order (after prepare)."""
        return classification_data.class_names(self.config.data)

    def prepare(self) -> None:
        """Downloads and prepares a TFDS dataset (call on one process; image folders: nothing)."""
        classification_data.prepare(self.config.data)

    def restore(self, meta: Mapping[str, Any], process_index: int) -> None:
        """Continues from a checkpoint's metadata: this process's position, or on another
        process count the start of its prelude (input_pipeline.relayout), as ShardSource."""
        _restore_progress(self, meta, process_index, lambda p, count: (
            classification_data.train_epoch_length(self.config.data, process_index=p,
                                                   process_count=count)))

    def batches(self, batch_size: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
        return classification_data.build_train_dataset(
            self.config, batch_size=batch_size, seed=seed, start_position=self.position,
            skip_counts=True, layout=self.layout, **self._process).as_numpy_iterator()

    def observe(self, host: Mapping[str, np.ndarray]) -> None:
        consumed = int(host["_index"].max()) + 1
        self.skipped += consumed - self.position - len(host["_index"])
        self.position = consumed
        self._reasons.update(host)
        self._log_names(host.get("_skipped_names", ()))

    def _log_names(self, names: Any) -> None:
        for joined in names:
            for line in (joined.decode() if isinstance(joined, bytes) else str(joined)).splitlines():
                self._named += 1
                logging.warning("input: skipped damaged image, %s%s", line,
                                " (further ones are only counted: data/skipped/...)"
                                if self._named == SkipNames.LOG_FIRST else "")

    def state(self) -> dict[str, int]:
        return {"position": self.position, "skipped": self.skipped,
                **{f"skipped/{reason}": n for reason, n in self._reasons.totals().items()}}

    def checkpoint_meta(self, gathered: Mapping[str, Sequence[int]]) -> dict[str, Any]:
        reasons = [key.split("/", 1)[1] for key in gathered if key.startswith("skipped/")]
        count = len(gathered["position"])
        return {"data_positions": list(gathered["position"]),
                "skipped_records": list(gathered["skipped"]),
                "epoch_lengths": [0] * count,
                "skipped_by_reason": [{r: gathered[f"skipped/{r}"][i] for r in reasons}
                                      for i in range(count)],
                "data_layout": self.layout.to_meta()}


DataSource = ShardSource | ClassificationSource


def _restore_progress(source: DataSource, meta: Mapping[str, Any], process_index: int,
                      old_epoch_length: Callable[[int, int], int]) -> None:
    """Sets a source's layout, position and skip counts from a checkpoint's metadata: this
    process's own when the checkpoint was written by as many processes, else the start of its
    prelude under `relayout.relayout` (old processes' epoch lengths from
    `old_epoch_length(process_index, process_count)`), the old skip counts summed onto
    process 0 and `source.resumed` set."""
    old = relayout.Layout.from_meta(meta)
    reasons = meta.get("skipped_by_reason") or [{}] * old.process_count
    if old.process_count == source._process["process_count"]:
        source.layout = old
        source.position = int(meta["data_positions"][process_index])
        source.skipped = int(meta.get("skipped_records", [0] * (process_index + 1))[process_index])
        source._reasons = SkipCounter(source.position, reasons[process_index])
        return
    lengths = [old_epoch_length(p, old.process_count) for p in range(old.process_count)]
    source.resumed = relayout.relayout(old, [int(p) for p in meta["data_positions"]], lengths,
                                       source._process["process_count"])
    source.layout = source.resumed.layout
    source.position = 0
    if process_index == 0:  # the run's totals, kept once
        source.skipped = sum(int(n) for n in meta.get("skipped_records", []))
        source._reasons = SkipCounter(0, {r: sum(int(c.get(r, 0)) for c in reasons)
                                          for r in SkipCounter.REASONS})


def open_source(input_config: pipeline.InputConfig | classification_data.ClassificationInputConfig,
                *, process_index: int = 0, process_count: int = 1) -> DataSource:
    """The data source of a parsed input section; nothing is read yet."""
    if isinstance(input_config, pipeline.InputConfig):
        return ShardSource(input_config, process_index, process_count)
    return ClassificationSource(input_config, process_index, process_count)
