"""Real multi-process JAX: two local processes joined by jax.distributed with gloo collectives."""
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from checkpoints.orbax_io import restore_params
from tests.conftest import REPO
from tests.training.conftest import (
    TINY_STEPS,
    checkpoint_steps,
    launch,
    process_env,
    tiny_train_args,
)


def test_two_processes_equal_one_process_with_four_devices(tmp_path):
    worker = str(REPO / "tests" / "distributed_step_worker.py")
    (tmp_path / "multi").mkdir()
    (tmp_path / "single").mkdir()
    multi = subprocess.run(launch(worker, str(tmp_path / "multi"), "2,2,1"), cwd=REPO, env=process_env(),
                           capture_output=True, text=True, timeout=300)
    assert multi.returncode == 0, multi.stderr[-3000:]
    single = subprocess.run([sys.executable, worker, str(tmp_path / "single"), "2,2,1"], cwd=REPO,
                            env=process_env(devices=4), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    p0, p1 = (np.load(tmp_path / "multi" / f"params_{i}.npz") for i in (0, 1))
    ref = np.load(tmp_path / "single" / "params_0.npz")
    assert sorted(p0.files) == sorted(p1.files) == sorted(ref.files)
    for key in ref.files:
        np.testing.assert_array_equal(p0[key], p1[key])          # both processes hold the same model
        np.testing.assert_allclose(p0[key], ref[key], atol=1e-5)  # and it is the 1-process result


def test_two_process_preemption_and_exact_resume(tmp_path, two_process_run):
    reference_dir, reference = two_process_run
    # Only process 0 prints metrics and progress (launch_local prefixes each line with [rank]).
    lines = (reference.stdout + reference.stderr).splitlines()
    metric_lines = [line for line in lines if "train/loss=" in line or " steps/s, " in line]
    assert metric_lines and all(line.startswith("[0] ") for line in metric_lines), metric_lines

    workdir = tmp_path / "preempted"
    command = launch(str(REPO / "train.py"), *tiny_train_args(workdir))
    launcher = subprocess.Popen(command, cwd=REPO, env=process_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not checkpoint_steps(workdir):  # first checkpoint (step 4) on disk: the run is mid-way
        assert launcher.poll() is None and time.time() < deadline
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)  # forwarded to both processes, as a scheduler does
    _, stderr = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, stderr[-3000:]
    stops = [line for line in stderr.splitlines() if "Preempted: checkpoint of step" in line]
    assert len(stops) == 2, stderr[-3000:]  # both processes stopped...
    stopped = {int(line.split("checkpoint of step ")[1].split()[0]) for line in stops}
    assert len(stopped) == 1  # ...at the same step
    assert checkpoint_steps(workdir)[-1] == stopped.pop() < TINY_STEPS

    resumed = subprocess.run(command, cwd=REPO, env=process_env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from step" in resumed.stderr
    assert checkpoint_steps(workdir)[-1] == checkpoint_steps(reference_dir)[-1] == TINY_STEPS
    got, want = restore_params(str(workdir))[0], restore_params(str(reference_dir))[0]
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_process_flags_without_a_coordinator_are_refused(monkeypatch):
    # Otherwise N processes meant as one run each train alone as process 0 in the same workdir.
    import pytest

    from coyo_vit.training import runtime
    monkeypatch.delenv("COYO_VIT_COORDINATOR", raising=False)
    with pytest.raises(ValueError, match="need --coordinator_address"):
        runtime.initialize(None, 4, 1)
    monkeypatch.delenv("COYO_VIT_NUM_PROCESSES", raising=False)
    with pytest.raises(ValueError, match="--num_processes or COYO_VIT_NUM_PROCESSES"):
        runtime.initialize("localhost:1", None, 0)


def test_tpu_pod_script_passes_no_empty_argument(tmp_path):
    # scripts/tpu_pod.sh with gcloud stubbed: with no extra flags, train.py gets none (printf %q
    # of nothing used to add '' , which train.py rejects on every worker); extra flags pass quoted.
    (tmp_path / "gcloud").write_text('#!/bin/sh\nfor a; do echo "$a"; done >> "$GCLOUD_LOG"\n')
    (tmp_path / "gcloud").chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", TPU_NAME="t", ZONE="z",
               WORKDIR="gs://b/w", DATA="gs://b/*.tfrecord", GCLOUD_LOG=str(tmp_path / "log"))
    for extra, want in (([], "--config.input.data.files='gs://b/*.tfrecord' >"),
                        (["--config.seed=3"], "--config.input.data.files='gs://b/*.tfrecord' --config.seed=3 >")):
        (tmp_path / "log").write_text("")
        result = subprocess.run(["bash", str(REPO / "scripts" / "tpu_pod.sh"), "configs/demo.py", *extra],
                                env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        launch = [line for line in (tmp_path / "log").read_text().splitlines() if "train.py" in line]
        assert len(launch) == 1 and want in launch[0], launch
