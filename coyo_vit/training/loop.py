"""The training loop shared by train.py (pretraining) and fine-tuning: one straight line.

Order of events: Ctrl-C watched -> parse and check the whole config -> mesh and batch split ->
the workdir's latest checkpoint: its config.json compared with this run's, or "already
finished" (all of this without TensorFlow, in seconds) -> model, optimizer and the state's
shardings -> evaluators built and (where their data is not the run's own) their data found and
class counts checked -> the training files found (shards, image folders). Only then is anything
written: the data (demo data written, TFDS prepared) -> the remaining evaluators' data checked ->
config.json -> restore the latest checkpoint of the workdir or initialise -> the data stream
from the restored position -> steps, with periodic logging, asynchronous checkpoints and
evaluations. Ctrl-C before the first step stops at once (exit 130); during training it finishes
the step, checkpoints it and exits 130, like SIGTERM (which exits 0).
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import linen as nn
from jax.experimental import multihost_utils

from checkpoints import orbax_io
from checkpoints.orbax_io import TrainCheckpointer
from coyo_vit.config_keys import ConfigError
from coyo_vit.models import Model, count_params
from coyo_vit.training import run_config, runtime, sharding
from coyo_vit.training import workdir as workdir_record
from coyo_vit.training.evaluators.registry import build_evaluators, is_due
from coyo_vit.training.step import (
    TrainState,
    compiler_options_for_mesh,
    init_state,
    make_train_step,
    state_shardings,
)


def run(config: ml_collections.ConfigDict, workdir: str,
        run_cfg: run_config.RunConfig | None = None) -> TrainState | None:
    """Trains (or resumes training) per `config` in `workdir`; returns the final state, or None
    when the workdir's run had already finished. `run_cfg`: `config` already parsed by
    `run_config.parse` (train.py does, before it imports this module); parsed here otherwise.

    Raises `runtime.Interrupted` (a SystemExit with status 130) after a Ctrl-C: during training
    once the current step is checkpointed, before it at once, with nothing saved.
    """
    preemption = runtime.PreemptionWatcher()  # first, so a Ctrl-C during set-up stops it cleanly
    try:
        return _run(config, workdir, preemption, run_cfg)
    except runtime.InterruptedBeforeTraining:
        logging.warning("interrupted before training started: no step to save; run the same "
                        "command to start again")
        raise runtime.Interrupted(None) from None
    finally:
        preemption.close()


def _run(config: ml_collections.ConfigDict, workdir: str, preemption: runtime.PreemptionWatcher,
         run_cfg: run_config.RunConfig | None) -> TrainState | None:
    run_cfg = run_cfg or run_config.parse(config, workdir)  # every section checked before any work
    # Before anything compiles: JAX picks its cache directory at the first compilation.
    runtime.enable_compilation_cache(run_cfg.compilation_cache_dir)
    process_index, process_count = jax.process_index(), jax.process_count()
    is_main = process_index == 0

    # Devices, mesh and batch split. Errors here name the numbers that do not divide.
    mesh = sharding.make_mesh(run_cfg.mesh_axes)
    rules = sharding.rules_from_config(run_cfg.sharding_rules)
    local_batch = sharding.check_batch_size(run_cfg.batch_size, mesh, process_count)
    accum = run_cfg.grad_accum_steps
    if run_cfg.batch_size % (accum * sharding.data_parallel_size(mesh)):
        raise ConfigError(f"Batch size {run_cfg.batch_size} is not divisible by grad_accum_steps={accum} "
                          f"x {sharding.data_parallel_size(mesh)} data-parallel devices.")
    logging.info("Process %d/%d, %d local of %d devices, mesh %s", process_index, process_count,
                 jax.local_device_count(), jax.device_count(), dict(mesh.shape))

    # The workdir, read only: a resume must be of the same model and data (config.json), and a
    # finished run stops here, before any data is built or any step compiled.
    latest = orbax_io.latest_step(workdir)
    resume_changes: dict[str, Any] = {}
    if latest is not None:
        resume_changes = workdir_record.check_resume(workdir, config)
        if latest >= run_cfg.total_steps:
            logging.info("already finished at step %d (config.total_steps=%d) in %s; raise "
                         "--config.total_steps to train further", latest, run_cfg.total_steps, workdir)
            return None
    # Late: TensorFlow (data, gs:// files, clu's writers) only once the config, the mesh and the
    # workdir are known good, so that those errors and a finished run's rerun take seconds.
    import tensorflow as tf

    from coyo_vit.training.metric_logging import MetricLogger  # late: clu imports TensorFlow
    from input_pipeline import data_source  # late: TensorFlow

    # Model, optimizer and where every piece of the state lives.
    model = run_cfg.model
    with nn.logical_axis_rules(rules):
        abstract, shardings = state_shardings(model, run_cfg.tx, run_cfg.image_shape, mesh, rules,
                                              run_cfg.param_sharding,
                                              ema=run_cfg.ema_decay is not None)
    logging.info("Model: %s parameters; %.1f MiB of params + optimizer state per device",
                 f"{count_params(abstract.params):,}", sharding.bytes_per_device(abstract) / 2**20)

    # Every evaluator's section checked; the data of those that do not read what this run
    # writes or prepares (its demo data, its TFDS dataset) found, and their classes counted.
    evaluators = build_evaluators(run_cfg.evals, model=model, mesh=mesh,
                                  params_shardings=shardings.params, loss_fn=run_cfg.loss_fn,
                                  train_input=run_cfg.input)
    run_data = _run_data(config)
    later = {name: e for name, e in evaluators.items() if _reads_run_data(e, run_data)}
    for name, evaluator in evaluators.items():
        if name not in later:
            evaluator.check_data()

    source = data_source.open_source(run_cfg.input, process_index=process_index,
                                     process_count=process_count)
    writes_data = bool(run_data["dirs"]) or run_data["tfds"]
    if is_main and not writes_data:
        source.prepare()  # shards or an image folder: finds the files, writes nothing

    # From here on files are written. The data: demo data written and TFDS prepared by process
    # 0, then the remaining evaluators' data checked, before anything compiles.
    preemption.check()
    tf.io.gfile.makedirs(workdir)  # gs:// too, like the checkpoints
    if is_main and writes_data:
        _write_demo_data(config)
        source.prepare()
    multihost_utils.sync_global_devices("inputs_prepared")
    for evaluator in later.values():
        evaluator.check_data()
    preemption.check()
    if is_main:  # class_names.txt, for predict and the exports (written once; other names stop)
        workdir_record.write_class_names(workdir, source.class_names(), run_cfg.num_classes)
    if is_main and (latest is None or resume_changes):
        # The first start's config.json; a resume that changed safe keys writes config.<step>.json.
        path = workdir_record.write_config(workdir, config, latest)
        if latest is not None:
            logging.info("Resumed with changed %s; this run's config is in %s",
                         ", ".join(resume_changes), path)

    # Resume from the workdir's latest checkpoint (no flag needed) or start fresh.
    checkpointer = batches = logger = None  # closed in the finally, whichever were opened
    try:
        checkpointer = TrainCheckpointer(workdir, max_to_keep=run_cfg.keep_checkpoints,
                                         compress=run_cfg.checkpoint_compression)
        latest = checkpointer.latest_step()
        if latest is None:
            params = _init_params(run_cfg, model) if run_cfg.init else None
            state = init_state(model, run_cfg.tx, run_cfg.image_shape, run_cfg.seed, shardings, params)
        else:
            # Parameters, optimizer state and EMA are laid out for this run's mesh as they are
            # read (orbax reshards to `abstract`'s shardings), whatever mesh wrote them.
            restored, meta = checkpointer.restore(latest, abstract.as_checkpoint())
            state = TrainState.from_checkpoint(restored)
            source.restore(meta, process_index)
            _log_resume(latest, meta, source, run_cfg.batch_size)
        first_step = int(jax.device_get(state.step))

        batches = sharding.DevicePrefetcher(source.batches(local_batch, run_cfg.seed),
                                            sharding.batch_sharding(mesh), depth=run_cfg.device_prefetch)
        train_step = make_train_step(model, run_cfg.tx, run_cfg.loss_fn, shardings,
                                     sharding.batch_sharding(mesh), run_cfg.schedule,
                                     grad_accum_steps=accum, ema_decay=run_cfg.ema_decay,
                                     mixup_alpha=run_cfg.mixup_alpha,
                                     skip_nonfinite=run_cfg.skip_nonfinite)
        logging.info("Steps compiled with XLA options %s (coyo_vit/training/step.py; XLA_FLAGS: %s)",
                     compiler_options_for_mesh(mesh), os.environ.get("XLA_FLAGS") or "unset")
        logger = MetricLogger(workdir, is_main=is_main, resume_step=first_step,
                              batch_size=run_cfg.batch_size)
        progress = logger.progress(run_cfg.total_steps, run_cfg.log_every_steps)
        progress(first_step)  # the clock starts here: the rate excludes set-up and compilation
        pending: list[dict[str, jax.Array]] = []  # device metrics since the last log: no per-step host sync
        total = run_cfg.total_steps

        preemption.start_training()  # from here a Ctrl-C finishes the step and saves it
        stopped_at = None
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            for step in range(first_step + 1, total + 1):
                batch, host = next(batches)
                state, step_metrics = train_step(state, batch)
                pending.append(step_metrics)
                source.observe(host)
                progress(step)

                stop = preemption.should_stop(step)
                save = stop or step % run_cfg.checkpoint_every_steps == 0 or step == total
                # A preempted run logs what it has too: the steps since the last log are not lost.
                log_now = stop or step % run_cfg.log_every_steps == 0 or step == total
                if save or log_now:
                    host_metrics = jax.device_get(pending)
                    # Never checkpoint (nor go on from) non-finite parameters. The loss is that of
                    # the parameters before the update, so the parameter norm after it is checked
                    # too; with skip_nonfinite a bad step kept the last finite parameters, so only
                    # they are checked.
                    _check_finite(host_metrics, step - len(pending) + 1, workdir,
                                  run_cfg.skip_nonfinite)
                    data_state = _gather_state(source.state())
                if log_now:
                    scalars = {k: float(np.sum(v) if k == "train/skipped_nonfinite" else np.nanmean(v))
                               for k, v in jax.tree.map(lambda *xs: np.stack(xs), *host_metrics).items()}
                    pending.clear()
                    scalars["data/skipped_records"] = sum(data_state["skipped"])
                    # Per-reason counts only where non-zero, all of them with --verbosity=1 (DEBUG).
                    every_count = logging.getLogger().isEnabledFor(logging.DEBUG)
                    scalars.update({f"data/{key}": float(sum(values)) for key, values in data_state.items()
                                    if key.startswith("skipped/") and (sum(values) or every_count)})
                    scalars = logger.write(step, scalars)
                    if is_main:
                        skipped = int(scalars["data/skipped_records"])
                        logging.info("step %d/%d  loss %.4f  lr %.3g  %.1f img/s%s",
                                     step, total, scalars["train/loss"], scalars["train/lr"],
                                     scalars.get("train/images_per_sec", float("nan")),
                                     f"  (skipped {skipped} bad records)" if skipped else "")

                # Saved before the evaluations: one that fails must not cost this step's checkpoint.
                if save:
                    meta = {"model": _model_kwargs(run_cfg), "step": step,
                            "batch_size": run_cfg.batch_size,
                            "devices": [process_count, jax.local_device_count()],
                            **source.checkpoint_meta(data_state)}
                    checkpointer.save(step, state.as_checkpoint(), meta)
                if stop:
                    stopped_at = step  # reported once the checkpoint is committed (finally below)
                    break

                for name, evaluator in evaluators.items():
                    if is_due(evaluator.every_steps, step, total):
                        started = time.perf_counter()
                        with progress.timed(name, wait_jax_async_dispatch=False):
                            results = evaluator.evaluate(state.eval_params)
                        logger.write(step, results)
                        if is_main:
                            logging.info("step %d %s: %s (%.1fs)", step, name,
                                         json.dumps({k: round(v, 4) for k, v in results.items()}),
                                         time.perf_counter() - started)
    finally:
        # Also when a step, the data or an evaluator fails: the checkpoint being written in the
        # background is finished and committed, not left as a temporary directory.
        for opened in (batches, checkpointer, logger):
            if opened is not None:
                opened.close()
    if stopped_at is not None:
        if preemption.interrupted:
            logging.warning("interrupted: saved step %d; run the same command to resume", stopped_at)
            raise runtime.Interrupted(stopped_at)
        logging.warning("Preempted: checkpoint of step %d written; exiting.", stopped_at)
    return state


def _log_resume(step: int, meta: Mapping[str, Any], source: Any, batch_size: int) -> None:
    """Says where the run continues: the data position, or how a checkpoint of another slice
    was laid onto this one (e.g. `resumed step 400 written by 2 processes x 1 device on 1 process
    x 2 devices; 3,072 of 3,584 records of epoch 1 remain`), and a changed global batch size."""
    resumed = getattr(source, "resumed", None)  # a ShardSource laid out afresh
    if resumed is None:
        logging.info("Resumed from step %d (data position %d)", step, source.position)
    else:
        written = meta.get("devices") or [len(meta["data_positions"]), None]
        logging.info("resumed step %d written by %s on %s; %s; then epoch %d over %s", step,
                     _slice(*written), _slice(jax.process_count(), jax.local_device_count()),
                     resumed.describe(), resumed.layout.base_epoch,
                     _plural(jax.process_count(), "process", "processes"))
    if meta.get("batch_size") not in (None, batch_size):
        logging.info("batch size changed on resume: %d (checkpoint) -> %d (this run); the "
                     "learning-rate schedule follows steps", meta["batch_size"], batch_size)


def _slice(processes: int, local_devices: int | None) -> str:
    """'2 processes x 1 device' (device count unknown for checkpoints from before it was kept)."""
    text = _plural(processes, "process", "processes")
    return text if local_devices is None else f"{text} x {_plural(local_devices, 'device', 'devices')}"


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _run_data(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What this run writes or prepares itself: its demo data directories, and whether its
    training data is a TFDS dataset (source.prepare() may download and prepare it)."""
    dirs = []
    if config.get("demo_data") is not None:
        dirs.append(str(config.input.data.files))
    if config.get("demo_digits") is not None:
        dirs.append(str(config.demo_digits.out_dir))
    return {"dirs": [d for d in dirs if d], "tfds": config.input.data.get("name") == "tfds"}


def _reads_run_data(evaluator: Any, run_data: Mapping[str, Any]) -> bool:
    """Whether an evaluator's data is only there once the run wrote or prepared it, so that
    `check_data()` must wait for it: the holdout (the run's own input) of a demo run, a TFDS
    evaluator of a TFDS run, data inside the demo data directories."""
    data = getattr(evaluator, "data", None)
    if data is None:  # the holdout evaluator: it reads the training input's holdout
        return bool(run_data["dirs"]) or run_data["tfds"]
    if data.get("name") == "tfds":
        return run_data["tfds"]
    values = [str(v) for v in data.values() if isinstance(v, str)]
    return any(v.startswith(d) for v in values for d in run_data["dirs"])


def _write_demo_data(config: ml_collections.ConfigDict) -> None:
    """The embedded demos' data, where run_config.parse pointed the input (process 0 only)."""
    # Late, like the input pipeline in run().
    from input_pipeline.demo import digits as demo_digits
    from input_pipeline.demo import shards as demo_shards  # late, like run()'s input pipeline

    if config.get("demo_data") is not None:
        demo_shards.ensure_demo_shards(config.input.data.files, num_images=config.demo_data.num_images,
                                       image_size=config.demo_data.image_size)
    if config.get("demo_digits") is not None:
        demo_digits.ensure_digits_folder(config.input.data.root,
                                         image_size=config.demo_digits.image_size)


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


def _init_params(run_cfg: run_config.RunConfig, model: Model) -> Any:
    """Parameters of `config.init` adapted to this run's head, pre-logits and resolution."""
    import checkpoints  # late: the format readers; TensorFlow only for coyo-vit TF checkpoints

    dims = model.dims
    # num_heads: TensorFlow's 2-D attention kernels cannot tell it; the config's model can.
    params, loaded = checkpoints.load(
        run_cfg.init, num_classes=run_cfg.num_classes, scan=model.scan,
        rep_size=model.representation_size, image_size=run_cfg.image_size,
        head_kernel_init=model.head_kernel_init, head_bias_init=model.head_bias_init,
        num_heads=dims.num_heads)
    wanted = {"patch_size": dims.patch_size, "width": dims.width, "depth": dims.depth,
              "mlp_dim": dims.mlp_dim, "num_heads": dims.num_heads, "pool_type": model.pool_type,
              "posemb": model.posemb, "gelu_approximate": model.gelu_approximate,
              "layer_norm_eps": model.layer_norm_eps}
    # Formats that do not record the numerics (npz, TensorFlow) use the Model's defaults.
    loaded = {"gelu_approximate": Model.gelu_approximate, "layer_norm_eps": Model.layer_norm_eps,
              **loaded}
    mismatched = {k: (loaded.get(k), v) for k, v in wanted.items() if loaded.get(k) != v}
    if mismatched:
        raise ValueError(f"config.init {run_cfg.init!r} does not match config.model: "
                         + ", ".join(f"{k} checkpoint={a} config={b}" for k, (a, b) in mismatched.items())
                         + " (set --config.model.<key> to the checkpoint's value)")
    logging.info("Initialised from %s", run_cfg.init)
    return params


def _gather_state(state: Mapping[str, int]) -> dict[str, list[int]]:
    """Each value of every process's `state`, in process order, in one collective (all
    processes call it; their states have the same keys)."""
    values = np.asarray(list(state.values()), np.int64)
    if jax.process_count() > 1:
        values = np.asarray(multihost_utils.process_allgather(values))
    values = values.reshape(-1, len(state))
    return {key: [int(v) for v in values[:, i]] for i, key in enumerate(state)}


def _model_kwargs(run_cfg: run_config.RunConfig) -> dict[str, Any]:
    """Model description stored with each checkpoint so it loads without the config."""
    kwargs = {"num_classes": run_cfg.num_classes, **run_cfg.model_kwargs}
    kwargs["dtype"] = str(kwargs.get("dtype", "float32"))
    return kwargs
