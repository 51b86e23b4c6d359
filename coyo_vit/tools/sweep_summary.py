"""What a finished (or running) sweep measured: each point's final metrics as a table, and curves.

Reads only files every run writes (`WORKDIR/metrics.jsonl`, `WORKDIR/checkpoints/<step>/`), so
it works the same on a sweep run here and on one whose points ran on a pod and were copied back.
"Final" means the last logged value of each metric: evaluators log at their own cadence, so
`val/top1` may come from an earlier step than `train/loss`; the table states the step of the
sorted metric.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from coyo_vit import file_access

METRICS_FILE = "metrics.jsonl"
# checkpoints.orbax_io's layout (WORKDIR/checkpoints/<step>/{state,meta}), spelled out here so the
# sweep CLI does not import jax and orbax just to list directories; a test keeps them equal.
CHECKPOINT_SUBDIR, STATE_ITEM, META_ITEM = "checkpoints", "state", "meta"
MODES = ("max", "min")


@dataclass
class PointResult:
    """One point of a sweep as found on disk."""
    name: str
    overrides: dict[str, Any]
    workdir: str
    total_steps: int
    checkpoint_step: int | None          # latest complete checkpoint, None = none yet
    final: dict[str, tuple[int, float]] = field(default_factory=dict)  # metric -> (step, value)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def status(self) -> str:
        if self.checkpoint_step is None:
            return "not started" if not self.curves else "no checkpoint"
        if self.checkpoint_step >= self.total_steps:
            return "finished"
        return f"stopped at {self.checkpoint_step}/{self.total_steps}"


def latest_checkpoint_step(workdir: str) -> int | None:
    """The newest complete checkpoint step of a train.py workdir (orbax layout), or None.

    Complete = a `<step>/` directory holding both items; orbax writes a step under a temporary
    name and renames it when done, so a half-written step is never counted.
    """
    fs = file_access.for_path(workdir)
    directory = os.path.join(workdir, CHECKPOINT_SUBDIR)
    if not fs.isdir(directory):
        return None
    names = [name.rstrip("/") for name in fs.listdir(directory)]  # gs:// dirs list as "N/"
    steps = [int(name) for name in names if name.isdigit()
             and fs.isdir(os.path.join(directory, name, STATE_ITEM))
             and fs.isdir(os.path.join(directory, name, META_ITEM))]
    return max(steps) if steps else None


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a half-written last line (a killed run) is ignored."""
    fs = file_access.for_path(path)
    if not fs.exists(path):
        return []
    records = []
    with fs.open(path) as f:
        lines = f.read().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number} is not JSON: {line[:80]!r}") from None
    return records


def metric_curves(records: Sequence[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(step, value)] in file order; non-finite values (logged as strings) kept as floats."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        step = int(record["step"])
        for key, value in record.items():
            if key == "step":
                continue
            try:
                curves.setdefault(key, []).append((step, float(value)))
            except (TypeError, ValueError):
                continue
    return curves


def collect(name: str, overrides: dict[str, Any], workdir: str, total_steps: int) -> PointResult:
    """Reads one point's workdir."""
    curves = metric_curves(read_metrics(os.path.join(workdir, METRICS_FILE)))
    final = {k: v[-1] for k, v in curves.items() if v}
    return PointResult(name, dict(overrides), workdir, total_steps,
                       latest_checkpoint_step(workdir), final, curves)


def default_mode(metric: str) -> str:
    """`min` for losses and errors, `max` for everything else (accuracies, precisions)."""
    lowered = metric.lower()
    return "min" if any(w in lowered for w in ("loss", "error", "err", "nll", "perplexity")) else "max"


def sort_results(results: Sequence[PointResult], metric: str, mode: str) -> list[PointResult]:
    """Best first by the final value of `metric`; points without it (or NaN) go last."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    available = sorted({k for r in results for k in r.final})
    if results and available and not any(metric in r.final for r in results):
        raise ValueError(f"no point logged metric {metric!r}; metrics found: {available}")

    def key(result: PointResult) -> tuple[int, float]:
        value = result.final.get(metric, (0, math.nan))[1]
        if math.isnan(value):
            return (1, 0.0)
        return (0, -value if mode == "max" else value)

    return sorted(results, key=key)


def _format(value: float | None) -> str:
    if value is None:
        return "—"
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.4g}"


def override_keys(results: Sequence[PointResult]) -> list[str]:
    keys: list[str] = []
    for result in results:
        keys += [k for k in result.overrides if k not in keys]
    return keys


def to_markdown(results: Sequence[PointResult], metric: str, mode: str,
                columns: Sequence[str] = ()) -> str:
    """A markdown table, best point first: overrides, status, the metric, then `columns`."""
    keys = override_keys(results)
    extra = [c for c in columns if c != metric]
    header = ["rank", *keys, "status", f"{metric} ({mode})", "at step", *extra]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rank, result in enumerate(results, 1):
        step, value = result.final.get(metric, (None, None))
        row = [str(rank), *(str(result.overrides.get(k, "")) for k in keys), result.status,
               _format(value), "—" if step is None else str(step),
               *(_format(result.final[c][1]) if c in result.final else "—" for c in extra)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def to_csv(results: Sequence[PointResult]) -> str:
    """Every final metric of every point (one row each, in the given order)."""
    keys = override_keys(results)
    metrics = sorted({k for r in results for k in r.final})
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["point", "workdir", "status", "checkpoint_step", "total_steps", *keys, *metrics])
    for r in results:
        writer.writerow([r.name, r.workdir, r.status, "" if r.checkpoint_step is None else r.checkpoint_step,
                         r.total_steps, *(r.overrides.get(k, "") for k in keys),
                         *(repr(r.final[m][1]) if m in r.final else "" for m in metrics)])
    return out.getvalue()


def plot_curves(results: Sequence[PointResult], metric: str, path: str,
                second: str | None = "train/loss") -> bool:
    """Writes a PNG with `metric` (and `second`, when logged and different) against step.

    Returns False, writing nothing, when matplotlib is not installed: the table is the result,
    the plot a convenience.
    """
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    panels = [metric] + ([second] if second and second != metric and any(
        second in r.curves for r in results) else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, name in zip(axes[0], panels):
        for result in results:
            points = result.curves.get(name)
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o" if len(points) < 20 else None, label=result.name)
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


@dataclass
class Summary:
    """What write_summary produced: the markdown table and the files it wrote."""
    markdown: str
    md_path: str
    csv_path: str
    png_path: str | None


def write_summary(results: Sequence[PointResult], out_dir: str, metric: str, mode: str | None = None,
                  columns: Sequence[str] = ()) -> Summary:
    """summary.md, summary.csv and (with matplotlib) summary.png in `out_dir`, best point first."""
    mode = mode or default_mode(metric)
    ordered = sort_results(results, metric, mode)
    markdown = to_markdown(ordered, metric, mode, columns)
    md_path, csv_path = os.path.join(out_dir, "summary.md"), os.path.join(out_dir, "summary.csv")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(f"Sweep summary, sorted by {metric} ({mode}, final logged value)\n\n{markdown}")
    with open(csv_path, "w", encoding="utf-8") as f:
        f.write(to_csv(ordered))
    png_path = os.path.join(out_dir, "summary.png")
    return Summary(markdown, md_path, csv_path, png_path if plot_curves(ordered, metric, png_path) else None)
