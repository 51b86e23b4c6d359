"""train.py end to end on real demo shards: resume after a kill, logs, TensorBoard, bad input."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from checkpoints.orbax_io import restore_params
from input_pipeline.demo.shards import ensure_demo_shards
from tests.conftest import REPO

STEPS = 16
SMALL = [f"--config.total_steps={STEPS}", "--config.batch_size=16", "--config.log_every_steps=4",
         "--config.eval_every_steps=8", "--config.checkpoint_every_steps=4",
         "--config.schedule.warmup_steps=2", "--config.eval_batch_size=64",
         "--config.input.shuffle_buffer=256"]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("demo_data")
    ensure_demo_shards(str(out), num_images=1024)
    return str(out)


def _train_cmd(workdir, demo_dir, *extra):
    return [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/demo.py"),
            "--workdir", str(workdir), f"--config.demo_data.out_dir={demo_dir}",
            "--config.demo_data.num_images=1024", *SMALL, *extra]


def _run(cmd, timeout=300, env=None):
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def _finished_steps(workdir: Path) -> list[int]:
    ckpt = workdir / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.exists() else []


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, demo_dir) -> Path:
    workdir = tmp_path_factory.mktemp("reference")
    result = _run(_train_cmd(workdir, demo_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def jax_leaves(tree):
    import jax
    return jax.tree.leaves(tree)


def test_metrics_jsonl_and_tensorboard_events(reference_run):
    records = [json.loads(line) for line in open(reference_run / "metrics.jsonl")]
    train = [r for r in records if "train/loss" in r]
    holdout = [r for r in records if "holdout/prec@1" in r]
    assert [r["step"] for r in train] == [4, 8, 12, 16]
    assert [r["step"] for r in holdout] == [8, 16]
    for r in train:
        for key in ("train/lr", "train/images_per_sec", "train/prec@1", "data/skipped_records"):
            assert key in r
    assert train[-1]["train/loss"] < train[0]["train/loss"]

    from tensorboard.backend.event_processing import event_accumulator
    events = event_accumulator.EventAccumulator(str(reference_run / "tensorboard"),
                                                size_guidance={event_accumulator.TENSORS: 0})
    events.Reload()
    tags = set(events.Tags()["tensors"])
    assert {"train/loss", "train/lr", "holdout/prec@1", "holdout/loss"} <= tags
    from tensorflow import make_ndarray
    logged = {e.step: float(make_ndarray(e.tensor_proto)) for e in events.Tensors("train/loss")}
    assert logged == pytest.approx({r["step"]: r["train/loss"] for r in train}, rel=1e-6)
    prec = {e.step: float(make_ndarray(e.tensor_proto)) for e in events.Tensors("holdout/prec@1")}
    assert prec == pytest.approx({r["step"]: r["holdout/prec@1"] for r in holdout}, rel=1e-6)


def test_checkpoint_meta_counts_skipped_records(reference_run):
    meta = json.load(open(reference_run / "checkpoints" / str(STEPS) / "meta" / "metadata"))
    consumed = meta["data_positions"][0]
    assert consumed >= STEPS * 16
    assert meta["skipped_records"][0] == consumed - STEPS * 16
    last = [json.loads(line) for line in open(reference_run / "metrics.jsonl") if "train/loss" in line][-1]
    assert last["data/skipped_records"] == meta["skipped_records"][0]
    # The per-reason counts explain every skipped record, and reach the logs too.
    by_reason = meta["skipped_by_reason"][0]
    assert sum(by_reason.values()) == meta["skipped_records"][0]
    # The log shows the reasons that occurred (zero counts are left out of it).
    assert {k: v for k, v in last.items() if k.startswith("data/skipped/")} == {
        f"data/skipped/{reason}": n for reason, n in by_reason.items() if n}


def test_unknown_config_key_fails(tmp_path, demo_dir):
    result = _run(_train_cmd(tmp_path / "w", demo_dir, "--config.no_such_key=1"))
    assert result.returncode != 0
    assert "no_such_key" in result.stderr


def test_pattern_matching_nothing_names_it(tmp_path):
    pattern = str(tmp_path / "missing" / "shard-*.tfrecord")
    cmd = [sys.executable, str(REPO / "train.py"), "--config",
           f"{REPO / 'configs/coyo_pretrain.py'}:variant=Ti/16,files={pattern}", "--workdir", str(tmp_path / "w")]
    result = _run(cmd)
    assert result.returncode != 0
    assert pattern in result.stderr


def test_batch_not_divisible_by_devices_names_both_numbers(tmp_path, demo_dir):
    result = _run(_train_cmd(tmp_path / "w", demo_dir, "--config.batch_size=15"),)
    assert result.returncode != 0
    assert "Batch size 15 is not divisible by the 2 data-parallel devices" in result.stderr


def test_nonfinite_update_stops_naming_the_step_and_is_never_checkpointed(tmp_path, demo_dir):
    # The loss of a step is that of the parameters before its update: an update that overflows
    # has a finite loss. Checkpointing every step, such a step was once saved with NaN
    # parameters, and every resume restored them and failed again.
    workdir = tmp_path / "diverged"
    result = _run(_train_cmd(workdir, demo_dir, "--config.schedule.base_lr=1e30",
                             "--config.optimizer.grad_clip_norm=0",
                             "--config.checkpoint_every_steps=1"))
    assert result.returncode != 0
    assert "Non-finite parameter norm after the update" in result.stderr, result.stderr[-2000:]
    bad_step = int(result.stderr.split(") at step ")[1].split(".")[0])
    finished = _finished_steps(workdir)
    assert all(s < bad_step for s in finished)
    if finished:
        params, _ = restore_params(str(workdir))
        assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax_leaves(params))


def test_a_failing_evaluation_does_not_cost_the_checkpoint_of_its_step(tmp_path, demo_dir):
    # An evaluator whose data is found (checked before training) but whose pp keeps no example
    # (a crop larger than the resized image) fails when it first runs, at a step that also saves.
    # Data that is missing altogether fails before training starts.
    config = tmp_path / "broken_eval_config.py"
    config.write_text(
        "from configs import demo\n\n\n"
        "def get_config(arg=None):\n"
        "    config = demo.get_config(arg)\n"
        "    config.evals = {'gone': dict(type='multilabel', every_steps=4, batch_size=16,\n"
        "                                 data=dict(files=%r),\n"
        "                                 pp=\"decode|resize_small(12)|central_crop(32)|coyo_labels('threshold', 0.1)\")}\n"
        "    return config\n" % f"{demo_dir}/*.tfrecord")
    workdir = tmp_path / "broken_eval"
    cmd = _train_cmd(workdir, demo_dir)
    cmd[cmd.index("--config") + 1] = str(config)
    result = _run(cmd)
    assert result.returncode != 0
    assert "evaluator 'gone': the eval split has no examples" in result.stderr, result.stderr[-2000:]
    assert _finished_steps(workdir) == [4]
    assert not [p.name for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]
    assert json.load(open(workdir / "checkpoints" / "4" / "meta" / "metadata"))["step"] == 4


def _snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in directory.rglob("*") if p.is_file()}


def _start(cmd, env=None) -> tuple[subprocess.Popen, list[str]]:
    """Starts `cmd`, collecting its stderr lines in a list as they come."""
    import threading
    # SIGINT as a terminal's process has it: a shell's background job (e.g. pytest under `&`)
    # starts with it ignored, which train.py respects; a handler here is reset by exec.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, env=env)
    finally:
        signal.signal(signal.SIGINT, previous)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    proc.reader = reader
    return proc, lines


def _finish(proc, lines, timeout=120) -> str:
    proc.wait(timeout=timeout)
    proc.reader.join(timeout=10)
    return "".join(lines)


def _wait_for_checkpoint_after(proc, lines, workdir: Path, step: int) -> None:
    deadline = time.time() + 300
    while not [s for s in _finished_steps(workdir) if s > step]:
        assert proc.poll() is None and time.time() < deadline, "".join(lines)[-3000:]
        time.sleep(0.05)


def test_sigterm_ctrl_c_and_kill_keep_progress_and_the_same_command_resumes_exactly(
        tmp_path, demo_dir, reference_run):
    """One run stopped three ways in turn, each resumed by the same command: SIGTERM (a
    scheduler's preemption notice) and Ctrl-C checkpoint the current step; kill -9 loses only the
    steps since the last checkpoint. The end result is the uninterrupted reference run's."""
    workdir = tmp_path / "stopped"
    # Checkpoints at every step (the cadence does not change the result): each signal below is
    # sent as soon as the run is past its last stop, and comes well before the last step. The
    # runs share a compilation cache of their own: the resumed ones load the steps the first
    # compiled, and must still end bitwise-close to the reference run. JAX caches only programs
    # that took >= 1 s to compile unless told otherwise.
    common = ["--config.checkpoint_every_steps=1",
              f"--config.compilation_cache_dir={tmp_path / 'xla_cache'}"]
    env = {**os.environ, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    # SIGTERM: the current step is checkpointed, exit 0.
    proc, lines = _start(_train_cmd(workdir, demo_dir, *common), env)
    _wait_for_checkpoint_after(proc, lines, workdir, 0)
    proc.send_signal(signal.SIGTERM)
    stderr = _finish(proc, lines)
    assert proc.returncode == 0, stderr[-3000:]
    preempted = int(stderr.split("Preempted: checkpoint of step ")[1].split()[0])
    assert _finished_steps(workdir)[-1] == preempted < STEPS
    first_config = (workdir / "config.json").read_text()
    cached = set(os.listdir(tmp_path / "xla_cache"))
    assert any(name.startswith("jit_step") for name in cached), sorted(cached)

    # The same command, here with a safe change (the log cadence), resumes; its config is kept
    # beside the first. Ctrl-C: the current step is checkpointed, exit 130, one line says so.
    again = _train_cmd(workdir, demo_dir, *common, "--config.log_every_steps=2")
    proc, lines = _start(again, env)
    _wait_for_checkpoint_after(proc, lines, workdir, preempted)
    proc.send_signal(signal.SIGINT)
    stderr = _finish(proc, lines)
    assert proc.returncode == 130, stderr[-3000:]
    assert f"Resumed from step {preempted}" in stderr
    interrupted = int(stderr.split("interrupted: saved step ")[1].split(";")[0])
    assert "; run the same command to resume" in stderr
    assert _finished_steps(workdir)[-1] == interrupted < STEPS
    assert (workdir / "config.json").read_text() == first_config
    assert json.loads((workdir / f"config.{preempted}.json").read_text())["log_every_steps"] == 2

    # kill -9: nothing is saved on the way out.
    proc, lines = _start(again, env)
    _wait_for_checkpoint_after(proc, lines, workdir, interrupted)
    proc.send_signal(signal.SIGKILL)
    _finish(proc, lines)
    killed_at = max(_finished_steps(workdir))
    assert interrupted < killed_at < STEPS
    # What a kill -9 in the middle of a later checkpoint write leaves behind: orbax's temporary
    # directory, never renamed to its step. A restart must neither pick it up nor trip over it.
    partial = workdir / "checkpoints" / f"{killed_at + 1}.orbax-checkpoint-tmp"
    (partial / "state").mkdir(parents=True, exist_ok=True)
    (partial / "state" / "half_written").write_bytes(b"\0" * 100)

    result = _run(again, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resumed from step {killed_at}" in result.stderr
    assert not partial.exists()
    resumed, resumed_kwargs = restore_params(str(workdir))
    reference, reference_kwargs = restore_params(str(reference_run))
    assert resumed_kwargs == reference_kwargs
    assert _finished_steps(workdir)[-1] == _finished_steps(reference_run)[-1] == STEPS
    for a, b in zip(jax_leaves(resumed), jax_leaves(reference), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    # metrics.jsonl reads as one run: each train step logged once, in order (the killed run's
    # lines beyond its last checkpoint dropped). The stopped runs logged the steps since their
    # last log line before they exited.
    logged = [r["step"] for r in map(json.loads, open(workdir / "metrics.jsonl")) if "train/loss" in r]
    assert logged == sorted(set(logged)) and logged[-1] == STEPS, logged
    assert preempted in logged and interrupted in logged


def test_ctrl_c_before_training_starts_stops_at_once_with_one_line(tmp_path, demo_dir):
    workdir = tmp_path / "ctrl_c"
    proc, lines = _start(_train_cmd(workdir, demo_dir))
    deadline = time.time() + 120
    while not any("Process 0/1" in line for line in lines):  # set-up has begun
        assert proc.poll() is None and time.time() < deadline, "".join(lines)[-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stderr = _finish(proc, lines, timeout=60)
    assert proc.returncode == 130, stderr[-3000:]
    assert "interrupted before training started: no step to save" in stderr
    assert "Traceback" not in stderr
    assert _finished_steps(workdir) == []
    assert not [p for p in workdir.rglob("*") if p.name.endswith(".tmp")] if workdir.exists() else True


def test_rerunning_a_finished_run_says_so_at_once(reference_run, demo_dir):
    before = _snapshot(reference_run)
    result = _run(_train_cmd(reference_run, demo_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"already finished at step {STEPS}" in result.stderr
    assert "Model:" not in result.stderr and "Steps compiled" not in result.stderr
    assert "Unable to initialize backend" not in result.stderr  # JAX's note, default output
    verbose = _run(_train_cmd(reference_run, demo_dir, "--verbosity=1"))
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert "Unable to initialize backend 'tpu'" in verbose.stderr  # --verbosity=1: everything
    assert _snapshot(reference_run) == before


def test_resuming_with_another_model_names_the_keys_and_touches_nothing(reference_run, demo_dir):
    before = _snapshot(reference_run)
    result = _run(_train_cmd(reference_run, demo_dir, "--config.model.width=64",
                             "--config.loss=softmax_xent", "--config.total_steps=20"))
    assert result.returncode != 0
    assert (f"config.json of {reference_run} differs: loss 'sigmoid_xent' (checkpoint) vs "
            f"'softmax_xent' (this run); model.width 96 (checkpoint) vs 64 (this run). ") in result.stderr
    assert "total_steps" not in result.stderr.split("differs:")[1].split(". ")[0]  # a safe key
    assert _snapshot(reference_run) == before


# evaluate.py --workdir: a run evaluated as it evaluated itself (its saved config, its holdout).

def _evaluate(*args, cwd=REPO, timeout=300):
    return subprocess.run([sys.executable, str(REPO / "evaluate.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def resumed_copy(tmp_path_factory, reference_run) -> Path:
    """The reference run as if resumed from step 12 with a safe key changed (config.12.json)."""
    import shutil

    workdir = tmp_path_factory.mktemp("evaluated") / "run"
    shutil.copytree(reference_run, workdir)
    config = json.load(open(workdir / "config.json"))
    (workdir / "config.12.json").write_text(json.dumps({**config, "eval_batch_size": 32}))
    return workdir


def test_evaluate_workdir_step_with_its_own_config_into_the_workdir(tmp_path, resumed_copy):
    # Once the config had to be repeated by hand (a missed argument evaluated at another
    # resolution) and the results went into the current directory.
    result = _evaluate("--workdir", resumed_copy, "--step", 8, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not list(tmp_path.iterdir())  # nothing in the current directory
    evaluated = json.load(open(resumed_copy / "eval_results.json"))
    # Step 8 was trained and evaluated under config.json: config.12.json applies from step 12.
    assert (evaluated["step"], evaluated["config_file"]) == (8, str(resumed_copy / "config.json"))
    assert evaluated["checkpoint"] == str(resumed_copy / "checkpoints" / "8")
    assert evaluated["config"]["image_size"] == 32 and evaluated["config"]["eval_batch_size"] == 64
    logged = [json.loads(line) for line in open(resumed_copy / "metrics.jsonl")]
    logged = [r for r in logged if r["step"] == 8 and "holdout/loss" in r][0]
    for name in ("holdout/loss", "holdout/prec@1", "holdout/examples"):
        assert evaluated["results"][name] == pytest.approx(logged[name], abs=1e-5), name
    assert "holdout/prec@1" in result.stdout and f"wrote {resumed_copy / 'eval_results.json'}" in result.stdout


@pytest.mark.parametrize("args,expected", [
    # The latest checkpoint, with the config of the latest resume before it (step 12).
    (["--workdir", "{run}", "--evals", "val"],
     "error: --evals names ['val'], not evaluators of the config: ['holdout']"),
    (["--workdir", "{tmp}"],
     "error: --workdir {tmp} has no config.json and no checkpoint ({tmp}/checkpoints/<step>/): not "
     "a training workdir, or one whose run has not saved yet"),
    (["--workdir", "{run}", "--output", "{run}/config.json/results.json"],
     "error: cannot write the results to {run}/config.json/results.json: {run}/config.json is not "
     "a directory; nothing was evaluated (give --output FILE in a writable directory)"),
    (["--config", "configs/demo.py", "--checkpoint", "{run}/checkpoints/16"],
     "error: --output FILE is needed: --checkpoint {run}/checkpoints/16 is not a training workdir "
     "to write eval_results.json into (nothing is written into the current directory unasked)"),
])
def test_evaluate_errors_are_one_line_before_evaluating(tmp_path, resumed_copy, args, expected):
    fill = {"{run}": str(resumed_copy), "{tmp}": str(tmp_path)}
    for key, value in fill.items():
        args, expected = [a.replace(key, value) for a in args], expected.replace(key, value)
    result = _evaluate(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1].startswith(expected), result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "holdout done" not in result.stderr
    if "--evals" in args:
        assert (f"config {resumed_copy}/config.12.json, checkpoint {resumed_copy}/checkpoints/16"
                in result.stderr)
