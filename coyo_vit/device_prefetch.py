"""Turns each process's numpy batches into global, sharded jax.Arrays, a few steps ahead.

A background thread builds the next batches (host-to-device copies included) while the current
step runs, so the accelerator never waits on the host. Host-side bookkeeping (the raw-record
position `_index`) is split off and returned next to the device batch, never sent to devices.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

_DONE = object()


def to_global(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assembles the global batch from this process's slice (same call on every process)."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}


def split_host_fields(batch: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Fields starting with '_' stay on the host, except the eval mask which the step needs."""
    host = {k: v for k, v in batch.items() if k.startswith("_") and k != "_mask"}
    device = {k: v for k, v in batch.items() if k not in host}
    return device, host


class DevicePrefetcher:
    """Iterator of (global device batch, host fields) with `depth` batches built ahead."""

    def __init__(self, local_batches: Iterable[dict[str, np.ndarray]], sharding: NamedSharding,
                 depth: int = 2):
        self._source = iter(local_batches)
        self._sharding = sharding
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, daemon=True, name="device-prefetch")
        self._thread.start()

    def _fill(self) -> None:
        try:
            for local in self._source:
                device, host = split_host_fields(local)
                item = (to_global(device, self._sharding), host)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put(_DONE)
        except BaseException as e:  # surfaced in the consumer's thread, with its traceback
            self._queue.put(e)

    def __iter__(self) -> Iterator[tuple[dict[str, jax.Array], dict[str, np.ndarray]]]:
        return self

    def __next__(self) -> tuple[dict[str, jax.Array], dict[str, Any]]:
        item = self._queue.get()
        if item is _DONE:
            self._queue.put(_DONE)
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
