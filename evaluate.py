r"""Evaluate a checkpoint with the evaluators of a config; print a table and write JSON.

    python evaluate.py --workdir /ckpt/ft384 [--step 20000] [--evals val,real] [--output FILE]
    python evaluate.py --config configs/imagenet_finetune.py:res=384 --checkpoint /ckpt/ft384.npz \
        --config.input.data.data_dir=/data/tfds --output results.json

--workdir: a training workdir evaluated as its run evaluated it: its latest checkpoint (--step N
for another), with the run's own saved config (config.json, or the config.<k>.json a resume from
step k <= N wrote), so its resolution, evaluators and holdout (the `eval_every_steps` one) are
the run's. Results go to WORKDIR/eval_results.json unless --output says otherwise.
--workdir with --config: this run's checkpoint with the evaluators, data and resolution of
another config (--config.key=value overrides apply to it).
--config with --checkpoint: anything `checkpoints.load` reads (a training workdir: its latest
step; an orbax step; a coyo-vit TensorFlow checkpoint; a vit_jax / big_vision .npz); --output is
needed unless the checkpoint is a training workdir (then CHECKPOINT/eval_results.json).
The output's directory is checked before anything is evaluated.

The model comes from the checkpoint itself, but for the speed options of `config.model`
(`SPEED_OPTIONS`: attention_impl, attention_pad_multiple, gelu_recompute), which the config sets;
its position embedding is resized to `config.image_size` when that differs. Every entry of
`config.evals` runs (or those named by --evals), whatever its every_steps, and the `holdout`
that `config.eval_every_steps` adds. The demos' data is written if missing (where the run
wrote it, or a temp dir for a config's unset paths). Results: one row per metric on stdout, and {"checkpoint", "workdir", "step",
"config_file", "config", "results": {metric: value}, "seconds": {evaluator: s}} in the output.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import linen as nn
from jax.experimental import multihost_utils
from ml_collections import config_flags

from coyo_vit.config_keys import ConfigError
from coyo_vit.models import SPEED_OPTIONS, Model
from coyo_vit.training import cli, runtime, sharding
from coyo_vit.training import workdir as workdir_record
from coyo_vit.training.evaluators.registry import build_evaluators, run_sections
from coyo_vit.training.step import get_loss

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file whose evaluators, data and image size to use, optionally with an "
    "argument: configs/X.py:arg=val. Needed with --checkpoint; with --workdir, in place of the "
    "run's saved config (other data).", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Training workdir to evaluate: its latest checkpoint (or --step) with its "
    "saved config (config.json / config.<k>.json); writes WORKDIR/eval_results.json.")
_STEP = flags.DEFINE_integer("step", None, "With --workdir: the checkpoint step (default: the latest).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Checkpoint to evaluate with --config "
                                  "(anything checkpoints.load reads); not with --workdir.")
_EVALS = flags.DEFINE_list("evals", None, "Evaluators to run (default: all of config.evals and "
                           "the holdout).")
_OUTPUT = flags.DEFINE_string(
    "output", None, "Where to write the JSON results. Default: WORKDIR/eval_results.json with "
    "--workdir, or CHECKPOINT/eval_results.json for a --checkpoint that is a training workdir; "
    "required for any other --checkpoint.")
_VARIANT = flags.DEFINE_string("variant", None, "ViT variant (e.g. L/16) for checkpoints whose "
                               "shapes cannot tell the head count.")
RESULTS_FILE = "eval_results.json"


def load_sharded(path: str, image_size: int, mesh: jax.sharding.Mesh, rules, variant: str | None,
                 model_overrides: dict | None = None) -> tuple[Model, dict, object]:
    """(model, params placed per the sharding rules, their shardings) from any checkpoint;
    `model_overrides` replace the checkpoint's model fields (the config's speed options)."""
    import checkpoints  # lazy: TensorFlow is only needed for TF checkpoints

    params, kwargs = checkpoints.load(path, variant=variant, image_size=image_size)
    model = Model(**{**kwargs, **(model_overrides or {})})
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    with nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x)["params"], images)
        shardings = sharding.param_shardings(boxed, mesh, rules)
    return model, jax.device_put(params, shardings), shardings


def _write_demo_data(config) -> None:
    """The embedded demos' data (deterministic, reused when complete) where the config points
    (a saved config: where the run wrote it), else in a temp dir; the input follows it. Never
    into a workdir for another config: that would rewrite the run's own demo data."""
    from input_pipeline.demo import digits as demo_digits  # late: TensorFlow only for the demos
    from input_pipeline.demo import shards as demo_shards  # late, likewise

    temp = tempfile.gettempdir()
    writes = []
    with config.unlocked():
        if config.get("demo_data") is not None:
            config.input.data.files = (config.input.data.get("files") or config.demo_data.out_dir
                                       or os.path.join(temp, "coyo_vit_demo_data"))
            writes.append(lambda: demo_shards.ensure_demo_shards(
                config.input.data.files, num_images=config.demo_data.num_images,
                image_size=config.demo_data.image_size))
        if config.get("demo_digits") is not None:  # evaluators' sections share its root field
            config.input.data.root = (config.input.data.get("root") or config.demo_digits.out_dir
                                      or os.path.join(temp, "coyo_vit_digits"))
            writes.append(lambda: demo_digits.ensure_digits_folder(
                config.input.data.root, image_size=config.demo_digits.image_size))
    if jax.process_index() == 0:
        for write in writes:
            try:
                write()
            except OSError as err:  # e.g. a read-only workdir: its data may be complete anyway
                logging.warning("could not check or write the demo data: %s", err)
    multihost_utils.sync_global_devices("demo_data_written")


def format_table(results: dict[str, float]) -> str:
    width = max((len(k) for k in results), default=6)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ----------"]
    lines += [f"{name:<{width}}  {value:.6g}" for name, value in results.items()]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    workdir, checkpoint = _WORKDIR.value, _CHECKPOINT.value
    if workdir and checkpoint:
        raise ConfigError(f"--workdir {workdir} and --checkpoint {checkpoint}: give one; --workdir "
                          "DIR [--step N] evaluates a run's checkpoint, --checkpoint PATH (with "
                          "--config) any other")
    if not workdir and not (checkpoint and _CONFIG.value is not None):
        raise ConfigError("nothing to evaluate: give --workdir DIR (a training workdir, evaluated "
                          "with its saved config), or --config FILE with --checkpoint PATH")
    if _STEP.value is not None and not workdir:
        raise ConfigError(f"--step {_STEP.value} needs --workdir DIR (the run whose checkpoint "
                          "of that step to evaluate); with --checkpoint, name the step's directory")
    output = _output_path(workdir, checkpoint)
    runtime.initialize()
    step = config_file = None
    if workdir:
        step, checkpoint, config_file = _run_of(workdir, _STEP.value, _CONFIG.value is None)
        if _CONFIG.value is not None:  # the run's checkpoint with another config's evaluators
            config_file = None
    _check_writable(output)  # before anything is evaluated
    config = workdir_record.read_config(config_file) if config_file else _CONFIG.value
    logging.info("config %s, checkpoint %s", config_file or "--config", checkpoint)
    names = list(run_sections(config))
    if not names:
        raise ConfigError("the config has no `evals` section and no holdout (eval_every_steps): "
                          "nothing to evaluate")
    unknown = sorted(set(_EVALS.value or ()) - set(names))
    if unknown:
        raise ConfigError(f"--evals names {unknown}, not evaluators of the config: {sorted(names)}")
    _write_demo_data(config)  # before reading evals: they may share its root field
    evals = run_sections(config)
    evals = {name: evals[name] for name in _EVALS.value or names}
    train_input = None
    if any(section.get("type") == "holdout" for section in evals.values()):
        from input_pipeline import data_source  # late: TensorFlow only for the holdout's shards

        train_input = data_source.parse_input(config.input)

    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_from_config(config.get("sharding_rules"))
    config_model = config.get("model") or {}
    speed = {k: config_model[k] for k in SPEED_OPTIONS if k in config_model}
    model, params, shardings = load_sharded(checkpoint, config.image_size, mesh, rules,
                                            _VARIANT.value, speed)
    logging.info("model from the checkpoint, with the config's speed options %s",
                 {k: getattr(model, k) for k in SPEED_OPTIONS})
    results: dict[str, float] = {}
    seconds: dict[str, float] = {}
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        evaluators = build_evaluators(evals, model=model, mesh=mesh, params_shardings=shardings,
                                      loss_fn=get_loss(config.loss), train_input=train_input)
        for name, evaluator in evaluators.items():
            started = time.perf_counter()
            results.update(evaluator.evaluate(params))
            seconds[name] = round(time.perf_counter() - started, 2)
            logging.info("%s done in %.1fs", name, seconds[name])
    if jax.process_index() == 0:
        print(format_table(results))
        _write_json(output, {"checkpoint": checkpoint, "workdir": workdir, "step": step,
                             "config_file": config_file,
                             "config": json.loads(config.to_json_best_effort()),
                             "results": results, "seconds": seconds})
        print(f"wrote {output}")


def _run_of(workdir: str, step: int | None, needs_config: bool) -> tuple[int, str, str | None]:
    """(step, its checkpoint directory, the saved config in force at it) of a training workdir;
    a ConfigError naming what is missing otherwise."""
    from checkpoints import orbax_io  # late: orbax only once there is a checkpoint to read

    if not os.path.isdir(workdir) and "://" not in workdir:
        raise ConfigError(f"--workdir {workdir} does not exist: give a training workdir (its "
                          "config.json and checkpoints/<step>/, as train.py and finetune.py write "
                          "them), or --config FILE with --checkpoint PATH")
    steps = orbax_io.checkpoint_steps(workdir)
    config_file = workdir_record.saved_config_file(workdir, step if step is not None
                                                   else (steps[-1] if steps else 0))
    missing = ([f"no {workdir_record.CONFIG_FILE}"] if needs_config and config_file is None else []) \
        + ([f"no checkpoint ({os.path.join(workdir, orbax_io.CHECKPOINT_SUBDIR)}/<step>/)"]
           if not steps else [])
    if missing:
        raise ConfigError(
            f"--workdir {workdir} has {' and '.join(missing)}: not a training workdir, or one whose "
            "run has not saved yet (train.py and finetune.py write config.json at the start and a "
            "checkpoint every checkpoint_every_steps and at the end); evaluate another checkpoint "
            "with --config FILE --checkpoint PATH")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ConfigError(f"--step {step}: {workdir} has no checkpoint of that step; its "
                          f"checkpoints: {steps}")
    return step, os.path.join(workdir, orbax_io.CHECKPOINT_SUBDIR, str(step)), config_file


def _output_path(workdir: str | None, checkpoint: str | None) -> str:
    """--output, else RESULTS_FILE in the training workdir evaluated (see the flag)."""
    from checkpoints.orbax_io import CHECKPOINT_SUBDIR  # late: orbax is imported with it

    if _OUTPUT.value:
        return _OUTPUT.value
    if workdir:
        return os.path.join(workdir, RESULTS_FILE)
    if os.path.isdir(os.path.join(checkpoint, CHECKPOINT_SUBDIR)):
        return os.path.join(checkpoint, RESULTS_FILE)
    raise ConfigError(f"--output FILE is needed: --checkpoint {checkpoint} is not a training "
                      f"workdir to write {RESULTS_FILE} into (nothing is written into the current "
                      "directory unasked)")


def _check_writable(path: str) -> None:
    """A ConfigError naming `path` unless process 0 (the writer) can write a file there (local
    paths; a gs:// one shows at the end); every process raises it, none is left waiting."""
    problem = _write_problem(path) if jax.process_index() == 0 else None
    if jax.process_count() > 1:
        failed = multihost_utils.broadcast_one_to_all(np.int32(problem is not None))
        problem = problem or ("process 0 cannot write it" if int(failed) else None)
    if problem:
        raise ConfigError(f"cannot write the results to {path}: {problem}; nothing was evaluated "
                          "(give --output FILE in a writable directory)")


def _write_problem(path: str) -> str | None:
    """Why a file cannot be written at the local `path` (None: it can, or it is remote)."""
    if "://" in path:
        return None
    directory = os.path.dirname(os.path.abspath(path))
    problem = None
    if os.path.isdir(path):
        problem = "it is a directory"
    elif not os.path.isdir(directory):
        problem = f"{directory} is not a directory"
    else:
        try:
            handle, probe = tempfile.mkstemp(dir=directory, prefix=".eval_results.", suffix=".probe")
            os.close(handle)
            os.remove(probe)
        except OSError as err:
            problem = f"{directory} is not writable ({err.strerror})"
    return problem


def _write_json(path: str, data: dict) -> None:
    """Written whole, then renamed: an interrupted write leaves no partial results file."""
    if "://" in path:
        import tensorflow as tf  # late: gfile only for remote (gs://) outputs

        with tf.io.gfile.GFile(path, "w") as f:
            json.dump(data, f, indent=2)
        return
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    cli.run(main)
