"""Where metrics go: TensorBoard and the console (clu metric writers) and WORKDIR/metrics.jsonl.

Only process 0 writes files; other processes log to their console only. On resume, lines of
metrics.jsonl beyond the restored step (and a line a killed run left half-written) are dropped so
the file reads as one uninterrupted run. A gs:// workdir gets its metrics.jsonl in the bucket
like its checkpoints and TensorBoard logs (coyo_vit.file_system).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping

from clu import metric_writers

from coyo_vit import file_system

METRICS_FILE = "metrics.jsonl"


class MetricLogger:
    """One `write(step, scalars)` call feeds TensorBoard, the console and metrics.jsonl."""

    def __init__(self, workdir: str, *, is_main: bool, resume_step: int = 0):
        self._is_main = is_main
        self._writer = metric_writers.create_default_writer(
            os.path.join(workdir, "tensorboard"), just_logging=not is_main, asynchronous=False)
        self._jsonl = None
        if is_main:
            path = os.path.join(workdir, METRICS_FILE)
            _truncate_after(path, resume_step)
            self._jsonl = file_system.for_path(path).GFile(path, "a")

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        scalars = {k: float(v) for k, v in scalars.items()}
        self._writer.write_scalars(step, scalars)
        if self._jsonl is not None:
            clean = {k: (v if math.isfinite(v) else str(v)) for k, v in scalars.items()}
            self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
            self._jsonl.flush()

    def write_hparams(self, hparams: Mapping[str, object]) -> None:
        self._writer.write_hparams(dict(hparams))

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()
        if self._jsonl is not None:
            self._jsonl.close()


def _truncate_after(path: str, step: int) -> None:
    """Keeps the lines with step <= `step`; written to a temp file and renamed (never half a file).

    A line that is not JSON can only be a write cut short by a kill: it is dropped, not fatal.
    """
    fs = file_system.for_path(path)
    if not fs.exists(path):
        return
    kept = []
    with fs.GFile(path, "r") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                logging.warning("%s:%d is not JSON (a write cut short?): dropped", path, number)
                continue
            if record.get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with fs.GFile(tmp, "w") as f:
        f.write("".join(kept))
    fs.rename(tmp, path, overwrite=True)


class Progress:
    """Rate and ETA of the steps since the last report, for the console progress line."""

    def __init__(self, first_step: int, total_steps: int, batch_size: int):
        self._total, self._batch = total_steps, batch_size
        self._last_step, self._last_time = first_step, time.perf_counter()

    def report(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        steps, seconds = step - self._last_step, max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        steps_per_sec = steps / seconds
        return {"steps_per_sec": steps_per_sec, "images_per_sec": steps_per_sec * self._batch,
                "eta_seconds": (self._total - step) / steps_per_sec if steps_per_sec else float("inf")}


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
