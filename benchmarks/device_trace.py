"""Where an accelerator's step time goes: a jax.profiler trace summed by kernel.

    PYTHONPATH=. python -m benchmarks.accelerator --variant B/16 --profile_dir /tmp/prof ...
    PYTHONPATH=. python -m benchmarks.device_trace /tmp/prof [--top 25] [--out summary.json]

`benchmarks.accelerator --profile_dir` records a few steps with `jax.profiler.trace` (CUPTI on
GPUs); this module reads the Chrome-format trace it writes (`*.trace.json.gz`, no TensorBoard
plugin needed), keeps the device processes (`/device:...`), and sums each thread's events by
name: busy time per stream, the heaviest kernels, and their share by kind (matrix products,
attention, the rest: fused elementwise/reduction kernels and copies). The per-kind split says
whether a step is bound by the matrix units or by memory traffic around them. No TensorFlow.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
from collections.abc import Sequence
from typing import Any

from benchmarks import report

# Kernel-name fragments of each kind, first match wins: cuDNN's attention kernels (its fused
# kernels and the helpers of their backward pass, cudnn::fusion::...), then
# cuBLAS/cuBLASLt/CUTLASS/Triton GEMMs. cuDNN's convolution (the patch embedding) counts as matmul.
KERNEL_KINDS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("attention", re.compile(r"fmha|flash|attention|cudnn_generated|cudnn::fusion::|softmax", re.I)),
    ("matmul", re.compile(r"gemm|xmma|cutlass|nvjet|cublas|matmul|triton_dot|wgmma|hgmma|dot", re.I)),
    ("copy/memset", re.compile(r"memcpy|memset|copy", re.I)),
)


def kernel_kind(name: str) -> str:
    for kind, pattern in KERNEL_KINDS:
        if pattern.search(name):
            return kind
    return "other (fusions)"


def find_trace(log_dir: str) -> str:
    """The newest Chrome-format trace under a jax.profiler log dir."""
    paths = glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"), recursive=True)
    paths += glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"no *.trace.json.gz under {log_dir!r}: was it written by "
                                f"jax.profiler.trace (benchmarks.accelerator --profile_dir)?")
    return max(paths, key=os.path.getmtime)


def summarize(trace_path: str, process_pattern: str = r"^/device:", top: int = 20) -> dict[str, Any]:
    """Per device thread: event count, busy microseconds and the `top` names by total time."""
    with gzip.open(trace_path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    processes, threads = {}, {}
    for event in events:
        if event.get("ph") == "M" and event.get("name") == "process_name":
            processes[event["pid"]] = event["args"]["name"]
        elif event.get("ph") == "M" and event.get("name") == "thread_name":
            threads[(event["pid"], event["tid"])] = event["args"]["name"]
    wanted = {pid for pid, name in processes.items() if re.search(process_pattern, name)}
    per_thread: dict[tuple[int, int], collections.Counter] = collections.defaultdict(collections.Counter)
    counts: collections.Counter = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and event.get("pid") in wanted:
            key = (event["pid"], event.get("tid"))
            per_thread[key][event["name"]] += float(event.get("dur", 0.0))
            counts[key] += 1
    summary = []
    for key, by_name in sorted(per_thread.items(), key=lambda kv: -sum(kv[1].values())):
        busy = sum(by_name.values())
        kinds: collections.Counter = collections.Counter()
        for name, dur in by_name.items():
            kinds[kernel_kind(name)] += dur
        summary.append({
            "process": processes.get(key[0], str(key[0])), "thread": threads.get(key, str(key[1])),
            "events": counts[key], "busy_us": busy,
            "by_kind_us": dict(kinds.most_common()),
            "top": [{"name": name, "us": dur, "share": dur / busy if busy else 0.0}
                    for name, dur in by_name.most_common(top)]})
    return {"trace": trace_path, "threads": summary}


def print_summary(summary: dict[str, Any], steps: int | None = None) -> None:
    per = f" per step ({steps} traced)" if steps else ""
    for thread in summary["threads"]:
        busy = thread["busy_us"] / (steps or 1)
        print(f"{thread['process']} / {thread['thread']}: {thread['events']} events, "
              f"busy {busy / 1e3:.2f} ms{per}")
        kinds = ", ".join(f"{kind} {100 * us / thread['busy_us']:.1f}%"
                          for kind, us in thread["by_kind_us"].items())
        print(f"  by kind: {kinds}")
        rows = [{"name": t["name"][:90], "ms": t["us"] / 1e3 / (steps or 1), "share": 100 * t["share"]}
                for t in thread["top"]]
        print(report.table(rows, [("name", "kernel / op"), ("ms", f"ms{per and ' per step'}"),
                                  ("share", "% of busy")]))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.device_trace",
        description="Sum a jax.profiler trace (benchmarks.accelerator --profile_dir) by device "
                    "kernel: busy time per stream, heaviest kernels, matmul/attention/other split.")
    parser.add_argument("log_dir", help="the --profile_dir of benchmarks.accelerator")
    parser.add_argument("--top", type=int, default=20, help="kernels listed per thread")
    parser.add_argument("--steps", type=int, default=None, help="traced steps, to print per-step times")
    parser.add_argument("--process", default=r"^/device:",
                        help="regex on the trace's process names to keep (default: devices)")
    parser.add_argument("--out", default=None, help="write the summary as JSON here")
    args = parser.parse_args(argv)
    summary = summarize(find_trace(args.log_dir), args.process, args.top)
    print_summary(summary, args.steps)
    report.write_json(args.out, {"benchmark": "device_trace", "result": summary})
    return summary


if __name__ == "__main__":
    main()
