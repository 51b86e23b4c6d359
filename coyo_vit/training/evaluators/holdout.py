"""Loss and prec@1 on the holdout of the training shards, which training never reads.

Config (in `config.evals`; the configs' `eval_every_steps` adds it as `holdout`):

    holdout=dict(type="holdout", every_steps=300, batch_size=256)

It reads the run's own input section (files, holdout split, `pp_eval`), so it takes no data
of its own. Results: `{name}/loss`, `{name}/prec@1`, `{name}/examples`.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding

from coyo_vit.config_keys import check_keys
from coyo_vit.training import sharding
from coyo_vit.training.evaluators.classification import LossFn, check_every_steps, local_batch_size
from coyo_vit.training.step import compiler_options_for_mesh, precision_at_1


def make_eval_step(model: nn.Module, loss_fn: LossFn, params_shardings: Any,
                   batch_sharding: NamedSharding) -> Callable:
    """Returns eval(params, batch) -> sums of loss, prec@1 and example count over the real
    (masked) examples."""
    def step(params, batch):
        logits = model.apply({"params": params}, batch["image"], train=False)
        mask = batch["_mask"].astype(jnp.float32)
        return {"loss": (loss_fn(logits, batch["labels"]) * mask).sum(),
                "prec@1": (precision_at_1(logits, batch["labels"]) * mask).sum(),
                "count": mask.sum()}

    rep = sharding.replicated(batch_sharding.mesh)
    return jax.jit(step, in_shardings=(params_shardings, batch_sharding), out_shardings=rep,
                   compiler_options=compiler_options_for_mesh(batch_sharding.mesh))


class HoldoutEvaluator:
    """One pass over the holdout with the input section's `pp_eval`.

    Every process reads its share of the holdout; padded examples (`_mask` False) are not
    counted, so the result does not depend on how the holdout divides into batches.
    """

    KEYS = ("type", "every_steps", "batch_size")

    def __init__(self, name: str, cfg: dict[str, Any], *, model: nn.Module, mesh: Mesh,
                 params_shardings: Any, loss_fn: LossFn, train_input: Any = None):
        check_keys(cfg, self.KEYS, f"config.evals.{name}")
        if train_input is None or not hasattr(train_input, "holdout_files"):
            raise ValueError(f"config.evals.{name}: a holdout evaluator reads the holdout of COYO "
                             "shards (config.input.holdout); this run's data has none")
        self.name = name
        self.every_steps = check_every_steps(cfg.get("every_steps", 0), name)
        self._pp_eval = train_input.pp_eval
        self._local_batch = local_batch_size(cfg.get("batch_size"), mesh, name)
        self._train_input = train_input
        self._num_classes = model.num_classes
        self._batch_sharding = sharding.batch_sharding(mesh)
        self._step = make_eval_step(model, loss_fn, params_shardings, self._batch_sharding)
        self._data = None  # built by check_data (the loop calls it before training) or evaluate

    def check_data(self) -> None:
        """Builds (does not read) the holdout, so a missing holdout or a pp_eval that does not
        fit the model fails before training starts rather than at the first evaluation."""
        import input_pipeline.pipeline as pipeline  # late: TensorFlow only where data is read

        self._data = pipeline.build_eval_dataset(
            self._train_input, split="holdout", batch_size=self._local_batch,
            process_index=jax.process_index(), process_count=jax.process_count())
        classes = self._data.element_spec["labels"].shape[-1]
        if self._num_classes and classes != self._num_classes:
            raise ValueError(f"config.input.pp_eval makes labels over {classes} classes but the "
                             f"model has {self._num_classes}: {self._pp_eval!r}")

    def evaluate(self, params: Any, prefix: str | None = None) -> dict[str, float]:
        if self._data is None:
            self.check_data()
        totals: dict[str, jax.Array] | None = None
        for local in self._data.as_numpy_iterator():
            batch = sharding.to_global({k: local[k] for k in ("image", "labels", "_mask")},
                                       self._batch_sharding)
            sums = self._step(params, batch)
            totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
        if totals is None:
            raise ValueError("The holdout is empty: set config.input.holdout.files or .examples.")
        totals = {k: float(v) for k, v in jax.device_get(totals).items()}
        if totals["count"] == 0:  # a loss and prec@1 of 0 would look like results
            raise ValueError(
                "The holdout gave no example: every record was skipped (damaged, or pp_eval failed "
                "on it, e.g. a central_crop larger than the resized image) or had no label that "
                f"the label mode keeps. pp_eval: {self._pp_eval!r}")
        prefix = prefix or self.name
        return {f"{prefix}/loss": totals["loss"] / totals["count"],
                f"{prefix}/prec@1": totals["prec@1"] / totals["count"],
                f"{prefix}/examples": totals["count"]}
