"""Scans TFRecord shards and counts damaged records by reason, before a run rather than during it.

    python -m input_pipeline.tools.validate_shards /data/coyo/shards [--json report.json] [--strict]

Training skips damaged records cheaply and counts them coarsely (skip_accounting.SkipCounter); this tool
names every problem precisely (truncated file vs bad checksum, missing vs empty label list, JPEG
that does not decode vs bytes that are no image), with the file and record of each. It decodes
every image with the decoder training uses, so it is as slow as a pass of training input; use
--workers to scan files in parallel and --no_decode for a quick structural pass. In --strict
mode it stops at the first damaged record, prints its file, record index and reason, and exits 1.
Reasons are listed in damage.py.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import json
import math
import multiprocessing
import sys
import time
from typing import Iterator, Sequence

import tensorflow as tf
from google.protobuf.message import DecodeError

from input_pipeline import damage, ops_image, sources

_EXAMPLES_PER_REASON = 5
PIPE_PROGRESS_SECONDS = 10.0  # progress line interval when stderr is not a terminal


class DamagedRecord(Exception):
    """Raised in strict mode: names the file, the record index and the reason."""

    def __init__(self, path: str, index: int, reason: str):
        super().__init__(f"{path} record {index}: {reason}")
        self.path, self.index, self.reason = path, index, reason

    def __reduce__(self):  # crosses process boundaries with --workers
        return DamagedRecord, (self.path, self.index, self.reason)


@dataclasses.dataclass
class Report:
    """Counts of one or many files. `examples` keeps the first few (path, record) per reason."""
    files: int = 0
    records: int = 0
    usable: int = 0
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: dict[str, list[tuple[str, int]]] = dataclasses.field(default_factory=dict)

    def add(self, other: "Report") -> None:
        self.files += other.files
        self.records += other.records
        self.usable += other.usable
        self.counts.update(other.counts)
        for reason, found in other.examples.items():
            kept = self.examples.setdefault(reason, [])
            kept.extend(found[:_EXAMPLES_PER_REASON - len(kept)])

    def note(self, path: str, index: int, reason: str) -> None:
        self.counts[reason] += 1
        found = self.examples.setdefault(reason, [])
        if len(found) < _EXAMPLES_PER_REASON:
            found.append((path, index))

    def coarse_counts(self) -> dict[str, int]:
        """Counts under the training pipeline's reasons (damage.SKIP_REASONS)."""
        coarse: collections.Counter = collections.Counter()
        for reason, n in self.counts.items():
            coarse[damage.coarse_reason(reason)] += n
        return dict(coarse)

    def to_json(self) -> dict:
        return {"files": self.files, "records": self.records, "usable": self.usable,
                "damaged": sum(self.counts.values()), "counts": dict(self.counts),
                "examples": {r: [list(e) for e in v] for r, v in self.examples.items()}}

    def markdown(self) -> str:
        damaged = sum(self.counts.values())
        lines = [f"{self.files} files, {self.records:,} records read, {self.usable:,} usable, "
                 f"{damaged:,} damaged", "",
                 "| reason | records | first seen at |", "|---|---|---|"]
        for reason in damage.VALIDATOR_REASONS:
            if self.counts.get(reason):
                where = ", ".join(f"{p} #{i}" for p, i in self.examples.get(reason, [])[:2])
                lines.append(f"| {reason} | {self.counts[reason]:,} | {where} |")
        if not damaged:
            lines.append("| (none) | 0 | |")
        return "\n".join(lines)


def check_record(serialized: bytes, num_classes: int = damage.NUM_CLASSES,
                 decode: bool = True) -> str | None:
    """The first problem of one serialized record (a validator reason), or None if usable.

    Checks in the order the training pipeline does, so a record counts under the same reason.
    """
    try:
        example = tf.train.Example.FromString(serialized)
    except DecodeError:
        return "not_an_example"
    feature = example.features.feature
    data = b""
    for name in ("jpg", "image"):
        if name in feature and feature[name].bytes_list.value:
            data = feature[name].bytes_list.value[0]
            if data:
                break
    if not data:
        return "no_image"
    if damage.image_format(data) is None:
        return "not_an_image"
    if "labels" not in feature:
        return "missing_labels"
    labels = feature["labels"].int64_list.value
    probs = feature["label_probs"].float_list.value if "label_probs" in feature else []
    if not labels:
        return "empty_labels"
    if any(not 0 <= label < num_classes for label in labels):
        return "label_out_of_range"
    if len(labels) != len(probs):
        return "label_length_mismatch"
    if decode:
        try:
            ops_image.decode_image(tf.constant(data))
        except tf.errors.InvalidArgumentError:
            return "undecodable_image"
    return None


def iter_records(path: str) -> Iterator[tuple[int, bytes | None, str | None]]:
    """(index, record, None) for each readable record, then (index, None, reason) if the file is
    truncated or fails a checksum there (tf.data cannot read past that point)."""
    index = 0
    iterator = iter(tf.data.TFRecordDataset(path))
    while True:
        try:
            record = next(iterator)
        except StopIteration:
            return
        except tf.errors.DataLossError as e:
            yield index, None, "truncated_file" if "truncated" in str(e) else "bad_checksum"
            return
        yield index, record.numpy(), None
        index += 1


def scan_file(path: str, num_classes: int = damage.NUM_CLASSES, decode: bool = True,
              strict: bool = False) -> Report:
    """Report of one file; in strict mode raises DamagedRecord at its first problem."""
    report = Report(files=1)
    for index, record, file_problem in iter_records(path):
        reason = file_problem or check_record(record, num_classes, decode)
        if file_problem is None:
            report.records += 1
        if reason is None:
            report.usable += 1
            continue
        if strict:
            raise DamagedRecord(path, index, reason)
        report.note(path, index, reason)
    return report


def scan(files: Sequence[str], num_classes: int = damage.NUM_CLASSES, decode: bool = True,
         strict: bool = False, workers: int = 1, progress: bool = False) -> Report:
    """Report over `files`, scanned by `workers` processes (1 = in this process)."""
    total = Report()
    started = time.monotonic()
    # A terminal gets one line rewritten in place; a log file or pipe whole lines, at most one
    # per PIPE_PROGRESS_SECONDS (and the last), since `\r` there piles up into one long line.
    terminal = sys.stderr.isatty()
    last_line = -math.inf

    def tick(done: int) -> None:
        nonlocal last_line
        if not progress:
            return
        now = time.monotonic()
        if not terminal and now - last_line < PIPE_PROGRESS_SECONDS and done < len(files):
            return
        last_line = now
        rate = total.records / max(now - started, 1e-9)
        line = f"{done}/{len(files)} files, {total.records:,} records, {rate:,.0f} records/s"
        if terminal:
            print(f"\r{line}", end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    if workers <= 1:
        for done, path in enumerate(files, 1):
            total.add(scan_file(path, num_classes, decode, strict))
            tick(done)
    else:
        # spawn, not fork: TensorFlow's threads do not survive a fork.
        context = multiprocessing.get_context("spawn")
        pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=context)
        try:
            futures = [pool.submit(scan_file, p, num_classes, decode, strict) for p in files]
            for done, future in enumerate(futures, 1):
                total.add(future.result())  # strict: re-raises the first file's DamagedRecord
                tick(done)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    if progress and terminal:
        print(file=sys.stderr)  # ends the line rewritten in place
    return total


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m input_pipeline.tools.validate_shards",
        description="Count damaged records of TFRecord shards by reason.")
    parser.add_argument("files", nargs="+",
                        help="shard files, globs or directories (as input.data.files)")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first damaged record and exit 1")
    parser.add_argument("--no_decode", action="store_true",
                        help="skip decoding images (fast structural check)")
    parser.add_argument("--num_classes", type=int, default=damage.NUM_CLASSES)
    parser.add_argument("--workers", type=int, default=1, help="processes scanning files")
    parser.add_argument("--json", help="write the full report (counts, examples) here")
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    files = sources.list_files(args.files)
    try:
        report = scan(files, args.num_classes, not args.no_decode, args.strict, args.workers,
                      progress=not args.no_progress)
    except DamagedRecord as e:
        print(f"damaged record: {e}", file=sys.stderr)
        return 1
    print(report.markdown())
    if args.json:
        with tf.io.gfile.GFile(args.json, "w") as f:
            json.dump(report.to_json(), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
