"""Writing generated demo data safely: one writer at a time, and no file ever half written.

The demo generators (demo_data's shards, demo_digits' image folder) may be started by several
processes at once (tests, a multi-process launch) and may be killed mid-write; these two pieces
make both harmless.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Holds an exclusive flock on `lock_path` (created if needed) for the `with` body."""
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_atomic(path: Path, data: bytes, tmp_suffix: str, sync: bool = True) -> None:
    """Writes via `path` + `tmp_suffix` and a rename, so a killed run never leaves a partial
    `path`. `sync` also flushes the bytes to disk before the rename; writers of many small files
    that are only trusted once a manifest lists them can skip it."""
    tmp = path.with_name(path.name + tmp_suffix)
    with open(tmp, "wb") as f:
        f.write(data)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
