"""Reading a file or listing a directory by path, local or URL, without TensorFlow for local paths.

Run directories may live on gs:// (or another TensorFlow file system), which only tf.io.gfile
reads; but importing TensorFlow costs seconds, which the checks that run before any work
(resume checks, the sweep's status of its points) must not pay for a local workdir.
"""
from __future__ import annotations

import functools
import os
from types import SimpleNamespace


def for_path(path: str) -> SimpleNamespace:
    """isdir, listdir, exists and open (for reading text) for `path`: the os module's for local
    paths, tf.io.gfile's for URLs (gs://, TensorFlow's other file systems)."""
    if "://" not in path:
        return SimpleNamespace(isdir=os.path.isdir, listdir=os.listdir, exists=os.path.exists,
                               open=functools.partial(open, mode="r", encoding="utf-8"))
    import tensorflow as tf  # late: only URLs need TensorFlow's file systems
    gfile = tf.io.gfile
    return SimpleNamespace(isdir=gfile.isdir, listdir=gfile.listdir, exists=gfile.exists,
                           open=functools.partial(gfile.GFile, mode="r"))
