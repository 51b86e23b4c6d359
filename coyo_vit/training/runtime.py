"""Process life: start-up (logging, JAX's multi-controller runtime, compilation cache) and a
clean stop on SIGTERM and Ctrl-C."""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import jax
from jax.experimental import multihost_utils


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Joins the multi-process runtime when one is described, and sets up logging.

    Sources, first match wins: explicit arguments (train.py flags); COYO_VIT_COORDINATOR,
    COYO_VIT_NUM_PROCESSES and COYO_VIT_PROCESS_ID (set by coyo_vit.tools.launch_local); SLURM jobs of
    several tasks; COYO_VIT_DISTRIBUTED=auto (set by scripts/tpu_pod.sh), where
    `jax.distributed.initialize()` finds the cluster itself. A plain single process initialises
    nothing.
    """
    coordinator_address = coordinator_address or os.environ.get("COYO_VIT_COORDINATOR")
    if not coordinator_address and (num_processes is not None or process_id is not None):
        # Without this, N processes meant to be one run would each train alone as process 0.
        raise ValueError("--num_processes/--process_id need --coordinator_address (or "
                         "COYO_VIT_COORDINATOR=host:port): without a coordinator there is no "
                         "multi-process run to join")
    if coordinator_address:
        if num_processes is None:
            num_processes = _int_from_env("COYO_VIT_NUM_PROCESSES", "--num_processes")
        if process_id is None:
            process_id = _int_from_env("COYO_VIT_PROCESS_ID", "--process_id")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id {process_id} must be in [0, {num_processes}).")
        # CPU processes need a collectives backend for cross-process all-reduces (GPUs use NCCL).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    elif "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()
    elif os.environ.get("COYO_VIT_DISTRIBUTED") == "auto":
        jax.distributed.initialize()  # TPU pod slices and other clusters JAX detects itself
    if logging.getLogger().getEffectiveLevel() > logging.INFO:  # --verbosity=1 (DEBUG) stays
        logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("absl").addFilter(_quiet_orbax_info)
    logging.info("JAX %s: process %d of %d, devices %s", jax.__version__, jax.process_index(),
                 jax.process_count(), jax.devices())


def _int_from_env(variable: str, flag: str) -> int:
    value = os.environ.get(variable)
    if value is None or not value.strip().lstrip("-").isdigit():
        raise ValueError(f"a multi-process run (coordinator given) needs {flag} or {variable} as a "
                         f"whole number; {variable} is {value!r}")
    return int(value)


def enable_compilation_cache(directory: str | None) -> None:
    """Keeps compiled programs in `directory` (local path or gs://...), so a restarted, resumed or
    repeated run loads its train step instead of compiling it again (XLA keys each entry by the
    program, the devices, the compiler flags and the jax version, so a stale entry is never
    used). None or "" leaves JAX's own setting, i.e. JAX_COMPILATION_CACHE_DIR if set."""
    if directory:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
        logging.info("Compilation cache: %s", directory)


def _quiet_orbax_info(record: logging.LogRecord) -> bool:
    """Orbax narrates every checkpoint step at INFO; keep its warnings, drop the chatter."""
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


# --- Preemption and Ctrl-C ---------------------------------------------------------------
# Stop cleanly on SIGTERM (what TPU and GPU schedulers send before evicting a job) and on the
# first Ctrl-C (SIGINT); a second Ctrl-C aborts at once.
#
# The loop asks `should_stop(step)` after every step. Single process: a signal handler sets a
# flag. Multi-process: JAX's coordination service already listens for SIGTERM and agrees across
# hosts on one safe step (`reached_preemption_sync_point`), so every process checkpoints the same
# step together and exits. It listens to SIGTERM only, so a process's first SIGINT sends that
# process a SIGTERM: a Ctrl-C forwarded to every process (coyo_vit.tools.launch_local, or a
# scheduler) stops them all at one agreed step, like a preemption.
#
# Before training starts (data written or prepared, steps compiled) there is no step to save:
# the first SIGINT raises `InterruptedBeforeTraining` there, which the loop turns into a
# one-line message and exit status 130.

INTERRUPTED_EXIT_STATUS = 130  # 128 + SIGINT, what shells report for a program stopped by Ctrl-C


class InterruptedBeforeTraining(KeyboardInterrupt):
    """Ctrl-C before the first training step: raised where the main thread was."""


class Interrupted(SystemExit):
    """Leaves the program with status 130 after a Ctrl-C; `step` is the step saved (None: the
    run was stopped before training started and saved nothing)."""

    def __init__(self, step: int | None):
        super().__init__(INTERRUPTED_EXIT_STATUS)
        self.step = step


class PreemptionWatcher:
    """True from `should_stop` once a preemption notice or a Ctrl-C arrived (agreed by all
    processes); `interrupted` tells a Ctrl-C (exit 130) from a preemption (exit 0).

    Create it before any work (Ctrl-C then stops the set-up at once) and call `start_training()`
    before the first step (from then on Ctrl-C finishes the step and checkpoints it, and SIGTERM
    is watched too); `close()` puts the previous handlers back.
    """

    def __init__(self) -> None:
        self._requested = threading.Event()
        self._multi = jax.process_count() > 1
        self._training = False
        self.interrupted = False
        self._previous: dict[int, object] = {}
        self._main_thread = threading.current_thread() is threading.main_thread()
        # An ignored SIGINT stays ignored: a parent that handles Ctrl-C itself (coyo_vit.tools.sweep)
        # passes it on as SIGTERM.
        if self._main_thread and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)
        self._unraisablehook = sys.unraisablehook
        sys.unraisablehook = self._quiet_swallowed_interrupt

    def _quiet_swallowed_interrupt(self, unraisable) -> None:
        """Where the set-up's interrupt lands in a callback that cannot raise (a garbage
        collection callback), Python would print it as ignored; `check()` raises it later."""
        if not isinstance(unraisable.exc_value, InterruptedBeforeTraining):
            self._unraisablehook(unraisable)

    def check(self) -> None:
        """Raises InterruptedBeforeTraining if a Ctrl-C came during set-up: the handler's own
        raise can be swallowed where it lands (e.g. in a garbage-collection callback)."""
        if self.interrupted and not self._training:
            raise InterruptedBeforeTraining()

    def start_training(self) -> None:
        self.check()
        self._training = True
        if not self._multi and self._main_thread:
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        logging.warning("Received signal %d: finishing this step, checkpointing, then exiting.", signum)
        self._requested.set()

    def _on_sigint(self, signum, frame) -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C aborts at once
        self.interrupted = True
        if not self._training:
            raise InterruptedBeforeTraining()  # if swallowed where it lands, check() raises it
        logging.warning("Interrupted (Ctrl-C): finishing this step, checkpointing, then exiting "
                        "(Ctrl-C again aborts without saving).")
        if self._multi:
            os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption sync point listens to SIGTERM
        else:
            self._requested.set()

    def should_stop(self, step: int) -> bool:
        if self._multi:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._requested.is_set()

    def close(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
        sys.unraisablehook = self._unraisablehook
