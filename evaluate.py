r"""Evaluate a checkpoint with the evaluators of a config; print a table and write JSON.

    python evaluate.py --config configs/imagenet_finetune.py:res=384 --checkpoint /ckpt/run \
        --config.input.data.data_dir=/data/tfds [--evals val,real] [--output results.json]

The checkpoint is anything `checkpoints.load` reads (a training workdir: its latest step; an
orbax step; a coyo-vit TensorFlow checkpoint; a vit_jax / big_vision .npz). The model comes
from the checkpoint itself, but for the speed options of `config.model` (`SPEED_OPTIONS`:
attention_impl, attention_pad_multiple, gelu_recompute), which the config sets; its position
embedding is resized to `config.image_size` when that differs. Every entry of `config.evals`
runs (or those named by --evals), whatever its every_steps. The digits demo's folder is written
if its root is unset. Results: one row per metric on stdout, and {"checkpoint", "config",
"results": {metric: value}, "seconds": {evaluator: s}} in --output.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # before anything imports TensorFlow

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import linen as nn
from jax.experimental import multihost_utils
from ml_collections import config_flags

from coyo_vit.models import SPEED_OPTIONS, Model
from coyo_vit.training import cli, runtime, sharding
from coyo_vit.training.evaluators.registry import build_evaluators
from coyo_vit.training.step import get_loss

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file with `evals`, optionally with an argument: configs/X.py:arg=val.",
    lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Checkpoint to evaluate.")
_EVALS = flags.DEFINE_list("evals", None, "Evaluators of config.evals to run (default: all).")
_OUTPUT = flags.DEFINE_string("output", "eval_results.json", "Where to write the JSON results.")
_VARIANT = flags.DEFINE_string("variant", None, "ViT variant (e.g. L/16) for checkpoints whose "
                               "shapes cannot tell the head count.")
flags.mark_flags_as_required(["config", "checkpoint"])


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


def _write_demo_digits(config) -> None:
    """The digits demo's folder (deterministic, so any place will do): out_dir or a temp dir."""
    from input_pipeline.demo import digits as demo_digits  # late: TensorFlow only for the demo

    out_dir = config.demo_digits.out_dir or os.path.join(tempfile.gettempdir(), "coyo_vit_digits")
    if jax.process_index() == 0:
        demo_digits.ensure_digits_folder(out_dir, image_size=config.demo_digits.image_size)
    multihost_utils.sync_global_devices("demo_digits_written")
    with config.unlocked():
        config.input.data.root = out_dir


def format_table(results: dict[str, float]) -> str:
    width = max((len(k) for k in results), default=6)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ----------"]
    lines += [f"{name:<{width}}  {value:.6g}" for name, value in results.items()]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    runtime.initialize()
    config = _CONFIG.value
    if not config.get("evals"):
        raise app.UsageError("the config has no `evals` section: nothing to evaluate")
    if config.get("demo_digits") is not None and not config.input.data.get("root"):
        _write_demo_digits(config)  # before reading evals: they share the root field
    evals = config.evals.to_dict()
    if _EVALS.value:
        unknown = sorted(set(_EVALS.value) - set(evals))
        if unknown:
            raise app.UsageError(f"--evals names {unknown}, not in config.evals {sorted(evals)}")
        evals = {name: evals[name] for name in _EVALS.value}

    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_from_config(config.get("sharding_rules"))
    config_model = config.get("model") or {}
    speed = {k: config_model[k] for k in SPEED_OPTIONS if k in config_model}
    model, params, shardings = load_sharded(_CHECKPOINT.value, config.image_size, mesh, rules,
                                            _VARIANT.value, speed)
    logging.info("model from the checkpoint, with the config's speed options %s",
                 {k: getattr(model, k) for k in SPEED_OPTIONS})
    results: dict[str, float] = {}
    seconds: dict[str, float] = {}
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        evaluators = build_evaluators(evals, model=model, mesh=mesh, params_shardings=shardings,
                                      loss_fn=get_loss(config.loss))
        for name, evaluator in evaluators.items():
            started = time.perf_counter()
            results.update(evaluator.evaluate(params))
            seconds[name] = round(time.perf_counter() - started, 2)
            logging.info("%s done in %.1fs", name, seconds[name])
    if jax.process_index() == 0:
        print(format_table(results))
        with open(_OUTPUT.value, "w", encoding="utf-8") as f:
            json.dump({"checkpoint": _CHECKPOINT.value,
                       "config": json.loads(config.to_json_best_effort()),
                       "results": results, "seconds": seconds}, f, indent=2)
        print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
    cli.run(main)
