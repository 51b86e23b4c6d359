"""input_pipeline.stats against an independent, plain-Python count of the same rows."""
from __future__ import annotations

import collections
import json
import statistics
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from input_pipeline import stats

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "coyo_shards"
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
        import matplotlib  # noqa: F401
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
