"""Stop cleanly on SIGTERM (what TPU and GPU schedulers send before evicting a job).

The loop asks `should_stop(step)` after every step. Single process: a signal handler sets a
flag. Multi-process: JAX's coordination service already listens for SIGTERM and agrees across
hosts on one safe step (`reached_preemption_sync_point`), so every process checkpoints the same
step together and exits.
"""
from __future__ import annotations

import logging
import signal
import threading

import jax
from jax.experimental import multihost_utils


class PreemptionWatcher:
    """True from `should_stop` once a preemption notice arrived (agreed by all processes)."""

    def __init__(self) -> None:
        self._requested = threading.Event()
        self._multi = jax.process_count() > 1
        self._previous = None
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        logging.warning("Received signal %d: finishing this step, checkpointing, then exiting.", signum)
        self._requested.set()

    def should_stop(self, step: int) -> bool:
        if self._multi:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._requested.is_set()

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
