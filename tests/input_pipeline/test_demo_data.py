"""Tests for the embedded demo dataset: img2dataset layout, labels, determinism, recovery."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from input_pipeline.demo import drawing as demo_drawing
from input_pipeline.demo import shards as demo_data
from tests.conftest import SHARED

FIXTURE_SHARDS = SHARED / "fixtures" / "coyo_shards" / "shards"
CLASSES_TSV = SHARED / "data" / "imagenet21k_classes.tsv"

# The main test set: 1000 images in shards of 256 -> 4 shards (the last one partial), 2 damaged.
NUM_IMAGES = 1000
PER_SHARD = 256
CONCEPT_INDICES = {c.index for c in demo_drawing.DEMO_CONCEPTS}
FORM_ACCURACY = 0.7  # measured 0.807 (ink and background colours: 0.202; shuffled: 0.108)


def _features(record: bytes) -> dict[str, tf.train.Feature]:
    return dict(tf.train.Example.FromString(record).features.feature)


def _value(feature: tf.train.Feature) -> list:
    return list(getattr(feature, feature.WhichOneof("kind")).value)


def _read(paths: list[str]) -> list[dict[str, tf.train.Feature]]:
    return [_features(r.numpy()) for r in tf.data.TFRecordDataset(paths)]


def _decodes(jpg: bytes) -> np.ndarray | None:
    try:
        return tf.io.decode_jpeg(jpg, channels=3).numpy()
    except tf.errors.InvalidArgumentError:
        return None


def _dir_bytes(directory: Path) -> dict[str, bytes]:
    """Every deterministic file's bytes (the _stats.json files hold wall-clock times)."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())
            if p.name.endswith(".tfrecord") or p.name == demo_data.MANIFEST_NAME}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("demo")
    paths = demo_data.ensure_demo_shards(str(out), num_images=NUM_IMAGES,
                                         images_per_shard=PER_SHARD, image_size=64, seed=0)
    return out, paths


@pytest.fixture(scope="module")
def records(demo: tuple[Path, list[str]]) -> list[dict[str, tf.train.Feature]]:
    return _read(demo[1])


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small complete directory that tests copy before damaging it."""
    out = tmp_path_factory.mktemp("small")
    demo_data.ensure_demo_shards(str(out), num_images=300, images_per_shard=100, seed=3)
    return out


def test_layout_matches_img2dataset_fixture(demo, records):
    out, paths = demo
    num_shards = math.ceil(NUM_IMAGES / PER_SHARD)
    assert [Path(p).name for p in paths] == [f"{s:05d}.tfrecord" for s in range(num_shards)]
    assert paths == sorted(paths)
    assert all((out / f"{s:05d}_stats.json").is_file() for s in range(num_shards))

    fixture = _features(next(iter(tf.data.TFRecordDataset(str(FIXTURE_SHARDS / "00000.tfrecord"))))
                        .numpy())
    fixture_kinds = {k: f.WhichOneof("kind") for k, f in fixture.items()}
    fixture_lengths = {k: len(_value(f)) for k, f in fixture.items()}
    assert len(records) == NUM_IMAGES
    for rec in records:
        assert {k: f.WhichOneof("kind") for k, f in rec.items()} == fixture_kinds
        assert {k: len(_value(f)) for k, f in rec.items()} == fixture_lengths

    first = records[0]
    assert _value(first["status"]) == [b"success"]
    assert _value(first["error_message"]) == [b""]
    assert _value(first["exif"]) == [b"{}"]
    assert [_value(first[k])[0] for k in ("width", "height", "original_width", "original_height")
            ] == [64, 64, 64, 64]


def test_keys_follow_img2dataset_rule(records):
    # img2dataset: 5-digit shard id + index in shard padded to ceil(log10(samples per shard)).
    # The fixture (64 per shard) has 7-character keys such as b"0000102" in shard 00001.
    keys = [_value(r["key"])[0].decode() for r in records]
    expected = [f"{i // PER_SHARD:05d}{i % PER_SHARD:03d}" for i in range(NUM_IMAGES)]
    assert keys == expected
    fixture_keys = [_value(r["key"])[0] for r in _read([str(FIXTURE_SHARDS / "00001.tfrecord")])]
    assert all(len(k) == 5 + math.ceil(math.log10(64)) and k.startswith(b"00001")
               for k in fixture_keys)


def test_stats_json_like_fixture(demo):
    out, paths = demo
    fixture_stats = json.loads((FIXTURE_SHARDS / "00000_stats.json").read_text())
    total = 0
    for path in paths:
        stats = json.loads(Path(path.replace(".tfrecord", "_stats.json")).read_text())
        assert stats.keys() == fixture_stats.keys()
        count = sum(1 for _ in tf.data.TFRecordDataset(path))
        assert stats["count"] == stats["successes"] == count
        assert stats["status_dict"] == {"success": count}
        assert stats["end_time"] - stats["start_time"] == pytest.approx(stats["duration"])
        total += count
    assert total == NUM_IMAGES


def test_labels_and_probabilities_like_coyo_rows(records):
    for rec in records:
        labels = _value(rec["labels"])
        probs = np.array(_value(rec["label_probs"]))
        assert len(labels) == len(probs) == demo_drawing.NUM_LABELS
        assert len(set(labels)) == len(labels)
        assert all(0 <= label < demo_drawing.NUM_CLASSES for label in labels)
        assert np.all(np.diff(probs) <= 0), probs
        kept = [label for label, p in zip(labels, probs) if p >= 0.1]
        assert 1 <= len(kept) <= 2
        assert set(kept) <= CONCEPT_INDICES
        assert set(labels[len(kept):]).isdisjoint(CONCEPT_INDICES)
        assert np.all((probs[:len(kept)] >= 0.3) & (probs[:len(kept)] <= 0.9))
        assert np.all((probs[len(kept):] > 0) & (probs[len(kept):] < 0.05))


def test_concepts_are_balanced(records):
    counts = {c.index: 0 for c in demo_drawing.DEMO_CONCEPTS}
    for rec in records:
        for label, p in zip(_value(rec["labels"]), _value(rec["label_probs"])):
            if p >= 0.1:
                counts[label] += 1
    # 1000 images x 1.3 concepts on average / 10 concepts = ~130 each.
    assert min(counts.values()) > 90, counts


def test_concepts_are_real_imagenet21k_classes():
    rows = [line.split("\t") for line in CLASSES_TSV.read_text().splitlines()[1:]]
    by_index = {int(i): (wnid, name) for i, wnid, name in rows}
    assert len(by_index) == demo_drawing.NUM_CLASSES
    concepts = demo_drawing.DEMO_CONCEPTS
    assert 8 <= len(concepts) <= 10
    for c in concepts:
        assert by_index[c.index] == (c.wnid, c.name), c
    assert len({c.index for c in concepts}) == len({c.drawing for c in concepts}) == len(concepts)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, small, caplog):
    with caplog.at_level(logging.INFO):
        again = demo_data.ensure_demo_shards(str(tmp_path / "a"), num_images=300,
                                             images_per_shard=100, seed=3)
    assert len(again) == 3
    # Writing shows progress: one line per shard with the count, the rate and the time left.
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("demo data: ")]
    assert [line.split(" images")[0] for line in progress[1:]] == [
        "demo data: 100/300", "demo data: 200/300", "demo data: 300/300"], progress
    assert "images/s, ETA " in progress[-1]
    assert _dir_bytes(tmp_path / "a") == _dir_bytes(small)
    demo_data.ensure_demo_shards(str(tmp_path / "b"), num_images=300, images_per_shard=100,
                                 seed=4)
    other = _dir_bytes(tmp_path / "b")
    assert all(other[name] != data for name, data in _dir_bytes(small).items())


def test_complete_directory_is_reused_untouched(small):
    before = {p.name: p.stat().st_mtime_ns for p in small.iterdir()}
    demo_data.ensure_demo_shards(str(small), num_images=300, images_per_shard=100, seed=3)
    assert {p.name: p.stat().st_mtime_ns for p in small.iterdir()} == before


@pytest.mark.parametrize("damage", ["truncate_shard", "delete_manifest", "delete_shard",
                                    "leftover_temp"])
def test_interrupted_directory_is_rewritten(tmp_path, small, damage):
    out = tmp_path / "demo"
    shutil.copytree(small, out)
    shard = out / "00001.tfrecord"
    if damage == "truncate_shard":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif damage == "delete_manifest":
        (out / demo_data.MANIFEST_NAME).unlink()
    elif damage == "delete_shard":
        (out / "00002.tfrecord").unlink()
    else:  # A run killed while writing shard 2 after shards 0-1 of a new generation.
        (out / demo_data.MANIFEST_NAME).unlink()
        (out / "00002.tfrecord").unlink()
        (out / "00002.tfrecord.demo_tmp").write_bytes(b"partial")
    paths = demo_data.ensure_demo_shards(str(out), num_images=300, images_per_shard=100, seed=3)
    assert [Path(p).name for p in paths] == ["00000.tfrecord", "00001.tfrecord", "00002.tfrecord"]
    assert _dir_bytes(out) == _dir_bytes(small)
    assert not list(out.glob("*.demo_tmp"))


def test_other_parameters_regenerate_and_drop_stale_shards(tmp_path, small):
    out = tmp_path / "demo"
    shutil.copytree(small, out)
    (out / "notes.txt").write_text("user file")
    paths = demo_data.ensure_demo_shards(str(out), num_images=150, images_per_shard=100, seed=3)
    assert sorted(p.name for p in out.glob("*.tfrecord")) == ["00000.tfrecord", "00001.tfrecord"]
    assert sum(1 for _ in tf.data.TFRecordDataset(paths)) == 150
    assert not (out / "00002_stats.json").exists()
    assert demo_data.read_manifest(str(out))["params"]["num_images"] == 150
    assert (out / "notes.txt").read_text() == "user file"


def test_refuses_to_overwrite_foreign_shards(tmp_path):
    shutil.copy(FIXTURE_SHARDS / "00000.tfrecord", tmp_path / "00000.tfrecord")
    with pytest.raises(FileExistsError, match="did not write"):
        demo_data.ensure_demo_shards(str(tmp_path), num_images=20)
    assert (tmp_path / "00000.tfrecord").read_bytes() == (FIXTURE_SHARDS / "00000.tfrecord"
                                                         ).read_bytes()


def test_damaged_records_at_the_documented_rate(demo, records):
    out, _ = demo
    broken = [r for r in records if _decodes(_value(r["jpg"])[0]) is None]
    assert len(broken) == round(NUM_IMAGES / demo_data.DAMAGE_EVERY) == 2
    broken_keys = [_value(r["key"])[0].decode() for r in broken]
    assert broken_keys == demo_data.read_manifest(str(out))["damaged_keys"]
    jpgs = [_value(r["jpg"])[0] for r in broken]
    assert sum(j.startswith(b"\xff\xd8") for j in jpgs) == 1  # One truncated JPEG...
    assert sum(not j.startswith(b"\xff\xd8") for j in jpgs) == 1  # ...and one of random bytes.
    for rec in records:  # sha256 is of the intact JPEG, so only damaged records mismatch.
        jpg, sha = _value(rec["jpg"])[0], _value(rec["sha256"])[0].decode()
        intact = _value(rec["key"])[0].decode() not in broken_keys
        assert (hashlib.sha256(jpg).hexdigest() == sha) == intact
        assert _value(rec["status"]) == [b"success"]


def _lone_concepts(records) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ink per 8x8 cell, ink and background RGB, concept column) of each decodable one-concept
    image.

    Ink is the distance of a cell's grey level from the image's median (its background), scaled
    to the image's largest: the same for light-on-dark and dark-on-light and for every colour."""
    column = {c.index: i for i, c in enumerate(demo_drawing.DEMO_CONCEPTS)}
    cells, colours, targets = [], [], []
    for rec in records:
        kept = [column[label] for label, p in zip(_value(rec["labels"]), _value(rec["label_probs"]))
                if p >= 0.1]
        image = _decodes(_value(rec["jpg"])[0])
        if image is None or len(kept) != 1:
            continue
        assert image.shape == (64, 64, 3)
        grey = image.astype(np.float64).mean(axis=2)
        ink = np.abs(grey - np.median(grey)).reshape(8, 8, 8, 8).mean(axis=(1, 3))
        cells.append((ink / ink.max()).ravel())
        pixels = image.reshape(-1, 3).astype(np.float64)
        inkiest = pixels[np.argsort(np.abs(grey.ravel() - np.median(grey)))[-100:]]
        colours.append(np.concatenate([inkiest.mean(0), np.median(pixels, axis=0)]))
        targets.append(kept[0])
    return np.array(cells), np.array(colours), np.array(targets)


def _held_out_accuracy(x: np.ndarray, y: np.ndarray) -> float:
    """A logistic regression trained on the first half, scored on the second."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    half = len(x) // 2
    scale = StandardScaler().fit(x[:half])
    classifier = LogisticRegression(max_iter=2000).fit(scale.transform(x[:half]), y[:half])
    return float(classifier.score(scale.transform(x[half:]), y[half:]))


def test_concepts_are_in_the_form_not_the_colour(records):
    cells, colours, concept = _lone_concepts(records)
    chance = 1 / len(demo_drawing.DEMO_CONCEPTS)
    assert len(concept) > 500 and set(concept) == set(range(len(demo_drawing.DEMO_CONCEPTS)))
    # The ink's layout tells the concept, with a linear model on 64 cells...
    assert _held_out_accuracy(cells, concept) > FORM_ACCURACY
    # ...but not once the labels are shuffled, and colours tell nothing: what a model learns
    # from this data is form, which is what carries over to the fine-tuning demo's digits.
    shuffled = np.random.default_rng(0).permutation(concept)
    assert _held_out_accuracy(cells, shuffled) < chance + 0.08
    # (Colours say a little through blending: thin strokes leave few cells of pure ink.)
    assert _held_out_accuracy(colours, concept) < chance + 0.2


@pytest.mark.parametrize("kwargs, message", [
    ({"num_images": 0}, "num_images must be >= 1, got 0"),
    ({"images_per_shard": -5}, "images_per_shard must be >= 1, got -5"),
    ({"image_size": 8}, "image_size must be >= 16"),
    ({"seed": -1}, "seed must be a non-negative integer, got -1"),
])
def test_bad_parameters_are_named(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        demo_data.ensure_demo_shards(str(tmp_path), **kwargs)
    assert not list(tmp_path.iterdir())


def test_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo_data.main(["--help"])
    assert exit_info.value.code == 0
    assert "--num_images" in capsys.readouterr().out
    demo_data.main(["--out_dir", str(tmp_path), "--num_images", "40", "--images_per_shard", "16",
                    "--image_size", "32", "--seed", "7"])
    assert "3 shards, 40 images" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == sorted(
        [".coyo_vit_demo_data", ".demo_data.lock", demo_data.MANIFEST_NAME]
        + [f"0000{s}{suffix}" for s in range(3) for suffix in (".tfrecord", "_stats.json")])
    with pytest.raises(SystemExit) as exit_info:
        demo_data.main(["--out_dir", str(tmp_path), "--num_images", "0"])
    assert exit_info.value.code == 2
    assert "num_images must be >= 1" in capsys.readouterr().err
