"""Where metrics go: TensorBoard and the console (clu metric writers) and WORKDIR/metrics.jsonl,
and the progress line (clu's ReportProgress: steps/s, share done, ETA).

Only process 0 writes files and prints metrics and progress: the other processes hold the same
numbers, and N copies of each line would bury everything else. On resume, lines of
metrics.jsonl beyond the restored step (and a line a killed run left half-written) are dropped so
the file reads as one uninterrupted run. Files go through tf.io.gfile, so a gs:// workdir gets its
metrics.jsonl in the bucket like its checkpoints and TensorBoard logs (file access only: it
starts no TensorFlow runtime and takes no accelerator).
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping

from clu import metric_writers, periodic_actions

METRICS_FILE = "metrics.jsonl"


def _gfile():
    """tf.io.gfile, imported late: this module loads on GPU hosts without TensorFlow."""
    import tensorflow as tf
    return tf.io.gfile


class MetricLogger:
    """One `write(step, scalars)` call feeds TensorBoard, the console and metrics.jsonl.

    It is also the writer of `progress()`: clu's ReportProgress hands it `steps_per_sec` (and
    `uptime`) at a logging step, and the next `write` of that step adds them as
    `train/steps_per_sec` and `train/images_per_sec`.
    """

    def __init__(self, workdir: str, *, is_main: bool, resume_step: int = 0, batch_size: int = 0):
        self._batch_size = batch_size
        self._rate: dict[str, float] = {}
        self._rate_step = -1
        self._is_main = is_main
        self._writer = (metric_writers.create_default_writer(
            os.path.join(workdir, "tensorboard"), asynchronous=False) if is_main
            else metric_writers.MultiWriter([]))
        self._jsonl = None
        if is_main:
            path = os.path.join(workdir, METRICS_FILE)
            _truncate_after(path, resume_step)
            self._jsonl = _gfile().GFile(path, "a")

    def progress(self, total_steps: int, every_steps: int) -> periodic_actions.ReportProgress:
        """clu's progress reporter (logs rate, share done and ETA) writing its rate through here;
        on processes other than 0 it only times (the rate is process 0's to report)."""
        reporter = periodic_actions.ReportProgress if self._is_main else _SilentProgress
        return reporter(num_train_steps=total_steps, every_steps=every_steps,
                                               every_secs=None, writer=self)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """The clu MetricWriter method ReportProgress calls: keeps its rate for `write(step)`."""
        if step != self._rate_step:
            self._rate, self._rate_step = {}, step
        if "steps_per_sec" in scalars:
            rate = float(scalars["steps_per_sec"])
            self._rate.update({"train/steps_per_sec": rate,
                               "train/images_per_sec": rate * self._batch_size})

    def write(self, step: int, scalars: Mapping[str, float]) -> dict[str, float]:
        """Writes `scalars` (with the progress rate of this step, if any); returns what it wrote."""
        scalars = {k: float(v) for k, v in scalars.items()}
        if step == self._rate_step:
            scalars.update(self._rate)
        self._writer.write_scalars(step, scalars)
        if self._jsonl is not None:
            clean = {k: (v if math.isfinite(v) else str(v)) for k, v in scalars.items()}
            self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
            self._jsonl.flush()
        return scalars

    def write_hparams(self, hparams: Mapping[str, object]) -> None:
        self._writer.write_hparams(dict(hparams))

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()
        if self._jsonl is not None:
            self._jsonl.close()


class _SilentProgress(periodic_actions.ReportProgress):
    """ReportProgress that keeps its clock and timed parts but logs and writes nothing."""

    def _apply(self, step: int, t: float) -> None:
        del step, t


def _truncate_after(path: str, step: int) -> None:
    """Keeps the lines with step <= `step`; written to a temp file and renamed (never half a file).

    A line that is not JSON can only be a write cut short by a kill: it is dropped, not fatal.
    """
    if not _gfile().exists(path):
        return
    kept = []
    with _gfile().GFile(path, "r") as f:
        lines = f.read().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            logging.warning("%s:%d is not JSON (a write cut short?): dropped", path, number)
            continue
        if record.get("step", 0) <= step:
            kept.append(line + "\n")
    tmp = path + ".tmp"
    with _gfile().GFile(tmp, "w") as f:
        f.write("".join(kept))
    _gfile().rename(tmp, path, overwrite=True)
