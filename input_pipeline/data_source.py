"""A run's training data as one object: its parsed input section, its batches and its resume state.

The train loop talks to a `DataSource` and never asks which kind it has:

    source = open_source(config.input)           # parsed and checked once, nothing read yet
    source.prepare()                             # process 0: e.g. TFDS download_and_prepare
    source.restore(meta, process_index)          # on resume: position, skip counts, epoch length
    for batch in source.batches(batch_size, seed): ... source.observe(host_fields)
    meta.update(source.checkpoint_meta(gathered_states))

`state()` is this process's bookkeeping as flat ints (the same keys on every process), so the
loop gathers it over processes in one collective and the source lays the gathered lists out in
the checkpoint metadata. COYO shards (`ShardSource`) also count skipped records per reason and,
once a damaged file was met, the epoch length read off the data; classification data
(`ClassificationSource`: TFDS or an image folder) counts skipped (damaged) images per reason
too, and logs the first few by file name.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from input_pipeline import classification_data, pipeline, sources
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

    @property
    def num_classes(self) -> int | None:
        return None  # the pp decides (coyo_labels' class count)

    def prepare(self) -> None:
        """Fails fast: a pattern that matches nothing stops here, before anything compiles."""
        sources.list_files(self.config.files)

    def restore(self, meta: Mapping[str, Any], process_index: int) -> None:
        """Continues from a checkpoint's metadata written by as many processes as this run."""
        self.position = int(meta["data_positions"][process_index])
        self.skipped = int(meta.get("skipped_records", [0] * (process_index + 1))[process_index])
        reasons = meta.get("skipped_by_reason")
        self._reasons = SkipCounter(self.position, reasons[process_index] if reasons else None)
        if self._reasons.totals().get("damaged_file", 0) > 0:
            # A damaged file met before: record headers may promise records that cannot be read
            # (bad checksum), so the epoch is counted by reading, once; checkpoints keep the count.
            self._epoch_length = int((meta.get("epoch_lengths") or [0] * (process_index + 1))[process_index])
            if not self._epoch_length:
                logging.info("Counting this process's epoch by reading its files (damage seen)")
                self._epoch_length = pipeline.train_epoch_length(self.config, read_payloads=True,
                                                                 **self._process)

    def batches(self, batch_size: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
        """Endless numpy batches of this process from the current position."""
        return pipeline.build_train_dataset(
            self.config, batch_size=batch_size, seed=seed, start_position=self.position,
            skip_counts=True, epoch_length=self._epoch_length or None,
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
                                      for i in range(count)]}


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

    @property
    def num_classes(self) -> int | None:
        return None

    def prepare(self) -> None:
        """Downloads and prepares a TFDS dataset (call on one process; image folders: nothing)."""
        classification_data.prepare(self.config.data)

    def restore(self, meta: Mapping[str, Any], process_index: int) -> None:
        self.position = int(meta["data_positions"][process_index])
        self.skipped = int(meta.get("skipped_records", [0] * (process_index + 1))[process_index])
        reasons = meta.get("skipped_by_reason")
        self._reasons = SkipCounter(self.position, reasons[process_index] if reasons else None)

    def batches(self, batch_size: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
        return classification_data.build_train_dataset(
            self.config, batch_size=batch_size, seed=seed, start_position=self.position,
            skip_counts=True, **self._process).as_numpy_iterator()

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
                                      for i in range(count)]}


DataSource = ShardSource | ClassificationSource


def parse_input(section: Any) -> pipeline.InputConfig | classification_data.ClassificationInputConfig:
    """The input section as its typed, checked config (shards, or TFDS / image folder)."""
    if classification_data.is_classification_data(section["data"]):
        return classification_data.ClassificationInputConfig.from_config(section)
    return pipeline.InputConfig.from_config(section)


def open_source(input_config: pipeline.InputConfig | classification_data.ClassificationInputConfig,
                *, process_index: int = 0, process_count: int = 1) -> DataSource:
    """The data source of a parsed input section; nothing is read yet."""
    if isinstance(input_config, pipeline.InputConfig):
        return ShardSource(input_config, process_index, process_count)
    return ClassificationSource(input_config, process_index, process_count)
