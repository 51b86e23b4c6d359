"""The command line of train.py and finetune.py, and the run config parsed once, up front.

`parse(config, workdir)` turns the ml_collections config into a `RunConfig`: the model, the
optimizer and its schedule, the loss, the mesh and sharding rules, the parsed input section
(the data source's config) and the evaluator sections (the holdout included). Every section is
checked here, before any data is prepared or any step compiled, so a typo fails in seconds; the
loop and the builders take the typed objects and never read the ConfigDict again.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import optax
from absl import app, flags
from ml_collections import config_flags

from coyo_vit.config_keys import ConfigError, check_keys
from coyo_vit.input_config import parse_input  # TensorFlow-free: errors come in seconds
from coyo_vit.models import VARIANTS, Model, decode_variant
from coyo_vit.training import optimizer, runtime
from coyo_vit.training.evaluators.registry import run_sections
from coyo_vit.training.step import get_loss

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with an argument: configs/X.py:arg=val,arg2=val2. "
    "Override any value with --config.key=value; unknown keys are an error.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.jsonl; "
                               "a workdir holding a checkpoint is resumed.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for clusters that jax.distributed does not "
    "detect by itself (TPU pods and SLURM are detected; leave unset there).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's rank (with --coordinator_address).")
flags.mark_flags_as_required(["config", "workdir"])

# Top-level keys a training config may hold; anything else is a typo.
TOP_LEVEL_KEYS = (
    "seed", "num_classes", "image_size", "batch_size", "grad_accum_steps", "total_steps", "loss",
    "model", "init", "input", "demo_data", "demo_digits", "optimizer", "schedule", "ema_decay",
    "mixup_alpha", "evals", "eval_batch_size", "eval_every_steps", "log_every_steps",
    "checkpoint_every_steps", "keep_checkpoints", "checkpoint_compression", "device_prefetch",
    "compilation_cache_dir", "mesh", "sharding_rules", "param_sharding")


# config.model.variant="auto": the model's shape is config.init's (see resolve_model).
AUTO = "auto"
_SHAPE_FIELDS = ("patch_size", "width", "depth", "mlp_dim", "num_heads")
_MODEL_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Model)}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A training run, parsed and checked: what the loop needs and nothing it must re-read."""
    seed: int
    num_classes: int
    image_size: int
    batch_size: int
    grad_accum_steps: int
    total_steps: int
    model_kwargs: dict[str, Any]          # Model(**model_kwargs): the config's model section
    init: str | None                      # a checkpoint to start from (fine-tuning)
    input: Any                            # input_pipeline's parsed input section
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array]
    schedule: optax.Schedule
    tx: optax.GradientTransformation
    skip_nonfinite: bool
    ema_decay: float | None
    mixup_alpha: float
    evals: dict[str, dict[str, Any]]      # evaluator sections by name, the holdout included
    mesh_axes: dict[str, int]
    sharding_rules: Any
    param_sharding: tuple
    log_every_steps: int
    checkpoint_every_steps: int
    keep_checkpoints: int
    checkpoint_compression: bool
    device_prefetch: int
    compilation_cache_dir: str | None
    raw: ml_collections.ConfigDict        # as given, for WORKDIR/config.json

    @property
    def model(self) -> Model:
        return Model(num_classes=self.num_classes, **self.model_kwargs)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, 3)


def parse(config: ml_collections.ConfigDict, workdir: str) -> RunConfig:
    """Checks every section of `config` and returns the typed run (see the module docstring).

    The embedded demos' data sections point the input at the data they will write into
    `workdir`; nothing is written here.
    """
    check_keys(config, TOP_LEVEL_KEYS, "config")
    with config.unlocked():
        if config.get("demo_data") is not None:
            demo_dir = config.demo_data.out_dir or os.path.join(workdir, "demo_data")
            _refuse_demo_data_override(config.input.data.get("files"), demo_dir, "files",
                                       "demo_data")
            config.input.data.files = demo_dir
        if config.get("demo_digits") is not None:
            # A shared field: the evaluators' data sections follow it.
            config.demo_digits.out_dir = config.demo_digits.out_dir or os.path.join(workdir, "digits")
            _refuse_demo_data_override(config.input.data.get("root"), config.demo_digits.out_dir,
                                       "root", "demo_digits")
            config.input.data.root = config.demo_digits.out_dir
    model_kwargs = resolve_model(config.model.to_dict(), config.get("init") or None,
                                 config.num_classes)
    if config.model.get("variant") == AUTO:
        with config.unlocked():  # WORKDIR/config.json (and the report) name the resolved shape
            config.model.update({k: v for k, v in model_kwargs.items() if k in config.model})
    schedule = optimizer.make_schedule(config.schedule, config.total_steps)
    skip_nonfinite = bool(config.optimizer.get("skip_nonfinite", False))
    evals = run_sections(config)  # config.evals and the holdout of eval_every_steps
    accum = config.get("grad_accum_steps", 1)
    if not isinstance(accum, int) or accum < 1:
        raise ValueError(f"config.grad_accum_steps must be an int >= 1, got {accum!r}")
    return RunConfig(
        seed=config.seed, num_classes=config.num_classes, image_size=config.image_size,
        batch_size=config.batch_size, grad_accum_steps=accum, total_steps=config.total_steps,
        model_kwargs=model_kwargs, init=config.get("init") or None,
        input=parse_input(config.input), loss_fn=get_loss(config.loss),
        schedule=schedule, tx=optimizer.make_optimizer(config.optimizer, schedule),
        skip_nonfinite=skip_nonfinite, ema_decay=config.get("ema_decay"),
        mixup_alpha=config.get("mixup_alpha", 0.0), evals=evals,
        mesh_axes=dict(config.mesh), sharding_rules=config.get("sharding_rules"),
        param_sharding=tuple(config.get("param_sharding", ())),
        log_every_steps=config.log_every_steps, checkpoint_every_steps=config.checkpoint_every_steps,
        keep_checkpoints=config.keep_checkpoints,
        checkpoint_compression=config.get("checkpoint_compression", False),
        device_prefetch=config.get("device_prefetch", 2),
        compilation_cache_dir=config.get("compilation_cache_dir") or None, raw=config)


def resolve_model(model: dict[str, Any], init: str | None, num_classes: int) -> dict[str, Any]:
    """`config.model` as concrete Model kwargs, checked against the checkpoint `init`.

    With `init`, the shape the config leaves open comes from the checkpoint's shapes and metadata
    (checkpoints.describe; no parameter is read): everything with `variant="auto"` (patch,
    width, depth, MLP size, heads, pooling, position embedding, and the pre-logits size when
    `rep_size=True` keeps them), else `pool_type` / `posemb` where they are None. Any field the
    config sets wins, and a shape that differs from the checkpoint's is a ConfigError naming
    both, e.g. "checkpoint: width 64, depth 2; config: B/16 (width 768, depth 12)".
    """
    auto = model.get("variant") == AUTO
    if init is None:
        if auto:
            raise ConfigError(
                "config.model.variant='auto' takes the model's shape from config.init, which is "
                "unset: set --config.init=CHECKPOINT, or a variant (e.g. --config.model.variant=B/16)")
        resolved = {k: v for k, v in model.items() if v is not None or _MODEL_DEFAULTS.get(k) is None}
        return _checked(resolved, num_classes)
    checkpoint = _describe_init(init, model, auto)
    resolved = dict(model)
    open_fields = _SHAPE_FIELDS + ("pool_type", "posemb") if auto else ("pool_type", "posemb")
    for field in open_fields:
        if resolved.get(field) is None:
            resolved[field] = checkpoint[field]
    if auto:
        # A standard size is named by its variant (the report's "ViT-L/16"); the fields stay set.
        sizes = {k: resolved[k] for k in ("width", "depth", "mlp_dim", "num_heads")}
        resolved["variant"] = next((f"{name}/{resolved['patch_size']}" for name, known
                                    in VARIANTS.items() if known == sizes), None)
        if resolved.get("rep_size") is True:  # keep the checkpoint's pre-logits layer
            if not checkpoint.get("rep_size"):
                raise ConfigError(f"config.model.rep_size=True keeps the pre-logits layer, but "
                                  f"config.init {init!r} has none: set --config.model.rep_size=None")
            resolved["rep_size"] = checkpoint["rep_size"]
        logging.info("config.model.variant='auto': the shape of %s: %s", init,
                     {k: resolved[k] for k in open_fields + ("rep_size",)})
    model_obj = Model(num_classes=num_classes, **_checked(resolved, num_classes))
    dims = model_obj.dims
    ours = {"patch": dims.patch_size, "width": dims.width, "depth": dims.depth,
            "mlp_dim": dims.mlp_dim, "heads": dims.num_heads, "pool_type": model_obj.pool_type,
            "posemb": model_obj.posemb}
    theirs = {"patch": checkpoint["patch_size"], "width": checkpoint["width"],
              "depth": checkpoint["depth"], "mlp_dim": checkpoint["mlp_dim"],
              "heads": checkpoint["num_heads"], "pool_type": checkpoint["pool_type"],
              "posemb": checkpoint["posemb"]}
    rep = model_obj.representation_size
    if rep is not None:  # kept pre-logits must be the checkpoint's (None drops them)
        ours["pre-logits"], theirs["pre-logits"] = rep, checkpoint.get("rep_size")
    if ours != theirs:
        raise ConfigError(f"config.init {init!r} does not match config.model: "
                          + mismatch(theirs, ours, model.get("variant"))
                          + "; leave config.model.variant='auto' (the checkpoint's shape) or set "
                          "--config.model.<key> to the checkpoint's values")
    return resolved


def mismatch(checkpoint: Mapping[str, Any], config: Mapping[str, Any], variant: str | None) -> str:
    """"checkpoint: width 64, depth 2; config: B/16 (width 768, depth 12)": the differing fields."""
    keys = [k for k in config if checkpoint.get(k) != config[k]]
    theirs = ", ".join(f"{k} {checkpoint.get(k)}" for k in keys)
    ours = ", ".join(f"{k} {config[k]}" for k in keys)
    return f"checkpoint: {theirs}; config: " + (f"{variant} ({ours})" if variant and variant != AUTO else ours)


def _describe_init(init: str, model: Mapping[str, Any], auto: bool) -> dict[str, Any]:
    """checkpoints.describe(init), the head count from the config where the format has none."""
    import checkpoints  # late: the format readers (TensorFlow only for coyo-vit TF checkpoints)

    heads = model.get("num_heads")
    try:
        return checkpoints.describe(init, num_heads=heads)
    except checkpoints.HeadCountUnknown as err:
        if auto or model.get("variant") is None:
            raise ConfigError(
                f"config.init {init!r} does not record its attention head count and its width "
                f"{err.width} is not a standard ViT's: set --config.model.num_heads (a divisor of "
                f"{err.width}; standard ViTs have 64 channels per head)") from None
        # The config's variant supplies the heads; if they cannot divide the width, the width
        # differs from the variant's anyway, which the caller reports.
        variant_heads = decode_variant(model["variant"])["num_heads"]
        described = checkpoints.describe(
            init, num_heads=variant_heads if err.width % variant_heads == 0 else 1)
        return {**described, "num_heads": variant_heads}
    except FileNotFoundError:
        raise ConfigError(
            f"config.init {init!r} does not exist: give a checkpoints.load path (a training "
            f"workdir or one of its steps, a coyo-vit TensorFlow checkpoint, a .npz file, or a "
            f"transformers / timm folder)") from None
    except ValueError as err:  # no reader accepted it: the reasons, on one line
        raise ConfigError(f"config.init {init!r}: {' '.join(str(err).split())}") from None


def _checked(model: dict[str, Any], num_classes: int) -> dict[str, Any]:
    try:
        Model(num_classes=num_classes, **model)  # checks its fields and the variant
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config.model: {err}") from None
    return model


def _refuse_demo_data_override(given: Any, demo_dir: str, key: str, section: str) -> None:
    """The demos train on the data they write: a data path set by hand would be replaced (and
    written into), so it is an error rather than silently ignored."""
    if given and given != demo_dir:
        raise ConfigError(
            f"config.input.data.{key}={given!r} cannot be used with this demo config: it trains on "
            f"the data it writes (config.{section}); move that with --config.{section}.out_dir=DIR, "
            "or train on your own data with a config without a demo section (e.g. "
            + ("configs/coyo_pretrain.py)" if section == "demo_data" else "configs/finetune.py)"))


def main(argv: list[str], *, require_init: bool) -> None:
    """Body of train.py's and finetune.py's main(): join the runtime, then the train loop."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if require_init and not config.get("init"):
        raise app.UsageError("Fine-tuning needs --config.init=PATH (a checkpoint to start from); "
                             "use train.py to train from scratch.")
    try:
        runtime.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    except ValueError as err:  # inconsistent multi-process flags: a usage error, not a crash
        raise app.UsageError(str(err)) from None
    # A bad config is reported before TensorFlow, orbax and the loop are imported (~15 s of CPU):
    # parse is TensorFlow-free, and the loop takes its result. After runtime.initialize: reading
    # config.init's checkpoint may touch JAX.
    run_cfg = parse(config, _WORKDIR.value)
    from coyo_vit.training import loop  # late: the loop pulls in TensorFlow, orbax, the evaluators

    loop.run(config, _WORKDIR.value, run_cfg)
    logging.info("Finished; results in %s", _WORKDIR.value)
