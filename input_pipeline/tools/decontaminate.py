r"""Finds training images that are near-duplicates of evaluation images, by pHash.

    python -m input_pipeline.tools.decontaminate --eval_dir /data/imagenet/val \
        --train_metadata '/data/coyo/metadata/*.parquet' --max_distance 4 --output_dir decon/
    python -m input_pipeline.tools.decontaminate --eval_tfds imagenet2012:validation \
        --train_shards /data/coyo/shards --output_dir decon/

Evaluation images (an image folder, or a TFDS split read without decoding) are hashed with
phash.phash, the definition of the metadata's `imagehash`. Training hashes come from that column
(fast: no image is read) or are computed from the shards' images. Every training image within
`max_distance` bits of an evaluation image is written to OUTPUT_DIR:
  exclude_keys.txt   the input pipeline's exclusion list (`config.input.exclude_keys_file`):
                     first line the field, `url` (metadata) or `key` (shards), then the values
  matches.tsv        eval_id, train_id (metadata id or shard key), url, distance, one per pair
  summary.json       counts, the distance histogram of the matches, settings

The search never compares all pairs: the evaluation hashes (the small side) are indexed by their
four 16-bit quarters. Two hashes within d bits agree within d // 4 bits on at least one quarter
(pigeonhole), so each training hash is compared only with evaluation hashes that share a quarter
up to d // 4 flipped bits. Training rows are streamed in batches, so 300M rows need no more
memory than one batch and the index.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import itertools
import json
import multiprocessing
import os
import sys
import time
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import tensorflow as tf

from input_pipeline import sources
from input_pipeline.tools import phash

MAX_SUPPORTED_DISTANCE = 15
DEFAULT_MAX_DISTANCE = 4
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
_CHUNKS = 4
_CHUNK_BITS = 16
_BATCH_ROWS = 65_536


class Matches(NamedTuple):
    """Pairs (query row, indexed row) within the distance, and their distances."""
    query: np.ndarray     # int64 [m], positions in the queried batch
    indexed: np.ndarray   # int64 [m], positions in the index's hashes
    distance: np.ndarray  # int64 [m]


class NearDuplicateIndex:
    """Finds, for batches of query hashes, every indexed hash within `max_distance` bits."""

    def __init__(self, hashes: np.ndarray, max_distance: int = DEFAULT_MAX_DISTANCE):
        if not (isinstance(max_distance, int) and 0 <= max_distance <= MAX_SUPPORTED_DISTANCE):
            raise ValueError(f"max_distance must be an int in [0, {MAX_SUPPORTED_DISTANCE}], got "
                             f"{max_distance!r}")
        self.hashes = np.asarray(hashes, dtype=np.uint64).reshape(-1)
        self.max_distance = max_distance
        flips = max_distance // _CHUNKS
        self._masks = np.array([sum(1 << b for b in bits) for n in range(flips + 1)
                                for bits in itertools.combinations(range(_CHUNK_BITS), n)],
                               dtype=np.int64)
        self._order, self._starts, self._counts = [], [], []
        for chunk in range(_CHUNKS):
            values = self._chunk(self.hashes, chunk)
            counts = np.bincount(values, minlength=1 << _CHUNK_BITS)
            self._order.append(np.argsort(values, kind="stable"))
            self._counts.append(counts)
            self._starts.append(np.cumsum(counts) - counts)

    @staticmethod
    def _chunk(hashes: np.ndarray, chunk: int) -> np.ndarray:
        shift = np.uint64(chunk * _CHUNK_BITS)
        return ((hashes >> shift) & np.uint64((1 << _CHUNK_BITS) - 1)).astype(np.int64)

    def query(self, hashes: np.ndarray) -> Matches:
        """All (query, indexed) pairs within max_distance, each pair once, sorted by query."""
        hashes = np.asarray(hashes, dtype=np.uint64).reshape(-1)
        found_q, found_i, found_d = [], [], []
        for chunk in range(_CHUNKS):
            values = self._chunk(hashes, chunk)
            for mask in self._masks:
                probe = values ^ mask
                counts = self._counts[chunk][probe]
                rows = np.flatnonzero(counts)
                if not len(rows):
                    continue
                per_row = counts[rows]
                query = np.repeat(rows, per_row)
                first = np.repeat(self._starts[chunk][probe[rows]], per_row)
                within = np.arange(len(query)) - np.repeat(np.cumsum(per_row) - per_row, per_row)
                indexed = self._order[chunk][first + within]
                distance = phash.hamming(hashes[query], self.hashes[indexed])
                keep = distance <= self.max_distance
                found_q.append(query[keep])
                found_i.append(indexed[keep])
                found_d.append(distance[keep])
        if not found_q:
            empty = np.zeros(0, np.int64)
            return Matches(empty, empty, empty)
        query, indexed, distance = (np.concatenate(x) for x in (found_q, found_i, found_d))
        pair = query * max(len(self.hashes), 1) + indexed
        # A pair can be found through several quarters: keep it once.
        _, first = np.unique(pair, return_index=True)
        return Matches(query[first], indexed[first], distance[first])


# ------------------------------------------------------------------ hashing many images


def _hash_or_none(data: bytes) -> int | None:
    try:
        return phash.phash(data)
    except ValueError:
        return None


def hash_images(images: Iterable[bytes], workers: int = 1, chunk: int = 2048
                ) -> Iterator[int | None]:
    """pHash of each encoded image, in order (None where it does not decode).

    With workers > 1, images are sent to the processes `chunk` at a time, so memory holds one
    chunk of encoded images, not the whole set.
    """
    if workers <= 1:
        yield from map(_hash_or_none, images)
        return
    # spawn, not fork: this process runs TensorFlow threads, which do not survive a fork.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        stream = iter(images)
        while batch := list(itertools.islice(stream, chunk)):
            yield from pool.map(_hash_or_none, batch, chunksize=max(1, chunk // (4 * workers)))


# ------------------------------------------------------------------ evaluation images


def folder_images(root: str) -> Iterator[tuple[str, bytes]]:
    """(path relative to root, bytes) of the image files under root, in sorted order."""
    if not tf.io.gfile.isdir(root):
        raise FileNotFoundError(f"--eval_dir {root!r} is not a directory")
    for directory, _, names in sorted(tf.io.gfile.walk(root)):
        for name in sorted(names):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                path = os.path.join(directory, name)
                with tf.io.gfile.GFile(path, "rb") as f:
                    yield os.path.relpath(path, root), f.read()


def tfds_images(spec: str, data_dir: str | None = None, image_key: str = "image",
                id_key: str | None = None) -> Iterator[tuple[str, bytes]]:
    """(id, encoded bytes) of a TFDS split `NAME:SPLIT`, read without decoding the images.

    The id is `id_key`'s value if given (e.g. imagenet2012's `file_name`), else TFDS's own
    record id (`tfds_id`). COYO's builder (input_pipeline.tools.tfds_coyo) is registered on import.
    """
    import tensorflow_datasets as tfds

    import input_pipeline.tools.tfds_coyo  # noqa: F401  (registers coyo_labeled_300m)

    name, sep, split = spec.partition(":")
    if not sep or not name or not split:
        raise ValueError(f"--eval_tfds must be NAME:SPLIT (e.g. imagenet2012:validation), got "
                         f"{spec!r}")
    ds = tfds.load(name, split=split, data_dir=data_dir, download=False,
                   decoders={image_key: tfds.decode.SkipDecoding()},
                   read_config=tfds.ReadConfig(add_tfds_id=True))
    if image_key not in ds.element_spec:
        raise ValueError(f"{name} has no feature {image_key!r}; features: "
                         f"{sorted(ds.element_spec)}")
    for example in ds.as_numpy_iterator():
        ident = example[id_key] if id_key else example["tfds_id"]
        yield (ident.decode() if isinstance(ident, bytes) else str(ident)), example[image_key]


def hash_eval_set(images: Iterable[tuple[str, bytes]], workers: int = 1
                  ) -> tuple[list[str], np.ndarray, list[str]]:
    """(ids, hashes uint64, ids that did not decode) of the evaluation images."""
    pairs = iter(images)
    ids: list[str] = []

    def data() -> Iterator[bytes]:
        for ident, encoded in pairs:
            ids.append(ident)
            yield encoded

    values = list(hash_images(data(), workers))
    kept = [i for i, v in enumerate(values) if v is not None]
    hashes = np.array([values[i] for i in kept], dtype=np.uint64)
    return [ids[i] for i in kept], hashes, [ids[i] for i, v in enumerate(values) if v is None]


# ------------------------------------------------------------------ training rows


class TrainBatch(NamedTuple):
    """A batch of training rows: identifiers and hashes (rows without a hash already removed).

    `ids` and `urls` are lists or pyarrow arrays: from 300M metadata rows only the few that match
    are ever turned into Python strings (see `take`).
    """
    ids: Sequence
    urls: Sequence
    hashes: np.ndarray

    def take(self, rows: np.ndarray) -> tuple[list[str], list[str]]:
        """(ids, urls) of the given rows, as strings."""
        return _take(self.ids, rows), _take(self.urls, rows)


def _take(values: Sequence, rows: np.ndarray) -> list[str]:
    if hasattr(values, "take") and not isinstance(values, (list, tuple)):  # a pyarrow array
        return [str(v) for v in values.take(rows).to_pylist()]
    return [str(values[i]) for i in rows.tolist()]


def metadata_batches(files: Sequence[str], batch_rows: int = _BATCH_ROWS
                     ) -> Iterator[tuple[TrainBatch, int]]:
    """(batch, rows without a valid imagehash) from metadata parquet files, streamed."""
    import pyarrow as pa

    for batch in sources.parquet_column_batches(files, ("id", "url", "imagehash"), batch_rows):
        hashes, valid = phash.hex_array(batch.column("imagehash").to_pylist())
        keep = pa.array(valid)
        yield (TrainBatch(batch.column("id").filter(keep), batch.column("url").filter(keep),
                          hashes[valid]), int((~valid).sum()))


def shard_batches(files: Sequence[str], workers: int = 1, batch_rows: int = 4096
                  ) -> Iterator[tuple[TrainBatch, int]]:
    """(batch, records whose image did not decode) from TFRecord shards, hashing every image."""
    def records() -> Iterator[tuple[str, str, bytes]]:
        for path in files:
            for record in tf.data.TFRecordDataset(path).ignore_errors():
                feature = tf.train.Example.FromString(record.numpy()).features.feature
                data = next((feature[k].bytes_list.value[0] for k in ("jpg", "image")
                             if k in feature and feature[k].bytes_list.value), b"")
                yield (_first_bytes(feature, "key"), _first_bytes(feature, "url"), data)

    stream = records()
    while True:
        chunk = list(itertools.islice(stream, batch_rows))
        if not chunk:
            return
        values = list(hash_images((data for _, _, data in chunk), workers))
        keep = [i for i, v in enumerate(values) if v is not None]
        yield (TrainBatch([chunk[i][0] for i in keep], [chunk[i][1] for i in keep],
                          np.array([values[i] for i in keep], dtype=np.uint64)),
               len(chunk) - len(keep))


def _first_bytes(feature, name: str) -> str:
    if name in feature and feature[name].bytes_list.value:
        return feature[name].bytes_list.value[0].decode("utf-8", "replace")
    return ""


# ------------------------------------------------------------------ the whole run


def find_matches(eval_ids: list[str], eval_hashes: np.ndarray,
                 train: Iterable[tuple[TrainBatch, int]], max_distance: int,
                 progress: bool = False) -> tuple[list[tuple[str, str, str, int]], dict]:
    """Matches (eval_id, train_id, url, distance) sorted by train row order, and counts."""
    index = NearDuplicateIndex(eval_hashes, max_distance)
    matches: list[tuple[str, str, str, int]] = []
    rows = unusable = 0
    started = time.monotonic()
    for batch, skipped in train:
        rows += len(batch.ids)
        unusable += skipped
        found = index.query(batch.hashes)
        ids, urls = batch.take(found.query)
        for train_id, url, i, d in zip(ids, urls, found.indexed.tolist(), found.distance.tolist()):
            matches.append((eval_ids[i], train_id, url, d))
        if progress:
            rate = rows / max(time.monotonic() - started, 1e-9)
            print(f"\r{rows:,} training rows, {len(matches):,} matches, {rate:,.0f} rows/s",
                  end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return matches, {"train_rows": rows, "train_rows_without_hash": unusable}


def write_outputs(output_dir: str, field: str, matches: list[tuple[str, str, str, int]],
                  summary: dict) -> None:
    """exclude_keys.txt, matches.tsv and summary.json (see the module docstring)."""
    tf.io.gfile.makedirs(output_dir)
    column = 1 if field == "key" else 2
    excluded = list(dict.fromkeys(m[column] for m in matches))  # unique, in first-seen order
    with tf.io.gfile.GFile(os.path.join(output_dir, "exclude_keys.txt"), "w") as f:
        f.write("\n".join([field] + excluded) + "\n")
    with tf.io.gfile.GFile(os.path.join(output_dir, "matches.tsv"), "w") as f:
        f.write("eval_id\ttrain_id\turl\tdistance\n")
        for eval_id, train_id, url, distance in matches:
            f.write(f"{eval_id}\t{train_id}\t{url}\t{distance}\n")
    histogram = collections.Counter(m[3] for m in matches)
    summary = {**summary, "matches": len(matches), "excluded": len(excluded),
               "eval_images_matched": len({m[0] for m in matches}),
               "distance_histogram": {str(k): histogram[k] for k in sorted(histogram)}}
    with tf.io.gfile.GFile(os.path.join(output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m input_pipeline.tools.decontaminate",
        description="List training images within a pHash Hamming distance of evaluation images.")
    evals = parser.add_mutually_exclusive_group(required=True)
    evals.add_argument("--eval_dir", help="folder of evaluation images (searched recursively)")
    evals.add_argument("--eval_tfds", help="TFDS split NAME:SPLIT, e.g. imagenet2012:validation")
    parser.add_argument("--tfds_data_dir", help="TFDS data_dir of --eval_tfds")
    parser.add_argument("--tfds_image_key", default="image")
    parser.add_argument("--tfds_id_key", help="feature naming each eval image (default tfds_id)")
    trains = parser.add_mutually_exclusive_group(required=True)
    trains.add_argument("--train_metadata", nargs="+",
                        help="metadata parquet files/globs (uses their imagehash column)")
    trains.add_argument("--train_shards", nargs="+",
                        help="TFRecord shards/globs/directories (hashes every image: slow)")
    parser.add_argument("--max_distance", type=int, default=DEFAULT_MAX_DISTANCE,
                        help=f"largest Hamming distance that counts as a duplicate "
                             f"(0..{MAX_SUPPORTED_DISTANCE}, default {DEFAULT_MAX_DISTANCE})")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--workers", type=int, default=1, help="processes hashing images")
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)
    if not 0 <= args.max_distance <= MAX_SUPPORTED_DISTANCE:
        parser.error(f"--max_distance must be in [0, {MAX_SUPPORTED_DISTANCE}], got "
                     f"{args.max_distance}")

    if args.eval_dir:
        images = folder_images(args.eval_dir)
    else:
        images = tfds_images(args.eval_tfds, args.tfds_data_dir, args.tfds_image_key,
                             args.tfds_id_key)
    eval_ids, eval_hashes, undecodable = hash_eval_set(images, args.workers)
    if not eval_ids:
        raise SystemExit("no evaluation image could be hashed")
    if args.train_metadata:
        files = sources.list_parquet_files(args.train_metadata)
        field, train = "url", metadata_batches(files)
    else:
        files = sources.list_files(args.train_shards)
        field, train = "key", shard_batches(files, args.workers)
    matches, counts = find_matches(eval_ids, eval_hashes, train, args.max_distance,
                                   progress=not args.no_progress)
    summary = {"eval_images": len(eval_ids), "eval_images_undecodable": undecodable,
               "train_files": len(files), **counts, "max_distance": args.max_distance,
               "exclude_field": field}
    write_outputs(args.output_dir, field, matches, summary)
    print(f"{len(matches)} matches within {args.max_distance} bits: "
          f"{len({m[0] for m in matches})} of {len(eval_ids)} evaluation images, "
          f"{counts['train_rows']:,} training rows; wrote {args.output_dir}/exclude_keys.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
