"""Workdir file access: plain `os` for local paths, tf.io.gfile for URLs (gs://, ...).

The few operations the loop, the metric log and the sweep tools need, under tf.io.gfile's names.
TensorFlow is imported only for a URL, so local use (and GPU hosts without TensorFlow) never
pays for it.
"""
from __future__ import annotations

import os
from typing import Any, IO


class _LocalFiles:
    """tf.io.gfile's functions that this project uses, on local paths."""

    exists = staticmethod(os.path.exists)
    isdir = staticmethod(os.path.isdir)
    listdir = staticmethod(os.listdir)

    @staticmethod
    def makedirs(path: str) -> None:
        os.makedirs(path, exist_ok=True)

    @staticmethod
    def rename(src: str, dst: str, overwrite: bool = False) -> None:
        if not overwrite and os.path.exists(dst):
            raise FileExistsError(dst)
        os.replace(src, dst)

    @staticmethod
    def GFile(path: str, mode: str = "r") -> IO[Any]:  # noqa: N802 (tf.io.gfile's name)
        return open(path, mode, encoding="utf-8")


def for_path(path: str) -> Any:
    """tf.io.gfile when `path` is a URL, else the local equivalent with the same names."""
    if "://" in str(path):
        import tensorflow as tf
        return tf.io.gfile
    return _LocalFiles
