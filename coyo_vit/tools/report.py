"""Our evaluated runs beside the published COYO and JFT-300M results, with the differences.

    python -m coyo_vit.tools.report /ckpt/ft_coyo_l16_384 /ckpt/ft_coyo_l16_512 --json report.json
    python -m coyo_vit.tools.report results_384.json --upstream coyo --imagenet_metric val/top1

Each RUN is a fine-tuning workdir (its config.json, and the last logged value of each metric in
metrics.jsonl, overridden by WORKDIR/eval_results.json when evaluate.py wrote one there) or a
results file written by evaluate.py (`--output`). For each run the table states what decides
the comparison: model, upstream data, resolution (config.image_size), steps (config.total_steps
and the step the metric was logged at), and the checkpoint it started from (config.init).
Upstream data is `--upstream` (one for all runs, or one per run), else read from the init
checkpoint's own config.json (a demo or COYO pretraining run of ours), else guessed from the
init path ("jft", "coyo"). Metrics are fractions scaled by --scale (100: percent, as published).
Differences are ours minus the published row of the same model and resolution.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from coyo_vit.tools import published_results
from coyo_vit.tools.published_results import COYO, JFT
from coyo_vit.tools.sweep_summary import METRICS_FILE, metric_curves, read_metrics

EVAL_RESULTS_FILE = "eval_results.json"   # what evaluate.py --workdir RUN writes into RUN
DEFAULT_IMAGENET_METRIC = "val/top1"       # configs/imagenet_finetune.py evaluator `val`
DEFAULT_REAL_METRIC = "real/top1"          # configs/imagenet_finetune.py evaluator `real`
DEMO_UPSTREAM = "demo data"


@dataclass
class Run:
    """One evaluated run, with what the table states about it."""
    path: str
    name: str
    model: str
    upstream: str
    upstream_from: str                       # flag | init config | init path | own config
    res: int | None
    total_steps: int | None
    init: str | None
    metrics: dict[str, tuple[int | None, float]] = field(default_factory=dict)  # name -> (step, value)


def load_run(path: str) -> tuple[dict[str, Any], dict[str, tuple[int | None, float]], str | None]:
    """(config, metrics, evaluated checkpoint) of a workdir or an evaluate.py results file."""
    if os.path.isdir(path):
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{path} has no config.json: is it a train.py / finetune.py workdir?")
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        metrics = {k: v[-1] for k, v in metric_curves(read_metrics(os.path.join(path, METRICS_FILE))).items()}
        evaluated = None
        results_path = os.path.join(path, EVAL_RESULTS_FILE)
        if os.path.isfile(results_path):
            _, results, evaluated = load_run(results_path)
            metrics.update(results)
        return config, metrics, evaluated
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict) or not {"config", "results"} <= set(data):
            raise ValueError(f"{path} is not an evaluate.py results file (expected keys 'config' and "
                             f"'results', found {sorted(data) if isinstance(data, dict) else type(data).__name__})")
        metrics = {k: (None, float(v)) for k, v in data["results"].items()}
        return data["config"], metrics, data.get("checkpoint")
    raise FileNotFoundError(f"run {path!r} does not exist (give a workdir or an evaluate.py results file)")


def model_name(config: dict[str, Any]) -> str:
    """`ViT-L/16` from model.variant; otherwise the shape of a custom (e.g. demo) model."""
    model = config.get("model") or {}
    if model.get("variant") == "auto":  # an evaluate.py config: the shape was the checkpoint's
        return "ViT (the checkpoint's shape)"
    if model.get("variant"):
        return f"ViT-{model['variant']}"
    shape = ", ".join(f"{k} {model[k]}" for k in ("patch_size", "width", "depth") if k in model)
    return f"ViT ({shape})" if shape else "ViT (unknown)"


def infer_upstream(config: dict[str, Any]) -> tuple[str, str]:
    """(upstream data, how it was found) for a run without --upstream."""
    init = config.get("init")
    if not init:  # a pretraining run: its own data is the upstream
        return _data_of(config) or "unknown", "own config"
    init_config = os.path.join(str(init), "config.json")
    if os.path.isfile(init_config):
        with open(init_config, encoding="utf-8") as f:
            found = _data_of(json.load(f))
        if found:
            return found, "init config"
    return _upstream_named_in(init), "init path"


def infer_evaluated_upstream(checkpoint: str) -> tuple[str, str]:
    """(upstream, how) of a checkpoint that evaluate.py evaluated with a config lacking `init`:
    from the config.json of the workdir it came from (the checkpoint or a directory above it,
    e.g. for WORKDIR/checkpoints/STEP), else keywords in its path."""
    directory = os.path.abspath(str(checkpoint))
    for _ in range(3):  # WORKDIR, WORKDIR/checkpoints, WORKDIR/checkpoints/STEP
        workdir_config = os.path.join(directory, "config.json")
        if os.path.isfile(workdir_config):
            with open(workdir_config, encoding="utf-8") as f:
                upstream, how = infer_upstream(json.load(f))
            if upstream != "unknown":
                return upstream, f"checkpoint's {how}"
            break
        directory = os.path.dirname(directory)
    return _upstream_named_in(checkpoint), "checkpoint path"


def _upstream_named_in(path: str) -> str:
    """JFT or COYO when the path names one (e.g. gs://bucket/coyo_l16_pretrain), else unknown."""
    lowered = str(path).lower()
    return next((upstream for keyword, upstream in (("jft", JFT), ("coyo", COYO))
                 if keyword in lowered), "unknown")


def _data_of(config: dict[str, Any]) -> str | None:
    if config.get("demo_data") is not None:
        return DEMO_UPSTREAM
    files = str(((config.get("input") or {}).get("data") or {}).get("files", "")).lower()
    return COYO if "coyo" in files else None


def build_runs(paths: Sequence[str], upstreams: Sequence[str]) -> list[Run]:
    if upstreams and len(upstreams) not in (1, len(paths)):
        raise ValueError(f"--upstream takes one value for all runs or one per run ({len(paths)}); "
                         f"got {len(upstreams)}: {list(upstreams)}")
    runs = []
    for i, path in enumerate(paths):
        config, metrics, evaluated = load_run(path)
        if upstreams:
            upstream = published_results.canonical_upstream(upstreams[i if len(upstreams) > 1 else 0])
            how = "flag"
        elif evaluated and not config.get("init"):  # evaluate.py's config rarely names the init
            upstream, how = infer_evaluated_upstream(evaluated)
        else:
            upstream, how = infer_upstream(config)
        res, steps = config.get("image_size"), config.get("total_steps")
        runs.append(Run(path=path, name=os.path.basename(os.path.normpath(path)), model=model_name(config),
                        upstream=upstream, upstream_from=how, res=res, total_steps=steps,
                        init=config.get("init"), metrics=metrics))
    return runs


def check_metrics(runs: Sequence[Run], names: Sequence[str]) -> None:
    """Fails when no run logged any of the metrics: almost surely a wrong metric name."""
    if runs and not any(n in r.metrics for r in runs for n in names):
        found = sorted({k for r in runs for k in r.metrics})
        raise ValueError(f"no run has metric {' or '.join(map(repr, names))}; metrics found: {found}. "
                         f"Choose them with --imagenet_metric / --real_metric.")


def _delta(ours: float | None, published: float | None) -> float | None:
    return None if ours is None or published is None else round(ours - published, 2)


def build_rows(runs: Sequence[Run], imagenet_metric: str, real_metric: str, scale: float
               ) -> list[dict[str, Any]]:
    """Published rows and ours, grouped by resolution (published first), with the differences."""
    rows: list[dict[str, Any]] = []
    published_res = []
    for row in published_results.RESULTS:
        if row.res not in published_res:
            published_res.append(row.res)
    def with_deltas(row: dict[str, Any]) -> dict[str, Any]:
        for upstream, tag in ((COYO, "coyo"), (JFT, "jft")):
            ref = published_results.lookup(row["model"], upstream, row["res"])
            row[f"delta_vs_{tag}"] = None if ref is None or (row["source"] == "published"
                                                             and row["upstream"] == upstream) else {
                "imagenet": _delta(row["imagenet"], ref.imagenet), "real": _delta(row["real"], ref.real)}
        return row

    def ours(run: Run) -> dict[str, Any]:
        imagenet, real = run.metrics.get(imagenet_metric), run.metrics.get(real_metric)
        steps_at = sorted({m[0] for m in (imagenet, real) if m is not None and m[0] is not None})
        return {"source": run.name, "path": run.path, "model": run.model, "upstream": run.upstream,
                "upstream_from": run.upstream_from, "res": run.res, "steps": run.total_steps,
                "metric_steps": steps_at, "init": run.init,
                "imagenet": None if imagenet is None else round(imagenet[1] * scale, 2),
                "real": None if real is None else round(real[1] * scale, 2)}

    placed = set()
    for res in published_res:
        for row in published_results.RESULTS:
            if row.res == res:
                rows.append(with_deltas({"source": "published", "path": published_results.SOURCE,
                                         "model": row.model, "upstream": row.upstream, "res": row.res,
                                         "steps": None, "metric_steps": [], "init": None,
                                         "imagenet": row.imagenet, "real": row.real}))
        for i, run in enumerate(runs):
            if run.res == res:
                rows.append(with_deltas(ours(run)))
                placed.add(i)
    rows += [with_deltas(ours(run)) for i, run in enumerate(runs) if i not in placed]
    return rows


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _signed(delta: dict[str, Any] | None) -> str:
    if delta is None:
        return "—"
    return " / ".join("—" if delta[k] is None else f"{delta[k]:+.2f}" for k in ("imagenet", "real"))


def to_markdown(rows: Sequence[dict[str, Any]], imagenet_metric: str, real_metric: str) -> str:
    header = ["source", "model", "upstream", "res", "steps", "init checkpoint", "ImageNet", "ReaL",
              "Δ vs COYO (IN / ReaL)", "Δ vs JFT (IN / ReaL)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        steps = _cell(row["steps"])
        if row["metric_steps"] and row["metric_steps"] != [row["steps"]]:
            steps += " (metric at " + ", ".join(map(str, row["metric_steps"])) + ")"
        upstream = row["upstream"] + ("" if row.get("upstream_from") in (None, "flag")
                                      else f" ({row['upstream_from']})")
        source = "published" if row["source"] == "published" else f"ours: {row['source']}"
        lines.append("| " + " | ".join([
            source, row["model"], upstream, _cell(row["res"]), steps, _cell(row["init"]),
            _cell(row["imagenet"]), _cell(row["real"]),
            _signed(row["delta_vs_coyo"]), _signed(row["delta_vs_jft"])]) + " |")
    note = (f"\nImageNet = `{imagenet_metric}`, ReaL = `{real_metric}` (top-1, %). Published: "
            f"{published_results.SOURCE}. Δ = row minus the published row of the same model and "
            f"resolution (— where there is none).\n")
    return "\n".join(lines) + "\n" + note


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m coyo_vit.tools.report",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="workdir or evaluate.py results file")
    parser.add_argument("--upstream", action="append", default=[],
                        help="upstream data (coyo, jft or any name): once for all runs, or once per "
                             "run in order (default: inferred from each run's init)")
    parser.add_argument("--imagenet_metric", default=DEFAULT_IMAGENET_METRIC)
    parser.add_argument("--real_metric", default=DEFAULT_REAL_METRIC)
    parser.add_argument("--scale", type=float, default=100.0,
                        help="multiplies our metrics (100: fractions -> percent, as published)")
    parser.add_argument("--json", default=None, help="also write the table as JSON here ('-': stdout)")
    parser.add_argument("--markdown", default=None, help="also write the markdown table here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        runs = build_runs(args.runs, args.upstream)
        check_metrics(runs, [args.imagenet_metric, args.real_metric])
    except (ValueError, FileNotFoundError) as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 2
    rows = build_rows(runs, args.imagenet_metric, args.real_metric, args.scale)
    markdown = to_markdown(rows, args.imagenet_metric, args.real_metric)
    for run in runs:
        missing = [m for m in (args.imagenet_metric, args.real_metric) if m not in run.metrics]
        if missing:
            print(f"report: note: {run.path} has no {missing}", file=sys.stderr)
    report = {"metrics": {"imagenet": args.imagenet_metric, "real": args.real_metric, "scale": args.scale},
              "published": [r.as_dict() for r in published_results.RESULTS],
              "runs": [asdict(r) for r in runs], "rows": rows}
    if args.json == "-":
        print(json.dumps(report, indent=2))
    else:
        print(markdown, end="")
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
