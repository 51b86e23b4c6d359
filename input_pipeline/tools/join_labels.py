r"""Adds COYO's labels to shards downloaded without them, joining on url with bounded memory.

    python -m input_pipeline.tools.join_labels --shards /data/coyo/shards \
        --metadata '/data/coyo/metadata/*.parquet' --output_dir /data/coyo/shards_labelled

img2dataset run without `--save_additional_columns '["labels","label_probs"]'` writes records
with url and key only. This tool writes a copy of each shard (same file names) whose records
carry `labels` and `label_probs` from the metadata row with the same url, plus the per-shard
parquet with those columns and the `_stats.json`. Records whose url is not in the metadata are
left out and counted (a record without labels would only be skipped in training). If a url is
in the metadata twice, its first row wins (counted as `duplicate_metadata_urls`).

Neither side (300M metadata rows, ~30k shards) is loaded at once. It is a hash join through
disk, in four streaming passes over a work directory:
  1. metadata rows (url, labels, label_probs) are split into buckets by a hash of the url;
  2. the shards' (url, shard, key), from each shard's parquet or else its records, likewise;
  3. bucket by bucket, urls are matched in memory (one bucket: about `--bucket_rows` rows) and
     the labels of each matched record are written sorted by shard;
  4. shard by shard, the sorted bucket outputs are read in step (a merge), and the records are
     rewritten with their labels.
Memory: one bucket, plus `--flush_rows` buffered rows in steps 1-2, plus one row group
(`result_row_group` rows) of each bucket output in step 4.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
import zlib
from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf
from google.protobuf.message import DecodeError

from input_pipeline import sources
from input_pipeline.tools import validate_shards

DEFAULT_BUCKET_ROWS = 1_000_000
DEFAULT_FLUSH_ROWS = 1_000_000
_READ_ROWS = 65_536


@dataclasses.dataclass
class JoinReport:
    metadata_rows: int = 0
    duplicate_metadata_urls: int = 0
    shard_records: int = 0
    labelled: int = 0
    unmatched: int = 0
    unreadable: int = 0   # damaged records or file tails, as validate_shards reports them
    buckets: int = 0
    seconds: float = 0.0
    unmatched_examples: list[str] = dataclasses.field(default_factory=list)


def bucket_of(urls: Sequence[str], num_buckets: int) -> np.ndarray:
    """Stable bucket of each url (crc32 of its UTF-8 bytes): the same in every process."""
    return np.fromiter((zlib.crc32(u.encode()) % num_buckets for u in urls), np.int64,
                       count=len(urls))


class _BucketWriter:
    """Buffers rows and appends them, grouped by bucket, to one parquet file per bucket."""

    def __init__(self, directory: str, num_buckets: int, schema, flush_rows: int):
        import pyarrow.parquet as pq

        os.makedirs(directory, exist_ok=True)
        self._paths = [os.path.join(directory, f"bucket-{b:05d}.parquet")
                       for b in range(num_buckets)]
        self._writers = [pq.ParquetWriter(p, schema) for p in self._paths]
        self._buffer: list = []
        self._buffered = 0
        self._flush_rows = flush_rows

    def add(self, table, buckets: np.ndarray) -> None:
        import pyarrow as pa

        self._buffer.append(table.append_column("_bucket", pa.array(buckets, pa.int64())))
        self._buffered += table.num_rows
        if self._buffered >= self._flush_rows:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc

        if not self._buffer:
            return
        table = pa.concat_tables(self._buffer)
        self._buffer, self._buffered = [], 0
        order = pc.sort_indices(table, sort_keys=[("_bucket", "ascending")])
        table = table.take(order)
        buckets = table.column("_bucket").to_numpy()
        bounds = np.flatnonzero(np.diff(buckets)) + 1
        for start, stop in zip(np.r_[0, bounds], np.r_[bounds, len(buckets)]):
            self._writers[buckets[start]].write_table(
                table.slice(start, stop - start).drop_columns(["_bucket"]))

    def close(self) -> list[str]:
        self.flush()
        for writer in self._writers:
            writer.close()
        return self._paths


def _metadata_tables(files: Sequence[str]) -> Iterator:
    import pyarrow as pa

    schema = pa.schema([("url", pa.string()), ("labels", pa.list_(pa.int64())),
                        ("label_probs", pa.list_(pa.float32()))])
    for batch in sources.parquet_column_batches(files, schema.names, _READ_ROWS):
        yield pa.Table.from_batches([batch]).cast(schema)


def shard_keys(path: str, use_parquet: bool) -> Iterator[tuple[str, str]]:
    """(key, url) of each record of a shard: from its img2dataset parquet (success rows) when
    `use_parquet` and it exists, else from the records themselves."""
    parquet_path = _sibling(path, ".parquet")
    if use_parquet and parquet_path and tf.io.gfile.exists(parquet_path):
        table = sources.open_parquet(parquet_path).read(columns=["key", "url", "status"])
        for key, url, status in zip(*(table.column(c).to_pylist() for c in ("key", "url",
                                                                             "status"))):
            if status == "success" and key is not None and url is not None:
                yield key, url
        return
    for _, record, problem in validate_shards.iter_records(path):
        if problem is None:
            feature = _features(record)
            if feature is not None:
                yield _text(feature, "key"), _text(feature, "url")


def _partition_shards(files: Sequence[str], directory: str, num_buckets: int, flush_rows: int,
                      use_parquet: bool) -> list[str]:
    import pyarrow as pa

    schema = pa.schema([("url", pa.string()), ("shard", pa.int64()), ("key", pa.string())])
    writer = _BucketWriter(directory, num_buckets, schema, flush_rows)
    for shard, path in enumerate(files):
        pairs = list(shard_keys(path, use_parquet))
        urls = [u for _, u in pairs]
        table = pa.table({"url": urls, "shard": np.full(len(pairs), shard, np.int64),
                          "key": [k for k, _ in pairs]}, schema=schema)
        writer.add(table, bucket_of(urls, num_buckets))
    return writer.close()


def _join_bucket(metadata_path: str, shard_path: str, output_path: str, row_group: int,
                 report: JoinReport) -> None:
    """Labels of each record of one bucket, sorted by (shard, key), into output_path."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    meta = pq.read_table(metadata_path)
    first_row: dict[str, int] = {}
    for row, url in enumerate(meta.column("url").to_pylist()):
        if url in first_row:
            report.duplicate_metadata_urls += 1
        else:
            first_row[url] = row
    wanted = pq.read_table(shard_path)
    urls = wanted.column("url").to_pylist()
    rows = np.array([first_row.get(u, -1) for u in urls], np.int64)
    found = rows >= 0
    report.labelled += int(found.sum())
    report.unmatched += int((~found).sum())
    keys = wanted.column("key").to_pylist()
    for i in np.flatnonzero(~found)[:10 - len(report.unmatched_examples)]:
        report.unmatched_examples.append(f"{keys[i]} {urls[i]}")
    mask = pa.array(found)
    result = pa.table({"shard": wanted.column("shard").filter(mask),
                       "key": wanted.column("key").filter(mask),
                       "labels": meta.column("labels").take(pa.array(rows[found])),
                       "label_probs": meta.column("label_probs").take(pa.array(rows[found]))})
    result = result.take(pc.sort_indices(result, sort_keys=[("shard", "ascending"),
                                                            ("key", "ascending")]))
    pq.write_table(result, output_path, row_group_size=row_group)


class _SortedCursor:
    """Reads a bucket output (sorted by shard) forward, one row group at a time."""

    def __init__(self, path: str):
        import pyarrow.parquet as pq

        self._file = pq.ParquetFile(path)
        self._group = 0
        self._table = None
        self._shards = np.zeros(0, np.int64)
        self._position = 0

    def take(self, shard: int) -> Iterator[tuple[str, list[int], list[float]]]:
        """(key, labels, probs) of `shard`; shards must be asked for in increasing order."""
        while True:
            if self._position == len(self._shards):
                if self._group == self._file.num_row_groups:
                    return
                self._table = self._file.read_row_group(self._group)
                self._group += 1
                self._shards = self._table.column("shard").to_numpy()
                self._position = 0
                continue
            rest = self._shards[self._position:]
            start = self._position + int(np.searchsorted(rest, shard, side="left"))
            stop = self._position + int(np.searchsorted(rest, shard, side="right"))
            part = self._table.slice(start, stop - start)  # rows before `start`: skipped shards
            yield from zip(part.column("key").to_pylist(), part.column("labels").to_pylist(),
                           part.column("label_probs").to_pylist())
            self._position = stop
            if stop < len(self._shards):
                return  # the next row belongs to a later shard
            # else this row group ended: the next one may hold more rows of `shard`


def _write_shard(path: str, output_dir: str, labels: dict[str, tuple[list[int], list[float]]],
                 report: JoinReport) -> None:
    """Rewrites one shard (records, parquet, stats json) with labels; unmatched records left out."""
    name = os.path.basename(path)
    target = os.path.join(output_dir, name)
    tmp = target + ".tmp"
    with tf.io.TFRecordWriter(tmp) as writer:
        for _, record, problem in validate_shards.iter_records(path):
            if problem is not None:
                report.unreadable += 1
                continue
            report.shard_records += 1
            example = _example(record)
            if example is None:
                report.unreadable += 1
                continue
            key = _text(example.features.feature, "key")
            if key not in labels:
                continue  # counted as unmatched by the join
            label_list, prob_list = labels[key]
            feature = example.features.feature
            feature["labels"].Clear()
            feature["labels"].int64_list.value.extend(label_list)
            feature["label_probs"].Clear()
            feature["label_probs"].float_list.value.extend(prob_list)
            writer.write(example.SerializeToString())
    tf.io.gfile.rename(tmp, target, overwrite=True)
    _copy_sidecars(path, output_dir, labels)


def _copy_sidecars(path: str, output_dir: str,
                   labels: dict[str, tuple[list[int], list[float]]]) -> None:
    """img2dataset's NNNNN_stats.json as is, and NNNNN.parquet with the label columns added."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    stats_path = _sibling(path, "_stats.json")
    if stats_path and tf.io.gfile.exists(stats_path):
        tf.io.gfile.copy(stats_path, os.path.join(output_dir, os.path.basename(stats_path)),
                         overwrite=True)
    parquet_path = _sibling(path, ".parquet")
    if parquet_path and tf.io.gfile.exists(parquet_path):
        table = sources.open_parquet(parquet_path).read()
        keys = table.column("key").to_pylist()
        joined = [labels.get(k) for k in keys]
        table = table.drop_columns([c for c in ("labels", "label_probs")
                                    if c in table.column_names])
        table = table.append_column("labels", pa.array(
            [j[0] if j else None for j in joined], pa.list_(pa.int64())))
        table = table.append_column("label_probs", pa.array(
            [j[1] if j else None for j in joined], pa.list_(pa.float32())))
        pq.write_table(table, os.path.join(output_dir, os.path.basename(parquet_path)))


def join(shard_files: Sequence[str], metadata_files: Sequence[str], output_dir: str, *,
         work_dir: str | None = None, bucket_rows: int = DEFAULT_BUCKET_ROWS,
         flush_rows: int = DEFAULT_FLUSH_ROWS, use_shard_parquet: bool = True,
         result_row_group: int = 8192, progress: bool = False) -> JoinReport:
    """Writes labelled copies of `shard_files` into `output_dir`; see the module docstring."""
    import pyarrow as pa

    for name, value in (("bucket_rows", bucket_rows), ("flush_rows", flush_rows),
                        ("result_row_group", result_row_group)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not shard_files:
        raise ValueError("no shard files to label")
    shard_dirs = {os.path.abspath(os.path.dirname(f)) for f in shard_files}
    if os.path.abspath(output_dir) in shard_dirs:
        raise ValueError(f"--output_dir {output_dir} holds the input shards; write elsewhere")
    started = time.monotonic()
    report = JoinReport()
    report.metadata_rows = sum(sources.open_parquet(p).metadata.num_rows for p in metadata_files)
    num_buckets = max(1, math.ceil(report.metadata_rows / bucket_rows))
    report.buckets = num_buckets
    _allow_open_files(2 * num_buckets + 64)
    tf.io.gfile.makedirs(output_dir)
    own_work_dir = work_dir is None
    work = tempfile.mkdtemp(prefix="join_labels_") if own_work_dir else work_dir
    say = _reporter(progress, started)
    try:
        meta_schema = pa.schema([("url", pa.string()), ("labels", pa.list_(pa.int64())),
                                 ("label_probs", pa.list_(pa.float32()))])
        writer = _BucketWriter(os.path.join(work, "metadata"), num_buckets, meta_schema,
                               flush_rows)
        done = 0
        for table in _metadata_tables(metadata_files):
            writer.add(table, bucket_of(table.column("url").to_pylist(), num_buckets))
            done += table.num_rows
            say(f"1/4 metadata: {done:,} of {report.metadata_rows:,} rows", done)
        metadata_buckets = writer.close()
        shard_buckets = _partition_shards(shard_files, os.path.join(work, "shards"),
                                          num_buckets, flush_rows, use_shard_parquet)
        say(f"2/4 shards: {len(shard_files)} indexed", None)
        results = []
        os.makedirs(os.path.join(work, "joined"), exist_ok=True)
        for b, (meta_path, shard_path) in enumerate(zip(metadata_buckets, shard_buckets)):
            results.append(os.path.join(work, "joined", f"bucket-{b:05d}.parquet"))
            _join_bucket(meta_path, shard_path, results[-1], result_row_group, report)
            say(f"3/4 join: bucket {b + 1}/{num_buckets}", None)
        cursors = [_SortedCursor(p) for p in results]
        for shard, path in enumerate(shard_files):
            labels = {key: (lab, prob) for cursor in cursors
                      for key, lab, prob in cursor.take(shard)}
            _write_shard(path, output_dir, labels, report)
            say(f"4/4 write: shard {shard + 1}/{len(shard_files)}", None)
    finally:
        if own_work_dir:
            shutil.rmtree(work, ignore_errors=True)
    report.seconds = time.monotonic() - started
    if progress:
        print(file=sys.stderr)
    return report


def _reporter(enabled: bool, started: float):
    def say(message: str, rows: int | None) -> None:
        if enabled:
            elapsed = time.monotonic() - started
            rate = f", {rows / max(elapsed, 1e-9):,.0f} rows/s" if rows else ""
            print(f"\r{message} ({elapsed:.0f}s{rate})", end="", file=sys.stderr, flush=True)
    return say


def _allow_open_files(needed: int) -> None:
    """Raises the soft open-file limit toward the hard one: one writer is open per bucket."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < needed:
            raise ValueError(f"{needed} open files needed, the limit is {hard}: raise "
                             f"--bucket_rows to use fewer buckets")


def _sibling(path: str, suffix: str) -> str | None:
    """img2dataset's NNNNN.parquet / NNNNN_stats.json next to NNNNN.tfrecord."""
    return path[: -len(".tfrecord")] + suffix if path.endswith(".tfrecord") else None


def _example(record: bytes) -> tf.train.Example | None:
    try:
        return tf.train.Example.FromString(record)
    except DecodeError:
        return None


def _features(record: bytes):
    example = _example(record)
    return None if example is None else example.features.feature


def _text(feature, name: str) -> str:
    if name in feature and feature[name].bytes_list.value:
        return feature[name].bytes_list.value[0].decode("utf-8", "replace")
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m input_pipeline.tools.join_labels",
        description="Add labels and label_probs from COYO's metadata to shards, by url.")
    parser.add_argument("--shards", nargs="+", required=True,
                        help="TFRecord shards: files, globs or directories")
    parser.add_argument("--metadata", nargs="+", required=True,
                        help="metadata parquet files, globs or directories")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--work_dir", help="for the temporary buckets (default: a temp dir)")
    parser.add_argument("--bucket_rows", type=int, default=DEFAULT_BUCKET_ROWS,
                        help="metadata rows per bucket (held in memory while joining it)")
    parser.add_argument("--flush_rows", type=int, default=DEFAULT_FLUSH_ROWS)
    parser.add_argument("--urls_from_records", action="store_true",
                        help="read urls from the records even where a shard parquet exists")
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)
    report = join(sources.list_files(args.shards), sources.list_parquet_files(args.metadata),
                  args.output_dir, work_dir=args.work_dir, bucket_rows=args.bucket_rows,
                  flush_rows=args.flush_rows, use_shard_parquet=not args.urls_from_records,
                  progress=not args.no_progress)
    print(json.dumps(dataclasses.asdict(report), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
