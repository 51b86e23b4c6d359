"""ImageNet-ReaL accuracy (Beyer et al. 2020, "Are we done with ImageNet?").

ReaL re-labelled the 50,000 ILSVRC2012 validation images with sets of plausible classes. A
prediction (arg-max over the 1,000 logits) is correct when it is in the image's set; images
whose set is empty (ReaL found no valid label: 3,163 of the 50,000) are excluded. Images are matched
to labels by file name: `ILSVRC2012_val_00000001.JPEG` is row 0 of the json, which lists the
label sets in file-name order. Any other file name has no ReaL label and is excluded too.

Config (in `config.evals`):

    real=dict(type="real", every_steps=1000, batch_size=512,
              data=dict(name="tfds", tfds_name="imagenet2012", split="validation"),
              pp="decode|resize(384)|onehot(1000)",
              labels_path=None, from_21k=False)

`labels_path` None reads coyo_vit/data/imagenet_real_labels.json. `from_21k=True` scores a
21,841-class model through its ImageNet-1k logits (see imagenet_from_21k). Results:
`{name}/top1`, `{name}/examples` (images with a ReaL label) and `{name}/unlabeled` (evaluated
images without one). Needs batch keys image, file_name, _mask.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
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
    local_eval_batches,
)
from coyo_vit.training.evaluators.imagenet_from_21k import load_index21k, select_1k_logits

LABELS_FILE = "imagenet_real_labels.json"
NUM_CLASSES = 1000


def load_real_labels(path: str | Path | None = None) -> list[list[int]]:
    """The ReaL label sets of the 50,000 validation images, in file-name order."""
    if path is None:
        resource = resources.files("coyo_vit").joinpath("data", LABELS_FILE)
        if not resource.is_file():
            raise FileNotFoundError(f"coyo_vit/data/{LABELS_FILE} is not installed; set the ReaL "
                                    f"evaluator's labels_path to imagenet_real_labels.json")
        text = resource.read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    labels = json.loads(text)
    if (not isinstance(labels, list) or len(labels) != metric_math.NUM_IMAGENET_VAL
            or not all(isinstance(s, list) and all(0 <= c < NUM_CLASSES for c in s) for s in labels)):
        raise ValueError(f"{path or LABELS_FILE}: expected a list of {metric_math.NUM_IMAGENET_VAL} "
                         f"lists of class indices in [0, {NUM_CLASSES})")
    return labels


class RealEvaluator(EvalSection):
    """ReaL top-1 over the evaluated images that have ReaL labels (see the module docstring)."""

    KEYS = COMMON_KEYS + ("labels_path", "from_21k", "mapping_path")

    def __init__(self, name: str, config: Any, *, model: nn.Module, mesh: Mesh,
                 params_shardings: Any, loss_fn: LossFn | None = None, train_input: Any = None):
        del loss_fn
        super().__init__(name, config, mesh)
        cfg = self._cfg
        self._labels = load_real_labels(cfg.get("labels_path"))
        index21k = load_index21k(cfg.get("mapping_path")) if cfg.get("from_21k") else None

        def fn(params, batch):
            logits = model.apply({"params": params}, batch["image"], train=False)
            return {"logits": logits if index21k is None else select_1k_logits(logits, index21k)}

        self._pass = GatheredPass(fn, params_shardings, mesh, ("image",),
                                  passthrough=("real_targets", "real_valid", "_mask"))

    def _targets(self, local: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in local["file_name"]]
        targets, valid = metric_math.real_targets(names, self._labels, NUM_CLASSES)
        return {"real_targets": targets, "real_valid": valid}

    def evaluate(self, params: Any, prefix: str | None = None) -> dict[str, float]:
        prefix = prefix or self.name
        count = unlabeled = hits = 0
        batches = local_eval_batches(self._data, self._pp, self._local_batch)
        for out in self._pass.run(params, batches, host_extra=self._targets):
            mask = out["_mask"].astype(bool)
            valid = mask & out["real_valid"].astype(bool)
            unlabeled += int((mask & ~valid).sum())
            if not valid.any():
                continue
            if out["logits"].shape[1] != NUM_CLASSES:
                raise ValueError(f"evaluator {self.name!r}: ReaL needs 1000 ImageNet logits, the "
                                 f"model gives {out['logits'].shape[1]} (set from_21k=True for a "
                                 f"21,841-class model)")
            count += int(valid.sum())
            hits += int(metric_math.top1_in_set(out["logits"][valid], out["real_targets"][valid]).sum())
        if count == 0:
            raise ValueError(f"evaluator {self.name!r}: none of the {unlabeled} evaluated images has "
                             f"a ReaL label; file names must be ILSVRC2012_val_NNNNNNNN.JPEG (TFDS "
                             f"imagenet2012 'validation', or an image folder of the validation set)")
        return {f"{prefix}/top1": hits / count, f"{prefix}/examples": float(count),
                f"{prefix}/unlabeled": float(unlabeled)}
