"""Multi-label metrics on the COYO holdout: prec@1, mAP and F1 of a sigmoid model.

Positives are the classes whose target (from the pp's label mode, e.g.
`coyo_labels('threshold', 0.1)`) is > 0. Definitions (metric_math has the code):

- prec@1: share of images whose top-scoring class is a positive.
- mAP: average precision per class, averaged over the classes with at least one positive among
  the evaluated images (`{name}/map_classes` says how many); ties rank in image order.
- micro / macro F1 of the predictions sigmoid(logit) >= threshold; macro averages per-class F1
  over the same classes as mAP.

mAP keeps every image's scores on the host: images x classes x 4 bytes (a 10,000-image holdout
over 21,841 classes takes 0.87 GB on each process); `map=False` skips it and keeps only counts.

Config (in `config.evals`):

    multilabel=dict(type="multilabel", every_steps=5000, batch_size=1024,
                    data=dict(name="coyo_shards", files="/data/coyo/*.tfrecord"),
                    holdout=dict(files=0, examples=50_000), split="holdout",
                    pp="decode|resize_small(256)|central_crop(224)|"
                       "coyo_labels('threshold', 0.1)",
                    threshold=0.5, map=True)

(Not `holdout=`: that name belongs to the built-in holdout loss/prec@1 evaluator of
`eval_every_steps`, and a config that uses both is an error.)

`data` + `holdout` must match the training input's so that the holdout is the same records.
Classification data (tfds / imagefolder) works too, with multi-hot targets from its pp.
Results: `{name}/prec@1`, `/mAP`, `/map_classes`, `/micro_f1`, `/macro_f1`, `/loss`,
`/examples`. Needs batch keys image, labels, _mask.
"""
from __future__ import annotations

import math
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
    as_dict,
    check_classes,
    local_eval_batches,
)

SPLITS = ("holdout", "all")


class MultilabelEvaluator(EvalSection):
    """prec@1, mAP, micro/macro F1 and loss over a multi-label eval split."""

    KEYS = COMMON_KEYS + ("holdout", "split", "threshold", "map")

    def __init__(self, name: str, config: Any, *, model: nn.Module, mesh: Mesh,
                 params_shardings: Any, loss_fn: LossFn, train_input: Any = None):
        super().__init__(name, config, mesh)
        cfg = self._cfg
        self._holdout = cfg.get("holdout")
        self._split = cfg.get("split", "holdout" if self._holdout else None)
        if self._split is not None and self._split not in SPLITS and not self._is_classification():
            raise ValueError(f"config.evals.{name}.split must be one of {SPLITS} for COYO shards, "
                             f"got {self._split!r}")
        threshold = cfg.get("threshold", 0.5)
        if not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
            raise ValueError(f"config.evals.{name}.threshold must be a probability in (0, 1), "
                             f"got {threshold!r}")
        self._logit_threshold = math.log(threshold / (1 - threshold))  # sigmoid(x) >= t <=> x >= this
        self._map = bool(cfg.get("map", True))
        self.label_classes = model.num_classes

        def fn(params, batch):
            logits = model.apply({"params": params}, batch["image"], train=False)
            check_classes(logits, batch["labels"], name)
            return {"logits": logits, "loss": loss_fn(logits, batch["labels"])}

        self._pass = GatheredPass(fn, params_shardings, mesh, ("image", "labels"),
                                  passthrough=("labels", "_mask"))

    def _splits(self) -> list[tuple[str | None, Mapping[str, Any] | None]]:
        return [(self._split, {"holdout": as_dict(self._holdout)} if self._holdout else None)]

    def _is_classification(self) -> bool:
        return as_dict(self._data).get("name") in ("tfds", "imagefolder")

    def evaluate(self, params: Any, prefix: str | None = None) -> dict[str, float]:
        prefix = prefix or self.name
        extra = {"holdout": as_dict(self._holdout)} if self._holdout else None
        batches = local_eval_batches(self._data, self._pp, self._local_batch, split=self._split,
                                     extra_input=extra)
        count, prec1, loss = 0, 0, 0.0
        counts: dict[str, np.ndarray] | None = None
        scores, positives = [], []
        for out in self._pass.run(params, batches):
            mask = out["_mask"].astype(bool)
            if not mask.any():
                continue
            logits, targets = out["logits"][mask], out["labels"][mask] > 0
            count += int(mask.sum())
            loss += float(out["loss"][mask].sum())
            prec1 += int(metric_math.top1_in_set(logits, targets).sum())
            batch_counts = metric_math.f1_counts(logits >= self._logit_threshold, targets)
            counts = batch_counts if counts is None else {k: counts[k] + v for k, v in batch_counts.items()}
            if self._map:
                scores.append(logits.astype(np.float32))
                positives.append(targets)
        if count == 0:
            raise ValueError(f"evaluator {self.name!r}: the eval split has no examples")
        results = {f"{prefix}/prec@1": prec1 / count, f"{prefix}/loss": loss / count,
                   f"{prefix}/examples": float(count)}
        results.update({f"{prefix}/{k}": v for k, v in metric_math.f1_scores(counts).items()})
        if self._map:
            mean_ap, classes = metric_math.mean_average_precision(np.concatenate(scores),
                                                                  np.concatenate(positives))
            results.update({f"{prefix}/mAP": mean_ap, f"{prefix}/map_classes": float(classes)})
        return results
