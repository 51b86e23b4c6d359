"""The TFDS builder coyo_labeled_300m, built from the real img2dataset fixture shards."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from input_pipeline import pipeline
from input_pipeline.tools import decontaminate, tfds_coyo
from tests.conftest import SHARED

FIXTURES = SHARED / "fixtures" / "coyo_shards"
SHARDS = FIXTURES / "shards"
CONFIG = "coyo_labeled_300m/holdout1"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """The four fixture shards plus a fifth holding only damaged records, built with the first
    shard as holdout."""
    root = tmp_path_factory.mktemp("tfds")
    manual = root / "shards"
    manual.mkdir()
    for path in SHARDS.glob("*.tfrecord"):
        shutil.copy(path, manual / path.name)
    record = next(iter(tf.data.TFRecordDataset(str(SHARDS / "00001.tfrecord")))).numpy()
    undecodable = tf.train.Example.FromString(record)
    jpg = undecodable.features.feature["jpg"].bytes_list.value
    jpg[0] = jpg[0][:1000]
    no_labels = tf.train.Example.FromString(record)
    del no_labels.features.feature["labels"]
    with tf.io.TFRecordWriter(str(manual / "00004.tfrecord")) as writer:
        writer.write(undecodable.SerializeToString())
        writer.write(no_labels.SerializeToString())
    builder = tfds_coyo.build(str(manual), str(root / "data"), holdout_shards=1)
    return {"data_dir": str(root / "data"), "builder": builder}


@pytest.fixture(scope="module")
def parquet_rows() -> dict[str, dict]:
    return {r["key"]: r for p in sorted(SHARDS.glob("*.parquet"))
            for r in pq.read_table(p).to_pylist() if r["status"] == "success"}


@pytest.fixture(scope="module")
def shard_jpgs() -> dict[str, bytes]:
    out = {}
    for record in tf.data.TFRecordDataset(sorted(str(p) for p in SHARDS.glob("*.tfrecord"))):
        f = tf.train.Example.FromString(record.numpy()).features.feature
        out[f["key"].bytes_list.value[0].decode()] = f["jpg"].bytes_list.value[0]
    return out


def test_tfds_load_gives_the_splits_and_counts(built):
    ds, info = tfds.load(CONFIG, data_dir=built["data_dir"], with_info=True, download=False)
    assert info.splits["train"].num_examples == 105  # shards 00001-00003 (00004: all damaged)
    assert info.splits["holdout"].num_examples == 40  # shard 00000
    assert sum(1 for _ in ds["train"]) == 105 and sum(1 for _ in ds["holdout"]) == 40
    spec = ds["train"].element_spec
    assert spec["image"] == tf.TensorSpec([None, None, 3], tf.uint8)
    assert spec["labels"] == tf.TensorSpec([None], tf.int64)
    assert spec["label_probs"] == tf.TensorSpec([None], tf.float32)
    assert spec["key"].dtype == spec["url"].dtype == tf.string


def test_every_example_equals_its_shard_record(built, parquet_rows, shard_jpgs):
    seen = set()
    for split in ("train", "holdout"):
        raw = tfds.load(CONFIG, split=split, data_dir=built["data_dir"], download=False,
                        decoders={"image": tfds.decode.SkipDecoding()})
        decoded = tfds.load(CONFIG, split=split, data_dir=built["data_dir"], download=False)
        for ex, image in zip(raw.as_numpy_iterator(), decoded.as_numpy_iterator()):
            key = ex["key"].decode()
            row = parquet_rows[key]
            assert ex["url"].decode() == row["url"]
            np.testing.assert_array_equal(ex["labels"], row["labels"])
            np.testing.assert_array_equal(ex["label_probs"],
                                          np.asarray(row["label_probs"], np.float32))
            assert ex["image"] == shard_jpgs[key]  # the stored bytes, untouched
            assert image["image"].shape == (row["height"], row["width"], 3)
            assert (split == "holdout") == key.startswith("00000")
            seen.add(key)
    assert seen == set(parquet_rows)


def test_records_store_the_image_under_the_declared_feature_name(built):
    version_dir = Path(tfds_coyo.split_files(built["data_dir"], "train", "holdout1")).parent
    declared = set(json.loads((version_dir / "features.json").read_text())
                   ["featuresDict"]["features"])
    assert declared == {"image", "labels", "label_probs", "key", "url"}
    files = tf.io.gfile.glob(tfds_coyo.split_files(built["data_dir"], "train", "holdout1"))
    record = next(iter(tf.data.TFRecordDataset(files))).numpy()
    assert set(tf.train.Example.FromString(record).features.feature) == declared


def test_damaged_records_are_left_out_and_counted(built):
    info = tfds.builder(CONFIG, data_dir=built["data_dir"]).info
    assert info.metadata["skipped"] == {"undecodable_image": 1, "missing_labels": 1}


def test_the_training_pipeline_reads_the_tfds_files(built, parquet_rows):
    files = tfds_coyo.split_files(built["data_dir"], "train", "holdout1")
    config = {"data": {"files": files}, "shuffle_buffer": 8, "cycle_length": 1,
              "pp_train": 'decode|resize(8)|value_range(-1, 1)|coyo_labels("soft")'}
    batch = next(pipeline.build_train_dataset(config, batch_size=105, seed=0).as_numpy_iterator())
    by_labels = {tuple(sorted(set(r["labels"]))): k for k, r in parquet_rows.items()}
    keys = sorted(by_labels[tuple(np.flatnonzero(row).tolist())] for row in batch["labels"])
    assert keys == sorted(k for k in parquet_rows if not k.startswith("00000"))
    np.testing.assert_array_equal(batch["_index"], np.arange(105))  # nothing skipped


def test_decontamination_reads_a_tfds_split(built, tmp_path, parquet_rows):
    out = tmp_path / "decon"
    assert decontaminate.main([
        "--eval_tfds", f"{CONFIG}:holdout", "--tfds_data_dir", built["data_dir"],
        "--train_metadata", str(FIXTURES / "metadata"), "--output_dir", str(out),
        "--no_progress"]) == 0
    urls = set((out / "exclude_keys.txt").read_text().splitlines()[1:])
    holdout_urls = {r["url"] for k, r in parquet_rows.items() if k.startswith("00000")}
    assert holdout_urls <= urls  # every holdout image finds its own metadata row
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_images"] == 40 and summary["eval_images_matched"] == 40


def test_split_files_names_only_known_splits():
    with pytest.raises(ValueError, match="unknown split 'test'; valid: train, holdout"):
        tfds_coyo.split_files("/data", "test")
