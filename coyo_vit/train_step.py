"""Train state, its sharded initialisation, and the jit-compiled train and eval steps.

Nothing here imports TensorFlow: GPU/TPU benchmarks and tests run these on synthetic arrays.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding

from coyo_vit import compiler_options as compiler_options_lib
from coyo_vit import ema as ema_lib
from coyo_vit import metrics as metrics_lib
from coyo_vit import mixup as mixup_lib
from coyo_vit import sharding as sharding_lib


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
    p_shardings = sharding_lib.param_shardings(boxed, mesh, rules, param_rules)
    abstract_params = nn.meta.unbox(boxed)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    o_shardings = sharding_lib.opt_state_shardings(tx, abstract_opt, p_shardings, mesh)
    rep = sharding_lib.replicated(mesh)
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
                          ema_params=ema_lib.init_ema(p) if ema else None)
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
        return loss, metrics_lib.precision_at_1(logits, labels).mean()

    grad_fn = jax.value_and_grad(loss_and_metrics, has_aux=True)

    def step(state: TrainState, batch: dict[str, jax.Array]):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng, impl="threefry2x32"), state.step)
        if mixup_alpha:
            rng, mix_rng = jax.random.split(rng)
            batch = mixup_lib.mixup_batch(mix_rng, batch, mixup_alpha)
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
            ema_params = ema_lib.ema_update(state.ema_params, params, ema_decay, state.step)
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

    rep = sharding_lib.replicated(batch_sharding.mesh)
    compiler_options = compiler_options_lib.for_mesh(batch_sharding.mesh)
    return jax.jit(step, in_shardings=(shardings, batch_sharding), out_shardings=(shardings, rep),
                   donate_argnums=(0,), compiler_options=compiler_options)


def make_eval_step(model: nn.Module, loss_fn: Callable[[jax.Array, jax.Array], jax.Array],
                   params_shardings: Any, batch_sharding: NamedSharding) -> Callable:
    """Returns eval(params, batch) -> sums of loss, prec@1 and example count over the real (masked) examples."""
    def step(params, batch):
        logits = model.apply({"params": params}, batch["image"], train=False)
        mask = batch["_mask"].astype(jnp.float32)
        return {"loss": (loss_fn(logits, batch["labels"]) * mask).sum(),
                "prec@1": (metrics_lib.precision_at_1(logits, batch["labels"]) * mask).sum(),
                "count": mask.sum()}

    rep = sharding_lib.replicated(batch_sharding.mesh)
    compiler_options = compiler_options_lib.for_mesh(batch_sharding.mesh)
    return jax.jit(step, in_shardings=(params_shardings, batch_sharding), out_shardings=rep,
                   compiler_options=compiler_options)
