"""Sweeps: expansion helpers, validation before anything runs, and a real 2-point demo
fine-tuning sweep that is interrupted, resumed, skipped when finished, summarized and reported
next to the published table (the report's own tests, on hand-written files, are in
test_report.py; its real-run test is here to share the sweep's runs)."""
import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coyo_vit.tools import sweep_expand
from coyo_vit.tools.sweep_expand import chain, fixed, point_name, product, sweep, zipped
from tests.conftest import REPO

STEPS = 6


def _sweep_cmd(*args):
    return [sys.executable, "-m", "coyo_vit.tools.sweep", *map(str, args)]


def _run(cmd, timeout=300):
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _write_config(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


# ---- helpers and expansion -------------------------------------------------------------------

def test_product_zip_chain_and_nesting():
    lrs = sweep("config.schedule.base_lr", [0.1, 0.01])
    grid = product([lrs, sweep("config.total_steps", [10, 20])])
    assert grid == [
        {"config.schedule.base_lr": 0.1, "config.total_steps": 10},
        {"config.schedule.base_lr": 0.1, "config.total_steps": 20},
        {"config.schedule.base_lr": 0.01, "config.total_steps": 10},
        {"config.schedule.base_lr": 0.01, "config.total_steps": 20},
    ]
    # zipped pairs warmup with steps; the pair is one factor of a product; chain adds a 3rd grid.
    paired = zipped([sweep("config.total_steps", [10, 20]), sweep("config.schedule.warmup_steps", [1, 2])])
    nested = chain([product([sweep("arg.res", [384]), lrs, paired]),
                    product([fixed("arg.res", 512), fixed("config.ema_decay", 0.9999)])])
    assert nested == [
        {"arg.res": 384, "config.schedule.base_lr": 0.1, "config.total_steps": 10, "config.schedule.warmup_steps": 1},
        {"arg.res": 384, "config.schedule.base_lr": 0.1, "config.total_steps": 20, "config.schedule.warmup_steps": 2},
        {"arg.res": 384, "config.schedule.base_lr": 0.01, "config.total_steps": 10, "config.schedule.warmup_steps": 1},
        {"arg.res": 384, "config.schedule.base_lr": 0.01, "config.total_steps": 20, "config.schedule.warmup_steps": 2},
        {"arg.res": 512, "config.ema_decay": 0.9999},
    ]
    assert zipped([product([sweep("config.a", [1, 2]), fixed("config.b", 0)]), sweep("config.c", ["x", "y"])]) == [
        {"config.a": 1, "config.b": 0, "config.c": "x"}, {"config.a": 2, "config.b": 0, "config.c": "y"}]


@pytest.mark.parametrize("build, message", [
    (lambda: product([sweep("config.a", [1]), sweep("config.a", [2])]), "sets 'config.a' twice"),
    (lambda: zipped([sweep("config.a", [1, 2]), sweep("config.b", [1])]), "equal length, got lengths [2, 1]"),
    (lambda: sweep("schedule.base_lr", [0.1]), "'config.<field path>'"),
    (lambda: sweep("config.init", [None]), "None cannot be set"),
    (lambda: sweep("config.a", []), "no values"),
    (lambda: product([{"config.a": 1}]), "must be a list of points"),
    (lambda: sweep("arg.res", ["384,512"]), "cannot contain ','"),
])
def test_helpers_reject_bad_sweeps(build, message):
    with pytest.raises((ValueError, TypeError)) as info:
        build()
    assert message in str(info.value)


def test_point_names_are_stable_readable_and_filesystem_safe():
    point = {"config.schedule.base_lr": 0.03, "config.total_steps": 20000, "arg.res": 384}
    assert point_name(point) == "schedule.base_lr=0.03,total_steps=20000,arg.res=384"
    assert point_name(dict(point)) == point_name(point)
    assert point_name({}) == "base"
    odd = [{"config.init": "/ckpt/a b"}, {"config.init": "/ckpt/a_b"}, {"config.init": "/ckpt/a:b"}]
    names = [point_name(p) for p in odd]
    assert len(set(names)) == 3  # lossy sanitising gets a hash suffix, so no two points collide
    for name in names + [point_name({"config.model.name": "x" * 500})]:
        assert len(name) <= 140 and "/" not in name and " " not in name and not name.startswith(".")
    assert point_name({"config.input.top_k": (1, 5)}) == point_name({"config.input.top_k": (1, 5)})


def test_config_argument_items_merge_into_the_base_argument():
    assert sweep_expand.merge_argument("variant=L/16,res=384", {"arg.res": 512}) == "variant=L/16,res=512"
    assert sweep_expand.merge_argument(None, {"arg.res": 512}) == "res=512"
    assert sweep_expand.merge_argument("6", {"arg": 12}) == "12"
    assert sweep_expand.merge_argument("6", {"config.x": 1}) == "6"
    with pytest.raises(ValueError, match="not of the form k=v"):
        sweep_expand.merge_argument("6", {"arg.steps": 12})


def test_the_papers_finetune_sweep_expands_against_the_real_config(tmp_path):
    """lr {0.06, 0.03, 0.01} x steps {20k, 40k} at 384 and 512px: 12 validated points."""
    config = _write_config(tmp_path / "paper_sweep.py", (
        "from configs.imagenet_finetune import get_config\n"
        "from coyo_vit.tools.sweep_expand import product, sweep\n\n"
        "def get_sweep():\n"
        "    return product([sweep('arg.res', [384, 512]),\n"
        "                    sweep('config.schedule.base_lr', [0.06, 0.03, 0.01]),\n"
        "                    sweep('config.total_steps', [20_000, 40_000])])\n"))
    points = sweep_expand.expand(f"{config}:variant=L/16", ["--config.init=/ckpt/coyo_l16"])
    assert len(points) == 12 and len({p.name for p in points}) == 12
    assert points[0].config_flag == f"{config}:variant=L/16,res=384"
    assert points[-1].name == "arg.res=512,schedule.base_lr=0.01,total_steps=40000"
    assert points[-1].total_steps == 40000
    loaded = sweep_expand.load_config(points[-1].config_flag, points[-1].override_flags)
    assert (loaded.image_size, loaded.ema_decay, loaded.schedule.base_lr, loaded.init) == (
        512, 0.9999, 0.01, "/ckpt/coyo_l16")
    assert sweep_expand.load_config(points[0].config_flag, points[0].override_flags).ema_decay is None

    printed = _run(_sweep_cmd("--config", f"{config}:variant=L/16", "--workdir_root", "gs://b/ft",
                              "--entry", "finetune.py", "--print_commands", "--config.init=/ckpt/coyo_l16"))
    assert printed.returncode == 0, printed.stderr
    lines = printed.stdout.splitlines()
    assert len(lines) == 12
    assert lines[0] == (f"python finetune.py --config {config}:variant=L/16,res=384 --workdir "
                        f"gs://b/ft/arg.res=384,schedule.base_lr=0.06,total_steps=20000 "
                        f"--config.schedule.base_lr=0.06 --config.total_steps=20000 "
                        f"--config.init=/ckpt/coyo_l16")


@pytest.mark.parametrize("bad_point, message", [
    ("{'config.schedule.base_lrr': 0.1}",
     "unknown config key 'config.schedule.base_lrr'"),
    ("{'config.batch_size': 1.5}", "bad value in '--config.batch_size=1.5'"),
    ("{'arg.mode': 'distill'}", "mode='distill' is not one of"),
])
def test_a_bad_point_fails_before_anything_runs(tmp_path, bad_point, message):
    config = _write_config(tmp_path / "bad_sweep.py", (
        "from configs.demo_sweep import get_config\n"
        "from coyo_vit.tools.sweep_expand import chain, sweep\n\n"
        "def get_sweep():\n"
        f"    return chain([sweep('config.schedule.base_lr', [0.003, 0.01]), [{bad_point}]])\n"))
    root = tmp_path / "root"
    result = _run(_sweep_cmd("--config", f"{config}:steps=2", "--workdir_root", root))
    assert result.returncode == 2
    assert "sweep point 2" in result.stderr and message in result.stderr, result.stderr
    if "lrr" in message:  # the error lists the fields that do exist
        assert "valid fields of config.schedule: ['base_lr', 'decay', 'end_lr', 'warmup_steps']" in result.stderr
    assert not root.exists()  # the two good points did not start either


def test_unknown_global_override_and_missing_entry_fail_early(tmp_path):
    root = tmp_path / "root"
    result = _run(_sweep_cmd("--config", "configs/demo_sweep.py", "--workdir_root", root,
                             "--config.model.widht=8"))
    assert result.returncode == 2 and "valid fields of config.model" in result.stderr
    assert "(given on the command line, for every point)" in result.stderr
    result = _run(_sweep_cmd("--config", "configs/demo_sweep.py", "--workdir_root", root,
                             "--entry", "nope.py"))
    assert result.returncode == 2 and "entry script 'nope.py' does not exist" in result.stderr
    assert not root.exists()


def test_checkpoint_layout_matches_orbax_io():
    from checkpoints import orbax_io
    from coyo_vit.tools import sweep_summary

    assert (sweep_summary.CHECKPOINT_SUBDIR, sweep_summary.STATE_ITEM, sweep_summary.META_ITEM) == (
        orbax_io.CHECKPOINT_SUBDIR, orbax_io.STATE_ITEM, orbax_io.META_ITEM)


# ---- a real 2-point demo fine-tuning sweep ----------------------------------------------------

def _checkpoint_steps(workdir: Path) -> list[int]:
    ckpt = workdir / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.exists() else []


def _random_demo_checkpoint(path: Path) -> None:
    """A demo-sized ViT with random weights, in our orbax format: the points' config.init."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax.linen import meta

    from checkpoints.orbax_io import save_params
    from configs import demo_finetune
    from coyo_vit.models import Model

    kwargs = dict(demo_finetune.get_config().model.to_dict(), num_classes=10)
    shapes = jax.eval_shape(lambda x: Model(**kwargs).init(jax.random.PRNGKey(0), x),
                            jnp.zeros((1, 32, 32, 3)))
    rng = np.random.default_rng(0)
    save_params(str(path), jax.tree.map(lambda s: rng.normal(0, 0.05, s.shape).astype(s.dtype),
                                        meta.unbox(shapes["params"])), kwargs)


@pytest.fixture(scope="module")
def demo_sweep(tmp_path_factory):
    """configs/demo_sweep.py:mode=finetune (2 points, 6 steps, 2 at a time), run three times:
    stopped by SIGTERM to the sweep once a point is training, again (resumes), again (skips)."""
    tmp = tmp_path_factory.mktemp("sweep")
    init, root = tmp / "random_init", tmp / "root"
    _random_demo_checkpoint(init)
    cmd = _sweep_cmd("--config", f"configs/demo_sweep.py:mode=finetune,steps={STEPS}", "--entry",
                     "finetune.py", "--workdir_root", root, "--parallel", 2, "--metric", "val/top1",
                     f"--config.init={init}", f"--config.demo_digits.out_dir={tmp / 'digits'}",
                     "--config.evals.val.every_steps=3")
    names = ["schedule.base_lr=0.1", "schedule.base_lr=0.03"]
    first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not any((root / n / "metrics.jsonl").exists() and (root / n / "metrics.jsonl").stat().st_size
                  for n in names):
        assert first.poll() is None, first.stdout.read()
        assert time.time() < deadline, "no point started training"
        time.sleep(0.05)
    # To the sweep only: it must pass SIGTERM on to the points, which checkpoint and exit.
    first.send_signal(signal.SIGTERM)
    first_out, _ = first.communicate(timeout=300)
    interrupted = {n: _checkpoint_steps(root / n) for n in names}
    second = _run(cmd)
    after_second = {n: (root / n / "sweep.log").read_text() for n in names}
    third = _run(cmd)
    return dict(root=root, init=init, names=names, cmd=cmd, first=(first.returncode, first_out),
                interrupted=interrupted, second=second, after_second=after_second, third=third)


def test_an_interrupted_point_resumes(demo_sweep):
    code, out = demo_sweep["first"]
    assert code == 143, out
    assert "interrupted" in out
    stopped = {n: s for n, s in demo_sweep["interrupted"].items() if s and max(s) < STEPS}
    assert stopped, f"no point was stopped mid-run: {demo_sweep['interrupted']}\n{out}"
    second = demo_sweep["second"]
    assert second.returncode == 0, second.stdout + second.stderr
    for name, steps in stopped.items():
        assert f"{name}: resuming from step {max(steps)}" in second.stdout
        assert f"Resumed from step {max(steps)}" in demo_sweep["after_second"][name]
    for name in demo_sweep["names"]:
        assert max(_checkpoint_steps(demo_sweep["root"] / name)) == STEPS
        logged = [json.loads(line)["step"] for line in (demo_sweep["root"] / name / "metrics.jsonl").open()]
        assert logged == sorted(logged) and logged[-1] == STEPS  # one run's worth of lines, no repeats


def test_a_rerun_skips_finished_points(demo_sweep):
    third = demo_sweep["third"]
    assert third.returncode == 0, third.stdout + third.stderr
    for name in demo_sweep["names"]:
        assert f"{name}: finished already (step {STEPS}); skipped" in third.stdout
        log = (demo_sweep["root"] / name / "sweep.log").read_text()
        assert log == demo_sweep["after_second"][name]  # nothing was started for it
    assert "2 finished, 0 to run" in third.stdout
    printed = _run(demo_sweep["cmd"] + ["--print_commands"])
    assert printed.returncode == 0 and printed.stdout == ""  # nothing left for a scheduler
    printed = _run(demo_sweep["cmd"] + ["--print_commands", "--all"])
    assert len(printed.stdout.splitlines()) == 2


def _final(workdir: Path, metric: str) -> float:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    return [r[metric] for r in records if metric in r][-1]


def test_the_summary_lists_both_points_with_their_metrics(demo_sweep):
    root, names = demo_sweep["root"], demo_sweep["names"]
    result = _run(demo_sweep["cmd"] + ["--summarize", "--columns", "val/top5,train/loss"])
    assert result.returncode == 0, result.stderr
    final = {name: _final(root / name, "val/top1") for name in names}
    best_first = sorted(names, key=lambda n: -final[n])
    table = (root / "summary.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 2
    for rank, (row, name) in enumerate(zip(rows, best_first), 1):
        lr = name.split("=")[1]
        top5 = _final(root / name, "val/top5")
        assert row.startswith(f"| {rank} | {lr} | finished | {final[name]:.4g} | {STEPS} | {top5:.4g} |")
    assert rows[0] in result.stdout and rows[1] in result.stdout
    with open(root / "summary.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["point"] for r in csv_rows] == best_first
    assert all(float(r["val/top1"]) == final[r["point"]] for r in csv_rows)
    assert all(r["checkpoint_step"] == str(STEPS) and r["train/loss"] for r in csv_rows)

    bad = _run(demo_sweep["cmd"] + ["--summarize", "--metric", "holdout/prec@1"])
    assert bad.returncode == 2 and "metrics found: [" in bad.stderr and "val/top1" in bad.stderr
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (root / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _table_rows(markdown: str) -> list[list[str]]:
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| source")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in rows]


def test_the_report_on_the_two_finetuned_points(demo_sweep, tmp_path):
    """Real evaluator output (`val/top1` of the digits test split) beside the published rows."""
    root, init = demo_sweep["root"], demo_sweep["init"]
    runs = [root / name for name in demo_sweep["names"]]
    result = subprocess.run([sys.executable, "-m", "coyo_vit.tools.report", *map(str, runs), "--upstream",
                             "random init", "--json", str(tmp_path / "r.json")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = _table_rows(result.stdout)
    assert [r[:8] for r in rows[:4]] == [
        ["published", "ViT-L/16", "JFT-300M", "512", "—", "—", "87.76", "90.54"],
        ["published", "ViT-L/16", "COYO-Labeled-300M", "512", "—", "—", "87.24", "90.03"],
        ["published", "ViT-L/16", "JFT-300M", "384", "—", "—", "87.12", "89.99"],
        ["published", "ViT-L/16", "COYO-Labeled-300M", "384", "—", "—", "86.72", "89.84"]]
    assert len(rows) == 6
    for row, run in zip(rows[4:], runs):  # no published row at 32px: no differences
        assert row == [f"ours: {run.name}", "ViT (patch_size 8, width 96, depth 4)", "random init", "32",
                       str(STEPS), str(init), f"{_final(run, 'val/top1') * 100:.2f}", "—", "—", "—"]
    assert "ImageNet = `val/top1`, ReaL = `real/top1`" in result.stdout
    assert "has no ['real/top1']" in result.stderr  # the digits demo has no ReaL labels
    data = json.loads((tmp_path / "r.json").read_text())
    assert [r["source"] for r in data["rows"][4:]] == [run.name for run in runs]
    assert data["runs"][0]["init"] == str(init) and data["runs"][0]["res"] == 32
