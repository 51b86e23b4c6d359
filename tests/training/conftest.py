"""Real multi-process runs shared by test_multiprocess.py and test_elastic_resume.py: two local
processes joined by jax.distributed (gloo collectives) training tests/tiny_config.py on the
img2dataset fixture shards. The finished 2-process run is made once per session."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, SHARED, TEST_XLA_FLAGS

SHARDS = str(SHARED / "fixtures" / "coyo_shards" / "shards" / "*.tfrecord")
TINY_STEPS = 12  # tests/tiny_config.py's total_steps


def process_env(devices: int | None = None) -> dict[str, str]:
    """The environment of a launched run; `devices` host CPU devices per process if given."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {TEST_XLA_FLAGS}"
    return env


def launch(*command: str, processes: int = 2, devices: int = 2) -> list[str]:
    """`command` (a python script and its arguments) as `processes` local processes."""
    return [sys.executable, "-m", "coyo_vit.tools.launch_local", "--num_processes", str(processes),
            "--devices_per_process", str(devices), "--", sys.executable, *command]


def tiny_train_args(workdir: Path, *extra: str) -> list[str]:
    return ["--config", f"{REPO / 'tests/tiny_config.py'}:{SHARDS}", "--workdir", str(workdir),
            "--config.mesh.fsdp=2", *extra]


def checkpoint_steps(workdir: Path) -> list[int]:
    ckpt = workdir / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.exists() else []


@pytest.fixture(scope="session")
def two_process_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """tests/tiny_config.py trained to the end by 2 processes x 2 devices: (workdir, the run).
    Read only: a test that trains on from it works on a copy (`copy_run`)."""
    workdir = tmp_path_factory.mktemp("two_processes") / "run"
    run = subprocess.run([*launch(str(REPO / "train.py"), *tiny_train_args(workdir))], cwd=REPO,
                         env=process_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert checkpoint_steps(workdir)[-1] == TINY_STEPS
    return workdir, run


def copy_run(workdir: Path, to: Path) -> Path:
    shutil.copytree(workdir, to)
    return to
