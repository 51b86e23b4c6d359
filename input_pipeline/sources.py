"""Where records come from: img2dataset TFRecord shards, file specs, and the holdout split.

Files are named by a spec (glob, comma-separated list, list, or directory) on any filesystem
tf.io.gfile knows (local, gs://). The holdout is carved from the front of the sorted file list
at record granularity, so training can skip exactly the records the holdout uses.

Records are img2dataset's (image bytes under `jpg`) or our TFDS builder's (under `image`).
Files are read so that a truncated or corrupt file shows up as one damaged record instead of a
silently shorter file (`read_file_records`). Exclusion lists name records to leave out by key
or url (`read_exclusion_list`). Metadata and per-shard parquet files are opened with pyarrow.
"""
from __future__ import annotations

import struct
from typing import Any, Iterator, NamedTuple, Sequence

import tensorflow as tf

# A TFRecord is: uint64 length, uint32 crc of length, data, uint32 crc of data.
_HEADER_BYTES = 12
_FOOTER_BYTES = 4
_FRAMING_BYTES = _HEADER_BYTES + _FOOTER_BYTES
_ACCOUNTING_BLOCK = 64  # records read_file_records accounts for at once

EXCLUDE_FIELDS = ("key", "url")  # record fields an exclusion list can match
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


def list_parquet_files(spec: str | Sequence[str]) -> list[str]:
    """Sorted parquet files of a spec like list_files' (directories: their `*.parquet` files).

    For the data tools that read COYO's metadata parquet or img2dataset's per-shard parquet.
    """
    parts = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec)]
    found: set[str] = set()
    for pattern in (p for p in parts if p):
        if tf.io.gfile.isdir(pattern):
            matches = tf.io.gfile.glob(f"{pattern.rstrip('/')}/*.parquet")
        else:
            matches = tf.io.gfile.glob(pattern)
        if not matches:
            raise FileNotFoundError(f"no parquet file matches {pattern!r}")
        found.update(matches)
    if not found:
        raise ValueError(f"parquet spec {spec!r} names no files")
    return sorted(found)


def open_parquet(path: str):
    """A pyarrow ParquetFile for a local path or a URI pyarrow.fs knows (gs://, s3://, hdfs://).

    pyarrow's own filesystems, not tf.io.gfile: pyarrow cannot read from a GFile object.
    """
    import pyarrow.fs
    import pyarrow.parquet as pq

    if "://" in path:
        filesystem, inner = pyarrow.fs.FileSystem.from_uri(path)
        return pq.ParquetFile(filesystem.open_input_file(inner))
    return pq.ParquetFile(path)


def parquet_column_batches(files: Sequence[str], columns: Sequence[str], batch_rows: int
                           ) -> Iterator[Any]:
    """pyarrow RecordBatches of `columns` from each parquet file in turn, streamed; a file that
    lacks one of them is an error naming the missing columns and the ones it has."""
    for path in files:
        parquet = open_parquet(path)
        missing = set(columns) - set(parquet.schema_arrow.names)
        if missing:
            raise ValueError(f"{path} lacks metadata columns {sorted(missing)}; it has "
                             f"{parquet.schema_arrow.names}")
        yield from parquet.iter_batches(batch_size=batch_rows, columns=list(columns))


def parse_example(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """Parses one tf.Example into jpg, key, url (strings), labels (int64 [n]) and label_probs
    (float32 [n]).

    Reads img2dataset records (image bytes under `jpg`) and our TFDS `coyo_labeled_300m` records
    (under `image`) alike: the bytes come out as `jpg` either way. Missing fields parse as empty
    (b"" or []), so the damage checks can name what is missing instead of the parser failing.
    """
    spec = {
        "jpg": tf.io.FixedLenFeature([], tf.string, default_value=""),
        "image": tf.io.FixedLenFeature([], tf.string, default_value=""),
        "key": tf.io.FixedLenFeature([], tf.string, default_value=""),
        "url": tf.io.FixedLenFeature([], tf.string, default_value=""),
        "labels": tf.io.VarLenFeature(tf.int64),
        "label_probs": tf.io.VarLenFeature(tf.float32),
    }
    features = tf.io.parse_single_example(serialized, spec)
    image = features.pop("image")
    features["jpg"] = tf.where(tf.equal(tf.strings.length(features["jpg"]), 0), image,
                               features["jpg"])
    for name in ("labels", "label_probs"):
        features[name] = tf.sparse.to_dense(features[name])
    return features


@tf.autograph.experimental.do_not_convert  # TF ops only: traced as written, no conversion
def read_file_records(path: tf.Tensor, constants: dict[str, tf.Tensor] | None = None
                      ) -> tf.data.Dataset:
    """Records of one TFRecord file as {_path, _record, _damaged, _serialized}, damage included.

    tf.data stops reading a file at a truncated record or a bad checksum (with ignore_errors it
    moves on to the next file), and would do so silently. Here the bytes of the records read are
    added up (each record takes its length + 16 bytes of framing) and compared with the file's
    size: if they fall short, one extra element with `_damaged` True and `_record` = the index of
    the unreadable record follows the good ones, so the damage is counted (or, in strict mode,
    reported with file and record) instead of vanishing. The file size is read once per file;
    records are accounted in blocks, which keeps the cost per record near that of plain reading.
    `constants` (scalar tensors, e.g. the epoch) are added to every record, cheaper than a map.
    """
    size = tf.reshape(tf.py_function(_file_size, [path], tf.int64), [])
    blocks = tf.data.TFRecordDataset(path).ignore_errors().batch(_ACCOUNTING_BLOCK)
    end = tf.data.Dataset.from_tensors(tf.constant([], tf.string))  # an empty block marks the end

    @tf.autograph.experimental.do_not_convert
    def step(state: tuple[tf.Tensor, tf.Tensor], records: tf.Tensor
             ) -> tuple[tuple[tf.Tensor, tf.Tensor], dict[str, tf.Tensor]]:
        count, consumed = state
        n = tf.size(records, out_type=tf.int64)
        is_end = tf.equal(n, 0)
        damaged = tf.logical_and(is_end, tf.not_equal(consumed, size))
        # At the end: one empty marker record if the file fell short, else nothing.
        records = tf.cond(is_end, lambda: tf.fill(tf.cast(damaged, tf.int32)[None], ""),
                          lambda: records)
        m = tf.size(records, out_type=tf.int64)
        out = {"_path": tf.fill([m], path), "_record": count + tf.range(m, dtype=tf.int64),
               "_damaged": tf.fill([m], damaged), "_serialized": records,
               **{k: tf.fill([m], v) for k, v in (constants or {}).items()}}
        read = tf.reduce_sum(tf.cast(tf.strings.length(records), tf.int64)) + _FRAMING_BYTES * n
        return (count + n, consumed + read), out

    initial = (tf.constant(0, tf.int64), tf.constant(0, tf.int64))
    return blocks.concatenate(end).scan(initial, step).unbatch()


def _file_size(path: tf.Tensor) -> int:
    return tf.io.gfile.stat(path.numpy().decode()).length


@tf.autograph.experimental.do_not_convert
def read_slice(path: tf.Tensor, start: tf.Tensor, take: tf.Tensor) -> tf.data.Dataset:
    """read_file_records of records [start, start + take) (take -1 = to the end)."""
    return read_file_records(path).skip(start).take(take)


def count_file_records(path: str, allow_damaged: bool = False, read_payloads: bool = False) -> int:
    """Number of records in one TFRecord file, from the length headers alone.

    Seeks over the payloads, so it reads far less than decoding the records would. A truncated
    file raises ValueError, unless `allow_damaged`: then the unreadable tail counts as one record,
    which is what `read_file_records` yields for it (the good records, then one damaged marker).
    Payload checksums are not read here, so a file with a bad checksum mid-file counts all its
    records; `python -m input_pipeline.tools.validate_shards` finds those. With `read_payloads` the
    count is that of `read_file_records` itself (every byte read, checksums verified): exact for
    such files too, at the cost of reading the whole file.
    """
    if read_payloads:
        records = read_file_records(tf.constant(path))
        return int(records.reduce(tf.constant(0, tf.int64), lambda count, _: count + 1))
    size = tf.io.gfile.stat(path).length
    count, position = 0, 0
    with tf.io.gfile.GFile(path, "rb") as f:
        while position < size:
            f.seek(position)
            header = f.read(_HEADER_BYTES)
            if len(header) < _HEADER_BYTES:
                if allow_damaged:
                    return count + 1
                raise ValueError(f"{path}: truncated TFRecord header at byte {position} of {size}")
            (length,) = struct.unpack("<Q", header[:8])
            position += _HEADER_BYTES + length + _FOOTER_BYTES
            if position > size:
                if allow_damaged:
                    return count + 1
                raise ValueError(f"{path}: record {count} claims {length} bytes, past the end of "
                                 f"the file ({size} bytes); the file is truncated or not a TFRecord")
            count += 1
    return count


def count_records(files: Sequence[str | FileSlice], allow_damaged: bool = False,
                  read_payloads: bool = False) -> int:
    """Total records in `files` (paths or FileSlices); see count_file_records."""
    total = 0
    for item in files:
        source = FileSlice(item) if isinstance(item, str) else item
        n = count_file_records(source.path, allow_damaged, read_payloads)
        stop = n if source.stop is None else min(source.stop, n)
        total += max(0, stop - source.start)
    return total


def read_exclusion_list(path: str) -> tuple[str, list[str]]:
    """(field, values) of an exclusion list: records whose `field` is one of `values` are left out.

    The file is text: a first line naming the field (`key` or `url`, the identifiers every
    img2dataset and TFDS record carries), then one value per line. Naming the field in the file
    means a list of urls can never be matched against keys and silently exclude nothing.
    `python -m input_pipeline.tools.decontaminate` writes such files. Blank lines are ignored.
    """
    with tf.io.gfile.GFile(path, "r") as f:
        lines = [line.rstrip("\r\n") for line in f]
    lines = [line for line in lines if line.strip()]
    if not lines or lines[0].strip() not in EXCLUDE_FIELDS:
        first = lines[0] if lines else "(empty file)"
        raise ValueError(f"exclusion list {path}: the first line must name the field to match, one "
                         f"of {', '.join(EXCLUDE_FIELDS)}; got {first!r}")
    return lines[0].strip(), lines[1:]


def split_holdout(files: Sequence[str], holdout_files: int = 0, holdout_examples: int = 0,
                  allow_damaged: bool = False) -> tuple[list[FileSlice], list[FileSlice]]:
    """Splits sorted files into (train_sources, holdout_sources).

    The holdout is the first `holdout_files` files, then the first `holdout_examples` records of
    the files after them. A file split in two appears in training as FileSlice(path, start=n),
    so training skips exactly its leading holdout records. Only the files the example count
    reaches are opened; a truncated one raises unless `allow_damaged` (see count_file_records).
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
        n = count_file_records(path, allow_damaged)
        if needed < n:
            holdout.append(FileSlice(path, 0, needed))
            return [FileSlice(path, needed)] + [FileSlice(f) for f in rest[i + 1:]], holdout
        holdout.append(FileSlice(path))
        needed -= n
    raise ValueError(f"holdout_examples={holdout_examples} takes every record of the "
                     f"{len(rest)} files after the first {holdout_files}: none left to train on")
