"""One training step, everything it computes: losses, prec@1, mixup, the EMA, the train state,
and the jit-compiled step with the XLA options it is compiled with.

Nothing here imports TensorFlow: GPU/TPU benchmarks and tests run these on synthetic arrays.
"""
from __future__ import annotations

import os
import shlex
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding

from coyo_vit.models import layers
from coyo_vit.training import sharding

# --- Losses over dense float targets [batch, classes] -------------------------------------

def sigmoid_xent(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-example binary cross-entropy SUMMED over classes (the COYO recipe; mean over batch later)."""
    return optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets).sum(axis=-1)


def softmax_xent(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy against (one-hot or smoothed) target distributions."""
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


LOSSES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "sigmoid_xent": sigmoid_xent,
    "softmax_xent": softmax_xent,
}


def get_loss(name: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    if name not in LOSSES:
        raise ValueError(f"Unknown loss {name!r}; valid: {sorted(LOSSES)}.")
    return LOSSES[name]


# --- Metrics: per-example on device, summed on the host ---------------------------------

def precision_at_1(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """1.0 where the highest-scoring class is a positive label (target > 0) of the example."""
    top1 = jnp.argmax(logits, axis=-1)
    return (jnp.take_along_axis(targets, top1[:, None], axis=-1)[:, 0] > 0).astype(jnp.float32)


# --- Mixup ------------------------------------------------------------------------------
# Mixup (Zhang et al. 2018) of a batch of images and dense label vectors, in jnp.
#
# One mixing weight per batch, drawn from Beta(alpha, alpha) and folded to >= 0.5 so each mixed
# example stays mostly itself; example i is mixed with example i-1 (a roll of the batch by one),
# as in big_vision. Runs inside jit on global batches sharded over the mesh of
# `coyo_vit.training.sharding.make_mesh` (Auto axes: the roll becomes a collective permute).
# Callers fold the step into the rng (`jax.random.fold_in(rng, step)`), so a resumed run mixes
# exactly as an uninterrupted one. `alpha == 0` means "off" and returns the inputs unchanged.

def mixup(rng: jax.Array, images: jax.Array, labels: jax.Array, alpha: float
          ) -> tuple[jax.Array, jax.Array]:
    """Returns (mixed images, mixed labels): lam * x + (1 - lam) * roll(x, 1) for both.

    images [B, ...], labels [B, C] float (one-hot or multi-hot); `alpha` a Python float >= 0.
    Label rows that sum to 1 still sum to 1 after mixing. uint8 images are first mapped to the
    model's float range (models/layers.py): rounding mixed pixels back to uint8 would lose detail.
    """
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha < 0:
        raise ValueError(f"mixup alpha must be a number >= 0 (0 = off), got {alpha!r}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"images {images.shape} and labels {labels.shape} differ in batch size")
    if alpha == 0:
        return images, labels
    images = layers.to_model_range(images)
    lam = jax.random.beta(rng, alpha, alpha)
    lam = jnp.maximum(lam, 1.0 - lam)

    def mix(x: jax.Array) -> jax.Array:
        mixed = lam * x.astype(jnp.float32) + (1.0 - lam) * jnp.roll(x, 1, axis=0).astype(jnp.float32)
        return mixed.astype(x.dtype)

    return mix(images), mix(labels)


def mixup_batch(rng: jax.Array, batch: dict[str, jax.Array], alpha: float) -> dict[str, jax.Array]:
    """`mixup` applied to batch["image"] and batch["labels"]; other entries pass through."""
    images, labels = mixup(rng, batch["image"], batch["labels"], alpha)
    return {**batch, "image": images, "labels": labels}


# --- Exponential moving average of the parameters ---------------------------------------
# Exponential moving average (EMA) of parameters, for the 512px fine-tuning recipe (decay 0.9999).
#
# Convention (TensorFlow's `ExponentialMovingAverage(num_updates=...)`, which the Keras recipe
# used): the average starts as a copy of the parameters, and the update with index `step`
# (0 for the first update) uses
#
#     decay_t = min(decay, (1 + step) / (10 + step))        (warmup=True, the default)
#     ema     = decay_t * ema + (1 - decay_t) * params
#
# so early averages follow the fast-moving weights instead of clinging to the initialisation
# (at decay 0.9999 a plain EMA would still be ~37% initial weights after 10k steps). Starting from
# a copy instead of zeros means no debiasing is needed. With warmup=False, decay_t = decay.

def init_ema(params: Any) -> Any:
    """The EMA before any update: a float32 copy of the parameters."""
    return jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)


def ema_decay(decay: float | jax.Array, step: int | jax.Array, warmup: bool = True) -> jax.Array:
    """The decay used by update number `step` (0-based); see the comment above init_ema."""
    decay = jnp.asarray(decay, jnp.float32)
    if not warmup:
        return decay
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(ema: Any, params: Any, decay: float | jax.Array, step: int | jax.Array,
               warmup: bool = True) -> Any:
    """One EMA update after training step `step` (0-based count of earlier updates).

    Pure and jit-friendly (`step` may be traced); keep `ema` sharded like the parameters.
    `decay` must lie in [0, 1]; a Python float outside raises.
    """
    if isinstance(decay, (int, float)) and not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay!r} (the recipe uses 0.9999)")
    d = ema_decay(decay, step, warmup)
    return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p.astype(jnp.float32), ema, params)


# --- XLA options the steps are compiled with -------------------------------------------
# The XLA options the train and eval steps are compiled with, per platform, and why.
#
# Passed to `jax.jit(compiler_options=...)`, so they apply to these steps alone and need no
# environment set before JAX starts. A flag the user sets in `XLA_FLAGS` wins: ours is then left
# out, so `XLA_FLAGS=--xla_gpu_enable_triton_gemm=true` restores XLA's own choice.

# CPU: LLVM backend level 1 instead of 2 compiles faster with bitwise-identical results (the
# matmuls run in YNNPACK, not in LLVM code); tests check the bits, docs/performance.md has the times.
_CPU = {"xla_backend_optimization_level": 1}

# GPU: with Triton's GEMM fusion off, XLA's cuBLAS rewriter sees the matrix products first and
# folds the MLP's bias + GELU (and the other bias adds) into cuBLASLt epilogues instead of leaving
# them to separate memory-bound fusions. docs/performance.md, section 3, has the measurements.
_GPU = {"xla_gpu_enable_triton_gemm": False}

# jax names CUDA and ROCm devices "gpu" alike; measured on CUDA (H100) only.
_BY_PLATFORM: Mapping[str, Mapping[str, object]] = {"cpu": _CPU, "gpu": _GPU}


def flags_set_in(xla_flags: str) -> set[str] | None:
    """Names of the flags an XLA_FLAGS value sets, read as XLA reads it: `--name[=value]` tokens
    up to the first token without a leading dash. A value that does not start with a dash names a
    file of flags, whose text is read the same way; None when that file cannot be read."""
    text = xla_flags.strip()
    if text and not text.startswith("-"):
        try:
            with open(text, encoding="utf-8") as file:
                text = file.read()
        except OSError:
            return None
    try:
        tokens = shlex.split(text)
    except ValueError:  # an unbalanced quote: split on spaces, as a best effort
        tokens = text.split()
    names = set()
    for token in tokens:
        if not token.startswith("-"):
            break
        names.add(token.lstrip("-").split("=", 1)[0])
    return names


def compiler_options_for_platform(platform: str, xla_flags: str | None = None) -> dict[str, object] | None:
    """The step's compiler options on `platform` (a jax Device.platform), without those that
    `xla_flags` (default: the XLA_FLAGS environment variable) sets itself; None when none remain,
    and when XLA_FLAGS names a file that cannot be read (then XLA's flags decide alone)."""
    set_by_user = flags_set_in(os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags)
    if set_by_user is None:
        return None
    options = {name: value for name, value in _BY_PLATFORM.get(platform, {}).items()
               if name not in set_by_user}
    return options or None


def compiler_options_for_mesh(mesh: Mesh) -> dict[str, object] | None:
    """`compiler_options_for_platform` of the devices a step runs on (a mesh holds devices of one platform)."""
    return compiler_options_for_platform(mesh.devices.flat[0].platform)


# --- Train state and step ---------------------------------------------------------------

@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32[2] key data: checkpoints as a plain array
    ema_params: Any = None  # exponential moving average of params, when config.ema_decay is set

    def as_checkpoint(self) -> dict[str, Any]:
        tree = {"step": self.step, "params": self.params, "opt_state": self.opt_state, "rng": self.rng}
        return tree if self.ema_params is None else {**tree, "ema_params": self.ema_params}

    @classmethod
    def from_checkpoint(cls, tree: dict[str, Any]) -> "TrainState":
        return cls(step=tree["step"], params=tree["params"], opt_state=tree["opt_state"],
                   rng=tree["rng"], ema_params=tree.get("ema_params"))

    @property
    def eval_params(self) -> Any:
        """What evaluators see: the EMA weights when kept, else the trained ones."""
        return self.params if self.ema_params is None else self.ema_params


def _unboxed(model: nn.Module, rng: jax.Array, images: jax.Array) -> Any:
    return nn.meta.unbox(model.init(rng, images, train=False)["params"])


def state_shardings(model: nn.Module, tx: optax.GradientTransformation, image_shape: tuple[int, ...],
                    mesh: Mesh, rules, param_rules=(), ema: bool = False) -> tuple[TrainState, TrainState]:
    """(abstract state, its shardings): shapes without allocating, placements from logical axes."""
    images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    boxed = jax.eval_shape(lambda r, x: model.init(r, x, train=False)["params"], jax.random.PRNGKey(0), images)
    p_shardings = sharding.param_shardings(boxed, mesh, rules, param_rules)
    abstract_params = nn.meta.unbox(boxed)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    o_shardings = sharding.opt_state_shardings(tx, abstract_opt, p_shardings, mesh)
    rep = sharding.replicated(mesh)
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                          opt_state=abstract_opt, rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
                          ema_params=abstract_params if ema else None)
    shardings = TrainState(step=rep, params=p_shardings, opt_state=o_shardings, rng=rep,
                           ema_params=p_shardings if ema else None)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    return abstract, shardings


def init_state(model: nn.Module, tx: optax.GradientTransformation, image_shape: tuple[int, ...],
               seed: int, shardings: TrainState, params: Any | None = None) -> TrainState:
    """Initialises (or adopts `params`, e.g. a checkpoint to fine-tune) into the target shardings.

    Random parameters are created directly in their shards; given ones are passed in as
    arguments (never baked into the program as constants) and placed by `out_shardings`.
    """
    ema = shardings.ema_params is not None

    def init(rng, given):
        init_rng, state_rng = jax.random.split(rng)
        p = given if given is not None else _unboxed(model, init_rng, jnp.zeros((1, *image_shape)))
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                          rng=jax.random.bits(state_rng, (2,), jnp.uint32),
                          ema_params=init_ema(p) if ema else None)
    return jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(seed), params)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    loss_fn: Callable[[jax.Array, jax.Array], jax.Array],
                    shardings: TrainState, batch_sharding: NamedSharding,
                    schedule: optax.Schedule, grad_accum_steps: int = 1,
                    ema_decay: float | None = None, mixup_alpha: float = 0.0,
                    skip_nonfinite: bool = False) -> Callable:
    """Returns step(state, batch) -> (state, metrics); `state` is donated.

    With gradient accumulation the global batch is split into `grad_accum_steps` micro-batches
    whose gradients are averaged inside one compiled step, so one step is one global batch.
    Mixup (alpha > 0) mixes the global batch on device; the EMA (when kept) follows each update.
    With `skip_nonfinite`, a step whose loss or gradient norm is inf/nan keeps the parameters,
    optimizer state (moments and Adam's count) and EMA it started from, only the step and the
    learning-rate schedule advance, and it reports `train/skipped_nonfinite` = 1. Done here
    rather than with optax.apply_if_finite, which gives up after a run of bad steps (applying
    the NaN update) and changes the optimizer state's layout, so checkpoints with and without it
    would not restore each other.
    """
    def loss_and_metrics(params, images, labels, rng):
        logits = model.apply({"params": params}, images, train=True, rngs={"dropout": rng})
        loss = loss_fn(logits, labels).mean()
        return loss, precision_at_1(logits, labels).mean()

    grad_fn = jax.value_and_grad(loss_and_metrics, has_aux=True)

    def step(state: TrainState, batch: dict[str, jax.Array]):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng, impl="threefry2x32"), state.step)
        if mixup_alpha:
            rng, mix_rng = jax.random.split(rng)
            batch = mixup_batch(mix_rng, batch, mixup_alpha)
        images, labels = batch["image"], batch["labels"]
        if grad_accum_steps == 1:
            (loss, prec1), grads = grad_fn(state.params, images, labels, rng)
        else:
            def split(x):  # micro-batch i takes every grad_accum_steps-th example: stays spread over devices
                x = x.reshape(x.shape[0] // grad_accum_steps, grad_accum_steps, *x.shape[1:])
                return jnp.swapaxes(x, 0, 1)

            def accumulate(carry, micro):
                i_images, i_labels, i = micro
                (l, p), g = grad_fn(state.params, i_images, i_labels, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, carry, (l, p, g)), None

            zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params))
            (loss, prec1, grads), _ = jax.lax.scan(
                accumulate, zeros, (split(images), split(labels), jnp.arange(grad_accum_steps)))
            loss, prec1, grads = jax.tree.map(lambda x: x / grad_accum_steps, (loss, prec1, grads))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params = state.ema_params
        if ema_params is not None:
            ema_params = ema_update(state.ema_params, params, ema_decay, state.step)
        grad_norm = optax.tree_utils.tree_norm(grads)
        metrics = {"train/loss": loss, "train/prec@1": prec1, "train/lr": schedule(state.step),
                   "train/grad_norm": grad_norm}
        if skip_nonfinite:
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            # Only the schedule's step count advances, so the learning rate keeps following the
            # global step (train/lr stays the rate in use); Adam's own count stays with the
            # moments it bias-corrects.
            is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
            params, opt_state, ema_params = jax.tree.map(
                lambda new, old: new if is_schedule(new) else jnp.where(finite, new, old),
                (params, opt_state, ema_params), (state.params, state.opt_state, state.ema_params),
                is_leaf=is_schedule)
            metrics["train/skipped_nonfinite"] = jnp.logical_not(finite).astype(jnp.float32)
        metrics["train/param_norm"] = optax.tree_utils.tree_norm(params)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  ema_params=ema_params)
        return new_state, metrics

    rep = sharding.replicated(batch_sharding.mesh)
    compiler_options = compiler_options_for_mesh(batch_sharding.mesh)
    return jax.jit(step, in_shardings=(shardings, batch_sharding), out_shardings=(shardings, rep),
                   donate_argnums=(0,), compiler_options=compiler_options)
