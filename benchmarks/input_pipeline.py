"""Input-pipeline throughput per CPU core on img2dataset shards, against plain JPEG decoding.

    python -m benchmarks.input_pipeline --out /tmp/input_pipeline.json
    python -m benchmarks.input_pipeline --shards '/data/coyo/0000*.tfrecord' --repeat 1
    python -m benchmarks.input_pipeline --compare_exact --upscale 2 --repeat 5   # larger JPEGs
    git worktree add /tmp/base HEAD~1 && python -m benchmarks.input_pipeline --baseline /tmp/base

The shards (default: the real img2dataset fixture, 145 images, linked `--repeat` times into a
temporary directory so one pass is long enough to time) go through, in each round:

  * `decode`: read the records, parse `jpg`, full `tf.io.decode_jpeg` - the reference rate;
  * `train`: input_pipeline.build_train_dataset with the pretraining recipe's pp_train
    (configs/coyo_pretrain.py: crop-window JPEG decode, at reduced DCT scale for windows at
    least twice the output, inception crop to 224, flip, 21,841-class threshold labels),
    batched like training;
  * `crop_only` (with --compare_crop_only): the recipe's crop op alone (crop-window decode,
    resize to the training size), batched: the bound for the train pipeline with this crop;
    and `crop_decode`, the same crop windows decoded and not resized, which splits that bound
    into decoding and resizing;
  * `train_full_decode` (with --compare_full_decode): the same pipeline with the crop taken after
    a full decode (`decode|inception_crop(...)`), i.e. without the crop-window optimisation;
  * `eval`: input_pipeline.build_eval_dataset with the recipe's pp_eval (decode, at 1/2 DCT
    scale for images at least twice the resize, resize-small 256, central crop 224) over one
    pass of the same records;
  * `train_exact`, `eval_exact` (with --compare_exact): the same with `exact=True` on the
    recipe's decoding ops, i.e. every JPEG decoded at full scale (the pixels of before
    reduced-scale decoding).

With `--upscale N`, every image of the shards is first re-encoded at N x its width and height
(PIL bicubic, JPEG quality 90) into temporary shards, the other features kept: larger JPEGs than
COYO's <= 512px downloads, for users who download with other arguments.

With `--baseline DIR` (another checkout of this repository), `train` and `eval` are also built
from that checkout's `input_pipeline` and `configs` packages, in the same process and rounds (the
two alternate their order), and the per-round ratios this tree / baseline are reported: on a
shared machine, rates of separate runs drift by several percent, paired rounds much less.

All of them run on the same `--threads` (tf.data private thread pool, intra-op parallelism 1).
Per core means records per CPU-second of this process (time.process_time over all its
threads), which other processes' load barely changes, unlike wall-clock rates; wall-clock
records/s are reported next to it. Rounds alternate the pipelines and medians are reported. Rates count RECORDS consumed per
second (the train pipeline drops images whose labels are all below the threshold; the records
were decoded all the same), so the train/decode ratio compares equal work. The consumer converts
each batch to numpy as the train loop does.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's C++ info logs would bury the table

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks import report

FIXTURE_SHARDS = (Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "coyo_shards"
                  / "shards" / "*.tfrecord")


_PIPELINE_PACKAGES = ("input_pipeline", "configs")


class Checkout:
    """The pipeline packages (`input_pipeline`, `configs`) of one source tree, importable side by
    side with this one's. Inside `with checkout.active():` imports of those packages resolve to
    the tree's copy (anything else they import, such as `coyo_vit`, still comes from this tree);
    datasets built there keep working after the block, since a built tf.data graph no longer
    needs the Python modules. root None is this tree."""

    def __init__(self, root: str | None):
        self.root = None if root is None else os.path.abspath(root)
        if self.root is not None and not os.path.isfile(
                os.path.join(self.root, "input_pipeline", "pipeline.py")):
            raise ValueError(f"{root!r} is not a checkout of this repository (no "
                             f"input_pipeline/pipeline.py); make one with `git worktree add DIR "
                             f"COMMIT`")
        self._modules: dict[str, Any] = {}

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        if self.root is None:
            yield
            return
        ours = _pop_pipeline_modules()
        sys.modules.update(self._modules)
        sys.path.insert(0, self.root)
        completed = False
        try:
            yield
            self._check_origin()
            completed = True
        finally:
            theirs = _pop_pipeline_modules()
            sys.modules.update(ours)
            sys.path.remove(self.root)
            self._modules = theirs if completed else {}  # never reuse half-imported modules

    def _check_origin(self) -> None:
        """Every pipeline module imported in the block must come from this checkout's files."""
        for name, module in sys.modules.items():
            path = getattr(module, "__file__", None)
            if (name.split(".")[0] in _PIPELINE_PACKAGES and path
                    and not os.path.abspath(path).startswith(self.root + os.sep)):
                raise RuntimeError(f"--baseline: {name} was imported from {path}, not from "
                                   f"{self.root}")


def _pop_pipeline_modules() -> dict[str, Any]:
    """Takes the pipeline packages' modules out of sys.modules and returns them."""
    names = [n for n in sys.modules if n.split(".")[0] in _PIPELINE_PACKAGES]
    return {n: sys.modules.pop(n) for n in names}


def configure_threads(threads: int) -> None:
    """TF's global pools to `threads` (a no-op if TF already started; the per-dataset options
    below are what bind the pipelines)."""
    try:
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    except RuntimeError:
        pass


def thread_options(threads: int) -> tf.data.Options:
    """Runs a whole tf.data graph on `threads` threads, one per op invocation."""
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
    return options


def repeated_shards(pattern: str, repeat: int, directory: str) -> list[str]:
    """Symlinks every shard `repeat` times into `directory` under distinct img2dataset-style
    names, so a pipeline sees `repeat` x the records without copying any bytes."""
    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no shard matches {pattern!r}")
    if repeat == 1:
        return files
    out = []
    for r in range(repeat):
        for i, path in enumerate(files):
            link = os.path.join(directory, f"{r * len(files) + i:05d}.tfrecord")
            os.symlink(os.path.abspath(path), link)
            out.append(link)
    return out


def count_records(files: Sequence[str]) -> int:
    from input_pipeline import sources  # late: --baseline swaps these modules per checkout
    return sources.count_records(list(files))


def recipe_input_config(files: Sequence[str], *, image_size: int, shuffle_buffer: int,
                        cycle_length: int, full_decode: bool = False, exact: bool = False
                        ) -> dict[str, Any]:
    """The pretraining recipe's input section, pointed at `files`, with a benchmark-sized shuffle
    buffer (the recipe's 250k records would hold the whole repeated fixture many times over).
    exact: `exact=True` added to the recipe's decoding ops (full-scale JPEG decoding)."""
    from configs import coyo_pretrain  # late: --baseline swaps these modules per checkout
    recipe = coyo_pretrain.get_config(f"res={image_size}")
    config = recipe.input.to_dict()
    config["data"] = {"files": list(files)}
    config["holdout"] = {"files": 0, "examples": 0}
    config["shuffle_buffer"] = shuffle_buffer
    config["cycle_length"] = cycle_length
    if full_decode:
        head, rest = config["pp_train"].split("|", 1)
        if not head.startswith("decode_jpeg_and_inception_crop("):
            raise ValueError(f"unexpected recipe pp_train {config['pp_train']!r}")
        config["pp_train"] = f"decode|inception_crop{head[len('decode_jpeg_and_inception_crop'):]}|{rest}"
    if exact:
        config["pp_train"] = _with_exact(config["pp_train"], "decode_jpeg_and_inception_crop")
        config["pp_eval"] = _with_exact(config["pp_eval"], "decode_and_resize_small")
    return config


def _with_exact(pp: str, op: str) -> str:
    """`pp` with `exact=True` added to the arguments of its first `op(...)` (no nested parens)."""
    start = pp.find(f"{op}(")
    end = pp.find(")", start)
    if start < 0 or end < 0 or "exact" in pp[start:end]:
        raise ValueError(f"--compare_exact: expected one {op}(...) without exact in the recipe's "
                         f"pp, got {pp!r}")
    return f"{pp[:end]}, exact=True{pp[end:]}"


def upscaled_shards(pattern: str, factor: int, directory: str) -> str:
    """Writes every shard of `pattern` into `directory` with each image re-encoded at `factor` x
    its size (PIL bicubic, JPEG quality 90; `width`/`height` updated); bytes PIL cannot read
    (damaged records) are kept as they are. Returns the new shards' glob."""
    import io

    from PIL import Image

    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no shard matches {pattern!r}")
    for path in files:
        with tf.io.TFRecordWriter(os.path.join(directory, os.path.basename(path))) as writer:
            for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
                example = tf.train.Example.FromString(record)
                feature = example.features.feature
                try:
                    with Image.open(io.BytesIO(feature["jpg"].bytes_list.value[0])) as image:
                        image = image.convert("RGB")
                        image = image.resize((image.width * factor, image.height * factor),
                                             Image.BICUBIC)
                except (OSError, ValueError, IndexError):
                    writer.write(record)
                    continue
                buffer = io.BytesIO()
                image.save(buffer, "JPEG", quality=90)
                feature["jpg"].bytes_list.value[0] = buffer.getvalue()
                for key, value in (("width", image.width), ("height", image.height)):
                    if key in feature:
                        feature[key].int64_list.value[:] = [value]
                writer.write(example.SerializeToString())
    return os.path.join(directory, "*" + os.path.splitext(files[0])[1])


def decode_dataset(files: Sequence[str], batch: int, cycle_length: int) -> tf.data.Dataset:
    """Records -> `jpg` -> full tf.io.decode_jpeg, read like the train pipeline reads them.

    Each decoded image is reduced to its size (which needs the decode to have run), so the
    reference pays for decoding and nothing else: no resize, no batching of pixels.
    """
    def decode(serialized: tf.Tensor) -> tf.Tensor:
        return tf.size(tf.io.decode_jpeg(_jpeg_bytes(serialized), channels=3), out_type=tf.int64)

    ds = _interleaved_records(files, cycle_length).map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.ignore_errors()  # damaged JPEGs (real shards have some) are skipped, as in training
    return ds.batch(batch).prefetch(2)


def crop_only_dataset(files: Sequence[str], batch: int, cycle_length: int, image_size: int
                      ) -> tf.data.Dataset:
    """Records -> `jpg` -> the recipe's `decode_jpeg_and_inception_crop(image_size, area_min=5)`
    alone, batched: the bound for a pipeline with this crop, read like `decode_dataset`. None of
    the training pipeline's bookkeeping (damage checks and skip counts, labels, flip, shuffle).
    """
    from input_pipeline import registry  # late: --baseline swaps these modules per checkout
    crop = registry.get("decode_jpeg_and_inception_crop")(image_size, area_min=5)
    return _seeded_records(files, batch, cycle_length,
                           lambda jpg, rng: crop({"jpg": jpg, "rng": rng})["image"])


def crop_decode_dataset(files: Sequence[str], batch: int, cycle_length: int
                        ) -> tf.data.Dataset:
    """`crop_only_dataset`'s crop windows (same seeds, the recipe's area_min=5) decoded with
    tf.image.decode_and_crop_jpeg and reduced to their size: crop_only minus the resize."""
    from input_pipeline import ops_image  # late: --baseline swaps these modules per checkout
    def decode_window(jpg: tf.Tensor, rng: tf.Tensor) -> tf.Tensor:
        # The crop op's own seed derivation, so the windows are crop_only's.
        op_seed = ops_image.op_seed({"rng": rng}, "decode_jpeg_and_inception_crop")
        window = ops_image.jpeg_crop_window(jpg, op_seed, area_min=5, area_max=100)
        return tf.size(tf.image.decode_and_crop_jpeg(jpg, window, channels=3), out_type=tf.int64)

    return _seeded_records(files, batch, cycle_length, decode_window)


def _seeded_records(files: Sequence[str], batch: int, cycle_length: int,
                    fn: Callable[[tf.Tensor, tf.Tensor], tf.Tensor]) -> tf.data.Dataset:
    """fn(jpg bytes, rng) of every record, read like `decode_dataset`, with the example seed the
    train pipeline would give the record's position; records where fn fails are skipped."""
    seed = tf.constant([0, 0], tf.int64)

    def per_record(index: tf.Tensor, serialized: tf.Tensor) -> tf.Tensor:
        return fn(_jpeg_bytes(serialized), tf.random.experimental.stateless_fold_in(seed, index))

    ds = _interleaved_records(files, cycle_length).enumerate()
    ds = ds.map(per_record, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.ignore_errors().batch(batch).prefetch(2)


def _interleaved_records(files: Sequence[str], cycle_length: int) -> tf.data.Dataset:
    """The files' serialized records, interleaved like the train pipeline reads them."""
    return tf.data.Dataset.from_tensor_slices(list(files)).interleave(
        tf.data.TFRecordDataset, cycle_length=min(cycle_length, len(files)), block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _jpeg_bytes(serialized: tf.Tensor) -> tf.Tensor:
    """An img2dataset record's `jpg` bytes."""
    return tf.io.parse_single_example(serialized, {"jpg": tf.io.FixedLenFeature([], tf.string)})["jpg"]


def time_batches(batches: Iterator[dict[str, np.ndarray] | np.ndarray], num_batches: int,
                 records_of: Callable[[Any], int]) -> dict[str, float]:
    """Pulls one untimed batch (start-up, shuffle-buffer fill), then times up to `num_batches`."""
    first = next(batches)
    del first
    records, images = 0, 0
    started, cpu_started = time.perf_counter(), time.process_time()
    for _ in range(num_batches):
        try:
            batch = next(batches)
        except StopIteration:
            break
        records += records_of(batch)
        images += len(batch["image"]) if isinstance(batch, dict) else len(batch)
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    return {"records": records, "images": images, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "records_per_s": records / seconds if seconds > 0 else float("nan"),
            "records_per_cpu_s": records / cpu_seconds if cpu_seconds > 0 else float("nan")}


def measure_round(files: list[str], args: argparse.Namespace, num_records: int, round_index: int = 0,
                  baseline: Checkout | None = None) -> dict[str, dict]:
    """One timing of each pipeline over about one pass of the (repeated) records. With a
    baseline, `train@baseline` and `eval@baseline` are timed next to `train` and `eval`, second
    when round_index is even and first when it is odd."""
    options = thread_options(args.threads)
    passes = max(num_records // args.batch - 1, 1)  # batches after the untimed first one
    ours = Checkout(None)
    out: dict[str, dict] = {}

    ds = decode_dataset(files, args.batch, args.cycle_length).with_options(options)
    out["decode"] = time_batches(ds.as_numpy_iterator(), passes, len)
    if args.compare_crop_only:
        ds = crop_decode_dataset(files, args.batch, args.cycle_length)
        out["crop_decode"] = time_batches(ds.with_options(options).as_numpy_iterator(), passes,
                                          len)
        ds = crop_only_dataset(files, args.batch, args.cycle_length, args.image_size)
        out["crop_only"] = time_batches(ds.with_options(options).as_numpy_iterator(), passes, len)

    def pair(name: str) -> list[tuple[str, Checkout]]:
        both = [(name, ours)] + ([(f"{name}@baseline", baseline)] if baseline else [])
        return both if round_index % 2 == 0 else both[::-1]

    variants = (pair("train") + ([("train_exact", ours)] if args.compare_exact else [])
                + ([("train_full_decode", ours)] if args.compare_full_decode else []))
    for name, checkout in variants:
        with checkout.active():
            from input_pipeline import pipeline  # late: --baseline swaps these modules per checkout
            config = recipe_input_config(files, image_size=args.image_size,
                                         shuffle_buffer=args.shuffle_buffer,
                                         cycle_length=args.cycle_length,
                                         full_decode=name == "train_full_decode",
                                         exact=name == "train_exact")
            ds = pipeline.build_train_dataset(config, batch_size=args.batch, seed=0)
        last_index = [-1]

        def consumed(batch: dict[str, np.ndarray], last=last_index) -> int:
            top = int(batch["_index"].max())
            n, last[0] = top - last[0], top
            return n

        iterator = ds.with_options(options).as_numpy_iterator()
        first = next(iterator)
        last_index[0] = int(first["_index"].max())
        out[name] = time_batches(_chain(first, iterator), passes, consumed)

    for name, checkout in pair("eval") + ([("eval_exact", ours)] if args.compare_exact else []):
        with checkout.active():
            from input_pipeline import pipeline  # late: --baseline swaps these modules per checkout
            config = recipe_input_config(files, image_size=args.image_size,
                                         shuffle_buffer=args.shuffle_buffer,
                                         cycle_length=args.cycle_length,
                                         exact=name == "eval_exact")
            ds = pipeline.build_eval_dataset(config, split="all", batch_size=args.batch)
        out[name] = time_batches(ds.with_options(options).as_numpy_iterator(), passes,
                                 lambda b: int(np.count_nonzero(b["_mask"])) or len(b["_mask"]))
    return out


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    """Puts back the batch that was taken to read the starting `_index`."""
    yield first
    yield from rest


def summarise(rounds: list[dict[str, dict]], threads: int) -> dict[str, Any]:
    """Median rates per pipeline, per core, and the per-round ratios to plain decoding.

    Per core is records per CPU-second of this process (all its threads: tf.data's and the
    consumer's). Unlike wall-clock rate / threads, it barely moves when other processes compete
    for the cores, so it is the figure to compare on a shared machine; the ratios use it too.
    """
    names = list(rounds[0])
    rates = {n: [r[n]["records_per_s"] for r in rounds] for n in names}
    cpu_rates = {n: [r[n]["records_per_cpu_s"] for r in rounds] for n in names}
    summary: dict[str, Any] = {
        "records_per_s": {n: report.median(v) for n, v in rates.items()},
        "records_per_s_per_thread": {n: report.median(v) / threads for n, v in rates.items()},
        "records_per_cpu_s": {n: report.median(v) for n, v in cpu_rates.items()},
        "records_per_s_rounds": rates,
        "records_per_cpu_s_rounds": cpu_rates,
    }
    for name in names:
        if name != "decode":
            ratios = [r[name]["records_per_cpu_s"] / r["decode"]["records_per_cpu_s"] for r in rounds]
            summary[f"{name}_over_decode"] = report.median(ratios)
            summary[f"{name}_over_decode_rounds"] = ratios
        if f"{name}@baseline" in names:  # per-round ratios of this tree's rate to the baseline's
            ratios = [r[name]["records_per_cpu_s"] / r[f"{name}@baseline"]["records_per_cpu_s"]
                      for r in rounds]
            summary[f"{name}_over_baseline"] = report.median(ratios)
            summary[f"{name}_over_baseline_rounds"] = ratios
    return summary


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.input_pipeline",
        description="Images/s per core of the pretraining and eval preprocessing on img2dataset "
                    "shards, against plain tf.io.decode_jpeg of the same JPEGs.")
    parser.add_argument("--shards", default=str(FIXTURE_SHARDS), help="glob of TFRecord shards")
    parser.add_argument("--repeat", type=int, default=20,
                        help="times each shard is repeated (symlinked) to lengthen one pass")
    parser.add_argument("--threads", type=int, default=1,
                        help="tf.data threads for every pipeline; figures are divided by this")
    parser.add_argument("--batch", type=int, default=64, help="batch size")
    parser.add_argument("--image_size", type=int, default=224, help="training/eval resolution")
    parser.add_argument("--shuffle_buffer", type=int, default=512, help="train shuffle buffer (records)")
    parser.add_argument("--cycle_length", type=int, default=16, help="shards read in parallel")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians reported")
    parser.add_argument("--compare_full_decode", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the train pipeline with a full decode before the crop")
    parser.add_argument("--compare_crop_only", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the recipe's crop op alone (crop-window decode, resize), "
                             "without the training pipeline's bookkeeping: the bound for it; and "
                             "the same crop windows decoded without the resize")
    parser.add_argument("--compare_exact", action=argparse.BooleanOptionalAction, default=False,
                        help="also time the train and eval pipelines with exact=True on the "
                             "recipe's decoding ops (full-scale JPEG decoding, no reduced DCT "
                             "scale)")
    parser.add_argument("--upscale", type=int, default=1, metavar="N",
                        help="re-encode every image at N x its size (PIL bicubic, JPEG quality "
                             "90) into temporary shards first: larger JPEGs than the shards'")
    parser.add_argument("--baseline", default=None, metavar="DIR",
                        help="another checkout of this repository (e.g. `git worktree add DIR "
                             "COMMIT`): its train and eval pipelines are timed in the same rounds "
                             "and the ratios this tree / baseline reported")
    parser.add_argument("--out", default=None, help="write the result as JSON to this path")
    return parser.parse_args(argv)


COLUMNS = [("pipeline", "pipeline"), ("records_per_s", "records/s (wall)"),
           ("per_core", "records per CPU-second"), ("over_decode", "x plain decode (per core)")]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    for name in ("threads", "batch", "repeat", "rounds", "upscale"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1")
    try:
        baseline = Checkout(args.baseline) if args.baseline else None
    except ValueError as e:
        raise SystemExit(f"--baseline: {e}") from None
    configure_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="coyo_vit_pipeline_bench_")
    try:
        shards = args.shards
        if args.upscale > 1:
            os.mkdir(os.path.join(tmp, "upscaled"))
            shards = upscaled_shards(shards, args.upscale, os.path.join(tmp, "upscaled"))
        files = repeated_shards(shards, args.repeat, tmp)
        num_records = count_records(files)
        rounds = []
        for i in range(args.rounds):
            rounds.append(measure_round(files, args, num_records, i, baseline))
            print(f"round {i + 1}/{args.rounds}: " + ", ".join(
                f"{k} {v['records_per_cpu_s']:.1f}/CPU-s" for k, v in rounds[-1].items()), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = summarise(rounds, args.threads)
    rows = [{"pipeline": name, "records_per_s": rate,
             "per_core": summary["records_per_cpu_s"][name],
             "over_decode": 1.0 if name == "decode" else summary[f"{name}_over_decode"]}
            for name, rate in summary["records_per_s"].items()]
    scaled = f" re-encoded at {args.upscale}x" if args.upscale > 1 else ""
    print(f"{num_records} records ({args.repeat} x {args.shards}{scaled}), {args.threads} thread(s), "
          f"batch {args.batch}, {args.image_size}px; medians of {args.rounds} rounds")
    print(report.table(rows, COLUMNS))
    for name in ("train", "eval"):
        if f"{name}_over_baseline" in summary:
            print(f"{name} / {name}@baseline ({args.baseline}), records per CPU-second: "
                  f"{summary[f'{name}_over_baseline']:.3f} (rounds "
                  + ", ".join(f"{r:.3f}" for r in summary[f"{name}_over_baseline_rounds"]) + ")")
    result = {"benchmark": "input_pipeline", "settings": vars(args), "num_records": num_records,
              **summary, "rounds": rounds}
    report.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
