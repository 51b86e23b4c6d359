"""Training-step throughput and MFU of a ViT on one accelerator, with synthetic data on the device.

    PYTHONPATH=. python -m benchmarks.accelerator --variant B/16 --batch 256 --dtype bfloat16 \
        --out /tmp/accel_b16.json
    PYTHONPATH=. python -m benchmarks.accelerator --variant L/16 --batch 128 --dtype bfloat16 \
        --out /tmp/accel_l16.json
    # CPU smoke run (MFU is n/a there):
    python -m benchmarks.accelerator --variant Ti/16 --batch 8 --image_size 32 --steps 2

It times the real jit step of coyo_vit.training.step (with donation, the recipe's AdamW, sigmoid
loss over 21,841 classes and pre-logits, from configs/coyo_pretrain.py) on a batch that lives on
the device, so the figure is the step alone: no input pipeline, no host-to-device copy. This
module must never import TensorFlow (the GPU host it runs on has none, and TF would reserve
accelerator memory); the result records whether it was imported.

MFU = model FLOPs per step / (step time x the chips' peak dense bf16 FLOP/s), with model FLOPs
from the analytic count in benchmarks/flops.py (forward MACs x 2 x 3, recomputation under remat
not counted). The peak comes from a table keyed by `jax.Device.device_kind`; CPUs report n/a.

The building blocks (`StepBench`, `build`, `compile_step`, `time_steps`) are also what
benchmarks/train_step.py runs, one configuration per subprocess, on the CPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from benchmarks import device_trace, report
from benchmarks import flops as flops_lib
from configs import coyo_pretrain
from coyo_vit.class_names import NUM_COYO_CLASSES
from coyo_vit.models import Model, count_params
from coyo_vit.models.vit import ATTENTION_IMPLS, REMAT_POLICIES
from coyo_vit.training import optimizer, sharding
from coyo_vit.training.step import (
    TrainState,
    compiler_options_for_platform,
    get_loss,
    init_state,
    make_train_step,
    state_shardings,
)

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class StepBench:
    """One benchmarked configuration: the model, its batch, and how long to time it."""

    variant: str = "B/16"
    batch: int = 256
    image_size: int = 224
    num_classes: int = NUM_COYO_CLASSES
    rep_size: int | None = 1024
    depth: int | None = None  # blocks; None = the variant's (fewer: quick smoke runs)
    dtype: str = "bfloat16"
    scan: bool = False
    remat_policy: str = "none"
    attention_impl: str = "auto"
    attention_pad_multiple: int | None = None  # None: the model's choice
    gelu_recompute: bool = True   # Model.gelu_recompute: tanh recomputed in the backward pass
    warmup: int = 3
    steps: int = 20
    repeats: int = 3
    latency_round: bool = True  # one more round with a host sync after every step
    seed: int = 0
    profile_dir: str | None = None  # after timing, trace `profile_steps` steps here
    profile_steps: int = 3
    dump_hlo: str | None = None  # write the optimized HLO of the step here (names the trace's kernels)


@dataclasses.dataclass
class Built:
    """Everything needed to compile and run the step, nothing allocated yet but the mesh."""

    model: Model
    mesh: jax.sharding.Mesh
    rules: Any
    abstract: TrainState
    shardings: TrainState
    batch_sharding: jax.sharding.NamedSharding
    step: Any  # the jitted train step (donates the state)
    tx: Any


def build(cfg: StepBench) -> Built:
    """The model, optimizer, loss and schedule of the pretraining recipe at the given sizes."""
    recipe = coyo_pretrain.get_config(
        f"variant={cfg.variant},batch={cfg.batch},res={cfg.image_size}")
    model_kwargs = dict(recipe.model.to_dict(), dtype=cfg.dtype, scan=cfg.scan,
                        remat_policy=cfg.remat_policy, attention_impl=cfg.attention_impl,
                        attention_pad_multiple=cfg.attention_pad_multiple,
                        gelu_recompute=cfg.gelu_recompute,
                        rep_size=cfg.rep_size)
    if cfg.depth:
        model_kwargs["depth"] = cfg.depth
    model = Model(num_classes=cfg.num_classes, **model_kwargs)
    schedule = optimizer.make_schedule(recipe.schedule, recipe.total_steps)
    tx = optimizer.make_optimizer(recipe.optimizer, schedule)
    mesh = sharding.make_mesh({"data": -1})
    rules = sharding.DEFAULT_RULES
    sharding.check_batch_size(cfg.batch, mesh, jax.process_count())
    image_shape = (cfg.image_size, cfg.image_size, 3)
    with nn.logical_axis_rules(rules):
        abstract, shardings = state_shardings(model, tx, image_shape, mesh, rules)
    batch_sharding = sharding.batch_sharding(mesh)
    step = make_train_step(model, tx, get_loss(recipe.loss), shardings, batch_sharding,
                           schedule)
    return Built(model, mesh, rules, abstract, shardings, batch_sharding, step, tx)


def abstract_batch(cfg: StepBench, batch_sharding: jax.sharding.NamedSharding) -> dict[str, Any]:
    """Shapes of a training batch as the pipeline delivers it (uint8 pixels, dense targets)."""
    return {
        "image": jax.ShapeDtypeStruct((cfg.batch, cfg.image_size, cfg.image_size, 3), jnp.uint8,
                                      sharding=batch_sharding),
        "labels": jax.ShapeDtypeStruct((cfg.batch, cfg.num_classes), jnp.float32,
                                       sharding=batch_sharding),
    }


def synthetic_batch(cfg: StepBench, batch_sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
    """A random batch placed on the devices once: uint8 pixels (the model maps them to [-1, 1],
    as in training) and ~2 positive labels per image (what threshold 0.1 gives on COYO), so the
    loss and gradients are realistic. Drawn with numpy: jax.random would add a compilation
    (seconds on a CPU) for nothing measured."""
    rng = np.random.default_rng(cfg.seed + 1)
    images = rng.integers(0, 256, (cfg.batch, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    labels = (rng.random((cfg.batch, cfg.num_classes), dtype=np.float32)
              < min(2.0 / cfg.num_classes, 0.5)).astype(np.float32)
    return {"image": jax.device_put(images, batch_sharding),
            "labels": jax.device_put(labels, batch_sharding)}


def compile_step(built: Built, cfg: StepBench) -> tuple[Any, dict[str, Any]]:
    """Lowers and compiles the step on abstract inputs (nothing allocated); returns the executable
    and the lowering/compile times, XLA's own FLOP count and its memory plan."""
    with jax.set_mesh(built.mesh), nn.logical_axis_rules(built.rules):
        started, cpu_started = time.perf_counter(), time.process_time()
        lowered = built.step.lower(built.abstract, abstract_batch(cfg, built.batch_sharding))
        lowered_at, lowered_cpu = time.perf_counter(), time.process_time()
        compiled = lowered.compile()
        compiled_at, compiled_cpu = time.perf_counter(), time.process_time()
    # CPU-seconds next to wall seconds: on a shared machine the wall time of a compilation
    # depends on the neighbours' load, its CPU time much less.
    info: dict[str, Any] = {"lower_s": lowered_at - started, "compile_s": compiled_at - lowered_at,
                            "lower_cpu_s": lowered_cpu - cpu_started,
                            "compile_cpu_s": compiled_cpu - lowered_cpu}
    info.update(_xla_analysis(compiled))
    if cfg.dump_hlo:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.dump_hlo)), exist_ok=True)
        with open(cfg.dump_hlo, "w", encoding="utf-8") as f:
            f.write(compiled.as_text())
    return compiled, info


def _xla_analysis(compiled: Any) -> dict[str, Any]:
    """XLA's FLOP count (counts remat recomputation, unlike ours) and its buffer plan, if given."""
    out: dict[str, Any] = {}
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        if cost and "flops" in cost:
            out["xla_flops_per_step"] = float(cost["flops"])
    except Exception:  # not every backend implements it; the figure is informative only
        pass
    try:
        memory = compiled.memory_analysis()
        if memory is not None:
            out["xla_temp_bytes"] = int(memory.temp_size_in_bytes)
            out["xla_argument_bytes"] = int(memory.argument_size_in_bytes)
            out["xla_output_bytes"] = int(memory.output_size_in_bytes)
    except Exception:
        pass
    return out


def time_steps(compiled: Any, state: TrainState, batch: dict[str, jax.Array], cfg: StepBench
               ) -> tuple[TrainState, dict[str, Any]]:
    """Times the compiled step: `warmup` untimed steps, then `repeats` rounds of `steps` steps
    dispatched back to back (as the train loop does: no host sync per step) and, if
    `latency_round`, one round with a sync after every step. The state is donated, so it is
    threaded through."""
    if cfg.steps < 1 or cfg.repeats < 1 or cfg.warmup < 0:
        raise ValueError(f"need steps >= 1, repeats >= 1 and warmup >= 0, got {cfg.steps}, "
                         f"{cfg.repeats}, {cfg.warmup}")
    for _ in range(cfg.warmup):
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))

    rounds, cpu_rounds = [], []
    for _ in range(cfg.repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        for _ in range(cfg.steps):
            state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        rounds.append((time.perf_counter() - started) / cfg.steps)
        cpu_rounds.append((time.process_time() - cpu_started) / cfg.steps)

    synced = []
    for _ in range(cfg.steps if cfg.latency_round else 0):
        started = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        synced.append(time.perf_counter() - started)

    loss = float(jax.device_get(metrics["train/loss"]))
    step_s = report.median(rounds)
    cpu_s = report.median(cpu_rounds)
    # Host CPU-seconds per step: on a CPU backend, the compute itself, in core-seconds, which
    # other processes' load barely changes (unlike wall time); on a GPU, the host's share.
    return state, {"step_s": step_s, "step_s_rounds": rounds, "step_s_synced_median": report.median(synced),
                   "images_per_s": cfg.batch / step_s, "host_cpu_s_per_step": cpu_s,
                   "images_per_cpu_s": cfg.batch / cpu_s if cpu_s > 0 else None, "final_loss": loss}


def trace_steps(compiled: Any, state: TrainState, batch: dict[str, jax.Array], cfg: StepBench
                ) -> TrainState:
    """Records `profile_steps` back-to-back steps with jax.profiler (after the timed rounds, so
    the profiler's own cost never enters the figures); benchmarks/device_trace.py reads it."""
    if cfg.profile_steps < 1:
        raise ValueError(f"--profile_steps must be >= 1, got {cfg.profile_steps}")
    with jax.profiler.trace(cfg.profile_dir):
        for _ in range(cfg.profile_steps):
            state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
    return state


def device_memory() -> dict[str, Any]:
    """Peak device memory of this process from the runtime (GPU/TPU; CPU reports none)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    out = {}
    if "peak_bytes_in_use" in stats:
        out["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
    if "bytes_limit" in stats:
        out["device_bytes_limit"] = int(stats["bytes_limit"])
    return out


def run(cfg: StepBench, *, compile_only: bool = False, peak_flops_override: float | None = None
        ) -> dict[str, Any]:
    """Builds, compiles and (unless compile_only) times one configuration; returns its figures."""
    device = jax.devices()[0]
    chip, peak = flops_lib.peak_flops(device.device_kind, device.platform)
    if peak_flops_override:
        chip, peak = f"{device.device_kind} (peak given)", peak_flops_override
    shape = flops_lib.ViTShape.from_variant(cfg.variant, cfg.image_size, cfg.num_classes, cfg.rep_size,
                                            cfg.depth)
    flops_per_step = flops_lib.train_flops_per_image(shape) * cfg.batch

    rss_start = report.peak_rss_bytes()
    built = build(cfg)
    compiled, compile_info = compile_step(built, cfg)
    result: dict[str, Any] = {
        **dataclasses.asdict(cfg),
        "platform": device.platform, "device_kind": device.device_kind,
        "num_devices": jax.device_count(), "chip": chip, "peak_flops_per_chip": peak,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "compiler_options": compiler_options_for_platform(device.platform),
        "params": count_params(built.abstract.params),
        "forward_macs_per_image": flops_lib.forward_macs_per_image(shape),
        "model_flops_per_step": flops_per_step,
        **compile_info,
    }
    if compile_only:
        result["peak_rss_bytes"] = report.peak_rss_bytes()
        result["rss_before_build_bytes"] = rss_start
        result["tensorflow_imported"] = "tensorflow" in sys.modules
        return result

    state = init_state(built.model, built.tx, (cfg.image_size,) * 2 + (3,), cfg.seed, built.shardings)
    batch = synthetic_batch(cfg, built.batch_sharding)
    with jax.set_mesh(built.mesh), nn.logical_axis_rules(built.rules):
        state, timing = time_steps(compiled, state, batch, cfg)
        if cfg.profile_dir:
            state = trace_steps(compiled, state, batch, cfg)
    del state
    result.update(timing)
    if cfg.profile_dir:
        summary = device_trace.summarize(device_trace.find_trace(cfg.profile_dir))
        device_trace.print_summary(summary, cfg.profile_steps)
        result["profile"] = summary
    result["model_tflops_per_s"] = flops_per_step / timing["step_s"] / 1e12
    result["mfu"] = flops_lib.mfu(flops_per_step, timing["step_s"], peak, jax.device_count())
    result.update(device_memory())
    result["peak_rss_bytes"] = report.peak_rss_bytes()
    result["rss_before_build_bytes"] = rss_start
    result["tensorflow_imported"] = "tensorflow" in sys.modules
    return result


COLUMNS = [
    ("variant", "model"), ("batch", "batch"), ("dtype", "dtype"), ("scan", "scan"),
    ("remat_policy", "remat"), ("compile_s", "compile s"), ("step_ms", "step ms"),
    ("images_per_s", "images/s"), ("model_tflops_per_s", "model TFLOP/s"), ("mfu_pct", "MFU %"),
    ("device_peak_gib", "device peak GiB"), ("peak_rss_gib", "host peak RSS GiB"),
]


def table_row(result: dict[str, Any]) -> dict[str, Any]:
    """The derived, human-unit fields the tables print."""
    row = dict(result)
    if "step_s" in result:
        row["step_ms"] = result["step_s"] * 1e3
    row["mfu_pct"] = None if result.get("mfu") is None else 100 * result["mfu"]
    if "device_peak_bytes" in result:
        row["device_peak_gib"] = result["device_peak_bytes"] / 2**30
    row["peak_rss_gib"] = result["peak_rss_bytes"] / 2**30
    return row


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.accelerator",
        description="ViT training-step images/s, step time and MFU on synthetic device data "
                    "(no TensorFlow). MFU uses the analytic FLOP count of benchmarks/flops.py.")
    parser.add_argument("--variant", default="B/16", help="ViT variant, e.g. Ti/16, B/16, L/16")
    parser.add_argument("--batch", type=int, default=256, help="global batch size")
    parser.add_argument("--image_size", type=int, default=224, help="resolution in pixels")
    parser.add_argument("--num_classes", type=int, default=NUM_COYO_CLASSES,
                        help=f"classes of the head (COYO-Labeled-300M: {NUM_COYO_CLASSES})")
    parser.add_argument("--rep_size", type=int, default=1024,
                        help="pre-logits width as in the recipe; 0 = no pre-logits layer")
    parser.add_argument("--depth", type=int, default=0,
                        help="number of blocks; 0 = the variant's (fewer: quick smoke runs)")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="activation dtype")
    parser.add_argument("--scan", action="store_true", help="stack the blocks with nn.scan")
    parser.add_argument("--remat", default="none", choices=sorted(REMAT_POLICIES),
                        help="rematerialisation policy of each block")
    parser.add_argument("--attention_impl", default="auto", choices=[i for i in ATTENTION_IMPLS if i],
                        help="attention: auto (the model's default: cuDNN's fused kernel on GPUs, "
                             "XLA elsewhere), xla, or cudnn (GPU only)")
    parser.add_argument("--attention_pad_multiple", type=int, default=0,
                        help="pad the tokens once, before the blocks, to a multiple of this "
                             "(Model.attention_pad_multiple); 0 = the model's choice (2 where cuDNN "
                             "attention runs, else none); 1 = never (blocks pad for cuDNN themselves)")
    parser.add_argument("--gelu_recompute", action=argparse.BooleanOptionalAction, default=True,
                        help="Model.gelu_recompute (the default): the GELU's backward pass "
                             "recomputes tanh from its input instead of keeping it (one tensor less "
                             "per block)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds; the median is reported")
    parser.add_argument("--peak_flops", type=float, default=None,
                        help="peak bf16 FLOP/s per chip for a device missing from the table")
    parser.add_argument("--compile_only", action="store_true",
                        help="only lower and compile on abstract inputs (compile time, XLA memory plan)")
    parser.add_argument("--profile_dir", default=None,
                        help="after timing, trace --profile_steps steps with jax.profiler here and "
                             "print where the device time went (benchmarks/device_trace.py)")
    parser.add_argument("--profile_steps", type=int, default=3, help="steps traced for --profile_dir")
    parser.add_argument("--dump_hlo", default=None,
                        help="write the compiled step's optimized HLO here: what each fusion in "
                             "the --profile_dir table computes")
    parser.add_argument("--out", default=None, help="write the result as JSON to this path")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> StepBench:
    return StepBench(
        variant=args.variant, batch=args.batch, image_size=args.image_size,
        num_classes=args.num_classes, rep_size=args.rep_size or None, depth=args.depth or None,
        dtype=args.dtype,
        scan=args.scan, remat_policy=args.remat,
        attention_impl=args.attention_impl, attention_pad_multiple=args.attention_pad_multiple or None,
        gelu_recompute=args.gelu_recompute,
        warmup=args.warmup, steps=args.steps, repeats=args.repeats,
        profile_dir=args.profile_dir, profile_steps=args.profile_steps, dump_hlo=args.dump_hlo)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cfg = config_from_args(args)
    try:
        result = run(cfg, compile_only=args.compile_only, peak_flops_override=args.peak_flops)
    except Exception as err:  # e.g. device OOM: leave a JSON that says so, then fail loudly
        hint = ""
        if "RESOURCE_EXHAUSTED" in str(err) or "out of memory" in str(err).lower():
            hint = " Out of device memory: try a smaller --batch, or --scan --remat dots_with_no_batch_dims_saveable."
        report.write_json(args.out, {"benchmark": "accelerator", "config": dataclasses.asdict(cfg),
                                     "error": f"{type(err).__name__}: {err}"[:2000]})
        print(f"benchmark failed: {type(err).__name__}: {str(err)[:500]}{hint}", file=sys.stderr)
        raise
    print(f"device: {result['device_kind']} x{result['num_devices']} ({result['platform']}); "
          f"peak bf16 per chip: {report.format_value(result['peak_flops_per_chip'])} FLOP/s"
          f"{'' if result['chip'] else ' (not in the table: MFU n/a)'}")
    print(f"step compiler options: {result['compiler_options']}; XLA_FLAGS: {result['xla_flags'] or 'unset'}")
    print(f"{cfg.variant} @ {cfg.image_size}px, {cfg.num_classes} classes: "
          f"{result['params']:,} params, {result['forward_macs_per_image'] / 1e9:.2f} GMACs forward "
          f"per image, {result['model_flops_per_step'] / 1e12:.3f} TFLOPs model FLOPs per step")
    print(report.table([table_row(result)], COLUMNS))
    if "xla_flops_per_step" in result:
        ratio = result["xla_flops_per_step"] / result["model_flops_per_step"]
        # On GPUs XLA's cost analysis skips the cuBLAS/cuDNN calls that do nearly all the FLOPs.
        caveat = "; XLA does not count library calls (cuBLAS, cuDNN)" if result["platform"] == "gpu" else ""
        print(f"XLA-counted FLOPs per step: {result['xla_flops_per_step'] / 1e12:.3f} T "
              f"({ratio:.2f}x the analytic count{caveat})")
    print(f"TensorFlow imported: {result['tensorflow_imported']}")
    report.write_json(args.out, {"benchmark": "accelerator", "result": result})
    return result


if __name__ == "__main__":
    main()
