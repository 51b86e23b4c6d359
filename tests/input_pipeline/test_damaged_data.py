"""Damaged data, made from the real fixture shards: every case is skipped and counted by reason,
or in strict mode stops with the file and record index. Never a crash, never a wrong target.

Cases: a JPEG that does not decode, bytes that are not an image, a record without `labels`,
labels outside 0..21840, labels and probabilities of different lengths, an empty label list,
a TFRecord file truncated mid-record, a TFRecord file with a bad checksum.
"""
from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from input_pipeline import damage, pipeline, skip_accounting, sources
from input_pipeline.tools import validate_shards
from tests.conftest import REPO, SHARED

SHARDS = SHARED / "fixtures" / "coyo_shards" / "shards"
PP_TRAIN = 'decode_jpeg_and_inception_crop(16)|value_range(-1, 1)|coyo_labels("soft")'
PP_EVAL = 'decode|resize(16)|value_range(-1, 1)|coyo_labels("soft")'

# (name, validator reason, pipeline reason, how to damage a record)
RECORD_CASES = [
    ("undecodable_jpeg", "undecodable_image", "unreadable", {"jpg": "truncate"}),
    ("not_an_image", "not_an_image", "not_an_image", {"jpg": b"<html>404 not found</html>"}),
    ("missing_labels", "missing_labels", "no_labels", {"labels": None, "label_probs": None}),
    ("label_out_of_range", "label_out_of_range", "label_out_of_range", {"labels": [21841] * 50}),
    ("length_mismatch", "label_length_mismatch", "label_length_mismatch",
     {"label_probs": [0.5]}),
    ("empty_labels", "empty_labels", "no_labels", {"labels": [], "label_probs": []}),
]
FILE_CASES = [("truncated", "truncated_file"), ("bad_checksum", "bad_checksum")]


def _records(path: Path) -> list[bytes]:
    return [r.numpy() for r in tf.data.TFRecordDataset(str(path))]


def _key(record: bytes) -> str:
    return tf.train.Example.FromString(record).features.feature["key"].bytes_list.value[0].decode()


def _damage(record: bytes, changes: dict) -> bytes:
    example = tf.train.Example.FromString(record)
    features = example.features.feature
    for name, value in changes.items():
        if value is None:
            del features[name]
            continue
        if value == "truncate":
            value = [features[name].bytes_list.value[0][:1000]]  # JPEG headers, no image rows
        elif isinstance(value, bytes):
            value = [value]
        features[name].Clear()
        kind = {"jpg": "bytes_list", "label_probs": "float_list"}.get(name, "int64_list")
        getattr(features[name], kind).value.extend(value)
    return example.SerializeToString()


def _write(path: Path, records: list[bytes]) -> str:
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record)
    return str(path)


def _record_offsets(data: bytes) -> list[int]:
    offsets, position = [], 0
    while position < len(data):
        offsets.append(position)
        (length,) = struct.unpack("<Q", data[position:position + 8])
        position += 12 + length + 4
    return offsets


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> dict:
    """records.tfrecord: good, case 1, good, case 2, ... good; one file per case; and the two
    damaged files (truncated in record 3 of 5, bad checksum in record 2 of 5)."""
    root = tmp_path_factory.mktemp("damaged")
    good = _records(SHARDS / "00001.tfrecord")
    mixed = [good[0]]
    per_case = {}
    for i, (name, _, _, changes) in enumerate(RECORD_CASES):
        bad = _damage(good[1 + 2 * i], changes)
        mixed += [bad, good[2 + 2 * i]]
        per_case[name] = _write(root / f"{name}.tfrecord", [good[1 + 2 * i], bad, good[2]])
    files = {"mixed": _write(root / "records.tfrecord", mixed), **per_case}
    intact = Path(_write(root / "five.tfrecord", good[20:25])).read_bytes()
    offsets = _record_offsets(intact)
    (root / "truncated.tfrecord").write_bytes(intact[:offsets[3] + 50])
    corrupt = bytearray(intact)
    corrupt[offsets[2] + 12 + 100] ^= 0xFF  # a payload byte: the record's data checksum fails
    (root / "bad_checksum.tfrecord").write_bytes(bytes(corrupt))
    files["truncated"] = str(root / "truncated.tfrecord")
    files["bad_checksum"] = str(root / "bad_checksum.tfrecord")
    (root / "five.tfrecord").unlink()
    return {"root": root, "files": files, "mixed_good_keys": [_key(r) for r in mixed[::2]],
            "good": good}


def _config(files: str, **overrides) -> dict:
    config = {"data": {"files": files}, "pp_train": PP_TRAIN, "pp_eval": PP_EVAL,
              "shuffle_buffer": 1, "cycle_length": 1}
    config.update(overrides)
    return config


def _train(config: dict, examples: int, start_position: int = 0
           ) -> tuple[list[dict], skip_accounting.SkipCounter]:
    ds = pipeline.build_train_dataset(config, batch_size=1, seed=0, skip_counts=True,
                                      start_position=start_position)
    counter = skip_accounting.SkipCounter(start_position)
    batches = list(ds.take(examples).as_numpy_iterator())
    for batch in batches:
        counter.update(batch)
    return batches, counter


def _nonzero(counts: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in counts.items() if v}


# ------------------------------------------------------------------ validator


def test_validator_counts_every_case_by_its_reason(damaged):
    report = validate_shards.scan(sources.list_files(str(damaged["root"])))
    per_record = [fine for _, fine, _, _ in RECORD_CASES]
    expected = {reason: 2 for reason in per_record}  # in records.tfrecord and in its own file
    expected.update({"truncated_file": 1, "bad_checksum": 1})
    assert dict(report.counts) == expected
    assert report.examples["truncated_file"] == [(damaged["files"]["truncated"], 3)]
    assert report.examples["bad_checksum"] == [(damaged["files"]["bad_checksum"], 2)]
    mixed = damaged["files"]["mixed"]
    for i, reason in enumerate(per_record):
        assert (mixed, 1 + 2 * i) in report.examples[reason]
    assert report.coarse_counts()["no_labels"] == 4
    assert report.coarse_counts()["damaged_file"] == 2


def test_validator_strict_stops_at_the_first_with_file_and_index(damaged, capsys):
    mixed = damaged["files"]["mixed"]
    assert validate_shards.main(["--strict", "--no_progress", mixed]) == 1
    assert f"{mixed} record 1: undecodable_image" in capsys.readouterr().err
    with pytest.raises(validate_shards.DamagedRecord, match="record 2: bad_checksum"):
        validate_shards.scan([damaged["files"]["bad_checksum"]], strict=True)


def test_validator_passes_the_real_shards():
    report = validate_shards.scan(sources.list_files(str(SHARDS)))
    assert (report.records, report.usable, sum(report.counts.values())) == (145, 145, 0)


def test_validator_progress_into_a_pipe_is_whole_lines():
    # A log file or pipe once got one endless line of `\r`-separated updates.
    result = subprocess.run([sys.executable, "-m", "input_pipeline.tools.validate_shards",
                             "--no_decode", str(SHARDS)], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "\r" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith("4/4 files, 145 records, "), result.stderr


# ------------------------------------------------------------------ training, default mode


def test_training_skips_each_bad_record_and_counts_it_by_reason(damaged):
    good_keys = damaged["mixed_good_keys"]
    batches, counter = _train(_config(damaged["files"]["mixed"]), len(good_keys))
    assert [_key_of(b) for b in batches] == good_keys  # the good records, in order, no others
    np.testing.assert_array_equal([int(b["_index"][0]) for b in batches],
                                  np.arange(0, 2 * len(good_keys), 2))
    expected: dict[str, int] = {}
    for _, _, coarse, _ in RECORD_CASES:
        expected[coarse] = expected.get(coarse, 0) + 1
    assert _nonzero(counter.totals()) == expected
    assert counter.scalars()["data/skipped/no_labels"] == 2.0
    # The trainer's cheap count, the `_index` gaps, is the same total.
    gaps = int(batches[-1]["_index"][0]) + 1 - len(batches)
    assert sum(counter.totals().values()) == gaps == len(RECORD_CASES)


def test_skip_counts_survive_a_resume_exactly(damaged):
    config = _config(damaged["files"]["mixed"])
    total = len(damaged["mixed_good_keys"])
    _, uninterrupted = _train(config, total)
    first, before = _train(config, 3)
    position = int(first[-1]["_index"][0]) + 1
    ds = pipeline.build_train_dataset(config, batch_size=1, seed=0, skip_counts=True,
                                      start_position=position)
    after = skip_accounting.SkipCounter(position, restored=before.totals())
    for batch in ds.take(total - 3).as_numpy_iterator():
        after.update(batch)
    assert after.totals() == uninterrupted.totals()
    with pytest.raises(ValueError, match=r"unknown reasons \['bad_reason'\]"):
        skip_accounting.SkipCounter(0, restored={"bad_reason": 1})


@pytest.mark.parametrize("name", [c[0] for c in FILE_CASES])
def test_a_damaged_file_is_read_up_to_the_damage_then_counted_once(damaged, name):
    path = damaged["files"][name]
    readable = {"truncated": 3, "bad_checksum": 2}[name]
    keys = [_key(r) for r in damaged["good"][20:20 + readable]]
    # One epoch is the readable records plus the damage marker; then the next epoch starts.
    batches, counter = _train(_config(path), readable + 1)
    assert [_key_of(b) for b in batches[:readable]] == keys
    assert [int(b["_index"][0]) for b in batches] == list(range(readable)) + [readable + 1]
    assert _nonzero(counter.totals()) == {"damaged_file": 1}


def test_resume_over_a_truncated_file_counts_it_like_the_stream(damaged):
    path = damaged["files"]["truncated"]
    assert sources.count_file_records(path, allow_damaged=True) == 4  # 3 records + the damage
    with pytest.raises(ValueError, match="truncated"):
        sources.count_file_records(path)
    start = 4 * 10 + 1  # ten epochs later, one record in
    batches, _ = _train(_config(path), 2, start_position=start)
    assert [int(b["_index"][0]) for b in batches] == [start, start + 1]


def test_resume_over_a_bad_checksum_file_is_exact_with_the_epoch_counted_by_reading(damaged, tmp_path):
    # Its headers promise 5 records, the stream reads 2 and a damage marker. From the headers a
    # resume epochs later lands on the wrong records; with the epoch length counted by reading
    # (what the trainer passes once it has counted a damaged_file skip) the resumed stream is the
    # uninterrupted one.
    good = tmp_path / "good.tfrecord"
    good.write_bytes(Path(_write(tmp_path / "g.tfrecord", damaged["good"][30:40])).read_bytes())
    config = _config(f"{good},{damaged['files']['bad_checksum']}", cycle_length=2, shuffle_buffer=4)
    assert sources.count_file_records(damaged["files"]["bad_checksum"]) == 5
    assert sources.count_file_records(damaged["files"]["bad_checksum"], read_payloads=True) == 3
    start, n = 44, 8  # several epochs in (each: the good file, 2 records and the marker)
    uninterrupted, _ = _train(config, 60)
    want = [(int(b["_index"][0]), _key_of(b)) for b in uninterrupted
            if int(b["_index"][0]) >= start][:n]
    n_good = len(damaged["good"][30:40])
    assert pipeline.train_epoch_length(config) == n_good + 5  # the headers
    assert pipeline.train_epoch_length(config, read_payloads=True) == n_good + 3  # what is read
    for epoch_length, exact in ((None, False), (n_good + 3, True)):
        ds = pipeline.build_train_dataset(config, batch_size=1, seed=0, start_position=start,
                                          epoch_length=epoch_length)
        got = [(int(b["_index"][0]), _key_of(b)) for b in ds.take(n).as_numpy_iterator()]
        assert (got == want) == exact, epoch_length


def test_eval_leaves_damaged_records_out_as_padding(damaged):
    config = _config(str(damaged["root"] / "*.tfrecord"))
    batches = list(pipeline.build_eval_dataset(config, split="all", batch_size=64)
                   .as_numpy_iterator())
    files = sources.list_files(config["data"]["files"])
    assert len(batches) == -(-sources.count_records(files, allow_damaged=True) // 64)
    usable = len(damaged["mixed_good_keys"]) + 2 * len(RECORD_CASES) + 3 + 2
    assert sum(int(b["_mask"].sum()) for b in batches) == usable


def test_an_all_skipped_stream_raises_instead_of_spinning_forever(damaged, tmp_path):
    without_labels = [_damage(r, {"labels": None, "label_probs": None})
                      for r in damaged["good"][:10]]
    path = _write(tmp_path / "no_labels.tfrecord", without_labels)
    ds = pipeline.build_train_dataset(_config(path), batch_size=1, seed=0)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"whole epoch.*no_labels=20.*join_labels"):
        next(iter(ds))


def test_a_pp_that_fails_on_every_record_raises_before_training_instead_of_hanging(damaged):
    # Such records are dropped before the epoch guard sees them: the stream once spun forever.
    pp = 'decode|central_crop(4000)|coyo_labels("soft")'
    with pytest.raises(ValueError, match=r"pp_train failed on each of the first 32 records(.|\n)*"
                                         r"image is smaller than the crop"):
        pipeline.build_train_dataset(_config(str(SHARDS / "*.tfrecord"), pp_train=pp),
                                     batch_size=1, seed=0)
    # Fewer records than the probe reads, all failing: the same error, not a silent pass.
    with pytest.raises(ValueError, match=r"pp_train failed on each of the first 3 records"):
        pipeline.build_train_dataset(_config(damaged["files"]["undecodable_jpeg"], pp_train=pp),
                                     batch_size=1, seed=0)


# ------------------------------------------------------------------ training, strict mode


def _strict_errors(config: dict, steps: int) -> list[str]:
    """Messages of the errors met in `steps` calls of a strict pipeline's iterator (a strict
    run would stop at the first; reading on shows every case in one pipeline)."""
    iterator = iter(pipeline.build_train_dataset(config, batch_size=1, seed=0))
    errors = []
    for _ in range(steps):
        try:
            next(iterator)
        except tf.errors.InvalidArgumentError as e:
            errors.append(e.message)
    return errors


def test_strict_training_stops_at_each_damaged_record_naming_file_and_index(damaged):
    mixed = damaged["files"]["mixed"]
    errors = _strict_errors(_config(mixed, strict=True), 2 * len(RECORD_CASES) + 1)
    assert len(errors) == len(RECORD_CASES)
    for i, (error, (_, fine, _, _)) in enumerate(zip(errors, RECORD_CASES)):
        reason = damage.coarse_reason(fine)
        assert f"input.strict: {reason} in {mixed} record {1 + 2 * i} " in error


def test_strict_training_stops_at_a_damaged_file_naming_file_and_index(damaged):
    paths = [damaged["files"]["truncated"], damaged["files"]["bad_checksum"]]
    errors = _strict_errors(_config(",".join(paths), strict=True), 3 + 2 + 2)  # one epoch
    assert sorted(e[e.index("input.strict"):e.index(" (run")] for e in errors) == [
        f"input.strict: damaged_file in {paths[1]} record 2",
        f"input.strict: damaged_file in {paths[0]} record 3"]


def test_strict_mode_does_not_stop_for_a_label_mode_that_keeps_no_label():
    # threshold 0.99: no label qualifies. Not damage: skipped, then the epoch guard speaks.
    config = _config(str(SHARDS / "00001.tfrecord"), strict=True,
                     pp_train=PP_TRAIN.replace('"soft"', '"threshold", 0.99'))
    with pytest.raises(tf.errors.InvalidArgumentError, match="whole epoch"):
        next(iter(pipeline.build_train_dataset(config, batch_size=1, seed=0)))


def test_labels_are_checked_against_the_class_count_of_the_pps_label_op(damaged):
    # With coyo_labels(num_classes=N) below 21,841, a label in [N, 21841) once passed the check
    # and failed the op's assert: skipped as `unreadable`, or in strict mode reported as an
    # undecodable image.
    records = damaged["good"][:10]
    top = [max(tf.train.Example.FromString(r).features.feature["labels"].int64_list.value)
           for r in records]
    classes = sorted(top)[len(top) // 2]  # half the records have a label >= classes
    assert 0 < sum(t >= classes for t in top) < len(top)
    path = _write(damaged["root"] / "ten.tfrecord", records)
    pp = PP_TRAIN.replace('"soft"', f'"soft", num_classes={classes}')
    kept = sum(t < classes for t in top)
    batches, counter = _train(_config(path, pp_train=pp), kept)
    assert [_key_of(b) for b in batches] == [_key(r) for r, t in zip(records, top) if t < classes]
    last_kept = max(i for i, t in enumerate(top) if t < classes)  # counted up to it
    assert _nonzero(counter.totals()) == {
        "label_out_of_range": sum(t >= classes for t in top[:last_kept])}
    errors = _strict_errors(_config(path, pp_train=pp, strict=True), 1 + top.index(
        next(t for t in top if t >= classes)))
    assert errors and "input.strict: label_out_of_range in" in errors[0]


def test_a_holdout_of_examples_counts_a_truncated_file_like_the_stream(damaged, tmp_path):
    # holdout.examples counts records from the headers; a truncated file once raised there,
    # stopping training although damaged data is otherwise skipped and counted.
    truncated = tmp_path / "a_truncated.tfrecord"  # sorted first: the holdout starts in it
    truncated.write_bytes(Path(damaged["files"]["truncated"]).read_bytes())  # 3 good, then damage
    shard = tmp_path / "b_good.tfrecord"
    shard.write_bytes((SHARDS / "00001.tfrecord").read_bytes())
    config = _config(f"{truncated},{shard}", holdout={"examples": 2})
    batches, counter = _train(config, 3)
    assert [int(b["_index"][0]) for b in batches] == [0, 2, 3]  # the file's 3rd record, then the shard
    assert _nonzero(counter.totals()) == {"damaged_file": 1}
    held_out = list(pipeline.build_eval_dataset(config, split="holdout", batch_size=4)
                    .as_numpy_iterator())
    assert sum(int(b["_mask"].sum()) for b in held_out) == 2
    with pytest.raises(ValueError, match="truncated|past the end"):
        pipeline.build_train_dataset({**config, "strict": True}, batch_size=1, seed=0)


def test_strict_must_be_a_bool():
    with pytest.raises(ValueError, match="strict must be True or False, got 'yes'"):
        pipeline.InputConfig.from_config(_config("x", strict="yes"))


# ------------------------------------------------------------------ helpers


_KEYS_BY_LABELS: dict[tuple, str] = {}


def _key_of(batch: dict) -> str:
    """Record key of a one-example batch, from its soft-label fingerprint (50 labels)."""
    if not _KEYS_BY_LABELS:
        for record in _records(SHARDS / "00001.tfrecord"):
            labels = tf.train.Example.FromString(record).features.feature["labels"]
            _KEYS_BY_LABELS[tuple(sorted(set(labels.int64_list.value)))] = _key(record)
    return _KEYS_BY_LABELS[tuple(np.flatnonzero(batch["labels"][0]).tolist())]


def test_fixture_has_the_cases_it_claims(damaged):
    """Guards the fixture itself: each per-case file holds good, bad, good records."""
    for name, fine, _, _ in RECORD_CASES:
        records = _records(Path(damaged["files"][name]))
        assert [validate_shards.check_record(r) for r in records] == [None, fine, None]


# ------------------------------------------------------------------ the in-graph checks alone


def test_in_graph_image_check_agrees_with_the_python_one():
    real_jpeg = _records(SHARDS / "00000.tfrecord")[0]
    real_jpeg = tf.train.Example.FromString(real_jpeg).features.feature["jpg"].bytes_list.value[0]
    cases = [real_jpeg, b"\xff\xd8\xff", b"\xff\xd8", b"\x89PNG\r\n\x1a\n....", b"\x89PNG\r\n\x1a",
             b"GIF87a", b"GIF9", b"BM\x00\x00", b"B", b"RIFF\x00\x00\x00\x00WEBPVP8 ",
             b"RIFF\x00\x00\x00\x00WEBX", b"RIFF\x00\x00\x00\x00WEB", b"", b"\x00" * 20,
             b"<html>404</html>", b"xx\xff\xd8\xff"]
    for data in cases:
        want = damage.image_format(data) is not None
        assert bool(damage.looks_like_image(tf.constant(data))) == want, data[:16]
    assert sum(damage.image_format(d) is not None for d in cases) == 6  # both answers occur


def test_first_reason_is_the_first_condition_that_holds():
    yes, no = tf.constant(True), tf.constant(False)
    cases = [([(no, "no_image"), (yes, "not_an_image"), (yes, "damaged_file")], "not_an_image"),
             ([(yes, "no_labels"), (yes, "damaged_file")], "no_labels"),
             ([(no, "no_image"), (no, "excluded")], None), ([], None)]
    for conditions, want in cases:
        assert int(damage.first_reason(conditions)) == (damage.code(want) if want else 0)
