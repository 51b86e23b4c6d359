"""ImageNet-1k accuracy of a 21,841-class (COYO / ImageNet-21k) model, without fine-tuning.

The 1k classes are a subset of the 21k synsets: the model's logit for 1k class i is its logit
for 21k class `index21k[i]` (imagenet1k_classes.tsv), and the prediction is the arg-max over
those 1,000 logits only. Teddy bear (n04399382) has no 21k synset: its logit is -inf, so it is
never predicted and its 50 validation images always count as errors (the best reachable top-1
is 99.9%).

Config (in `config.evals`):

    in1k=dict(type="imagenet_from_21k", every_steps=5000, batch_size=512,
              data=dict(name="tfds", tfds_name="imagenet2012", split="validation"),
              pp="decode|resize_small(256)|central_crop(224)|onehot(1000)",
              top_k=(1, 5), mapping_path=None)

`mapping_path` None reads the table shipped in coyo_vit/data. Results: `{name}/top1`,
`{name}/top5`, `{name}/examples`. Needs batch keys image, label, _mask.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from coyo_vit.class_names import IMAGENET1K, NUM_IMAGENET21K_CLASSES, load_class_list
from coyo_vit.training.evaluators import metric_math
from coyo_vit.training.evaluators.classification import (
    COMMON_KEYS,
    EvalSection,
    GatheredPass,
    LossFn,
    check_top_k,
    local_eval_batches,
)

NUM_21K = NUM_IMAGENET21K_CLASSES
NUM_1K = 1000


def load_index21k(path: str | Path | None = None) -> np.ndarray:
    """int [1000]: the 21k index of each ImageNet-1k class, -1 where there is none.

    `path` is a tsv with columns index, wnid, name, index21k (imagenet1k_classes.tsv); None
    reads the copy shipped in the package.
    """
    if path is None:
        table = load_class_list(IMAGENET1K).index21k
    else:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        if not rows or "index21k" not in rows[0]:
            raise ValueError(f"{path} must be a tsv with an index21k column (imagenet1k_classes.tsv)")
        table = [int(r["index21k"]) for r in rows]
    index = np.asarray(table, np.int64)
    if index.shape != (NUM_1K,) or index.max() >= NUM_21K or index.min() < -1:
        raise ValueError(f"the 1k->21k table must hold {NUM_1K} indices in [-1, {NUM_21K}), got "
                         f"{index.shape[0]} in [{index.min()}, {index.max()}]")
    return index


def select_1k_logits(logits21k: jax.Array, index21k: np.ndarray) -> jax.Array:
    """[B, 1000] logits read from [B, 21841]; -inf where index21k is -1 (jnp twin of
    metric_math.logits_1k_from_21k)."""
    if logits21k.shape[-1] != NUM_21K:
        raise ValueError(f"expected a {NUM_21K}-class model, got {logits21k.shape[-1]} classes")
    picked = jnp.take(logits21k.astype(jnp.float32), jnp.asarray(np.maximum(index21k, 0)), axis=-1)
    return jnp.where(jnp.asarray(index21k >= 0), picked, -jnp.inf)


class Imagenet1kFrom21kEvaluator(EvalSection):
    """Top-k accuracy on ImageNet-1k labels of a 21,841-class model (see the module docstring)."""

    KEYS = COMMON_KEYS + ("top_k", "mapping_path")

    def __init__(self, name: str, config: Any, *, model: nn.Module, mesh: Mesh,
                 params_shardings: Any, loss_fn: LossFn | None = None, train_input: Any = None):
        del loss_fn  # the training loss is over 21k classes; there is no 1k loss to report
        super().__init__(name, config, mesh)
        cfg = self._cfg
        self._top_k = check_top_k(cfg.get("top_k", (1, 5)), name)
        index21k = load_index21k(cfg.get("mapping_path"))

        def fn(params, batch):
            logits = model.apply({"params": params}, batch["image"], train=False)
            return {"logits": select_1k_logits(logits, index21k)}

        self._pass = GatheredPass(fn, params_shardings, mesh, ("image",),
                                  passthrough=("label", "_mask"))

    def evaluate(self, params: Any, prefix: str | None = None) -> dict[str, float]:
        prefix = prefix or self.name
        count = 0
        hits = {k: 0 for k in self._top_k}
        for out in self._pass.run(params, local_eval_batches(self._data, self._pp, self._local_batch)):
            mask = out["_mask"].astype(bool)
            if not mask.any():
                continue
            count += int(mask.sum())
            for k in self._top_k:
                hits[k] += int(metric_math.top_k_correct(out["logits"][mask], out["label"][mask], k).sum())
        if count == 0:
            raise ValueError(f"evaluator {self.name!r}: the eval split has no examples")
        return {**{f"{prefix}/top{k}": hits[k] / count for k in self._top_k},
                f"{prefix}/examples": float(count)}
