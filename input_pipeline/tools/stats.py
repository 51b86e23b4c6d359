"""Label and image-size statistics of COYO metadata or shards, like the dataset card's.

    python -m input_pipeline.tools.stats /data/coyo/metadata               # the 128 metadata files
    python -m input_pipeline.tools.stats /data/coyo/shards --plots_dir plots/ --json stats.json

PATHS are parquet files (COYO metadata, or img2dataset's per-shard parquet, of which only
`status == "success"` rows count: those are the images in the shards), TFRecord shards
(img2dataset or our TFDS records), globs, or directories (their TFRecords if they hold any, else
their parquet files). Files are streamed in batches into fixed-size counters, so thousands of
files take no more memory than one.

Prints, as markdown:
- the threshold table of the COYO-Labeled-300M dataset card: for each threshold t, labels per image (average number of
  labels with probability >= t over the images that keep at least one; the column "all images"
  averages over every image), unique labels, and the share of images with at least one label.
  Comparisons are in float32, as `coyo_labels("threshold", t)` makes them;
- top-1 label statistics (the most frequent top-1 classes with their names, the top-1
  probability distribution);
- image sizes (width and height: stored sizes, and the original sizes where recorded).
With --plots_dir, writes top1_labels.png and image_sizes.png (needs matplotlib).
Rows with broken label lists (labels outside [0, 21841), lengths differing from the
probabilities) are counted and left out of the label statistics.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf

from coyo_vit import class_names
from input_pipeline import damage, sources

DEFAULT_THRESHOLDS = (0.0, 0.05, 0.10, 0.15, 0.20, 0.25)
MAX_SIZE = 1 << 16          # sizes are counted exactly up to this (larger ones in the last bin)
JOINT_BIN = 64              # pixels per bin of the joint width x height histogram
JOINT_BINS = 64             # up to 4096 px per side, larger ones in the last bin
TOP_CLASSES = 20
MAX_LABELS_COUNTED = 256    # label-list lengths are counted exactly up to this
SIZE_FIELDS = (("image", "width", "height"), ("original", "original_width", "original_height"))
_BATCH_ROWS = 65_536


@dataclasses.dataclass
class Batch:
    """Rows as flat arrays: labels/probs of all rows concatenated, with each row's length."""
    lengths: np.ndarray                  # int64 [n]
    labels: np.ndarray                   # int64 [sum(lengths)]
    probs: np.ndarray                    # float32 [sum(probs lengths)]
    prob_lengths: np.ndarray             # int64 [n]
    sizes: dict[str, np.ndarray]         # field -> int64 [n], -1 where unknown


class Stats:
    """Fixed-size counters that batches of rows are added to."""

    def __init__(self, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                 num_classes: int = damage.NUM_CLASSES):
        bad = [t for t in thresholds if not 0 <= t <= 1]
        if bad or not thresholds:
            raise ValueError(f"thresholds must be probabilities in [0, 1], got {list(thresholds)}")
        self.thresholds = tuple(float(t) for t in thresholds)
        self.num_classes = num_classes
        self.rows = 0                      # rows read
        self.broken = 0                    # rows with broken label lists (left out)
        self.without_labels = 0            # rows with an empty (or no) label list
        self.statuses: dict[str, int] = {}
        t = len(self.thresholds)
        self.kept = np.zeros(t, np.int64)
        self.label_total = np.zeros(t, np.int64)
        self.unique = np.zeros((t, num_classes), bool)
        self.top1 = np.zeros(num_classes, np.int64)
        self.top1_prob = np.zeros(101, np.int64)            # bins of 0.01
        self.list_lengths = np.zeros(MAX_LABELS_COUNTED + 1, np.int64)
        self.sizes = {f: np.zeros(MAX_SIZE, np.int64)
                      for _, w, h in SIZE_FIELDS for f in (w, h)}
        self.joint = {name: np.zeros((JOINT_BINS, JOINT_BINS), np.int64)
                      for name, _, _ in SIZE_FIELDS}

    @property
    def labelled_rows(self) -> int:
        return self.rows - self.broken

    def add(self, batch: Batch) -> None:
        n = len(batch.lengths)
        self.rows += n
        for field, values in batch.sizes.items():
            known = values[values >= 0]
            self.sizes[field] += np.bincount(np.minimum(known, MAX_SIZE - 1), minlength=MAX_SIZE)
        for name, w_field, h_field in SIZE_FIELDS:
            if w_field in batch.sizes and h_field in batch.sizes:
                w, h = batch.sizes[w_field], batch.sizes[h_field]
                both = (w >= 0) & (h >= 0)
                bins = (np.minimum(w[both] // JOINT_BIN, JOINT_BINS - 1) * JOINT_BINS
                        + np.minimum(h[both] // JOINT_BIN, JOINT_BINS - 1))
                self.joint[name] += np.bincount(bins, minlength=JOINT_BINS ** 2).reshape(
                    JOINT_BINS, JOINT_BINS)
        self._add_labels(batch)

    def _add_labels(self, batch: Batch) -> None:
        n = len(batch.lengths)
        row_of = np.repeat(np.arange(n), batch.lengths)
        out_of_range = (batch.labels < 0) | (batch.labels >= self.num_classes)
        broken = np.bincount(row_of[out_of_range], minlength=n) > 0
        broken |= batch.lengths != batch.prob_lengths
        self.broken += int(broken.sum())
        good_rows = ~broken
        good = good_rows[row_of]
        labels, probs, rows = batch.labels[good], batch.probs[good_rows[
            np.repeat(np.arange(n), batch.prob_lengths)]], row_of[good]
        lengths = batch.lengths[good_rows]
        self.without_labels += int((lengths == 0).sum())
        self.list_lengths += np.bincount(np.minimum(lengths, MAX_LABELS_COUNTED),
                                         minlength=MAX_LABELS_COUNTED + 1)
        for i, t in enumerate(self.thresholds):
            chosen = probs >= np.float32(t)
            self.label_total[i] += int(chosen.sum())
            self.kept[i] += int(np.count_nonzero(np.bincount(rows[chosen], minlength=n)))
            self.unique[i, labels[chosen]] = True
        if len(labels):
            # Top-1 = the label with the highest probability (the first, as COYO sorts them).
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])[lengths > 0]
            best = np.maximum.reduceat(probs, starts)
            counts = lengths[lengths > 0]
            is_best = np.flatnonzero(probs == np.repeat(best, counts))
            best_rows = rows[is_best]  # non-decreasing: keep the first best label of each row
            first = np.concatenate([[True], best_rows[1:] != best_rows[:-1]])
            self.top1 += np.bincount(labels[is_best[first]], minlength=self.num_classes)
            self.top1_prob += np.bincount(np.clip((best * 100).astype(np.int64), 0, 100),
                                          minlength=101)

    # ------------------------------------------------------------ results

    def threshold_rows(self) -> list[dict]:
        """One dict per threshold: labels per kept image, per image, unique labels, kept share."""
        n = max(self.labelled_rows, 1)
        return [{"threshold": t,
                 "labels_per_image": float(self.label_total[i] / max(self.kept[i], 1)),
                 "labels_per_image_all": float(self.label_total[i] / n),
                 "unique_labels": int(self.unique[i].sum()),
                 "images_kept": int(self.kept[i]),
                 "images_kept_share": float(self.kept[i] / n)}
                for i, t in enumerate(self.thresholds)]

    def size_summary(self) -> dict[str, dict]:
        summary = {}
        for field, counts in self.sizes.items():
            total = int(counts.sum())
            if not total:
                continue
            values = np.arange(MAX_SIZE)
            cumulative = np.cumsum(counts)
            quantile = lambda q: int(np.searchsorted(cumulative, q * total))  # noqa: E731
            nonzero = np.flatnonzero(counts)
            summary[field] = {"count": total, "mean": float((counts * values).sum() / total),
                              "min": int(nonzero[0]), "p5": quantile(0.05),
                              "median": quantile(0.5), "p95": quantile(0.95),
                              "max": int(nonzero[-1])}
        return summary

    def to_json(self, class_names: Sequence[str] | None = None) -> dict:
        top = np.argsort(-self.top1, kind="stable")[:TOP_CLASSES]
        return {"rows": self.rows, "broken_label_rows": self.broken,
                "rows_without_labels": self.without_labels, "statuses": self.statuses,
                "thresholds": self.threshold_rows(),
                "top1_classes": [{"index": int(c), "name": _name(class_names, c),
                                  "images": int(self.top1[c])} for c in top if self.top1[c]],
                "top1_distinct_classes": int((self.top1 > 0).sum()),
                "top1_prob_histogram": self.top1_prob.tolist(),
                "label_list_lengths": {str(k): int(v) for k, v in
                                       enumerate(self.list_lengths) if v},
                "sizes": self.size_summary()}

    def markdown(self, class_names: Sequence[str] | None = None) -> str:
        n = self.labelled_rows
        out = [f"{self.rows:,} rows" + (f" ({self.broken:,} with broken label lists left out)"
                                       if self.broken else "")]
        if self.statuses:
            out.append("img2dataset status: " + ", ".join(
                f"{k} {v:,}" for k, v in sorted(self.statuses.items())))
        out += ["", "| threshold | labels / image | unique labels | images kept | "
                    "labels / image (all images) |", "|---|---|---|---|---|"]
        for row in self.threshold_rows():
            out.append(f"| {row['threshold']:.2f} | {row['labels_per_image']:.2f} | "
                       f"{row['unique_labels']:,} | {100 * row['images_kept_share']:.2f}% | "
                       f"{row['labels_per_image_all']:.2f} |")
        out += ["", "labels / image: over the images that keep at least one label at that "
                    "threshold; images kept: share of all images."]
        if n and self.top1.any():
            out += ["", f"Top-1 labels: {int((self.top1 > 0).sum()):,} distinct classes; "
                        f"mean top-1 probability {self._mean_top1_prob():.3f}",
                    "", "| rank | class | name | images | share |", "|---|---|---|---|---|"]
            for rank, c in enumerate(np.argsort(-self.top1, kind="stable")[:TOP_CLASSES], 1):
                if self.top1[c]:
                    out.append(f"| {rank} | {c} | {_name(class_names, c)} | {self.top1[c]:,} | "
                               f"{100 * self.top1[c] / n:.2f}% |")
            lengths = {k: int(v) for k, v in enumerate(self.list_lengths) if v}
            out += ["", "Labels per row (list length: rows): " + ", ".join(
                f"{k}: {v:,}" for k, v in lengths.items())]
        sizes = self.size_summary()
        if sizes:
            out += ["", "| size | images | mean | min | 5% | median | 95% | max |",
                    "|---|---|---|---|---|---|---|---|"]
            for field, s in sizes.items():
                out.append(f"| {field} | {s['count']:,} | {s['mean']:.1f} | {s['min']} | "
                           f"{s['p5']} | {s['median']} | {s['p95']} | {s['max']} |")
        return "\n".join(out)

    def _mean_top1_prob(self) -> float:
        centres = (np.arange(101) + 0.5) / 100
        return float((self.top1_prob * centres).sum() / max(self.top1_prob.sum(), 1))

    # ------------------------------------------------------------ plots

    def plot(self, plots_dir: str, class_names: Sequence[str] | None = None) -> list[str]:
        """Writes top1_labels.png and image_sizes.png; returns their paths."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise ImportError("--plots_dir needs matplotlib: pip install matplotlib "
                              "(or pip install 'coyo_vit[data]')") from None
        tf.io.gfile.makedirs(plots_dir)
        written = []
        top = [c for c in np.argsort(-self.top1, kind="stable")[:TOP_CLASSES] if self.top1[c]]
        fig, ax = plt.subplots(figsize=(10, 0.35 * max(len(top), 4) + 1.5))
        ax.barh(range(len(top)), [self.top1[c] for c in top][::-1] if top else [])
        ax.set_yticks(range(len(top)),
                      [f"{_name(class_names, c)[:40]} ({c})" for c in top][::-1])
        ax.set_xlabel("images whose top-1 label is the class")
        ax.set_title(f"Top-1 label distribution ({self.labelled_rows:,} images, "
                     f"{int((self.top1 > 0).sum()):,} distinct classes)")
        fig.tight_layout()
        written.append(_save(fig, plt, os.path.join(plots_dir, "top1_labels.png")))

        names = [name for name, _, _ in SIZE_FIELDS if self.joint[name].any()]
        columns = max(len(names), 1)
        fig, axes = plt.subplots(2, columns, figsize=(6 * columns, 9), squeeze=False)
        for column, (name, w_field, h_field) in enumerate(
                f for f in SIZE_FIELDS if f[0] in names):
            joint = self.joint[name]
            used = max(np.flatnonzero(joint.any(1)).max(), np.flatnonzero(joint.any(0)).max()) + 1
            extent = [0, JOINT_BIN * used, 0, JOINT_BIN * used]
            ax = axes[0][column]
            image = ax.imshow(np.log1p(joint[:used, :used].T), origin="lower", extent=extent,
                              cmap="viridis")
            ax.set_xlabel("width (px)")
            ax.set_ylabel("height (px)")
            ax.set_title(f"{name} sizes ({int(joint.sum()):,} images)")
            fig.colorbar(image, ax=ax, label="log(1 + images)")
            ax = axes[1][column]
            edges = np.arange(0, JOINT_BIN * used + 1, JOINT_BIN)
            for field in (w_field, h_field):
                counts = np.add.reduceat(self.sizes[field][:edges[-1]], edges[:-1])
                ax.stairs(counts, edges, label=field)
            ax.set_xlabel("pixels")
            ax.set_ylabel("images")
            ax.legend()
        fig.tight_layout()
        written.append(_save(fig, plt, os.path.join(plots_dir, "image_sizes.png")))
        return written


def _save(fig, plt, path: str) -> str:
    with tf.io.gfile.GFile(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return path


def _name(class_names: Sequence[str] | None, index: int) -> str:
    return class_names[index] if class_names is not None and index < len(class_names) else ""


# ------------------------------------------------------------------ readers


def expand_paths(paths: Sequence[str]) -> tuple[list[str], list[str]]:
    """(tfrecord files, parquet files) named by paths, globs and directories."""
    tfrecords, parquets = [], []
    for path in paths:
        if tf.io.gfile.isdir(path):
            try:
                tfrecords += sources.list_files(path)
            except FileNotFoundError:
                parquets += sources.list_parquet_files(path)
        elif path.endswith(".parquet") or tf.io.gfile.glob(path) and all(
                p.endswith(".parquet") for p in tf.io.gfile.glob(path)):
            parquets += sources.list_parquet_files(path)
        else:
            tfrecords += sources.list_files(path)
    return sorted(set(tfrecords)), sorted(set(parquets))


def parquet_rows(path: str) -> int:
    """Rows of a parquet file, from its footer."""
    return sources.open_parquet(path).metadata.num_rows


def parquet_batches(path: str, stats: Stats) -> Iterator[tuple[int, Batch]]:
    """(rows read, batch) over a metadata or img2dataset parquet file: failed img2dataset rows
    are counted in stats.statuses and left out of the batch, but not out of the rows read, which
    is what the progress bar's total (the files' row counts) counts too."""
    import pyarrow as pa
    import pyarrow.compute as pc

    parquet = sources.open_parquet(path)
    present = set(parquet.schema_arrow.names)
    wanted = ["labels", "label_probs", "status"] + [f for _, w, h in SIZE_FIELDS for f in (w, h)]
    columns = [c for c in wanted if c in present]
    for batch in parquet.iter_batches(batch_size=_BATCH_ROWS, columns=columns):
        table = pa.Table.from_batches([batch])
        read = table.num_rows
        if "status" in present:
            status = table.column("status")
            for item in pc.value_counts(status).to_pylist():
                key = str(item["values"])
                stats.statuses[key] = stats.statuses.get(key, 0) + int(item["counts"])
            table = table.filter(pc.equal(status, "success"))
        yield read, _arrow_batch(table)


def _arrow_batch(table) -> Batch:
    import pyarrow.compute as pc

    n = table.num_rows

    def lists(name: str, dtype) -> tuple[np.ndarray, np.ndarray]:
        if name not in table.column_names:
            return np.zeros(n, np.int64), np.zeros(0, dtype)
        column = table.column(name).combine_chunks()
        lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy().astype(np.int64)
        values = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(dtype)
        return lengths, values

    lengths, labels = lists("labels", np.int64)
    prob_lengths, probs = lists("label_probs", np.float32)
    sizes = {}
    for _, w, h in SIZE_FIELDS:
        for f in (w, h):
            if f in table.column_names:
                sizes[f] = pc.fill_null(table.column(f), -1).to_numpy().astype(np.int64)
    return Batch(lengths, labels, probs, prob_lengths, sizes)


def tfrecord_batches(files: Sequence[str]) -> Iterator[Batch]:
    """Batches of TFRecord shards; records that do not parse, and the unreadable rest of a
    damaged file, are skipped (python -m input_pipeline.tools.validate_shards counts those)."""
    size_names = [f for _, w, h in SIZE_FIELDS for f in (w, h)]
    spec = {"labels": tf.io.RaggedFeature(tf.int64),
            "label_probs": tf.io.RaggedFeature(tf.float32),
            **{f: tf.io.FixedLenFeature([], tf.int64, default_value=-1) for f in size_names}}
    ds = tf.data.Dataset.from_tensor_slices(list(files)).interleave(
        lambda p: tf.data.TFRecordDataset(p).ignore_errors(), cycle_length=1)
    ds = ds.map(lambda r: tf.io.parse_single_example(r, spec),
                num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
    ds = ds.ragged_batch(_BATCH_ROWS // 8).prefetch(2)
    for batch in ds:
        labels, probs = batch["labels"], batch["label_probs"]
        yield Batch(labels.row_lengths().numpy(), labels.flat_values.numpy(),
                    probs.flat_values.numpy(), probs.row_lengths().numpy(),
                    {f: batch[f].numpy() for f in size_names if (batch[f].numpy() >= 0).any()})


def compute(paths: Sequence[str], thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
            progress: bool = False) -> Stats:
    """Stats of everything PATHS name (see the module docstring)."""
    tfrecords, parquets = expand_paths(paths)
    stats = Stats(thresholds)
    total = sum(parquet_rows(p) for p in parquets) if parquets and not tfrecords else None
    bar = _progress(total, progress)
    for path in parquets:
        for read, batch in parquet_batches(path, stats):
            stats.add(batch)
            bar(read)
    if tfrecords:
        for batch in tfrecord_batches(tfrecords):
            stats.add(batch)
            bar(len(batch.lengths))
    bar(None)
    return stats


def _progress(total: int | None, enabled: bool):
    """A tqdm bar in rows (with rows/s); call with a row count, and None at the end."""
    from tqdm import tqdm

    bar = tqdm(total=total, unit=" rows", unit_scale=True, disable=not enabled, file=sys.stderr,
               smoothing=0.1)
    started = time.monotonic()

    def update(rows: int | None) -> None:
        if rows is None:
            bar.close()
            if enabled:
                elapsed = time.monotonic() - started
                rate = bar.n / max(elapsed, 1e-9)
                print(f"{bar.n:,} rows in {elapsed:.1f}s ({rate:,.0f} rows/s)", file=sys.stderr)
        else:
            bar.update(rows)

    return update


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m input_pipeline.tools.stats",
        description="Label and image-size statistics of COYO metadata parquet or shards.")
    parser.add_argument("paths", nargs="+", help="parquet/TFRecord files, globs or directories")
    parser.add_argument("--thresholds", default=",".join(str(t) for t in DEFAULT_THRESHOLDS),
                        help="comma-separated label probability thresholds")
    parser.add_argument("--plots_dir", help="write top1_labels.png and image_sizes.png here "
                                            "(needs matplotlib)")
    parser.add_argument("--json", help="write all statistics as JSON here")
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        thresholds = [float(t) for t in args.thresholds.split(",") if t.strip()]
    except ValueError:
        parser.error(f"--thresholds must be comma-separated numbers, got {args.thresholds!r}")
    if args.plots_dir:  # fail before a long scan, not after it
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plots_dir needs matplotlib: pip install matplotlib")
    stats = compute(args.paths, thresholds, progress=not args.no_progress)
    names = _class_names()
    print(stats.markdown(names))
    if args.json:
        with tf.io.gfile.GFile(args.json, "w") as f:
            json.dump(stats.to_json(names), f, indent=2)
    if args.plots_dir:
        for path in stats.plot(args.plots_dir, names):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _class_names() -> tuple[str, ...]:
    return class_names.load_class_list(class_names.IMAGENET21K).names


if __name__ == "__main__":
    sys.exit(main())
