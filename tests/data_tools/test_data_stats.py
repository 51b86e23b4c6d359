"""input_pipeline.tools.stats against an independent, plain-Python count of the same rows, and
input_pipeline.tools.join_labels (the other metadata-parquet tool) restoring labels exactly."""
from __future__ import annotations

import collections
import json
import shutil
import statistics
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from input_pipeline import sources
from input_pipeline.tools import join_labels, stats
from tests.conftest import SHARED

FIXTURES = SHARED / "fixtures" / "coyo_shards"
SHARDS = FIXTURES / "shards"
METADATA = FIXTURES / "metadata" / "part-00000.snappy.parquet"
THRESHOLDS = (0.0, 0.05, 0.10, 0.15, 0.20, 0.25)


def _success_rows() -> list[dict]:
    """The rows of the images inside the shards, from img2dataset's per-shard parquet."""
    return [r for p in sorted(SHARDS.glob("*.parquet")) for r in pq.read_table(p).to_pylist()
            if r["status"] == "success"]


def _expected(rows: list[dict]) -> dict:
    """The statistics computed the slow, obvious way."""
    table = []
    for t in THRESHOLDS:
        t32 = np.float32(t)
        chosen = [[label for label, p in zip(r["labels"], r["label_probs"]) if np.float32(p) >= t32]
                  for r in rows]
        kept = [c for c in chosen if c]
        table.append({"threshold": t,
                      "labels_per_image": sum(map(len, kept)) / max(len(kept), 1),
                      "labels_per_image_all": sum(map(len, kept)) / len(rows),
                      "unique_labels": len({label for c in chosen for label in c}),
                      "images_kept": len(kept),
                      "images_kept_share": len(kept) / len(rows)})
    top1 = collections.Counter(r["labels"][int(np.argmax(r["label_probs"]))] for r in rows
                               if r["labels"])
    sizes = {}
    for field in ("width", "height", "original_width", "original_height"):
        values = sorted(r[field] for r in rows if field in r and r[field] is not None)
        if values:
            sizes[field] = {"count": len(values), "min": values[0], "max": values[-1],
                            "mean": statistics.fmean(values),
                            "median": values[(len(values) - 1) // 2]}
    return {"table": table, "top1": top1, "sizes": sizes,
            "lengths": collections.Counter(len(r["labels"]) for r in rows)}


def _assert_matches(result: stats.Stats, expected: dict, rows: int) -> None:
    assert result.rows == rows and result.broken == 0
    for got, want in zip(result.threshold_rows(), expected["table"], strict=True):
        assert got == pytest.approx(want, rel=1e-12)
    summary = result.to_json()
    got_top1 = {c["index"]: c["images"] for c in summary["top1_classes"]}
    want_top1 = dict(expected["top1"].most_common())
    assert got_top1 == {c: want_top1[c] for c in got_top1}
    assert summary["top1_distinct_classes"] == len(want_top1)
    assert int(result.top1.sum()) == rows
    for field, want in expected["sizes"].items():
        got = summary["sizes"][field]
        assert {k: got[k] for k in want} == pytest.approx(want)
    assert {int(k): v for k, v in summary["label_list_lengths"].items()} == expected["lengths"]


def test_stats_of_the_fixture_shards_equal_a_count_from_their_parquet():
    rows = _success_rows()
    result = stats.compute([str(SHARDS)])  # the directory: its TFRecords
    _assert_matches(result, _expected(rows), 145)
    assert result.threshold_rows()[0]["labels_per_image"] == 50.0


def test_stats_of_the_shard_parquet_count_only_successful_rows():
    result = stats.compute([str(SHARDS / "*.parquet")])
    _assert_matches(result, _expected(_success_rows()), 145)
    all_rows = [r for p in sorted(SHARDS.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert result.statuses == dict(collections.Counter(r["status"] for r in all_rows))


def test_stats_of_the_metadata_equal_a_plain_count():
    rows = pq.read_table(METADATA).to_pylist()
    _assert_matches(stats.compute([str(METADATA)]), _expected(rows), len(rows))


def test_many_small_files_give_the_same_stats_as_one(tmp_path):
    table = pq.read_table(METADATA)
    for i, start in enumerate(range(0, table.num_rows, 7)):
        pq.write_table(table.slice(start, 7), tmp_path / f"part-{i:05d}.parquet")
    assert len(list(tmp_path.glob("*.parquet"))) == 35
    split, whole = stats.compute([str(tmp_path)]), stats.compute([str(METADATA)])
    assert split.to_json() == whole.to_json()
    np.testing.assert_array_equal(split.unique, whole.unique)
    assert all(v.nbytes == whole.sizes[k].nbytes for k, v in split.sizes.items())


def test_broken_label_rows_are_counted_and_left_out(tmp_path):
    rows = pq.read_table(METADATA).to_pylist()[:20]
    rows[3]["labels"] = [21841] + rows[3]["labels"][1:]     # outside the class range
    rows[7]["label_probs"] = rows[7]["label_probs"][:10]    # 50 labels, 10 probabilities
    rows[9]["labels"], rows[9]["label_probs"] = [], []      # no labels: kept, counted
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(METADATA)),
                   tmp_path / "broken.parquet")
    result = stats.compute([str(tmp_path / "broken.parquet")])
    assert (result.rows, result.broken, result.without_labels) == (20, 2, 1)
    good = [r for i, r in enumerate(rows) if i not in (3, 7)]
    want = _expected(good)["table"]
    for got, expected in zip(result.threshold_rows(), want):
        assert got == pytest.approx(expected)


def test_cli_prints_the_threshold_table_and_writes_json_and_plots(tmp_path, capsys):
    args = [str(SHARDS), "--json", str(tmp_path / "stats.json"), "--no_progress"]
    try:
        import matplotlib  # noqa: F401  (optional: the plots need it)
        has_matplotlib = True
    except ImportError:
        has_matplotlib = False
    if has_matplotlib:
        assert stats.main(args + ["--plots_dir", str(tmp_path / "plots")]) == 0
        for name in ("top1_labels.png", "image_sizes.png"):
            assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        with pytest.raises(SystemExit):
            stats.main(args + ["--plots_dir", str(tmp_path / "plots")])
        assert "needs matplotlib: pip install matplotlib" in capsys.readouterr().err
        assert stats.main(args) == 0
    out = capsys.readouterr().out
    assert "| threshold | labels / image | unique labels | images kept |" in out
    assert "| 0.00 | 50.00 |" in out and "| 1 | " in out
    assert "tabby, tabby cat" in out or "motorcycle, bike" in out  # named top-1 classes
    saved = json.loads((tmp_path / "stats.json").read_text())
    assert saved["rows"] == 145 and len(saved["thresholds"]) == len(THRESHOLDS)


def test_progress_reports_rows_per_second(capsys):
    stats.compute([str(METADATA)], progress=True)
    assert "243 rows in" in capsys.readouterr().err


def test_progress_reaches_its_total_on_per_shard_parquet(capsys):
    # img2dataset's parquet lists the failed downloads too (98 of 243 rows here): the bar once
    # counted only the successful rows against all rows and stopped at 60%.
    stats.compute([str(SHARDS / "*.parquet")], progress=True)
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert any(line.startswith("100%") and "243/243" in line for line in bar), bar[-3:]


# ------------------------------------------------------------------ join_labels (metadata tool)


@pytest.fixture(scope="module")
def unlabelled_shards(tmp_path_factory) -> Path:
    """The fixture shards as img2dataset writes them without --save_additional_columns."""
    root = tmp_path_factory.mktemp("unlabelled")
    for path in sorted(SHARDS.glob("*.tfrecord")):
        with tf.io.TFRecordWriter(str(root / path.name)) as writer:
            for record in tf.data.TFRecordDataset(str(path)):
                example = tf.train.Example.FromString(record.numpy())
                del example.features.feature["labels"]
                del example.features.feature["label_probs"]
                writer.write(example.SerializeToString())
        table = pq.read_table(path.with_suffix(".parquet")).drop_columns(["labels",
                                                                         "label_probs"])
        pq.write_table(table, root / f"{path.stem}.parquet")
        shutil.copy(SHARDS / f"{path.stem}_stats.json", root)
    return root


def _records_by_key(directory: Path) -> dict[str, tf.train.Example]:
    out = {}
    for path in sorted(directory.glob("*.tfrecord")):
        for record in tf.data.TFRecordDataset(str(path)):
            example = tf.train.Example.FromString(record.numpy())
            out[example.features.feature["key"].bytes_list.value[0].decode()] = example
    return out


def test_join_restores_every_label_exactly(unlabelled_shards, tmp_path):
    # Tiny buckets, flushes and row groups, so the join crosses all its boundaries.
    report = join_labels.join(sources.list_files(str(unlabelled_shards)), [str(METADATA)],
                              str(tmp_path / "out"), bucket_rows=50, flush_rows=40,
                              result_row_group=16)
    assert (report.buckets, report.labelled, report.unmatched, report.shard_records) == (
        5, 145, 0, 145)
    original, joined = _records_by_key(SHARDS), _records_by_key(tmp_path / "out")
    assert joined.keys() == original.keys()
    for key, example in joined.items():
        assert example == original[key]  # every feature, labels and float32 probs included
    for path in sorted(SHARDS.glob("*.parquet")):
        want = {r["key"]: r for r in pq.read_table(path).to_pylist() if r["status"] == "success"}
        got = {r["key"]: r for r in pq.read_table(tmp_path / "out" / path.name).to_pylist()}
        for key, row in want.items():
            assert got[key]["labels"] == row["labels"]
            assert np.array_equal(np.float32(got[key]["label_probs"]),
                                  np.float32(row["label_probs"]))
        assert (tmp_path / "out" / f"{path.stem}_stats.json").read_text() == (
            SHARDS / f"{path.stem}_stats.json").read_text()


def test_join_leaves_out_urls_missing_from_the_metadata_and_keeps_the_first_duplicate(
        unlabelled_shards, tmp_path, capsys):
    rows = pq.read_table(METADATA).to_pylist()
    shard_urls = {r["url"] for r in _success_rows()}
    dropped = sorted(shard_urls)[:4]
    kept = [r for r in rows if r["url"] not in dropped]
    first = next(r for r in kept if r["url"] in shard_urls)
    duplicate = dict(first, labels=list(reversed(first["labels"])))  # a later, different row
    pq.write_table(pa.Table.from_pylist(kept + [duplicate], schema=pq.read_schema(METADATA)),
                   tmp_path / "metadata.parquet")
    assert join_labels.main(["--shards", str(unlabelled_shards), "--metadata",
                             str(tmp_path / "metadata.parquet"), "--output_dir",
                             str(tmp_path / "out"), "--urls_from_records", "--no_progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["labelled"], report["unmatched"], report["duplicate_metadata_urls"]) == (
        141, 4, 1)
    original, joined = _records_by_key(SHARDS), _records_by_key(tmp_path / "out")
    urls = {k: e.features.feature["url"].bytes_list.value[0].decode()
            for k, e in original.items()}
    assert sorted(urls[k] for k in set(original) - set(joined)) == dropped
    assert all(joined[k] == original[k] for k in joined)  # the first row won
