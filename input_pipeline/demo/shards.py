"""Writes the small, learnable demo dataset that the CPU demo trains on.

The demo must show in minutes on a laptop that the whole stack (shards -> pipeline -> ViT ->
multi-label loss) learns, without downloading anything. So this module draws images in numpy and
writes them in exactly the on-disk layout that img2dataset produces for COYO-Labeled-300M
(`NNNNN.tfrecord` + `NNNNN_stats.json`; the per-shard `.parquet` is skipped so that running the
demo needs no pyarrow). The pipeline therefore reads demo shards through the same code path as
real ones.

Content. Every image is a mildly noisy background with one (70%) or two of the `DEMO_CONCEPTS`
drawn on it (a line, an arc, an S-shape, a hook, a ring, ...) in a random light colour on a
dark background, coarsened to 8x8 (one) or 16x16 (two) cells; only the form tells a concept.
Each is a real ImageNet-21k class, so the labels live in the COYO label space. A record's 50 labels are
its concepts first (probabilities 0.3-0.9) and then random other classes ("filler") with
probabilities below 0.05, descending overall like real COYO rows: a threshold of 0.1 keeps
exactly the concepts that are drawn.

Damaged records. About one record in 500 (`round(num_images / 500)` of them, at seeded random
positions) carries broken image bytes: alternately a truncated JPEG and random bytes. Their
`status` stays "success" and their `sha256` is that of the intact JPEG, as if the file was
damaged on disk after img2dataset wrote it; this exercises the pipeline's skip-and-count path.
The manifest lists their keys.

Completeness. Shards are written under temporary names and renamed into place, and
`demo_manifest.json` (parameters, generator version, each shard's size and sha256, damaged
keys) is written last. A directory is reused only if its manifest matches the requested
parameters and every shard matches its recorded size and hash; otherwise (a killed run, a
truncated file, other parameters) the demo files are deleted and written again. An owner mark
written before the first shard keeps this from ever deleting shards it did not write. The
tfrecords and the manifest are byte-identical for the same parameters; `_stats.json` files hold
wall-clock times, as img2dataset's do.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf

from input_pipeline.demo import generated_files
from input_pipeline.demo.drawing import DEMO_CONCEPTS, draw_images, draw_labels

MANIFEST_NAME = "demo_manifest.json"
# Bump whenever the drawn content or the record layout changes, so old directories regenerate.
GENERATOR_VERSION = 2
DAMAGE_EVERY = 500
JPEG_QUALITY = 90

_LOCK_NAME = ".demo_data.lock"
# Written before the first shard: shard files in a directory without it are someone else's data.
_OWNER_MARK = ".coyo_vit_demo_data"
_SHARD_DIGITS = 5  # img2dataset's shard names: 00000.tfrecord, 00001.tfrecord, ...
_DEMO_FILE_RE = re.compile(r"^\d{5,}(\.tfrecord|_stats\.json)$")
_TMP_SUFFIX = ".demo_tmp"
_MIN_IMAGE_SIZE = 16


@dataclasses.dataclass(frozen=True)
class _Params:
    num_images: int
    images_per_shard: int
    image_size: int
    seed: int

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_images / self.images_per_shard)

    def shard_count(self, shard: int) -> int:
        return min(self.images_per_shard, self.num_images - shard * self.images_per_shard)


def _validate(params: _Params) -> None:
    if params.num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {params.num_images}")
    if params.images_per_shard < 1:
        raise ValueError(f"images_per_shard must be >= 1, got {params.images_per_shard}")
    if params.image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {_MIN_IMAGE_SIZE} so the concepts stay visible, "
                         f"got {params.image_size}")
    if params.seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {params.seed}")


def _shard_name(shard: int) -> str:
    return f"{shard:0{_SHARD_DIGITS}d}"


def _sample_key(shard: int, index: int, images_per_shard: int) -> str:
    """img2dataset's key: shard id then the index in the shard, zero-padded to its magnitude."""
    digits = math.ceil(math.log10(images_per_shard)) if images_per_shard > 1 else 0
    return f"{_shard_name(shard)}{index:0{digits}d}"


# --------------------------------------------------------------------------- records


def _damaged_indices(params: _Params) -> np.ndarray:
    count = min(params.num_images, round(params.num_images / DAMAGE_EVERY))
    rng = np.random.default_rng(np.random.SeedSequence(params.seed, spawn_key=(1,)))
    return np.sort(rng.choice(params.num_images, count, replace=False))


def _damage(jpeg: bytes, kind: int, rng: np.random.Generator) -> bytes:
    """Kind 0: JPEG cut at 30-70% of its length. Kind 1: random bytes of the same length."""
    if kind == 0:
        return jpeg[: int(len(jpeg) * rng.uniform(0.3, 0.7))]
    junk = rng.bytes(len(jpeg))
    return b"\x00" + junk[1:] if junk[:2] == b"\xff\xd8" else junk


def _bytes_feature(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int_feature(values: Sequence[int]) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=values))


def _example(*, jpg: bytes, sha256: str, key: str, labels: np.ndarray, probs: np.ndarray,
             size: int) -> bytes:
    """Serialises one record with img2dataset's tfrecord features and types."""
    feature = {
        "jpg": _bytes_feature(jpg),
        "key": _bytes_feature(key.encode()),
        "url": _bytes_feature(f"https://demo.coyo-vit.invalid/{key}.jpg".encode()),
        "labels": _int_feature(labels.tolist()),
        "label_probs": tf.train.Feature(float_list=tf.train.FloatList(value=probs.tolist())),
        "status": _bytes_feature(b"success"),
        "error_message": _bytes_feature(b""),
        "sha256": _bytes_feature(sha256.encode()),
        "exif": _bytes_feature(b"{}"),
        "width": _int_feature([size]),
        "height": _int_feature([size]),
        "original_width": _int_feature([size]),
        "original_height": _int_feature([size]),
    }
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    return example.SerializeToString(deterministic=True)


def _shard_records(params: _Params, shard: int, damaged: dict[int, int]) -> list[bytes]:
    """Draws and serialises one shard; `damaged` maps global image index -> damage kind."""
    count = params.shard_count(shard)
    rng = np.random.default_rng(np.random.SeedSequence(params.seed, spawn_key=(0, shard)))
    num_concepts = np.where(rng.random(count) < 0.7, 1, 2)
    concept_ids = np.argsort(rng.random((count, len(DEMO_CONCEPTS))), axis=1)[:, :2]
    images = draw_images(rng, concept_ids, num_concepts, params.image_size)
    labels, probs = draw_labels(rng, concept_ids, num_concepts)
    records = []
    first = shard * params.images_per_shard
    for i in range(count):
        jpg = tf.io.encode_jpeg(images[i], quality=JPEG_QUALITY).numpy()
        sha256 = hashlib.sha256(jpg).hexdigest()
        if first + i in damaged:
            jpg = _damage(jpg, damaged[first + i], rng)
        records.append(_example(jpg=jpg, sha256=sha256,
                                key=_sample_key(shard, i, params.images_per_shard),
                                labels=labels[i], probs=probs[i], size=params.image_size))
    return records


# --------------------------------------------------------------------------- files


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    generated_files.write_atomic(path, data, _TMP_SUFFIX)


def _write_tfrecord_atomic(path: Path, records: Sequence[bytes]) -> None:
    tmp = path.with_name(path.name + _TMP_SUFFIX)
    with tf.io.TFRecordWriter(str(tmp)) as writer:
        for record in records:
            writer.write(record)
    os.replace(tmp, path)


def _stats_json(count: int, start: float, end: float) -> bytes:
    stats = {
        "count": count,
        "successes": count,
        "failed_to_download": 0,
        "failed_to_resize": 0,
        "duration": end - start,
        "start_time": start,
        "end_time": end,
        "status_dict": {"success": count},
    }
    return json.dumps(stats, indent=4).encode()


def _manifest_params(params: _Params) -> dict[str, int]:
    return {"generator_version": GENERATOR_VERSION, **dataclasses.asdict(params)}


def read_manifest(out_dir: str) -> dict | None:
    """The demo manifest of `out_dir`, or None when it is missing or unreadable."""
    try:
        return json.loads((Path(out_dir) / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None


def _is_complete(out: Path, params: _Params) -> bool:
    try:
        return _matches_manifest(out, params)
    except (KeyError, TypeError, OSError):  # A manifest we did not write, or files gone.
        return False


def _matches_manifest(out: Path, params: _Params) -> bool:
    manifest = read_manifest(str(out))
    if manifest is None or manifest.get("params") != _manifest_params(params):
        return False
    listed = {entry["file"] for entry in manifest["shards"]}
    present = {p.name for p in out.glob("*.tfrecord") if _DEMO_FILE_RE.match(p.name)}
    if present != listed:
        return False
    for entry in manifest["shards"]:
        path = out / entry["file"]
        if path.stat().st_size != entry["bytes"] or _file_sha256(path) != entry["sha256"]:
            return False
        if not (out / entry["stats_file"]).is_file():
            return False
    return True


def _clear_demo_files(out: Path) -> None:
    """Deletes only files this module writes, never anything else a user keeps there."""
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # First: the directory is now "incomplete".
    for path in out.iterdir():
        if _DEMO_FILE_RE.match(path.name) or path.name.endswith(_TMP_SUFFIX):
            path.unlink()


def _claim(out: Path) -> None:
    """Marks `out` as demo-owned, refusing if it already holds shards that are not ours."""
    if (out / _OWNER_MARK).exists():
        return
    foreign = sorted(p.name for p in out.iterdir() if _DEMO_FILE_RE.match(p.name))
    if foreign:
        raise FileExistsError(
            f"{out} holds shard files the demo generator did not write ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); refusing to replace them. Give an empty "
            "directory or one that only holds demo data.")
    _write_atomic(out / _OWNER_MARK, b"Written by input_pipeline/demo/shards.py.\n")


def _generate(out: Path, params: _Params) -> None:
    _claim(out)
    _clear_demo_files(out)
    damaged = {int(i): n % 2 for n, i in enumerate(_damaged_indices(params))}
    shards = []
    progress = _Progress(params.num_images, out)
    for shard in range(params.num_shards):
        start = time.time()
        records = _shard_records(params, shard, damaged)
        name = _shard_name(shard)
        path = out / f"{name}.tfrecord"
        _write_tfrecord_atomic(path, records)
        _write_atomic(out / f"{name}_stats.json", _stats_json(len(records), start, time.time()))
        shards.append({"file": path.name, "stats_file": f"{name}_stats.json",
                       "count": len(records), "bytes": path.stat().st_size,
                       "sha256": _file_sha256(path)})
        progress.done(len(records))
    manifest = {
        "description": "coyo_vit demo shards (img2dataset tfrecord layout), drawn by "
                       "input_pipeline/demo/shards.py",
        "params": _manifest_params(params),
        "concepts": [dataclasses.asdict(c) for c in DEMO_CONCEPTS],
        "damaged_keys": [_sample_key(i // params.images_per_shard,
                                     i % params.images_per_shard, params.images_per_shard)
                         for i in sorted(damaged)],
        "shards": shards,
    }
    _write_atomic(out / MANIFEST_NAME, json.dumps(manifest, indent=2).encode())


class _Progress:
    """One log line per shard written: images so far, rate and time left (a first run waits
    on this for a minute or more before training starts; silence would look like a hang)."""

    def __init__(self, total: int, out: Path):
        self._total, self._written, self._start = total, 0, time.monotonic()
        logging.info("demo data: drawing %d images into %s", total, out)

    def done(self, images: int) -> None:
        self._written += images
        rate = self._written / max(time.monotonic() - self._start, 1e-9)
        left = (self._total - self._written) / rate
        logging.info("demo data: %d/%d images (%.0f%%), %.0f images/s, ETA %.0fs", self._written,
                     self._total, 100 * self._written / self._total, rate, left)


def ensure_demo_shards(out_dir: str, *, num_images: int = 4096, images_per_shard: int = 512,
                       image_size: int = 64, seed: int = 0) -> list[str]:
    """Makes sure `out_dir` holds the demo shards for these parameters; returns their paths.

    Reuses a complete directory as it is, and (re)writes it otherwise (see the module
    docstring). Concurrent callers on one machine are serialised by a lock file in `out_dir`.
    Raises FileExistsError rather than delete shard files that this module did not write (an
    owner mark is written before the first shard). Returns the sorted `NNNNN.tfrecord` paths.
    """
    params = _Params(num_images, images_per_shard, image_size, seed)
    _validate(params)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with generated_files.exclusive_lock(out / _LOCK_NAME):
        if not _is_complete(out, params):
            _generate(out, params)
    return [str(out / f"{_shard_name(s)}.tfrecord") for s in range(params.num_shards)]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m input_pipeline.demo.shards",
        description="Write the coyo_vit demo dataset (drawn shapes labelled with ImageNet-21k "
                    "classes) as img2dataset TFRecord shards, unless it is already complete.")
    parser.add_argument("--out_dir", required=True, help="directory for the shards")
    parser.add_argument("--num_images", type=int, default=4096, help="images in all")
    parser.add_argument("--images_per_shard", type=int, default=512, help="images per shard")
    parser.add_argument("--image_size", type=int, default=64, help="side of the square images")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the progress lines
    start = time.time()
    try:
        paths = ensure_demo_shards(args.out_dir, num_images=args.num_images,
                                   images_per_shard=args.images_per_shard,
                                   image_size=args.image_size, seed=args.seed)
    except (ValueError, FileExistsError) as e:
        parser.error(str(e))
    manifest = read_manifest(args.out_dir) or {}
    print(f"{len(paths)} shards, {args.num_images} images "
          f"({len(manifest.get('damaged_keys', []))} damaged on purpose) in {args.out_dir} "
          f"[{time.time() - start:.1f} s]")


if __name__ == "__main__":
    main()
