r"""Run every point of a config's sweep in its own workdir, resumably; or print the commands.

    python -m coyo_vit.tools.sweep --config configs/demo_sweep.py --workdir_root /tmp/demo_sweep --parallel 2
    python -m coyo_vit.tools.sweep --config configs/demo_sweep.py --workdir_root /tmp/demo_sweep --summarize \
        --metric holdout/prec@1
    python -m coyo_vit.tools.sweep --config configs/imagenet_finetune.py:variant=L/16 --entry finetune.py \
        --workdir_root gs://bucket/ft --print_commands --config.init=gs://bucket/coyo_l16

The config file's `get_sweep()` lists the points (coyo_vit.tools.sweep_expand). Every point is
validated first; one bad key stops the sweep before anything runs. Each point runs
`python ENTRY --config FILE[:ARG] --workdir ROOT/<point name> --config.k=v ...` (extra
`--config.k=v` flags given here apply to every point). Points whose final checkpoint exists are
skipped; the others are (re)started in their workdir, where train.py resumes from the latest
checkpoint by itself, so running the same command again after a crash or Ctrl-C continues the
sweep. SIGTERM or Ctrl-C to the sweep is passed on to the running points as SIGTERM, on which they
checkpoint and exit.
Each point's output goes to ROOT/<point name>/sweep.log. When every point has finished the
summary (summary.md, summary.csv, summary.png in ROOT) is written; `--summarize` writes it
without running anything.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from coyo_vit.tools import sweep_expand, sweep_summary
from coyo_vit.tools.sweep_expand import SweepPoint

REPO = Path(__file__).resolve().parents[1]
LOG_NAME = "sweep.log"
EXIT_FAILED, EXIT_USAGE = 1, 2  # interrupted: 128 + the signal (130 Ctrl-C, 143 SIGTERM)


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m coyo_vit.tools.sweep", description=__doc__.split("\n\n")[0],
        epilog="Any --config.<key>=<value> given here is passed to every point.")
    parser.add_argument("--config", required=True, help="config file with get_sweep(), optionally :ARG")
    parser.add_argument("--workdir_root", required=True, help="each point runs in WORKDIR_ROOT/<name>")
    parser.add_argument("--entry", default="train.py", help="script each point runs (train.py, finetune.py)")
    parser.add_argument("--parallel", type=int, default=1, help="points run at once on this machine")
    parser.add_argument("--print_commands", action="store_true",
                        help="print one shell command per unfinished point (for a scheduler) and exit")
    parser.add_argument("--all", action="store_true", help="with --print_commands: finished points too")
    parser.add_argument("--summarize", action="store_true", help="only write the summary; run nothing")
    parser.add_argument("--metric", default="train/loss", help="metric the summary is sorted by")
    parser.add_argument("--mode", choices=sweep_summary.MODES, default=None,
                        help="best = max or min of --metric (default: min for losses/errors, else max)")
    parser.add_argument("--columns", default="", help="comma-separated metrics to add to summary.md")
    parser.add_argument("--python", default=None,
                        help="interpreter in commands (default: this one; 'python' when printing)")
    args, extra = parser.parse_known_args(argv)
    if args.parallel < 1:
        parser.error(f"--parallel must be >= 1, got {args.parallel}")
    bad = [a for a in extra if not (a.startswith("--config.") and "=" in a)]
    if bad:
        parser.error(f"unrecognized arguments {bad}; extra arguments must be --config.<key>=<value>")
    return args, extra


def resolve_entry(entry: str) -> str:
    """The entry script as given when it exists here, else the one in the repository root."""
    if os.path.isfile(entry):
        return entry
    candidate = REPO / entry
    if not os.path.isabs(entry) and candidate.is_file():
        return str(candidate)
    known = sorted(p.name for p in REPO.glob("*.py") if p.name != "setup.py")
    raise FileNotFoundError(f"entry script {entry!r} does not exist (here or in {REPO}); "
                            f"entry points there: {known}")


def point_workdir(root: str, point: SweepPoint) -> str:
    return os.path.join(root, point.name)


def command(point: SweepPoint, root: str, entry: str, python: str) -> list[str]:
    return [python, entry, "--config", point.config_flag, "--workdir", point_workdir(root, point),
            *point.override_flags]


def is_finished(point: SweepPoint, root: str) -> bool:
    step = sweep_summary.latest_checkpoint_step(point_workdir(root, point))
    return step is not None and step >= point.total_steps


def collect(points: Sequence[SweepPoint], root: str) -> list[sweep_summary.PointResult]:
    return [sweep_summary.collect(p.name, p.overrides, point_workdir(root, p), p.total_steps)
            for p in points]


class Runner:
    """Runs points as subprocesses, at most `parallel` at once; SIGTERM/SIGINT stop it cleanly."""

    def __init__(self, root: str, entry: str, python: str, parallel: int):
        self.root, self.entry, self.python, self.parallel = root, entry, python, parallel
        self.running: dict[str, tuple[SweepPoint, subprocess.Popen, float]] = {}
        self.outcome: dict[str, str] = {}
        self.stop_signal: int | None = None

    def _on_signal(self, signum: int, frame) -> None:
        if self.stop_signal is None:
            print(f"sweep: got signal {signum}; stopping the running points (they checkpoint first). "
                  f"Run the same command again to resume.", flush=True)
        self.stop_signal = signum
        for _, proc, _ in self.running.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def run(self, points: Sequence[SweepPoint]) -> dict[str, str]:
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            queue = deque(points)
            while queue or self.running:
                while queue and len(self.running) < self.parallel and self.stop_signal is None:
                    self._start(queue.popleft())
                self._reap()
                if self.running:
                    time.sleep(0.2)
            for point in queue:
                self.outcome[point.name] = "not started"
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        return self.outcome

    def _start(self, point: SweepPoint) -> None:
        workdir = point_workdir(self.root, point)
        os.makedirs(workdir, exist_ok=True)
        cmd = command(point, self.root, self.entry, self.python)
        resume = sweep_summary.latest_checkpoint_step(workdir)
        state = "starting" if resume is None else f"resuming from step {resume}"
        print(f"sweep: [{point.index}] {point.name}: {state} (log: {os.path.join(workdir, LOG_NAME)})",
              flush=True)
        log = open(os.path.join(workdir, LOG_NAME), "a", encoding="utf-8")
        log.write(f"\n==== sweep {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(cmd)}\n")
        log.flush()
        # Points ignore the terminal's Ctrl-C: the sweep gets it and passes on SIGTERM, on which
        # train.py checkpoints the step it is at before exiting (and ignores SIGINT when started
        # with it ignored, so the terminal's Ctrl-C does not also reach it).
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=_ignore_sigint)
        log.close()  # the child holds its own copy
        self.running[point.name] = (point, proc, time.perf_counter())

    def _reap(self) -> None:
        for name, (point, proc, started) in list(self.running.items()):
            code = proc.poll()
            if code is None:
                continue
            del self.running[name]
            seconds = time.perf_counter() - started
            if is_finished(point, self.root):
                self.outcome[name] = "finished"
            elif code == 0 or (self.stop_signal is not None and code < 0):  # preempted, or killed by us
                step = sweep_summary.latest_checkpoint_step(point_workdir(self.root, point))
                self.outcome[name] = f"stopped (checkpoint {step}/{point.total_steps})"
            else:
                self.outcome[name] = f"failed (exit {code})"
                print(_log_tail(point_workdir(self.root, point)), file=sys.stderr, flush=True)
            print(f"sweep: [{point.index}] {name}: {self.outcome[name]} after {seconds:.1f}s", flush=True)


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _log_tail(workdir: str, lines: int = 15) -> str:
    with open(os.path.join(workdir, LOG_NAME), encoding="utf-8", errors="replace") as f:
        tail = f.read().splitlines()[-lines:]
    return "\n".join(["sweep: last lines of " + os.path.join(workdir, LOG_NAME)] + tail)


def summarize(points: Sequence[SweepPoint], args: argparse.Namespace) -> None:
    if not os.path.isdir(args.workdir_root):
        raise ValueError(f"--workdir_root {args.workdir_root} does not exist: nothing to summarize")
    results = collect(points, args.workdir_root)
    columns = [c for c in args.columns.split(",") if c]
    summary = sweep_summary.write_summary(results, args.workdir_root, args.metric, args.mode, columns)
    print(summary.markdown, end="")
    print(f"sweep: wrote {summary.md_path}, {summary.csv_path}"
          + (f", {summary.png_path}" if summary.png_path else " (no PNG: matplotlib not installed)"))


def main(argv: Sequence[str] | None = None) -> int:
    args, global_overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        points = sweep_expand.expand(args.config, global_overrides)
        entry = args.entry if args.print_commands else resolve_entry(args.entry)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    root = args.workdir_root
    if args.print_commands:
        python = args.python or "python"
        for point in points:
            if args.all or not is_finished(point, root):
                print(shlex.join(command(point, root, entry, python)))
        return 0
    if args.summarize:
        try:
            summarize(points, args)
        except ValueError as e:
            print(f"sweep: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        return 0

    todo = []
    for point in points:
        if is_finished(point, root):
            print(f"sweep: [{point.index}] {point.name}: finished already (step {point.total_steps}); skipped")
        else:
            todo.append(point)
    print(f"sweep: {len(points)} points, {len(points) - len(todo)} finished, {len(todo)} to run "
          f"({args.parallel} at a time)", flush=True)
    runner = Runner(root, entry, args.python or sys.executable, args.parallel)
    outcome = runner.run(todo)
    unfinished = [p for p in points if not is_finished(p, root)]
    if runner.stop_signal is not None:
        print(f"sweep: interrupted; {len(unfinished)} point(s) unfinished. Run the same command "
              f"again to resume them.")
        return 128 + runner.stop_signal
    if unfinished:
        print(f"sweep: {len(unfinished)} point(s) did not finish: "
              + ", ".join(f"{p.name} ({outcome.get(p.name, 'not run')})" for p in unfinished))
        return EXIT_FAILED
    try:
        summarize(points, args)
    except ValueError as e:  # e.g. --metric names nothing the points logged
        print(f"sweep: all points finished, but the summary failed: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
