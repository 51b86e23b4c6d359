"""Command-line flags and main() shared by train.py and finetune.py (absl + ml_collections)."""
from __future__ import annotations

import logging

from absl import app, flags
from ml_collections import config_flags

from coyo_vit import runtime, train_loop

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with an argument: configs/X.py:arg=val,arg2=val2. "
    "Override any value with --config.key=value; unknown keys are an error.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.jsonl; "
                               "a workdir holding a checkpoint is resumed.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for clusters that jax.distributed does not "
    "detect by itself (TPU pods and SLURM are detected; leave unset there).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's rank (with --coordinator_address).")
flags.mark_flags_as_required(["config", "workdir"])


def run(argv: list[str], *, require_init: bool) -> None:
    """Body of main(): join the runtime, then the shared train loop."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if require_init and not config.get("init"):
        raise app.UsageError("Fine-tuning needs --config.init=PATH (a checkpoint to start from); "
                             "use train.py to train from scratch.")
    try:
        runtime.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    except ValueError as err:  # inconsistent multi-process flags: a usage error, not a crash
        raise app.UsageError(str(err)) from None
    train_loop.run(config, _WORKDIR.value)
    logging.info("Finished; results in %s", _WORKDIR.value)
