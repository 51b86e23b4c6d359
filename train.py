"""Pretrain a ViT on COYO-Labeled-300M shards (or the embedded demo data).

    python train.py --config configs/demo.py --workdir /tmp/demo
    python train.py --config configs/coyo_pretrain.py:variant=B/16 --workdir gs://bucket/run \
        --config.input.data.files='gs://bucket/coyo/*.tfrecord'

Starting again in a workdir that holds a checkpoint resumes from it. Any config value can be
overridden with --config.key=value; unknown keys are an error.
"""
from __future__ import annotations

import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # before anything imports TensorFlow

from absl import app, flags
from ml_collections import config_flags

from coyo_vit import runtime, train_loop

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with an argument: configs/X.py:arg=val,arg2=val2.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.jsonl.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for clusters that jax.distributed does not "
    "detect by itself (TPU pods and SLURM are detected; leave unset there).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's rank (with --coordinator_address).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    runtime.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    train_loop.run(_CONFIG.value, _WORKDIR.value)
    logging.info("Training finished; results in %s", _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
