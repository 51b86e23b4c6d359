"""Output shared by every benchmark: a plain-text table on stdout and a JSON file.

Every JSON result carries `machine` (where the numbers came from, including the load average,
because figures taken on a busy shared machine are noisy) and `argv`, so a figure in
docs/performance.md can be traced back to the command and host that produced it. Nothing here
imports JAX or TensorFlow: each benchmark decides which of them it may load.
"""
from __future__ import annotations

import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any


def median(values: Sequence[float]) -> float:
    """Median of repeated measurements: robust to a round disturbed by another process."""
    if not values:
        return float("nan")
    return float(statistics.median(values))


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports ru_maxrss in KiB)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def machine_info() -> dict[str, Any]:
    """Host facts that explain a figure: CPU, cores usable by this process, load, versions."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    info.update(_source_version())
    for module in ("jax", "jaxlib", "flax", "optax", "tensorflow"):
        loaded = sys.modules.get(module)
        if loaded is not None:
            info[f"{module}_version"] = getattr(loaded, "__version__", "?")
    return info


def _source_version() -> dict[str, Any]:
    """The repository commit and whether the working tree had local changes (read-only git)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": commit, "git_local_changes": bool(dirty)}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def format_value(value: Any) -> str:
    """Short human form: 3 significant digits for floats, thousands separators for ints."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.3g}"
    return str(value)


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Renders rows as a Markdown table (pastes into docs/performance.md unchanged).

    `columns` is a list of (key in each row, header); missing keys print as n/a.
    """
    headers = [header for _, header in columns]
    body = [[format_value(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h)
              for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in body]
    return "\n".join(lines)


def write_json(path: str | None, payload: Mapping[str, Any]) -> None:
    """Writes the result (with machine info and argv added) atomically; no-op without a path."""
    if not path:
        return
    full = _finite({"argv": sys.argv, "machine": machine_info(), **payload})
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(full, f, indent=2, allow_nan=False, default=_jsonable)
        f.write("\n")
    os.replace(tmp, path)


def _finite(value: Any) -> Any:
    """NaN and infinities become null: strict JSON readers reject them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _jsonable(value: Any) -> Any:
    """numpy scalars and the like: their Python value; anything else: its string."""
    if hasattr(value, "item"):
        return value.item()
    return str(value)
