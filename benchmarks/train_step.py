"""Training-step images/s, compile time and peak host memory of ViTs on this CPU, per configuration.

    python -m benchmarks.train_step --out /tmp/train_step.json
    python -m benchmarks.train_step --variants B/16 --ablate "" --memory_batch 32 --compile_only_variants ""

Every configuration runs in a fresh subprocess (`--worker`), so its peak resident memory
(getrusage's ru_maxrss) belongs to that configuration alone and one configuration's compile
cache cannot speed up the next. What runs:

  * a baseline (float32, unrolled blocks, no remat) for each of `--variants`;
  * for each of `--ablate`, the baseline with one change at a time: `--ablations` of
    scan (nn.scan over the blocks), remat (each block rematerialised, `--remat_policy`) and
    bf16 (bfloat16 activations); `--grid` runs the full scan x remat x dtype product instead;
  * `--memory_batch N`: `--memory_variant` (B/16) at batch N with and without remat, unrolled
    and with scan (the peak-memory target);
  * `--compile_only_variants`: lowering + compile time only, on abstract inputs (nothing is
    allocated or run), unrolled vs scan, `--compile_repeats` times each (the L/16 compile-time
    target).

The measurement itself is benchmarks.accelerator's (the real jit step with donation, synthetic
data already on the device); this module only chooses configurations and isolates them.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from benchmarks import report
from coyo_vit.class_names import NUM_COYO_CLASSES

_RESULT_MARK = "BENCHMARK_RESULT "
ABLATIONS = ("scan", "remat", "bf16")


@dataclasses.dataclass(frozen=True)
class Job:
    """One configuration for one worker process."""

    label: str
    config: dict[str, Any]  # StepBench fields
    compile_only: bool = False


def _base(args: argparse.Namespace, variant: str, batch: int | None = None) -> dict[str, Any]:
    return dict(variant=variant, batch=batch or args.batch, image_size=args.image_size,
                num_classes=args.num_classes, rep_size=args.rep_size or None,
                depth=args.depth or None, dtype="float32",
                scan=False, remat_policy="none", warmup=args.warmup, steps=args.steps,
                repeats=args.repeats, latency_round=False)


def _changed(config: dict[str, Any], change: str, remat_policy: str) -> dict[str, Any]:
    if change == "scan":
        return dict(config, scan=True)
    if change == "remat":
        return dict(config, remat_policy=remat_policy)
    if change == "bf16":
        return dict(config, dtype="bfloat16")
    raise ValueError(f"unknown ablation {change!r}; valid: {', '.join(ABLATIONS)}")


def _label(config: dict[str, Any]) -> str:
    parts = [config["variant"] + (f" depth {config['depth']}" if config.get("depth") else ""),
             f"b{config['batch']}", "bf16" if config["dtype"] == "bfloat16" else "f32",
             "scan" if config["scan"] else "unrolled"]
    if config["remat_policy"] != "none":
        parts.append(f"remat={config['remat_policy']}")
    return " ".join(parts)


def plan(args: argparse.Namespace) -> list[Job]:
    """The configurations to run, in order, without duplicates."""
    configs: list[dict[str, Any]] = []
    for variant in _split(args.variants):
        base = _base(args, variant)
        if args.grid:
            for scan in (False, True):
                for remat in ("none", args.remat_policy):
                    for dtype in ("float32", "bfloat16"):
                        configs.append(dict(base, scan=scan, remat_policy=remat, dtype=dtype))
        else:
            configs.append(base)
    if not args.grid:
        for variant in _split(args.ablate):
            base = _base(args, variant)
            configs.append(base)
            configs += [_changed(base, change, args.remat_policy) for change in _split(args.ablations)]
    if args.memory_batch:
        base = _base(args, args.memory_variant, args.memory_batch)
        for scan in (False, True):
            configs += [dict(base, scan=scan), dict(base, scan=scan, remat_policy=args.remat_policy)]
    jobs, seen = [], set()
    for config in configs:
        key = json.dumps(config, sort_keys=True)
        if key not in seen:
            seen.add(key)
            jobs.append(Job(_label(config), config))
    for variant in _split(args.compile_only_variants):
        base = _base(args, variant, args.compile_batch)
        for repeat in range(args.compile_repeats):  # alternating, so load drift hits both alike
            for scan in (False, True):
                config = dict(base, scan=scan)
                suffix = f" #{repeat + 1}" if args.compile_repeats > 1 else ""
                jobs.append(Job(_label(config) + " (compile only)" + suffix, config, compile_only=True))
    return jobs


def _split(text: str) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def run_job(job: Job, timeout_s: float) -> dict[str, Any]:
    """Runs one configuration in a fresh interpreter and parses the JSON line it prints."""
    command = [sys.executable, "-m", "benchmarks.train_step", "--worker",
               json.dumps({"config": job.config, "compile_only": job.compile_only})]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=repo,
                              env=env, check=False)
    except subprocess.TimeoutExpired:
        return {"label": job.label, "error": f"timed out after {timeout_s:.0f} s"}
    wall = time.perf_counter() - started
    for line in done.stdout.splitlines():
        if line.startswith(_RESULT_MARK):
            result = json.loads(line[len(_RESULT_MARK):])
            return {"label": job.label, "compile_only": job.compile_only, "wall_s": wall, **result}
    tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
    return {"label": job.label, "error": f"exit code {done.returncode}: " + " | ".join(tail)}


def worker(spec: str) -> None:
    """Subprocess side: measure one configuration, print it as one marked JSON line."""
    from benchmarks import accelerator  # imports JAX: only in the worker

    request = json.loads(spec)
    cfg = accelerator.StepBench(**request["config"])
    result = accelerator.run(cfg, compile_only=request["compile_only"])
    print(_RESULT_MARK + json.dumps(result), flush=True)


STEP_COLUMNS = [
    ("label", "configuration"), ("params", "params"), ("compile_s", "compile s"),
    ("step_s", "step s"), ("images_per_s", "images/s"), ("images_per_cpu_s", "images/CPU-s"),
    ("peak_rss_gib", "peak RSS GiB"),
    ("xla_temp_gib", "XLA temp GiB"), ("error", "error"),
]
COMPILE_COLUMNS = [
    ("label", "configuration"), ("lower_s", "lower s"), ("compile_s", "compile s"),
    ("lower_cpu_s", "lower CPU-s"), ("compile_cpu_s", "compile CPU-s"),
    ("scan_over_unrolled", "scan / unrolled, CPU-s (medians)"),
    ("scan_over_unrolled_wall", "same, wall"), ("peak_rss_gib", "peak RSS GiB"),
    ("error", "error"),
]


def _rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for result in results:
        row = dict(result)
        if "peak_rss_bytes" in result:
            row["peak_rss_gib"] = result["peak_rss_bytes"] / 2**30
        if "xla_temp_bytes" in result:
            row["xla_temp_gib"] = result["xla_temp_bytes"] / 2**30
        rows.append(row)
    return rows


def _columns(columns: list[tuple[str, str]], rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Drops the error column when every configuration succeeded."""
    if any("error" in row for row in rows):
        return columns
    return [c for c in columns if c[0] != "error"]


def compile_ratios(results: list[dict[str, Any]], clock: str = "cpu") -> dict[str, float]:
    """Median lowering + compile time with scan over the median unrolled, per variant (the
    <= 1/4 target); `clock` "cpu" uses CPU-seconds (robust to a shared machine's load),
    "wall" wall-clock seconds."""
    keys = ("lower_cpu_s", "compile_cpu_s") if clock == "cpu" else ("lower_s", "compile_s")
    times: dict[tuple[str, bool], list[float]] = {}
    for r in results:
        if r.get("compile_only") and keys[1] in r:
            times.setdefault((r["variant"], r["scan"]), []).append(r[keys[0]] + r[keys[1]])
    return {variant: report.median(times[(variant, True)]) / report.median(times[(variant, False)])
            for (variant, scan) in times if scan and (variant, False) in times}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.train_step",
        description="Train-step images/s, compile time and peak host memory per ViT configuration "
                    "on this machine's CPU; each configuration in a fresh subprocess.")
    parser.add_argument("--variants", default="Ti/16,S/16,B/16",
                        help="comma list: a float32, unrolled, no-remat baseline for each")
    parser.add_argument("--ablate", default="B/16",
                        help="comma list of variants to run with each of --ablations ('' = none)")
    parser.add_argument("--ablations", default="scan,remat,bf16",
                        help=f"one change at a time from the baseline: {', '.join(ABLATIONS)}")
    parser.add_argument("--grid", action="store_true",
                        help="run the full scan x remat x dtype product for each of --variants")
    parser.add_argument("--remat_policy", default="full", help="the policy used when remat is on")
    parser.add_argument("--batch", type=int, default=8, help="batch size")
    parser.add_argument("--image_size", type=int, default=224, help="resolution in pixels")
    parser.add_argument("--num_classes", type=int, default=NUM_COYO_CLASSES, help="classes of the head")
    parser.add_argument("--rep_size", type=int, default=1024, help="pre-logits width; 0 = none")
    parser.add_argument("--depth", type=int, default=0,
                        help="blocks of every model; 0 = each variant's own (fewer: smoke runs)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--repeats", type=int, default=1, help="timed rounds (median reported)")
    parser.add_argument("--memory_variant", default="B/16", help="model of the peak-memory pair")
    parser.add_argument("--memory_batch", type=int, default=0,
                        help="if > 0: --memory_variant at this batch, {unrolled, scan} x {no remat, remat}")
    parser.add_argument("--compile_only_variants", default="L/16",
                        help="comma list: compile time only, unrolled vs scan ('' = none)")
    parser.add_argument("--compile_batch", type=int, default=32, help="batch of the compile-only runs")
    parser.add_argument("--compile_repeats", type=int, default=3,
                        help="compile-only runs of each (alternating); medians reported")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    parser.add_argument("--out", default=None, help="write all results as JSON to this path")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker is not None:
        worker(args.worker)
        return {}
    jobs = plan(args)
    results = []
    for i, job in enumerate(jobs, 1):
        print(f"[{i}/{len(jobs)}] {job.label} ...", flush=True)
        results.append(run_job(job, args.timeout))
        if "error" in results[-1]:
            print(f"    failed: {results[-1]['error']}", flush=True)
    ratios, wall_ratios = compile_ratios(results, "cpu"), compile_ratios(results, "wall")
    for r in results:
        if r.get("compile_only") and r.get("scan") and r.get("variant") in ratios:
            r["scan_over_unrolled"] = ratios[r["variant"]]
            r["scan_over_unrolled_wall"] = wall_ratios[r["variant"]]
    rows = _rows(results)
    step_rows = [r for r in rows if not r.get("compile_only")]
    compile_rows = [r for r in rows if r.get("compile_only")]
    if step_rows:
        print(report.table(step_rows, _columns(STEP_COLUMNS, step_rows)))
    if compile_rows:
        print(report.table(compile_rows, _columns(COMPILE_COLUMNS, compile_rows)))
    summary = {"benchmark": "train_step", "results": results, "compile_scan_over_unrolled": ratios,
               "compile_scan_over_unrolled_wall": wall_ratios}
    report.write_json(args.out, summary)
    return summary


if __name__ == "__main__":
    main()
