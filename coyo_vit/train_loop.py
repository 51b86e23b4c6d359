"""The training loop shared by train.py (pretraining) and fine-tuning: one straight line.

Order of events: processes and mesh -> model, optimizer and the state's shardings -> restore the
latest checkpoint of the workdir or initialise -> the data stream from the restored position ->
steps, with periodic logging, holdout evaluation and asynchronous checkpoints.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import linen as nn
from jax.experimental import multihost_utils

from checkpoints.orbax_io import TrainCheckpointer
from coyo_vit import compiler_options, data_setup, file_system, losses, optimizer, runtime, sharding
from coyo_vit.device_prefetch import DevicePrefetcher
from coyo_vit.evaluators.holdout import HoldoutEvaluator
from coyo_vit.evaluators.registry import build_evaluators, is_due
from coyo_vit.metric_logging import MetricLogger, Progress, format_eta
from coyo_vit.models import Model, count_params
from coyo_vit.preemption import PreemptionWatcher
from coyo_vit.train_step import TrainState, init_state, make_train_step, state_shardings


def run(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains (or resumes training) per `config` in `workdir`; returns the final state."""
    process_index, process_count = jax.process_index(), jax.process_count()
    is_main = process_index == 0
    files = file_system.for_path(workdir)  # gs:// too, like the checkpoints
    files.makedirs(workdir)
    runtime.enable_compilation_cache(config.get("compilation_cache_dir"))
    data = data_setup.prepare_inputs(config, workdir)  # COYO shards or classification data
    if is_main:
        with files.GFile(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    # Devices, mesh and batch split. Errors here name the numbers that do not divide.
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_from_config(config.get("sharding_rules"))
    local_batch = sharding.check_batch_size(config.batch_size, mesh, process_count)
    accum = config.get("grad_accum_steps", 1)
    if config.batch_size % (accum * sharding.data_parallel_size(mesh)):
        raise ValueError(f"Batch size {config.batch_size} is not divisible by grad_accum_steps={accum} "
                         f"x {sharding.data_parallel_size(mesh)} data-parallel devices.")
    logging.info("Process %d/%d, %d local of %d devices, mesh %s", process_index, process_count,
                 jax.local_device_count(), jax.device_count(), dict(mesh.shape))

    # Model, optimizer and where every piece of the state lives.
    model = Model(num_classes=config.num_classes, **config.model)
    image_shape = (config.image_size, config.image_size, 3)
    schedule = optimizer.make_schedule(config.schedule, config.total_steps)
    tx = optimizer.make_optimizer(config.optimizer, schedule)
    skip_nonfinite = config.optimizer.get("skip_nonfinite", False)
    loss_fn = losses.get_loss(config.loss)
    with nn.logical_axis_rules(rules):
        abstract, shardings = state_shardings(model, tx, image_shape, mesh, rules,
                                              config.get("param_sharding", ()),
                                              ema=config.get("ema_decay") is not None)
    logging.info("Model: %s parameters; %.1f MiB of params + optimizer state per device",
                 f"{count_params(abstract.params):,}", sharding.bytes_per_device(abstract) / 2**20)

    # Resume from the workdir's latest checkpoint (no flag needed) or start fresh.
    checkpointer = TrainCheckpointer(workdir, max_to_keep=config.keep_checkpoints,
                                     compress=config.get("checkpoint_compression", False))
    latest = checkpointer.latest_step()
    if latest is None:
        params = _init_params(config, model) if config.get("init") else None
        state = init_state(model, tx, image_shape, config.seed, shardings, params)
        position, skipped = 0, 0
    else:
        restored, meta = checkpointer.restore(latest, abstract.as_checkpoint())
        state = TrainState.from_checkpoint(restored)
        if len(meta["data_positions"]) != process_count:
            raise ValueError(f"Checkpoint step {latest} was written by {len(meta['data_positions'])} "
                             f"processes, this run has {process_count}: the data position cannot be mapped.")
        position = int(meta["data_positions"][process_index])
        skipped = int(meta.get("skipped_records", [0] * process_count)[process_index])
        logging.info("Resumed from step %d (data position %d)", latest, position)
    first_step = int(jax.device_get(state.step))

    # COYO shards also say why each skipped record was skipped (classification data: counts only).
    by_reason = getattr(data, "SkipCounter", None)
    coyo_options: dict[str, Any] = {}
    exact_epoch = 0  # this process's epoch length counted by reading its files (0: not needed)
    if by_reason is not None:
        restored_reasons = meta.get("skipped_by_reason") if latest is not None else None
        by_reason = by_reason(position, restored_reasons[process_index] if restored_reasons else None)
        coyo_options = dict(skip_counts=True)
        if by_reason.totals().get("damaged_file", 0) > 0:
            # A damaged file met before: record headers may promise records that cannot be read
            # (bad checksum), so the epoch is counted by reading, once; checkpoints keep the count.
            exact_epoch = int((meta.get("epoch_lengths") or [0] * process_count)[process_index])
            if not exact_epoch:
                logging.info("Counting this process's epoch by reading its files (damage seen)")
                exact_epoch = data.train_epoch_length(config.input, process_index=process_index,
                                                      process_count=process_count,
                                                      read_payloads=True)
            coyo_options["epoch_length"] = exact_epoch
    train_data = data.build_train_dataset(
        config.input, batch_size=local_batch, seed=config.seed, process_index=process_index,
        process_count=process_count, start_position=position, **coyo_options)
    batches = DevicePrefetcher(train_data.as_numpy_iterator(), sharding.batch_sharding(mesh),
                               depth=config.get("device_prefetch", 2))
    train_step = make_train_step(model, tx, loss_fn, shardings, sharding.batch_sharding(mesh),
                                 schedule, grad_accum_steps=accum, ema_decay=config.get("ema_decay"),
                                 mixup_alpha=config.get("mixup_alpha", 0.0),
                                 skip_nonfinite=skip_nonfinite)
    logging.info("Steps compiled with XLA options %s (coyo_vit/compiler_options.py; XLA_FLAGS: %s)",
                 compiler_options.for_mesh(mesh),
                 os.environ.get("XLA_FLAGS") or "unset")
    evaluators = make_evaluators(config, model=model, mesh=mesh, params_shardings=shardings.params,
                                 loss_fn=loss_fn)
    logger = MetricLogger(workdir, is_main=is_main, resume_step=first_step)
    progress = Progress(first_step, config.total_steps, config.batch_size)
    pending: list[dict[str, jax.Array]] = []  # device metrics since the last log: no per-step host sync
    preemption = PreemptionWatcher()

    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            for step in range(first_step + 1, config.total_steps + 1):
                batch, host = next(batches)
                state, step_metrics = train_step(state, batch)
                pending.append(step_metrics)
                consumed = int(host["_index"].max()) + 1
                skipped += consumed - position - local_batch  # records dropped by the pipeline (bad images)
                position = consumed
                if by_reason is not None:
                    by_reason.update(host)

                stop = preemption.should_stop(step)
                save = stop or step % config.checkpoint_every_steps == 0 or step == config.total_steps
                # A preempted run logs what it has too: the steps since the last log are not lost.
                log_now = stop or step % config.log_every_steps == 0 or step == config.total_steps
                if save or log_now:
                    host_metrics = jax.device_get(pending)
                    # Never checkpoint (nor go on from) non-finite parameters. The loss is that of
                    # the parameters before the update, so the parameter norm after it is checked
                    # too; with skip_nonfinite a bad step kept the last finite parameters, so only
                    # they are checked.
                    _check_finite(host_metrics, step - len(pending) + 1, workdir, skip_nonfinite)
                if log_now:
                    scalars = {k: float(np.sum(v) if k == "train/skipped_nonfinite" else np.nanmean(v))
                               for k, v in jax.tree.map(lambda *xs: np.stack(xs), *host_metrics).items()}
                    pending.clear()
                    rate = progress.report(step)
                    scalars.update({"train/images_per_sec": rate["images_per_sec"],
                                    "train/steps_per_sec": rate["steps_per_sec"],
                                    "data/skipped_records": _sum_over_processes(skipped)})
                    if by_reason is not None:
                        scalars.update({f"data/skipped/{reason}": float(sum(per_process))
                                        for reason, per_process in _gather_counts(by_reason.totals()).items()})
                    logger.write(step, scalars)
                    if is_main:
                        logging.info("step %d/%d  loss %.4f  lr %.3g  %.1f img/s  ETA %s  (skipped %d bad records)",
                                     step, config.total_steps, scalars["train/loss"], scalars["train/lr"],
                                     rate["images_per_sec"], format_eta(rate["eta_seconds"]),
                                     scalars["data/skipped_records"])

                # Saved before the evaluations: one that fails must not cost this step's checkpoint.
                if save:
                    meta = {"model": _model_kwargs(config), "step": step,
                            "data_positions": _gather_ints(position), "skipped_records": _gather_ints(skipped),
                            "epoch_lengths": _gather_ints(exact_epoch)}
                    if by_reason is not None:
                        counts = _gather_counts(by_reason.totals())
                        meta["skipped_by_reason"] = [{r: n[i] for r, n in counts.items()} for i in range(process_count)]
                    checkpointer.save(step, state.as_checkpoint(), meta)
                if stop:
                    logging.warning("Preempted: checkpoint of step %d written; exiting.", step)
                    break

                for name, evaluator in evaluators.items():
                    if is_due(evaluator.every_steps, step, config.total_steps):
                        started = time.perf_counter()
                        results = evaluator.evaluate(state.eval_params)
                        logger.write(step, results)
                        if is_main:
                            logging.info("step %d %s: %s (%.1fs)", step, name,
                                         json.dumps({k: round(v, 4) for k, v in results.items()}),
                                         time.perf_counter() - started)
    finally:
        # Also when a step, the data or an evaluator fails: the checkpoint being written in the
        # background is finished and committed, not left as a temporary directory.
        preemption.close()
        batches.close()
        checkpointer.close()
        logger.close()
    return state


def make_evaluators(config: ml_collections.ConfigDict, *, model: Model, mesh: jax.sharding.Mesh,
                    params_shardings: Any, loss_fn) -> dict[str, Any]:
    """config.evals, plus the COYO holdout (loss, prec@1) when config.eval_every_steps is set."""
    evaluators = build_evaluators(config.get("evals"), model=model, mesh=mesh,
                                  params_shardings=params_shardings, loss_fn=loss_fn)
    if config.get("eval_every_steps"):
        if "holdout" in evaluators:
            raise ValueError("config.evals.holdout clashes with the built-in holdout evaluator that "
                             "config.eval_every_steps runs (both would write holdout/...): rename "
                             "the entry of config.evals, or set eval_every_steps=0")
        evaluators["holdout"] = HoldoutEvaluator(model, loss_fn, config, params_shardings, mesh)
    return evaluators


def _check_finite(step_metrics: list[dict[str, Any]], first_step: int, workdir: str,
                  skip_nonfinite: bool) -> None:
    """Stops the run at the first step with a non-finite loss or parameter norm (only the norm
    with skip_nonfinite), naming the step and the metric; earlier checkpoints stay."""
    keys = ("train/param_norm",) if skip_nonfinite else ("train/loss", "train/param_norm")
    advice = ("lower the learning rate" if skip_nonfinite else "lower the learning rate or set "
              "config.optimizer.skip_nonfinite=True to skip such updates")
    for offset, metrics in enumerate(step_metrics):
        for key in keys:
            value = float(metrics[key])
            if not np.isfinite(value):
                what = {"train/loss": "training loss",
                        "train/param_norm": "parameter norm after the update"}[key]
                raise FloatingPointError(
                    f"Non-finite {what} ({value}) at step {first_step + offset}. The last good "
                    f"checkpoint in {workdir} is kept; {advice}.")


def _init_params(config: ml_collections.ConfigDict, model: Model) -> Any:
    """Parameters of `config.init` adapted to this run's head, pre-logits and resolution."""
    import checkpoints  # the format readers; TensorFlow only for coyo-vit TF checkpoints

    dims = model.dims
    # num_heads: TensorFlow's 2-D attention kernels cannot tell it; the config's model can.
    params, loaded = checkpoints.load(
        config.init, num_classes=config.num_classes, scan=model.scan, rep_size=model.representation_size,
        image_size=config.image_size, head_kernel_init=model.head_kernel_init,
        head_bias_init=model.head_bias_init, num_heads=dims.num_heads)
    wanted = {"patch_size": dims.patch_size, "width": dims.width, "depth": dims.depth,
              "mlp_dim": dims.mlp_dim, "num_heads": dims.num_heads, "pool_type": model.pool_type,
              "posemb": model.posemb}
    mismatched = {k: (loaded.get(k), v) for k, v in wanted.items() if loaded.get(k) != v}
    if mismatched:
        raise ValueError(f"config.init {config.init!r} does not match config.model: "
                         + ", ".join(f"{k} checkpoint={a} config={b}" for k, (a, b) in mismatched.items()))
    logging.info("Initialised from %s", config.init)
    return params


def _gather_ints(value: int) -> list[int]:
    """The value of every process, in process order (all processes call this together)."""
    return [int(v) for v in np.asarray(multihost_utils.process_allgather(np.int64(value))).reshape(-1)]


def _gather_counts(counts: dict[str, int]) -> dict[str, list[int]]:
    """Each count of every process, in process order, in one collective (all processes call it)."""
    values = np.asarray(multihost_utils.process_allgather(np.asarray(list(counts.values()), np.int64)))
    values = values.reshape(-1, len(counts))
    return {reason: [int(v) for v in values[:, i]] for i, reason in enumerate(counts)}


def _sum_over_processes(value: int) -> int:
    return sum(_gather_ints(value)) if jax.process_count() > 1 else int(value)


def _model_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Model description stored with each checkpoint so it loads without the config."""
    kwargs = {"num_classes": config.num_classes, **config.model.to_dict()}
    kwargs["dtype"] = str(kwargs.get("dtype", "float32"))
    return kwargs
