"""Few-shot linear probe: how linearly separable the pre-head features are with k images a class.

As in the ViT paper: the model's pre-head features (after pre-logits when the model has them)
of k training images per class are fit by closed-form regularised least squares to targets
+1 (the image's class) / -1 (every other class), with an unregularised bias; the prediction on
a test image is the arg-max of the fitted scores. The k images of a class are the first k of
that class in the (deterministic) eval reading order of the training split, so the 1-shot set
is inside the 5-shot set and every run picks the same images. Reading stops once every class
has max(shots) images (or after `max_train_examples`); a class with fewer images uses those it
has (logged).

Config (in `config.evals`):

    fewshot=dict(type="fewshot", every_steps=5000, batch_size=512, num_classes=10,
                 data=dict(name="tfds", tfds_name="cifar10", split="train"), test_split="test",
                 pp="decode|resize(224)|onehot(10)",
                 shots=(1, 5, 10, 25), l2_reg=1.0, max_train_examples=None)

Results: `{name}/{k}shot_top1` per k and `{name}/test_examples`. Needs batch keys image,
label, _mask (from classification data: tfds or imagefolder).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from coyo_vit.training.evaluators import metric_math
from coyo_vit.training.evaluators.classification import (
    COMMON_KEYS,
    EvalSection,
    GatheredPass,
    LossFn,
    check_top_k,
    local_eval_batches,
    require,
)

log = logging.getLogger(__name__)


class FewshotEvaluator(EvalSection):
    """k-shot ridge-regression probe accuracy for each k in `shots`."""

    KEYS = COMMON_KEYS + ("test_split", "num_classes", "shots", "l2_reg", "max_train_examples")

    def __init__(self, name: str, config: Any, *, model: nn.Module, mesh: Mesh,
                 params_shardings: Any, loss_fn: LossFn | None = None, train_input: Any = None):
        del loss_fn
        super().__init__(name, config, mesh)
        cfg = self._cfg
        self._test_split = require(cfg, "test_split", name)
        self._num_classes = require(cfg, "num_classes", name)
        if not isinstance(self._num_classes, int) or self._num_classes < 2:
            raise ValueError(f"config.evals.{name}.num_classes must be an int >= 2, "
                             f"got {self._num_classes!r}")
        self._shots = tuple(sorted(check_top_k(cfg.get("shots", (1, 5, 10, 25)), name, "shots")))
        self._l2_reg = float(cfg.get("l2_reg", 1.0))
        if self._l2_reg < 0:
            raise ValueError(f"config.evals.{name}.l2_reg must be >= 0, got {self._l2_reg}")
        self._max_train = cfg.get("max_train_examples")

        def fn(params, batch):
            _, features = model.apply({"params": params}, batch["image"], train=False,
                                      return_features=True)
            return {"features": features}

        self._pass = GatheredPass(fn, params_shardings, mesh, ("image",),
                                  passthrough=("label", "_mask"))

    def _splits(self) -> list[tuple[str | None, Mapping[str, Any] | None]]:
        return [(None, None), (self._test_split, None)]

    def _features(self, params: Any, split: str | None, per_class: int | None
                  ) -> tuple[np.ndarray, np.ndarray]:
        """(features [N, D], labels [N]) of a split; with per_class, only the first per_class
        images of each class, reading no further than needed."""
        batches = local_eval_batches(self._data, self._pp, self._local_batch, split=split)
        features, labels = [], []
        taken = np.zeros(self._num_classes, np.int64)
        seen = 0
        for out in self._pass.run(params, batches):
            mask = out["_mask"].astype(bool)
            rows, row_labels = out["features"][mask], out["label"][mask].astype(np.int64)
            if (row_labels >= self._num_classes).any() or (row_labels < 0).any():
                raise ValueError(f"evaluator {self.name!r}: label outside [0, {self._num_classes}) "
                                 f"(num_classes): {row_labels.min()}..{row_labels.max()}")
            if per_class is not None:
                keep = np.zeros(len(row_labels), bool)
                for i, label in enumerate(row_labels):  # in reading order: first come, first kept
                    if taken[label] < per_class:
                        taken[label] += 1
                        keep[i] = True
                rows, row_labels = rows[keep], row_labels[keep]
            features.append(rows)
            labels.append(row_labels)
            seen += int(mask.sum())
            # Every process takes the same decision: the outputs are replicated.
            if per_class is not None and ((taken >= per_class).all() or (
                    self._max_train is not None and seen >= self._max_train)):
                break
        if per_class is not None and (taken < per_class).any():
            log.warning("fewshot %s: %d of %d classes have fewer than %d training images (min %d)",
                        self.name, int((taken < per_class).sum()), self._num_classes, per_class,
                        int(taken.min()))
        return np.concatenate(features), np.concatenate(labels)

    def evaluate(self, params: Any, prefix: str | None = None) -> dict[str, float]:
        prefix = prefix or self.name
        train_x, train_y = self._features(params, None, per_class=self._shots[-1])
        test_x, test_y = self._features(params, self._test_split, per_class=None)
        if len(test_y) == 0:
            raise ValueError(f"evaluator {self.name!r}: test split {self._test_split!r} is empty")
        results = {}
        for k in self._shots:
            chosen = _first_per_class(train_y, k)
            weights, bias = metric_math.ridge_fit(train_x[chosen], train_y[chosen],
                                                  self._num_classes, self._l2_reg)
            scores = metric_math.ridge_predict(test_x, weights, bias)
            results[f"{prefix}/{k}shot_top1"] = float(metric_math.top_k_correct(scores, test_y, 1).mean())
        results[f"{prefix}/test_examples"] = float(len(test_y))
        return results


def _first_per_class(labels: np.ndarray, k: int) -> np.ndarray:
    """Indices of the first k occurrences of each label, in order."""
    rank = np.zeros(len(labels), np.int64)
    counts: dict[int, int] = {}
    for i, label in enumerate(labels.tolist()):
        rank[i] = counts.get(label, 0)
        counts[label] = rank[i] + 1
    return np.flatnonzero(rank < k)
