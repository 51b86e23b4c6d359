"""Process start-up: logging and JAX's multi-controller runtime."""
from __future__ import annotations

import logging
import os

import jax


def initialize() -> None:
    """Joins the multi-process runtime when the environment describes one, and sets up logging.

    TPU pods and SLURM clusters are detected by `jax.distributed.initialize()` itself; a CPU or
    explicit cluster passes COYO_VIT_COORDINATOR, COYO_VIT_NUM_PROCESSES and COYO_VIT_PROCESS_ID.
    """
    coordinator = os.environ.get("COYO_VIT_COORDINATOR")
    if coordinator:
        # CPU processes need a collectives backend for cross-process all-reduces (GPUs use NCCL).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator,
                                   num_processes=int(os.environ["COYO_VIT_NUM_PROCESSES"]),
                                   process_id=int(os.environ["COYO_VIT_PROCESS_ID"]))
    elif "SLURM_JOB_ID" in os.environ or "TPU_WORKER_HOSTNAMES" in os.environ:
        jax.distributed.initialize()
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("absl").addFilter(_quiet_orbax_info)
    logging.info("JAX %s: process %d of %d, devices %s", jax.__version__, jax.process_index(),
                 jax.process_count(), jax.devices())


def _quiet_orbax_info(record: logging.LogRecord) -> bool:
    """Orbax narrates every checkpoint step at INFO; keep its warnings, drop the chatter."""
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname
