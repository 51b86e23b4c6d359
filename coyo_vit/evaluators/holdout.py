"""Loss and prec@1 on the holdout split that training never sees."""
from __future__ import annotations

from typing import Any

import jax
import ml_collections
from flax import linen as nn
from jax.sharding import Mesh

from coyo_vit import sharding
from coyo_vit.device_prefetch import to_global
from coyo_vit.train_step import make_eval_step


class HoldoutEvaluator:
    """One pass over the holdout with `config.input.pp_eval`; metrics named `holdout/...`.

    Every process reads its share of the holdout; padded examples (`_mask` False) are not
    counted, so the result does not depend on how the holdout divides into batches.
    """

    def __init__(self, model: nn.Module, loss_fn, config: ml_collections.ConfigDict,
                 params_shardings: Any, mesh: Mesh, prefix: str = "holdout"):
        self._config, self._prefix = config, prefix
        self.name = prefix
        self.every_steps = int(config.eval_every_steps)
        self._local_batch = sharding.check_batch_size(config.eval_batch_size, mesh, jax.process_count())
        self._batch_sharding = sharding.batch_sharding(mesh)
        self._step = make_eval_step(model, loss_fn, params_shardings, self._batch_sharding)
        # Built (not read) here, so a missing holdout or a pp_eval that does not fit the model
        # fails before training starts rather than at the first evaluation.
        import input_pipeline.pipeline as pipeline  # TensorFlow only where data is read
        self._data = pipeline.build_eval_dataset(
            config.input, split="holdout", batch_size=self._local_batch,
            process_index=jax.process_index(), process_count=jax.process_count())
        classes = self._data.element_spec["labels"].shape[-1]
        if model.num_classes and classes != model.num_classes:
            raise ValueError(f"config.input.pp_eval makes labels over {classes} classes but the "
                             f"model has {model.num_classes}: {config.input.pp_eval!r}")

    def evaluate(self, params: Any, prefix: str | None = None) -> dict[str, float]:
        totals: dict[str, jax.Array] | None = None
        for local in self._data.as_numpy_iterator():
            sums = self._step(params, to_global({k: local[k] for k in ("image", "labels", "_mask")},
                                                self._batch_sharding))
            totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
        if totals is None:
            raise ValueError("The holdout is empty: set config.input.holdout.files or .examples.")
        totals = {k: float(v) for k, v in jax.device_get(totals).items()}
        if totals["count"] == 0:  # a loss and prec@1 of 0 would look like results
            raise ValueError(
                "The holdout gave no example: every record was skipped (damaged, or pp_eval failed "
                "on it, e.g. a central_crop larger than the resized image) or had no label that "
                f"the label mode keeps. pp_eval: {self._config.input.pp_eval!r}")
        prefix = prefix or self._prefix
        return {f"{prefix}/loss": totals["loss"] / totals["count"],
                f"{prefix}/prec@1": totals["prec@1"] / totals["count"],
                f"{prefix}/examples": totals["count"]}
