"""Where records come from: img2dataset TFRecord shards, file specs, and the holdout split.

Files are named by a spec (glob, comma-separated list, list, or directory) on any filesystem
tf.io.gfile knows (local, gs://). The holdout is carved from the front of the sorted file list
at record granularity, so training can skip exactly the records the holdout uses.
"""
from __future__ import annotations

import struct
from typing import NamedTuple, Sequence

import tensorflow as tf

# A TFRecord is: uint64 length, uint32 crc of length, data, uint32 crc of data.
_HEADER_BYTES = 12
_FOOTER_BYTES = 4

_DIRECTORY_PATTERNS = ("*.tfrecord", "*.tfrecord-*")  # img2dataset and TFDS shard names


class FileSlice(NamedTuple):
    """Records [start, stop) of one TFRecord file (stop None = to the end of the file)."""
    path: str
    start: int = 0
    stop: int | None = None


def list_files(spec: str | Sequence[str]) -> list[str]:
    """Expands a file spec into a sorted, de-duplicated list of paths.

    spec: a glob, a comma-separated string of globs/paths, a list of them, or a directory (then
    its `*.tfrecord` and `*.tfrecord-*` files). Each part must match something, so a typo fails
    here with the pattern named rather than as a silently smaller dataset.
    """
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",")]
    elif isinstance(spec, Sequence) and all(isinstance(p, str) for p in spec):
        parts = [p.strip() for p in spec]
    else:
        raise TypeError(f"file spec must be a string or a list of strings, got {spec!r}")
    parts = [p for p in parts if p]
    if not parts:
        raise ValueError(f"file spec {spec!r} names no files")
    found: set[str] = set()
    for pattern in parts:
        if tf.io.gfile.isdir(pattern):
            matches = [m for glob in _DIRECTORY_PATTERNS
                       for m in tf.io.gfile.glob(f"{pattern.rstrip('/')}/{glob}")]
            if not matches:
                raise FileNotFoundError(f"directory {pattern!r} holds no "
                                        f"{' or '.join(_DIRECTORY_PATTERNS)} files")
        else:
            matches = tf.io.gfile.glob(pattern)
            if not matches:
                raise FileNotFoundError(f"no file matches {pattern!r}")
        found.update(matches)
    return sorted(found)


def parse_example(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """Parses one img2dataset tf.Example into jpg, key, url (strings), labels (int64 [n]) and
    label_probs (float32 [n]); missing label lists parse as empty."""
    spec = {
        "jpg": tf.io.FixedLenFeature([], tf.string),
        "key": tf.io.FixedLenFeature([], tf.string, default_value=""),
        "url": tf.io.FixedLenFeature([], tf.string, default_value=""),
        "labels": tf.io.VarLenFeature(tf.int64),
        "label_probs": tf.io.VarLenFeature(tf.float32),
    }
    features = tf.io.parse_single_example(serialized, spec)
    for name in ("labels", "label_probs"):
        features[name] = tf.sparse.to_dense(features[name])
    return features


def count_file_records(path: str) -> int:
    """Number of records in one TFRecord file, from the length headers alone.

    Seeks over the payloads, so it reads far less than decoding the records would. Raises
    ValueError for a truncated file, which tf.data would fail on too.
    """
    size = tf.io.gfile.stat(path).length
    count, position = 0, 0
    with tf.io.gfile.GFile(path, "rb") as f:
        while position < size:
            f.seek(position)
            header = f.read(_HEADER_BYTES)
            if len(header) < _HEADER_BYTES:
                raise ValueError(f"{path}: truncated TFRecord header at byte {position} of {size}")
            (length,) = struct.unpack("<Q", header[:8])
            position += _HEADER_BYTES + length + _FOOTER_BYTES
            if position > size:
                raise ValueError(f"{path}: record {count} claims {length} bytes, past the end of "
                                 f"the file ({size} bytes); the file is truncated or not a TFRecord")
            count += 1
    return count


def count_records(files: Sequence[str | FileSlice]) -> int:
    """Total records in `files` (paths or FileSlices)."""
    total = 0
    for item in files:
        source = FileSlice(item) if isinstance(item, str) else item
        n = count_file_records(source.path)
        stop = n if source.stop is None else min(source.stop, n)
        total += max(0, stop - source.start)
    return total


def split_holdout(files: Sequence[str], holdout_files: int = 0, holdout_examples: int = 0
                  ) -> tuple[list[FileSlice], list[FileSlice]]:
    """Splits sorted files into (train_sources, holdout_sources).

    The holdout is the first `holdout_files` files, then the first `holdout_examples` records of
    the files after them. A file split in two appears in training as FileSlice(path, start=n),
    so training skips exactly its leading holdout records. Only the files the example count
    reaches are opened.
    """
    for name, value in (("holdout_files", holdout_files), ("holdout_examples", holdout_examples)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    files = sorted(files)
    if holdout_files >= len(files) and (holdout_files or not files):
        raise ValueError(f"holdout_files={holdout_files} leaves no training file out of "
                         f"{len(files)} files")
    holdout = [FileSlice(f) for f in files[:holdout_files]]
    rest = files[holdout_files:]
    needed = holdout_examples
    for i, path in enumerate(rest):
        if needed == 0:
            return [FileSlice(f) for f in rest[i:]], holdout
        n = count_file_records(path)
        if needed < n:
            holdout.append(FileSlice(path, 0, needed))
            return [FileSlice(path, needed)] + [FileSlice(f) for f in rest[i + 1:]], holdout
        holdout.append(FileSlice(path))
        needed -= n
    raise ValueError(f"holdout_examples={holdout_examples} takes every record of the "
                     f"{len(rest)} files after the first {holdout_files}: none left to train on")
