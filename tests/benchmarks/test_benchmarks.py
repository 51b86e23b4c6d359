"""Smoke tests of the benchmark suite: each entry point parses --help, a tiny configuration of
each runs and writes valid JSON, and the analytic FLOP count matches the published convention.

These check that the benchmarks work, never how fast anything is (no timed assertions).
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import pytest

from benchmarks import flops
from tests.conftest import REPO

MODULES = ("input_pipeline", "train_step", "accelerator", "end_to_end", "attention", "device_trace")


def _load(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.loads(f.read(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


def test_forward_macs_of_vit_b16_at_224_is_17_56_g():
    shape = flops.ViTShape.from_variant("B/16", image_size=224, num_classes=1000)
    macs = flops.forward_macs_per_image(shape)
    assert macs == 17_563_828_224
    assert round(macs / 1e9, 2) == 17.56
    assert flops.train_flops_per_image(shape) == 6 * macs


def test_flop_formula_terms():
    # 12*N*D^2 per layer is the convention's form of 4*N*D^2 + 2*N*D*mlp_dim at mlp_dim = 4*D.
    shape = flops.ViTShape(depth=1, width=8, mlp_dim=32, patch_size=4, image_size=8, num_classes=3)
    n, d = 5, 8
    expected = 12 * n * d * d + 2 * n * n * d + 4 * 3 * 16 * d + d * 3
    assert flops.forward_macs_per_image(shape) == expected
    with_rep = flops.ViTShape(**{**shape.__dict__, "rep_size": 6})
    assert flops.forward_macs_per_image(with_rep) == expected - d * 3 + d * 6 + 6 * 3


@pytest.mark.parametrize("kind, platform, peak", [
    ("NVIDIA H100 80GB HBM3", "gpu", 989e12), ("NVIDIA H200", "gpu", 989e12),
    ("NVIDIA A100-SXM4-40GB", "gpu", 312e12), ("TPU v4", "tpu", 275e12),
    ("TPU v5 lite", "tpu", 197e12), ("cpu", "cpu", None), ("Mystery chip", "gpu", None)])
def test_peak_flops_table(kind, platform, peak):
    assert flops.peak_flops(kind, platform)[1] == peak
    assert flops.mfu(1e12, 1.0, peak, 1) == (None if peak is None else 1e12 / peak)


@pytest.mark.parametrize("name", MODULES)
def test_help(name, capsys):
    module = __import__(f"benchmarks.{name}", fromlist=["main"])
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert f"python -m benchmarks.{name}" in capsys.readouterr().out


def test_accelerator_runs_tiny_on_cpu(tmp_path):
    from benchmarks import accelerator
    out = tmp_path / "accelerator.json"
    # Two blocks and a small head only keep the compilation short.
    accelerator.main(["--variant", "Ti/16", "--batch", "8", "--image_size", "32", "--steps", "2",
                      "--warmup", "1", "--repeats", "1", "--num_classes", "10", "--rep_size", "0",
                      "--depth", "2", "--dtype", "float32", "--out", str(out),
                      "--profile_dir", str(tmp_path / "profile"), "--profile_steps", "2",
                      "--dump_hlo", str(tmp_path / "step.hlo.txt")])
    result = _load(out)["result"]
    assert result["platform"] == "cpu" and result["mfu"] is None
    assert result["images_per_s"] > 0 and result["compile_s"] > 0
    assert result["params"] < 2_000_000  # the depth override reached the model (12 blocks: 5.5M)
    assert result["model_flops_per_step"] == 8 * flops.train_flops_per_image(
        flops.ViTShape.from_variant("Ti/16", 32, 10, depth=2))
    assert "HloModule" in (tmp_path / "step.hlo.txt").read_text()
    # A CPU trace has no /device: process (so the run's own summary is empty); its host threads
    # still show the traced step being dispatched, which is what the summariser must find.
    assert result["profile"]["threads"] == []
    from benchmarks import device_trace
    summary = device_trace.main([str(tmp_path / "profile"), "--process", "^/host",
                                 "--out", str(tmp_path / "trace.json")])
    names = {t["name"] for thread in summary["threads"] for t in thread["top"]}
    assert any(name.startswith("PjitFunction(") for name in names), sorted(names)[:20]
    assert _load(tmp_path / "trace.json")["result"]["threads"][0]["busy_us"] > 0


def test_attention_benchmark_runs_on_cpu_and_reports_cudnn_refusals(tmp_path):
    from benchmarks import attention
    rows = attention.main(["--variant", "Ti/16", "--batch", "2", "--image_size", "32", "--iters", "1",
                           "--out", str(tmp_path / "attention.json")])
    by_name = {row["implementation"]: row for row in _load(tmp_path / "attention.json")["rows"]}
    assert set(by_name) == {"xla", "cudnn", "cudnn_pad2", "cudnn_pad16", "cudnn_pad64"}
    assert by_name["xla"]["ms"] > 0 and by_name["xla"]["err_out"] < 1e-2  # bf16 vs float32
    if jax.default_backend() != "gpu":  # cuDNN is not there: each cuDNN row says so
        assert all("cuDNN" in by_name[name]["error"] for name in by_name if name != "xla")
    assert len(rows) == 5


def test_block_parts_candidates_compute_what_the_model_computes(tmp_path):
    # In float32 the recomputed GELU and the fused q/k/v product must match the model's forms
    # (the reference rows) to rounding: a candidate that changed the math would show here.
    from benchmarks import block_parts
    # The head's bf16-operand candidate rounds on purpose: its error must show, and stay small.
    block_parts.main(["--variant", "Ti/16", "--batch", "2", "--image_size", "32", "--iters", "1",
                      "--dtype", "float32", "--num_classes", "100", "--rep_size", "16",
                      "--out", str(tmp_path / "parts.json")])
    result = _load(tmp_path / "parts.json")
    assert result["tokens"] == 6  # 2x2 patches + class token, padded to even as on GPUs
    by_name = {(row["part"], row["implementation"]): row for row in result["rows"]}
    rounding = by_name.pop(("head", "bf16_operands"))
    assert set(by_name) == {("mlp", "autodiff"), ("mlp", "recompute_gelu"), ("qkv", "separate"),
                            ("qkv", "fused"), ("head", "float32")}
    for row in by_name.values():
        assert row["ms"] > 0 and row["err_out"] < 1e-6 and row["err_grad"] < 1e-6, row
    assert 1e-6 < rounding["err_out"] < 1e-2 and rounding["err_grad"] < 1e-2
    with pytest.raises(SystemExit):
        block_parts.main(["--parts", "mlp,attention"])


def test_train_step_workers_run_in_fresh_processes_without_tensorflow(tmp_path):
    from benchmarks import train_step
    out = tmp_path / "train_step.json"
    train_step.main(["--variants", "", "--ablate", "", "--compile_only_variants", "Ti/16",
                     "--compile_repeats", "1", "--compile_batch", "2", "--image_size", "32",
                     "--num_classes", "10", "--rep_size", "0", "--depth", "2", "--out", str(out)])
    result = _load(out)
    unrolled, scanned = result["results"]
    for r in (unrolled, scanned):
        assert "error" not in r, r
        assert r["tensorflow_imported"] is False  # the test session has it: a fresh process
        assert r["compile_s"] > 0 and r["peak_rss_bytes"] > 0
    assert (unrolled["scan"], scanned["scan"]) == (False, True)
    assert result["compile_scan_over_unrolled"]["Ti/16"] > 0


def test_train_step_plan_isolates_ablations_and_compile_only_pairs():
    from benchmarks import train_step
    jobs = train_step.plan(train_step.parse_args(["--memory_batch", "32"]))
    labels = [j.label for j in jobs]
    assert len(labels) == len(set(labels))
    assert "B/16 b8 f32 scan" in labels and "B/16 b8 bf16 unrolled" in labels
    assert "B/16 b32 f32 unrolled remat=full" in labels and "B/16 b32 f32 scan remat=full" in labels
    assert [j.config["scan"] for j in jobs if j.compile_only] == [False, True] * 3


def test_input_pipeline_runs_tiny_configuration(tmp_path):
    from benchmarks import input_pipeline
    out = tmp_path / "input_pipeline.json"
    input_pipeline.main(["--repeat", "1", "--rounds", "1", "--batch", "16", "--image_size", "32",
                         "--shuffle_buffer", "16", "--no-compare_full_decode", "--out", str(out)])
    result = _load(out)
    assert result["num_records"] == 145
    assert set(result["records_per_s"]) == {"decode", "crop_decode", "crop_only", "train", "eval"}
    assert result["crop_only_over_decode"] > 0
    assert result["train_over_decode"] > 0


def test_input_pipeline_times_a_baseline_checkout_in_the_same_rounds(tmp_path):
    """A copy of this tree's pipeline packages as the baseline: imported as separate modules
    from the copy's files while its pipelines are built, and ours put back after."""
    import shutil
    import sys

    from benchmarks import input_pipeline
    from input_pipeline import pipeline
    root = REPO
    baseline = tmp_path / "baseline"
    for package in ("input_pipeline", "configs"):
        shutil.copytree(root / package, baseline / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    checkout = input_pipeline.Checkout(str(baseline))
    with checkout.active():
        from input_pipeline import pipeline as theirs
    assert theirs is not pipeline and Path(theirs.__file__).is_relative_to(baseline)
    assert sys.modules["input_pipeline.pipeline"] is pipeline

    out = tmp_path / "input_pipeline.json"
    input_pipeline.main(["--repeat", "1", "--rounds", "2", "--batch", "16", "--image_size", "32",
                         "--shuffle_buffer", "16", "--no-compare_full_decode",
                         "--baseline", str(baseline), "--out", str(out)])
    result = _load(out)
    assert set(result["records_per_s"]) == {"decode", "crop_decode", "crop_only", "train",
                                            "train@baseline",
                                            "eval", "eval@baseline"}
    assert len(result["train_over_baseline_rounds"]) == 2 and result["eval_over_baseline"] > 0
    assert list(result["rounds"][0])[3:5] == ["train", "train@baseline"]  # order alternates
    assert list(result["rounds"][1])[3:5] == ["train@baseline", "train"]
    assert sys.modules["input_pipeline.pipeline"] is pipeline
    with pytest.raises(SystemExit, match="not a checkout of this repository"):
        input_pipeline.main(["--baseline", str(tmp_path / "elsewhere")])


def test_end_to_end_runs_tiny_configuration(tmp_path):
    from benchmarks import end_to_end
    out = tmp_path / "end_to_end.json"
    end_to_end.main(["--steps", "4", "--log_every", "2", "--checkpoint_every", "4", "--batch", "8",
                     "--num_images", "1024", "--bare_steps", "2", "--rounds", "1", "--out", str(out)])
    result = _load(out)
    assert result["loop_images_per_s"] > 0 and result["bare_images_per_s"] > 0
    assert len(result["loop_runs"][0]["interval_rates"]) == 2


def test_end_to_end_can_swap_in_a_real_vit_and_resolution_and_matches_the_pipeline_dtype():
    from benchmarks import end_to_end
    args = end_to_end.parse_args(["--variant", "Ti/16", "--image_size", "64", "--steps", "10"])
    config = end_to_end.loop_config(args, "/tmp/unused")
    assert config.model.variant == "Ti/16" and config.model.width is None
    assert config.image_size == 64
    assert config.input.pp_train.startswith("decode_jpeg_and_inception_crop(64,")
    assert "resize(64)" in config.input.pp_eval
    assert end_to_end.pipeline_image_dtype(config) == "uint8"  # recipes send uint8 pixels
    config.input.pp_train = config.input.pp_train.replace("flip_lr|", "flip_lr|value_range(-1, 1)|")
    assert end_to_end.pipeline_image_dtype(config) == "float32"
