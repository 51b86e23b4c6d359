"""pHash against the real metadata `imagehash`, the near-duplicate search, decontamination of an
image folder with planted copies, and the pipeline's exclusion list."""
from __future__ import annotations

import collections
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow as tf
from PIL import Image

from input_pipeline import pipeline, skip_accounting, sources
from input_pipeline.tools import decontaminate, phash
from tests.conftest import SHARED

FIXTURES = SHARED / "fixtures" / "coyo_shards"
SHARDS = FIXTURES / "shards"
METADATA = FIXTURES / "metadata" / "part-00000.snappy.parquet"
PLANTED_PER_SHARD = 3


@pytest.fixture(scope="module")
def shard_images() -> list[dict]:
    """key, url, jpg bytes, width, original_width and shard of every fixture record."""
    rows = []
    for path in sorted(SHARDS.glob("*.tfrecord")):
        for record in tf.data.TFRecordDataset(str(path)):
            f = tf.train.Example.FromString(record.numpy()).features.feature
            rows.append({"key": f["key"].bytes_list.value[0].decode(),
                         "url": f["url"].bytes_list.value[0].decode(),
                         "jpg": f["jpg"].bytes_list.value[0], "shard": path.stem,
                         "resized": f["width"].int64_list.value[0]
                         != f["original_width"].int64_list.value[0]})
    return rows


@pytest.fixture(scope="module")
def metadata() -> dict[str, dict]:
    return {r["url"]: r for r in pq.read_table(METADATA).to_pylist()}


def test_our_phash_of_shard_images_is_the_metadata_imagehash(shard_images, metadata):
    distances = collections.Counter()
    for row in shard_images:
        distances[phash.hamming(phash.phash(row["jpg"]),
                                phash.from_hex(metadata[row["url"]]["imagehash"]))] += 1
    print("pHash distance to the metadata imagehash, over the 145 shard images:",
          dict(sorted(distances.items())))
    # Equal for most; where not, the two DCT coefficients next to the median swapped places
    # (pixel-level differences of decoders/resizers, and img2dataset's resize): 2 bits.
    assert sum(distances.values()) == 145
    assert max(distances) <= 2
    assert distances[0] >= 0.85 * 145


def test_phash_follows_the_imagehash_definition_step_by_step(shard_images):
    """An independent pHash: explicit DCT-II matrices instead of scipy, bits read row-major."""
    n = 32
    basis = np.cos(np.pi * np.outer(np.arange(n), 2 * np.arange(n) + 1) / (2 * n))
    for row in shard_images[:8]:
        grey = Image.open(io.BytesIO(row["jpg"])).convert("L").resize(
            (n, n), Image.Resampling.LANCZOS)
        pixels = np.asarray(grey, np.float64)
        low = (basis @ pixels @ basis.T)[:8, :8]
        bits = "".join("1" if b else "0" for b in (low > np.median(low)).ravel())
        assert phash.phash(row["jpg"]) == int(bits, 2)
        assert phash.to_hex(int(bits, 2)) == f"{int(bits, 2):016x}"


def test_hex_parsing_vectorised_and_strict():
    texts = ["a751b64b9738d628", "FFFFFFFFFFFFFFFF", None, "xyz", "0123456789abcdeg",
             "0000000000000001"]
    hashes, valid = phash.hex_array(texts)
    np.testing.assert_array_equal(valid, [True, True, False, False, False, True])
    assert hashes[0] == phash.from_hex("a751b64b9738d628") and hashes[1] == 2**64 - 1
    assert hashes[5] == 1
    with pytest.raises(ValueError, match="16 hex digits, got 'xyz'"):
        phash.from_hex("xyz")
    with pytest.raises(ValueError, match="do not decode as an image"):
        phash.phash(b"<html>not an image</html>")


@pytest.mark.parametrize("max_distance", [0, 3, 4, 7, 9])
def test_index_finds_exactly_the_pairs_a_full_comparison_finds(max_distance):
    rng = np.random.default_rng(max_distance)
    indexed = rng.integers(0, 2**63, 3000, dtype=np.uint64) * np.uint64(2)
    queries = rng.integers(0, 2**63, 4000, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    for i in range(300):  # planted neighbours at 0..12 bits
        value = int(indexed[rng.integers(len(indexed))])
        for bit in rng.choice(64, size=i % 13, replace=False):
            value ^= 1 << int(bit)
        queries[i] = value
    found = decontaminate.NearDuplicateIndex(indexed, max_distance).query(queries)
    all_pairs = phash.hamming(queries[:, None], indexed[None, :])
    q, i = np.nonzero(all_pairs <= max_distance)
    assert sorted(zip(found.query.tolist(), found.indexed.tolist())) == sorted(
        zip(q.tolist(), i.tolist()))
    np.testing.assert_array_equal(found.distance, all_pairs[found.query, found.indexed])
    assert len(q) > 0


def test_index_rejects_distances_it_cannot_search():
    with pytest.raises(ValueError, match=r"max_distance must be an int in \[0, 15\], got 16"):
        decontaminate.NearDuplicateIndex(np.zeros(1, np.uint64), 16)


# ------------------------------------------------------------------ decontamination end to end


@pytest.fixture(scope="module")
def eval_folder(tmp_path_factory, shard_images, metadata) -> dict:
    """Training = the metadata rows of shards 00001-00003. The eval folder holds re-encoded,
    resized copies of some of their images (planted), plus images of shard 00000, which are not
    in training (unrelated), plus a file that is no image."""
    root = tmp_path_factory.mktemp("decontam")
    train_urls = {r["url"] for r in shard_images if r["shard"] != "00000"}
    train_rows = [row for url, row in metadata.items() if url in train_urls]
    pq.write_table(pq.read_table(METADATA).take(
        [i for i, r in enumerate(pq.read_table(METADATA).to_pylist()) if r["url"] in train_urls]),
        root / "train_metadata.parquet")
    train_hashes = np.array([phash.from_hex(r["imagehash"]) for r in train_rows], np.uint64)

    folder = root / "eval"
    (folder / "copies").mkdir(parents=True)
    (folder / "other").mkdir()
    planted = {}
    for shard in ("00001", "00002", "00003"):
        rows = [r for r in shard_images if r["shard"] == shard][:PLANTED_PER_SHARD]
        for n, row in enumerate(rows):
            image = Image.open(io.BytesIO(row["jpg"])).convert("RGB")
            scale = (0.5, 0.7, 1.0)[n]
            image = image.resize((int(image.width * scale), int(image.height * scale)),
                                 Image.Resampling.BILINEAR)
            name = f"copies/{shard}_{n}.{('jpg', 'png', 'webp')[n]}"
            image.save(folder / name, quality=70)
            planted[name] = row
    unrelated = []
    for row in (r for r in shard_images if r["shard"] == "00000"):
        # Unrelated only if its metadata hash is far from every training hash.
        own = phash.from_hex(metadata[row["url"]]["imagehash"])
        if phash.hamming(train_hashes, own).min() > 2 * decontaminate.DEFAULT_MAX_DISTANCE:
            name = f"other/{row['key']}.jpg"
            Image.open(io.BytesIO(row["jpg"])).convert("RGB").save(folder / name, quality=80)
            unrelated.append(name)
        if len(unrelated) == 10:
            break
    (folder / "other" / "broken.jpg").write_bytes(b"<html>not an image</html>")
    return {"root": root, "folder": folder, "planted": planted, "unrelated": unrelated}


def _read_outputs(directory: Path) -> tuple[list[str], list[dict], dict]:
    lines = (directory / "exclude_keys.txt").read_text().splitlines()
    header, *rows = (directory / "matches.tsv").read_text().splitlines()
    matches = [dict(zip(header.split("\t"), r.split("\t"))) for r in rows]
    return lines, matches, json.loads((directory / "summary.json").read_text())


def test_decontamination_from_metadata_finds_planted_copies_only(eval_folder, capsys):
    out = eval_folder["root"] / "from_metadata"
    assert decontaminate.main([
        "--eval_dir", str(eval_folder["folder"]),
        "--train_metadata", str(eval_folder["root"] / "train_metadata.parquet"),
        "--output_dir", str(out), "--no_progress"]) == 0
    lines, matches, summary = _read_outputs(out)
    planted = eval_folder["planted"]
    assert lines[0] == "url"
    assert sorted(lines[1:]) == sorted(r["url"] for r in planted.values())
    assert {m["eval_id"] for m in matches} == set(planted)  # no unrelated image matched
    for m in matches:
        assert m["url"] == planted[m["eval_id"]]["url"]
        assert int(m["distance"]) <= decontaminate.DEFAULT_MAX_DISTANCE
    assert len(eval_folder["unrelated"]) == 10
    assert summary["eval_images"] == len(planted) + 10
    assert summary["eval_images_undecodable"] == ["other/broken.jpg"]
    assert summary["train_rows"] == 105
    print("planted copies' distances:", summary["distance_histogram"])
    assert "9 matches" in capsys.readouterr().out


def test_decontamination_from_shard_images_lists_their_keys(eval_folder):
    out = eval_folder["root"] / "from_shards"
    shards = [str(SHARDS / f"0000{i}.tfrecord") for i in (1, 2, 3)]
    assert decontaminate.main(["--eval_dir", str(eval_folder["folder"]), "--train_shards",
                               *shards, "--output_dir", str(out), "--no_progress"]) == 0
    lines, matches, _ = _read_outputs(out)
    assert lines[0] == "key"
    assert sorted(lines[1:]) == sorted(r["key"] for r in eval_folder["planted"].values())
    assert {m["eval_id"] for m in matches} == set(eval_folder["planted"])


def test_the_pipeline_leaves_out_the_listed_records(eval_folder, shard_images):
    out = eval_folder["root"] / "from_metadata"
    if not (out / "exclude_keys.txt").exists():
        decontaminate.main(["--eval_dir", str(eval_folder["folder"]), "--train_metadata",
                            str(eval_folder["root"] / "train_metadata.parquet"),
                            "--output_dir", str(out), "--no_progress"])
    excluded_urls = {r["url"] for r in eval_folder["planted"].values()}
    by_labels = _keys_by_labels()
    config = {"data": {"files": str(SHARDS)}, "shuffle_buffer": 16, "cycle_length": 2,
              "pp_train": 'decode|resize(8)|value_range(-1, 1)|coyo_labels("soft")',
              "exclude_keys_file": str(out / "exclude_keys.txt")}
    kept = 145 - len(excluded_urls)
    ds = pipeline.build_train_dataset(config, batch_size=kept, seed=0, skip_counts=True)
    batch = next(ds.as_numpy_iterator())  # one epoch's worth of examples
    urls = {by_labels[tuple(np.flatnonzero(row).tolist())] for row in batch["labels"]}
    assert urls == {r["url"] for r in shard_images} - excluded_urls
    counter = skip_accounting.SkipCounter()
    counter.update(batch)
    skipped = {k: v for k, v in counter.totals().items() if v}
    assert skipped == {"excluded": int(batch["_index"][-1]) + 1 - kept}


def test_an_exclusion_list_must_name_its_field(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("1917\n1931\n")
    config = {"data": {"files": str(SHARDS)}, "pp_train": 'decode|resize(8)|coyo_labels("soft")',
              "exclude_keys_file": str(path)}
    with pytest.raises(ValueError, match="first line must name the field to match, one of "
                                         "key, url; got '1917'"):
        pipeline.build_train_dataset(config, batch_size=2, seed=0)
    config["exclude_keys_file"] = str(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="exclude_keys_file .*missing.txt"):
        pipeline.build_train_dataset(config, batch_size=2, seed=0)
    path.write_text("key\n0000002\n")
    assert sources.read_exclusion_list(str(path)) == ("key", ["0000002"])


def _keys_by_labels() -> dict[tuple, str]:
    """url of each fixture record by its set of labels (the soft-label fingerprint)."""
    lookup = {}
    for path in sorted(SHARDS.glob("*.parquet")):
        for row in pq.read_table(path).to_pylist():
            if row["status"] == "success":
                lookup[tuple(sorted(set(row["labels"])))] = row["url"]
    return lookup
