"""Sources, holdout split and the train/eval pipelines, on the real img2dataset fixture shards.

Pipelines here use the `soft` label mode: each image's target holds its 50 labels, a fingerprint
that maps every output row back to its record key, so tests can follow records end to end.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_collections
import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from input_pipeline import pipeline, sources
from tests.conftest import SHARED

SHARDS = SHARED / "fixtures" / "coyo_shards" / "shards"
FILES = sorted(str(p) for p in SHARDS.glob("*.tfrecord"))
PP_TRAIN = ('decode_jpeg_and_inception_crop(16)|flip_lr|value_range(-1, 1)|'
            'coyo_labels("soft")')
PP_EVAL = 'decode|resize(16)|value_range(-1, 1)|coyo_labels("soft")'


def _config(**overrides) -> dict:
    config = {"data": {"files": str(SHARDS / "*.tfrecord")}, "holdout": {"files": 0, "examples": 0},
              "pp_train": PP_TRAIN, "pp_eval": PP_EVAL, "shuffle_buffer": 32, "cycle_length": 2,
              "num_parallel_calls": -1, "prefetch": 2}
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def parquet_rows() -> dict[str, dict]:
    rows = [r for p in sorted(SHARDS.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    return {r["key"]: r for r in rows if r["status"] == "success"}


@pytest.fixture(scope="module")
def key_of(parquet_rows):
    """Maps a soft-label target row back to its record key (via its set of labels)."""
    lookup = {tuple(sorted(set(r["labels"]))): k for k, r in parquet_rows.items()}
    assert len(lookup) == len(parquet_rows)
    return lambda row: lookup[tuple(np.flatnonzero(row).tolist())]


@pytest.fixture(scope="module")
def file_keys() -> dict[str, list[str]]:
    """Record keys of each shard, in record order."""
    return {f: [sources.parse_example(r)["key"].numpy().decode()
                for r in tf.data.TFRecordDataset(f)] for f in FILES}


def _take(ds: tf.data.Dataset, n: int) -> list[dict[str, np.ndarray]]:
    return [{k: v.numpy() for k, v in b.items()} for b in ds.take(n)]


def _assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _write_tfrecord(path: Path, records: list[bytes]) -> str:
    with tf.io.TFRecordWriter(str(path)) as writer:
        for r in records:
            writer.write(r)
    return str(path)


# ---------------------------------------------------------------- sources


def test_list_files_accepts_globs_lists_commas_and_directories():
    assert len(FILES) == 4
    assert sources.list_files(str(SHARDS / "*.tfrecord")) == FILES
    assert sources.list_files(str(SHARDS)) == FILES
    assert sources.list_files(f"{FILES[2]}, {FILES[0]}") == [FILES[0], FILES[2]]
    assert sources.list_files([FILES[3], str(SHARDS / "0000[01].tfrecord")]) == [
        FILES[0], FILES[1], FILES[3]]


def test_list_files_names_the_pattern_that_matches_nothing(tmp_path):
    pattern = str(SHARDS / "*.tfrecords-typo")
    with pytest.raises(FileNotFoundError, match="no file matches .*tfrecords-typo"):
        sources.list_files(f"{FILES[0]},{pattern}")
    with pytest.raises(FileNotFoundError, match="holds no"):
        sources.list_files(str(tmp_path))


def test_list_files_finds_tfds_style_shard_names(tmp_path):
    for i in range(2):
        shutil.copy(FILES[i], tmp_path / f"CoyoLabeled300m-train.tfrecord-0000{i}-of-00002")
    assert len(sources.list_files(str(tmp_path))) == 2


def test_counts_match_img2dataset_stats_and_tf_data():
    for f in FILES:
        stats = json.loads(Path(f.replace(".tfrecord", "_stats.json")).read_text())
        n = sources.count_file_records(f)
        assert n == stats["successes"] == sum(1 for _ in tf.data.TFRecordDataset(f))
    assert pipeline.count_records(str(SHARDS)) == 145


def test_count_rejects_a_truncated_file(tmp_path):
    data = Path(FILES[0]).read_bytes()
    (tmp_path / "cut.tfrecord").write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="truncated"):
        sources.count_file_records(str(tmp_path / "cut.tfrecord"))


def test_parsed_records_equal_the_shards_parquet(parquet_rows):
    seen = {}
    for r in tf.data.TFRecordDataset(FILES):
        ex = sources.parse_example(r)
        assert ex["labels"].dtype == tf.int64 and ex["label_probs"].dtype == tf.float32
        seen[ex["key"].numpy().decode()] = ex
    assert len(seen) == 145 and seen.keys() == parquet_rows.keys()
    for key, ex in seen.items():
        row = parquet_rows[key]
        assert ex["url"].numpy().decode() == row["url"]
        np.testing.assert_array_equal(ex["labels"].numpy(), row["labels"])
        np.testing.assert_array_equal(ex["label_probs"].numpy(),
                                      np.asarray(row["label_probs"], np.float32))


def test_split_holdout_takes_whole_files_then_leading_records():
    counts = [sources.count_file_records(f) for f in FILES]  # 40, 36, 37, 32
    train, holdout = sources.split_holdout(FILES, holdout_files=1, holdout_examples=5)
    assert holdout == [sources.FileSlice(FILES[0]), sources.FileSlice(FILES[1], 0, 5)]
    assert train == [sources.FileSlice(FILES[1], 5), sources.FileSlice(FILES[2]),
                     sources.FileSlice(FILES[3])]
    assert sources.count_records(holdout) == counts[0] + 5
    assert sources.count_records(holdout) + sources.count_records(train) == 145
    # Examples reaching exactly past whole files.
    train, holdout = sources.split_holdout(FILES, 0, counts[0] + counts[1])
    assert holdout == [sources.FileSlice(FILES[0]), sources.FileSlice(FILES[1])]
    assert train == [sources.FileSlice(FILES[2]), sources.FileSlice(FILES[3])]
    with pytest.raises(ValueError, match="none left to train on"):
        sources.split_holdout(FILES, 1, 105)
    with pytest.raises(ValueError, match="holdout_files=4 leaves no training file"):
        sources.split_holdout(FILES, 4, 0)


# ---------------------------------------------------------------- training stream


def test_each_epoch_covers_every_record_once_in_a_new_order(key_of, parquet_rows):
    ds = pipeline.build_train_dataset(_config(), batch_size=5, seed=0)
    batches = _take(ds, 58)  # 145 = 29 batches of 5: two epochs
    assert batches[0]["image"].shape == (5, 16, 16, 3) and batches[0]["image"].dtype == np.float32
    assert batches[0]["labels"].shape == (5, 21841)
    assert batches[0]["_index"].dtype == np.int64
    assert set(batches[0]) == {"image", "labels", "_index"}
    np.testing.assert_array_equal(np.concatenate([b["_index"] for b in batches]), np.arange(290))
    keys = [key_of(row) for b in batches for row in b["labels"]]
    first, second = keys[:145], keys[145:]
    assert sorted(first) == sorted(second) == sorted(parquet_rows)
    assert first != second
    assert -1.0 <= min(b["image"].min() for b in batches) < 0 < max(b["image"].max()
                                                                    for b in batches) <= 1.0


def test_same_seed_same_batches_other_seed_other_order(key_of):
    a = _take(pipeline.build_train_dataset(_config(), batch_size=8, seed=3), 6)
    b = _take(pipeline.build_train_dataset(_config(), batch_size=8, seed=3), 6)
    c = _take(pipeline.build_train_dataset(_config(), batch_size=8, seed=4), 6)
    _assert_same_batches(a, b)
    keys_a = [key_of(r) for x in a for r in x["labels"]]
    keys_c = [key_of(r) for x in c for r in x["labels"]]
    assert keys_a != keys_c


def test_order_does_not_depend_on_a_global_tf_seed():
    # Dataset.shuffle folds tf.random.set_seed into its seed: a launcher that set one once
    # changed the data order, and a resume without it would not continue the same stream.
    a = _take(pipeline.build_train_dataset(_config(), batch_size=8, seed=3), 3)
    tf.random.set_seed(1)
    try:
        b = _take(pipeline.build_train_dataset(_config(), batch_size=8, seed=3), 3)
    finally:
        tf.random.set_seed(None)
    _assert_same_batches(a, b)


def test_random_crops_do_not_depend_on_parallelism():
    serial = _take(pipeline.build_train_dataset(
        _config(num_parallel_calls=1, prefetch=0), batch_size=4, seed=1), 6)
    parallel = _take(pipeline.build_train_dataset(
        _config(num_parallel_calls=-1, prefetch=4), batch_size=4, seed=1), 6)
    _assert_same_batches(serial, parallel)


def test_resume_from_max_index_continues_the_uninterrupted_run():
    # threshold 0.3 drops images without a label, so `_index` has gaps, as in real training.
    config = _config(pp_train=PP_TRAIN.replace('"soft"', '"threshold", 0.3'))
    full = _take(pipeline.build_train_dataset(config, batch_size=6, seed=5), 40)
    indices = np.concatenate([b["_index"] for b in full])
    assert len(np.setdiff1d(np.arange(indices[-1]), indices)) > 0  # some records were dropped
    assert indices[-1] > 145  # the run crosses into the second epoch
    for stop_after in (4, 26):  # mid first epoch, and inside the second (epoch skipped by count)
        start = int(full[stop_after]["_index"].max()) + 1
        resumed = _take(pipeline.build_train_dataset(config, batch_size=6, seed=5,
                                                      start_position=start), 6)
        _assert_same_batches(resumed, full[stop_after + 1:stop_after + 7])


def test_resume_far_ahead_skips_epochs_without_reading_them():
    start = 145 * 10_000 + 7
    batch = _take(pipeline.build_train_dataset(_config(), batch_size=4, seed=0,
                                               start_position=start), 1)[0]
    np.testing.assert_array_equal(batch["_index"], np.arange(start, start + 4))


def test_processes_get_disjoint_files_covering_all(key_of, file_keys):
    per_process = []
    for index in range(2):
        files = FILES[index::2]
        n = sum(len(file_keys[f]) for f in files)
        ds = pipeline.build_train_dataset(_config(), batch_size=1, seed=0, process_index=index,
                                          process_count=2)
        keys = [key_of(b["labels"][0]) for b in _take(ds, n)]
        assert sorted(keys) == sorted(k for f in files for k in file_keys[f])
        per_process.append(set(keys))
    assert not per_process[0] & per_process[1]
    assert len(per_process[0] | per_process[1]) == 145


def test_a_process_without_files_is_an_error_naming_both_numbers():
    with pytest.raises(ValueError, match="process_index=4 of process_count=5"):
        pipeline.build_train_dataset(_config(), batch_size=1, seed=0, process_index=4,
                                     process_count=5)


def test_training_never_sees_the_holdout(key_of, file_keys):
    config = _config(holdout={"files": 1, "examples": 5})
    holdout_keys = set(file_keys[FILES[0]]) | set(file_keys[FILES[1]][:5])
    batches = _take(pipeline.build_train_dataset(config, batch_size=10, seed=0), 20)  # 2 epochs
    train_keys = {key_of(r) for b in batches for r in b["labels"]}
    assert len(train_keys) == 145 - 45
    assert not train_keys & holdout_keys

    evaluated = _take(pipeline.build_eval_dataset(config, batch_size=8), 100)
    eval_keys = [key_of(r) for b in evaluated for r, m in zip(b["labels"], b["_mask"]) if m]
    assert sorted(eval_keys) == sorted(holdout_keys)


def test_bad_records_are_skipped_and_the_rest_comes_through(tmp_path, key_of, file_keys):
    good = [r.numpy() for r in tf.data.TFRecordDataset(FILES[1]).take(6)]

    def corrupted(record: bytes, **changes) -> bytes:
        example = tf.train.Example.FromString(record)
        for name, values in changes.items():
            feature = example.features.feature[name]
            field = feature.bytes_list if name == "jpg" else (
                feature.float_list if name == "label_probs" else feature.int64_list)
            del field.value[:]
            field.value.extend(values)
        return example.SerializeToString()

    jpg = tf.train.Example.FromString(good[0]).features.feature["jpg"].bytes_list.value[0]
    records = [good[0],
               corrupted(good[1], jpg=[jpg[:1000]]),  # truncated JPEG: headers, no image rows
               good[2],
               corrupted(good[3], jpg=[b"<html>not an image</html>"]),
               corrupted(good[4], labels=[21841] * 50),  # label outside the class range
               b"this is not a tf.Example",
               corrupted(good[5], label_probs=[0.5]),  # 50 labels, 1 probability
               good[5]]
    path = _write_tfrecord(tmp_path / "bad.tfrecord", records)
    config = _config(data={"files": path}, shuffle_buffer=1)
    batches = _take(pipeline.build_train_dataset(config, batch_size=1, seed=0), 6)
    assert [int(b["_index"][0]) for b in batches] == [0, 2, 7, 8, 10, 15]
    keys = [key_of(b["labels"][0]) for b in batches]
    expected = [file_keys[FILES[1]][i] for i in (0, 2, 5)]
    assert keys == expected + expected

    evaluated = _take(pipeline.build_eval_dataset(config, split="all", batch_size=4), 10)
    assert len(evaluated) == 2  # 8 records counted -> 2 batches, the bad ones masked out
    assert [key_of(r) for b in evaluated for r, m in zip(b["labels"], b["_mask"]) if m] == expected


def test_png_bytes_in_the_jpg_field_train_like_jpeg(tmp_path):
    records = []
    for r in tf.data.TFRecordDataset(FILES[2]).take(3):
        example = tf.train.Example.FromString(r.numpy())
        jpg = example.features.feature["jpg"].bytes_list.value
        jpg[0] = tf.io.encode_png(tf.io.decode_jpeg(jpg[0], channels=3)).numpy()
        records.append(example.SerializeToString())
    path = _write_tfrecord(tmp_path / "png.tfrecord", records)
    batch = _take(pipeline.build_train_dataset(_config(data={"files": path}), batch_size=3,
                                               seed=0), 1)[0]
    np.testing.assert_array_equal(batch["_index"], [0, 1, 2])
    assert batch["image"].shape == (3, 16, 16, 3)


# ---------------------------------------------------------------- eval


@pytest.mark.parametrize("process_count, batch_size", [(1, 8), (2, 8), (8, 4)])
def test_eval_batches_are_padded_masked_and_equal_in_number(process_count, batch_size, key_of,
                                                            file_keys):
    config = _config(holdout={"files": 1, "examples": 5})  # 45 records
    per_process = [_take(pipeline.build_eval_dataset(config, batch_size=batch_size,
                                                     process_index=i,
                                                     process_count=process_count), 100)
                   for i in range(process_count)]
    expected_batches = -(-(-(-45 // process_count)) // batch_size)
    keys = []
    for index, batches in enumerate(per_process):
        assert len(batches) == expected_batches
        mask = np.concatenate([b["_mask"] for b in batches])
        assert mask.sum() == len(range(index, 45, process_count))
        assert mask[: mask.sum()].all()  # real rows first, padding after
        for b in batches:
            assert b["image"].shape == (batch_size, 16, 16, 3) and b["_mask"].dtype == bool
            assert not b["image"][~b["_mask"]].any() and not b["labels"][~b["_mask"]].any()
            keys += [key_of(r) for r, m in zip(b["labels"], b["_mask"]) if m]
    assert sorted(keys) == sorted(set(file_keys[FILES[0]]) | set(file_keys[FILES[1]][:5]))


def test_eval_all_split_and_masking_of_images_without_labels(parquet_rows):
    config = _config(pp_eval=PP_EVAL.replace('"soft"', '"threshold", 0.3'))
    batches = _take(pipeline.build_eval_dataset(config, split="all", batch_size=32), 100)
    assert len(batches) == 5  # ceil(145 / 32)
    with_label = sum(max(r["label_probs"]) >= np.float32(0.3) for r in parquet_rows.values())
    assert sum(int(b["_mask"].sum()) for b in batches) == with_label < 145


def test_eval_holdout_without_holdout_configured_is_an_error():
    with pytest.raises(ValueError, match="no holdout"):
        pipeline.build_eval_dataset(_config(), batch_size=4)
    with pytest.raises(ValueError, match="unknown eval split 'test'.*holdout, all"):
        pipeline.build_eval_dataset(_config(), split="test", batch_size=4)


# ---------------------------------------------------------------- config


def test_unknown_config_keys_are_named_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown keys \['shuffle_bufer'\].*shuffle_buffer"):
        pipeline.build_train_dataset(_config(shuffle_bufer=10), batch_size=2, seed=0)
    with pytest.raises(ValueError, match=r"'holdout' has unknown keys \['fraction'\]"):
        pipeline.build_train_dataset(_config(holdout={"fraction": 0.1}), batch_size=2, seed=0)


def test_config_dict_works_like_a_dict():
    config = ml_collections.ConfigDict(_config())
    config.lock()
    batch = _take(pipeline.build_train_dataset(config, batch_size=2, seed=0), 1)[0]
    assert batch["image"].shape == (2, 16, 16, 3)


def test_a_glob_matching_nothing_fails_the_build():
    with pytest.raises(FileNotFoundError, match="nothing-here-"):
        pipeline.build_train_dataset(_config(data={"files": "/nonexistent/nothing-here-*.tfrecord"}),
                                     batch_size=2, seed=0)


def test_pp_without_fixed_size_image_is_explained():
    with pytest.raises(ValueError, match="pp_train must produce a fixed-size image"):
        pipeline.build_train_dataset(_config(pp_train='decode|coyo_labels("top1")'),
                                     batch_size=2, seed=0)
