"""The real training loop's images/s against the bare train step's, same model and batch.

    python -m benchmarks.end_to_end --out /tmp/end_to_end.json
    python -m benchmarks.end_to_end --steps 400 --log_every 50 --checkpoint_every 100

`coyo_vit.training.loop.run` trains the demo config (configs/demo.py, its own img2dataset shards)
in a temporary workdir: input pipeline, device prefetch, step, metric logging and orbax
checkpoints, all as in a real run. Its rate is read back from the loop's own metrics.jsonl
(`train/images_per_sec` of each log interval), leaving out the first interval, which holds the
compilation and the pipeline's start-up. The bare step is the same jit step of the same model,
optimizer and batch size on a synthetic batch already on the device, dispatched back to back.
The ratio (loop / bare) is the loop's overhead; on a CPU-only host the pipeline and the step
share the cores, so the ratio there also measures that contention (on an accelerator host the
step runs on the device instead).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the loop's input pipeline imports TF

import jax  # noqa: E402
import ml_collections  # noqa: E402
from flax import linen as nn  # noqa: E402

from benchmarks import accelerator, report  # noqa: E402
from configs import demo  # noqa: E402
from coyo_vit.models import Model, layers  # noqa: E402
from coyo_vit.training import optimizer, sharding  # noqa: E402
from coyo_vit.training.step import TrainState, get_loss, make_train_step, state_shardings  # noqa: E402
from input_pipeline import pp_parser  # noqa: E402


def loop_config(args: argparse.Namespace, data_dir: str) -> ml_collections.ConfigDict:
    """The demo config with the benchmark's steps, batch, logging and checkpoint cadence."""
    config = demo.get_config(str(args.steps))
    config.batch_size = args.batch
    config.log_every_steps = args.log_every
    config.checkpoint_every_steps = args.checkpoint_every
    config.eval_every_steps = args.eval_every
    config.demo_data.out_dir = data_dir
    config.demo_data.num_images = args.num_images
    if args.variant:  # a real ViT size in place of the demo's 4-block model
        config.model.update(variant=args.variant, patch_size=None, width=None, depth=None,
                            mlp_dim=None, num_heads=None)
    # The recipe's kind of training input (a crop decoded from the JPEG, flipped), whatever the
    # demo itself trains on, so the measured loop feeds what a COYO run feeds.
    labels = config.input.pp_eval.rsplit("|", 1)[1]
    config.input.pp_train = (f"decode_jpeg_and_inception_crop({args.image_size}, area_min=50)|"
                             f"flip_lr|{labels}")
    config.input.pp_eval = f"decode|resize({args.image_size})|{labels}"
    config.image_size = args.image_size
    # Short smoke runs: the demo's warmup must stay shorter than the run (no effect on speed).
    config.schedule.warmup_steps = min(config.schedule.warmup_steps, args.steps - 1)
    return config


def loop_rate(workdir: str, batch: int, log_every: int) -> dict[str, Any]:
    """Images/s of the loop over all log intervals but the first, from its metrics.jsonl.

    Each interval holds `log_every` steps; the overall rate is total images over total time,
    i.e. the harmonic mean of the interval rates (an average of rates would overweight the
    fast intervals).
    """
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rates = [(r["step"], r["train/images_per_sec"]) for r in rows if "train/images_per_sec" in r]
    if len(rates) < 2:
        raise ValueError(f"need at least 2 log intervals to leave out the first, got {len(rates)}: "
                         f"use more --steps or a smaller --log_every")
    timed = rates[1:]
    images, seconds, previous = 0, 0.0, rates[0][0]
    for step, rate in timed:
        n = (step - previous) * batch
        images, seconds, previous = images + n, seconds + n / rate, step
    return {"images_per_s": images / seconds, "interval_rates": [r for _, r in rates],
            "timed_steps": images // batch}


def run_loop(config: ml_collections.ConfigDict, workdir: str) -> tuple[dict[str, Any], TrainState]:
    """One full run of the real loop in `workdir`; its rate and the final state."""
    from coyo_vit.training import loop as train_loop  # late: imports TensorFlow (the input pipeline)

    started = time.perf_counter()
    state = train_loop.run(config, workdir)
    wall = time.perf_counter() - started
    result = loop_rate(workdir, config.batch_size, config.log_every_steps)
    result["wall_s"] = wall
    return result, state


class BareStep:
    """The loop's own step (same model, optimizer, loss, batch, mesh) on a device-resident
    synthetic batch; built and compiled once, timed after every loop run.

    It starts from the state the loop returned (same shapes and shardings), which spares a
    second compilation of the initialiser: that alone takes ~10 s on a busy 2-core CPU.
    """

    def __init__(self, config: ml_collections.ConfigDict, state: TrainState, image_dtype: str):
        model = Model(num_classes=config.num_classes, **config.model)
        schedule = optimizer.make_schedule(config.schedule, config.total_steps)
        tx = optimizer.make_optimizer(config.optimizer, schedule)
        self._mesh = sharding.make_mesh(config.mesh)
        self._rules = sharding.rules_from_config(config.get("sharding_rules"))
        image_shape = (config.image_size, config.image_size, 3)
        with nn.logical_axis_rules(self._rules):
            _, shardings = state_shardings(model, tx, image_shape, self._mesh, self._rules)
        batch_sharding = sharding.batch_sharding(self._mesh)
        self._state = state
        self._step = make_train_step(model, tx, get_loss(config.loss), shardings, batch_sharding,
                                     schedule, grad_accum_steps=config.get("grad_accum_steps", 1))
        self._batch_size = config.batch_size

        batch = accelerator.synthetic_batch(
            accelerator.StepBench(batch=config.batch_size, image_size=config.image_size,
                                  num_classes=config.num_classes, seed=config.seed), batch_sharding)
        if image_dtype == "float32":  # the loop's pp ends in value_range: it sends floats
            batch["image"] = jax.device_put(layers.to_model_range(batch["image"]), batch_sharding)
        self._batch = batch

    def rate(self, steps: int, warmup: int) -> dict[str, float]:
        """`steps` dispatches back to back after `warmup` (the first call compiles)."""
        with jax.set_mesh(self._mesh), nn.logical_axis_rules(self._rules):
            state = self._state
            for _ in range(warmup):
                state, metrics = self._step(state, self._batch)
            jax.block_until_ready((state, metrics))
            started = time.perf_counter()
            for _ in range(steps):
                state, metrics = self._step(state, self._batch)
            jax.block_until_ready((state, metrics))
            seconds = time.perf_counter() - started
            self._state = state  # the old one was donated
        return {"images_per_s": steps * self._batch_size / seconds, "step_s": seconds / steps}


def pipeline_image_dtype(config: ml_collections.ConfigDict) -> str:
    """The image dtype the loop's train pipeline sends: float32 after a value_range op, else uint8
    (models/layers.py); the bare step gets the same, so both run the same compiled step."""
    return "float32" if "value_range" in pp_parser.op_names(config.input.pp_train) else "uint8"


def paired_ratios(loop: list[float], bare: list[float]) -> list[float]:
    """Each loop run's rate over the mean of the bare timings just before and after it.

    bare[i] is taken right after loop run i, so run i (i > 0) sits between bare[i-1] and
    bare[i]: pairing neighbours cancels most of a slow drift in a shared machine's load.
    """
    ratios = []
    for i, rate in enumerate(loop):
        neighbours = bare[max(i - 1, 0):i + 1]
        ratios.append(rate / (sum(neighbours) / len(neighbours)))
    return ratios


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.end_to_end",
        description="images/s of coyo_vit.training.loop.run on the demo config (pipeline, step, "
                    "logging, checkpoints) against the bare jit step of the same model and batch.")
    parser.add_argument("--steps", type=int, default=240, help="total steps of each loop run")
    parser.add_argument("--log_every", type=int, default=40, help="log interval (the first is not timed)")
    parser.add_argument("--checkpoint_every", type=int, default=80, help="checkpoint interval")
    parser.add_argument("--eval_every", type=int, default=0, help="holdout eval interval; 0 = off")
    parser.add_argument("--batch", type=int, default=64, help="global batch size")
    parser.add_argument("--variant", default="",
                        help="ViT variant in place of the demo's tiny model, e.g. Ti/16 (a step "
                             "that outweighs the pipeline, as on real runs); default: the demo's")
    parser.add_argument("--image_size", type=int, default=32,
                        help="training resolution (the demo's images are 64px)")
    parser.add_argument("--num_images", type=int, default=4096, help="images of the demo dataset")
    parser.add_argument("--bare_steps", type=int, default=100, help="timed steps of the bare step")
    parser.add_argument("--rounds", type=int, default=3,
                        help="loop runs, each followed by a bare-step timing; medians reported")
    parser.add_argument("--data_dir", default="",
                        help="where the demo shards are (re)used; default: a temporary directory")
    parser.add_argument("--out", default=None, help="write the result as JSON to this path")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.num_images <= 512:
        raise SystemExit("--num_images must exceed 512: the demo writes 512 images per shard and "
                         "holds one shard out for evaluation, so training needs a second one")
    tmp = tempfile.mkdtemp(prefix="coyo_vit_e2e_bench_")
    try:
        data_dir = args.data_dir or os.path.join(tmp, "demo_data")
        config = loop_config(args, data_dir)
        loops, bare, bare_step = [], [], None
        for i in range(args.rounds):
            workdir = os.path.join(tmp, f"run{i}")
            rate, state = run_loop(config, workdir)
            loops.append(rate)
            shutil.rmtree(workdir, ignore_errors=True)
            if bare_step is None:
                bare_step = BareStep(config, state, pipeline_image_dtype(config))
            bare.append(bare_step.rate(args.bare_steps, warmup=3))
            del state
            print(f"round {i + 1}/{args.rounds}: loop {loops[-1]['images_per_s']:.1f} images/s, "
                  f"bare step {bare[-1]['images_per_s']:.1f} images/s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    loop_ips = report.median([r["images_per_s"] for r in loops])
    bare_ips = report.median([r["images_per_s"] for r in bare])
    ratios = paired_ratios([r["images_per_s"] for r in loops], [r["images_per_s"] for r in bare])
    result = {
        "benchmark": "end_to_end", "settings": vars(args),
        "model": config.model.to_dict(), "image_size": config.image_size,
        "num_classes": config.num_classes, "devices": [d.device_kind for d in jax.devices()],
        "loop_images_per_s": loop_ips, "bare_images_per_s": bare_ips,
        "loop_over_bare": report.median(ratios), "loop_over_bare_rounds": ratios,
        "loop_runs": loops, "bare_runs": bare,
    }
    print(f"{args.variant or 'demo'} model, batch {args.batch}, {config.image_size}px, {jax.device_count()} "
          f"{jax.devices()[0].platform} device(s); medians of {len(loops)} loop runs, {len(bare)} bare "
          f"timings; the ratio is the median of each run over the bare timings next to it")
    print(report.table([{"what": "train_loop.run (pipeline, step, logging, checkpoints)", "ips": loop_ips,
                         "ratio": result["loop_over_bare"]},
                        {"what": "bare jit step, device-resident batch", "ips": bare_ips, "ratio": 1.0}],
                       [("what", "measured"), ("ips", "images/s"), ("ratio", "x bare step")]))
    report.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
