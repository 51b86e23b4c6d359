"""coyo_vit.tools.report: the published COYO / JFT-300M table with our evaluated runs and differences.

These use hand-written run files (a workdir as finetune.py writes it, an evaluate.py results
file) to pin the arithmetic down; the report on two real fine-tuned demo runs is in
test_sweep.py, where it shares the sweep's runs instead of training two more."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from coyo_vit.tools import published_results
from tests.conftest import REPO, SHARED

DESIGN = SHARED / "DESIGN.md"


def _report(*args):
    return subprocess.run([sys.executable, "-m", "coyo_vit.tools.report", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def _table_rows(markdown: str) -> list[list[str]]:
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| source")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in rows]


def test_published_rows_are_design_mds_table():
    if not DESIGN.exists():
        pytest.skip(f"{DESIGN} not present")
    text = DESIGN.read_text()
    section = text[text.index("The table to reproduce"):]
    found = re.findall(r"^\| (ViT-\S+) \| (\S+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \|$", section, re.M)
    assert len(found) == 4
    expected = [published_results.PublishedResult(m, u, int(r), float(i), float(rl)) for m, u, r, i, rl in found]
    assert list(published_results.RESULTS) == expected


def _write_workdir(path: Path, config: dict, records: list[dict]) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_differences_against_the_published_rows(tmp_path):
    """Hand-written run files (the numbers are ours to choose; the arithmetic is under test):
    a 512px fine-tuning workdir from a COYO checkpoint and an evaluate.py result at 384px from a
    JFT one, in the shapes finetune.py and evaluate.py write them."""
    model = {"variant": "L/16", "pool_type": "tok"}
    coyo = _write_workdir(tmp_path / "ft_coyo_512", {
        "init": "gs://bucket/coyo_l16_pretrain", "image_size": 512, "total_steps": 20000, "model": model},
        [{"step": 18000, "train/loss": 0.9, "val/top1": 0.8600, "real/top1": 0.8900},
         {"step": 20000, "train/loss": 0.8, "val/top1": 0.8710, "real/top1": 0.9001},
         {"step": 20000, "val/top5": 0.98}])
    jft = tmp_path / "eval_jft_384.json"
    jft.write_text(json.dumps({"checkpoint": "/ckpt/ft_jft_384", "config": {
        "init": "/ckpt/jft300m_l16", "image_size": 384, "total_steps": 40000, "model": model},
        "results": {"val/top1": 0.8750, "real/top1": 0.8990, "val/top5": 0.98}, "seconds": {}}))
    result = _report(coyo, jft, "--json", tmp_path / "report.json")
    assert result.returncode == 0, result.stderr
    rows = _table_rows(result.stdout)
    # Published rows first per resolution (512 then 384), each followed by ours at that resolution.
    assert [r[0] for r in rows] == ["published", "published", "ours: ft_coyo_512",
                                    "published", "published", "ours: eval_jft_384.json"]
    assert rows[0][1:8] == ["ViT-L/16", "JFT-300M", "512", "—", "—", "87.76", "90.54"]
    assert rows[1][8:] == ["—", "-0.52 / -0.51"]  # the published COYO-vs-JFT gap at 512px
    assert rows[2] == ["ours: ft_coyo_512", "ViT-L/16", "COYO-Labeled-300M (init path)", "512", "20000",
                       "gs://bucket/coyo_l16_pretrain", "87.10", "90.01", "-0.14 / -0.02", "-0.66 / -0.53"]
    assert rows[5] == ["ours: eval_jft_384.json", "ViT-L/16", "JFT-300M (init path)", "384", "40000",
                       "/ckpt/jft300m_l16", "87.50", "89.90", "+0.78 / +0.06", "+0.38 / -0.09"]
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["metrics"] == {"imagenet": "val/top1", "real": "real/top1", "scale": 100.0}
    assert len(data["published"]) == 4
    ours = data["rows"][2]
    assert ours["delta_vs_coyo"] == {"imagenet": -0.14, "real": -0.02}
    assert ours["metric_steps"] == [20000] and ours["steps"] == 20000

    # --upstream wins over inference; one value per run.
    result = _report(coyo, jft, "--upstream", "jft", "--upstream", "ImageNet-21k")
    rows = _table_rows(result.stdout)
    assert rows[2][2] == "JFT-300M" and rows[5][2] == "ImageNet-21k"
    assert rows[5][8:] == ["+0.78 / +0.06", "+0.38 / -0.09"]  # same model and res: same references


def test_evaluated_checkpoints_without_init_in_the_config_get_their_upstream(tmp_path):
    # evaluate.py runs with a fine-tuning config whose init is usually unset: the upstream comes
    # from the evaluated checkpoint's workdir config (its init), else from the checkpoint's path.
    model = {"variant": "L/16", "pool_type": "tok"}
    finetuned = _write_workdir(tmp_path / "ft_run", {
        "init": "gs://bucket/coyo_l16_pretrain", "image_size": 384, "total_steps": 100, "model": model},
        [{"step": 100, "val/top1": 0.8}])
    results = {}
    for name, checkpoint in (("from_workdir", str(finetuned / "checkpoints" / "100")),
                             ("from_path", "/ckpt/jft_l16_ft")):
        results[name] = tmp_path / f"{name}.json"
        results[name].write_text(json.dumps({"checkpoint": checkpoint, "config": {
            "init": None, "image_size": 384, "total_steps": 100, "model": model},
            "results": {"val/top1": 0.87, "real/top1": 0.9}, "seconds": {}}))
    result = _report(results["from_workdir"], results["from_path"])
    assert result.returncode == 0, result.stderr
    upstreams = {r[0]: r[2] for r in _table_rows(result.stdout) if r[0].startswith("ours")}
    assert upstreams == {"ours: from_workdir.json": "COYO-Labeled-300M (checkpoint's init path)",
                         "ours: from_path.json": "JFT-300M (checkpoint path)"}


def test_bad_inputs_name_what_is_wrong(tmp_path):
    run = _write_workdir(tmp_path / "run", {"image_size": 32, "total_steps": 4, "model": {}},
                         [{"step": 4, "holdout/prec@1": 0.5}])
    result = _report(run)
    assert result.returncode == 2
    assert "no run has metric 'val/top1' or 'real/top1'; metrics found: ['holdout/prec@1']" in result.stderr
    result = _report(tmp_path / "missing")
    assert result.returncode == 2 and "does not exist" in result.stderr
    result = _report(run, run, "--upstream", "a", "--upstream", "b", "--upstream", "c",
                     "--imagenet_metric", "holdout/prec@1")
    assert result.returncode == 2 and "one value for all runs or one per run (2); got 3" in result.stderr
    (tmp_path / "not_results.json").write_text("{}")
    result = _report(tmp_path / "not_results.json")
    assert result.returncode == 2 and "not an evaluate.py results file" in result.stderr
