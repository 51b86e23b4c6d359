"""Top-1 / top-5 accuracy and loss on a classification split, plus the machinery every
dataset evaluator here shares (reading eval batches, running the model over them).

How an evaluator works, whatever the metric: each process reads its share of a padded eval
split (`_mask` marks real examples), the batches are assembled into global arrays, one jitted
function computes per-example outputs (logits, features, ...) and returns them *replicated*, so
every process holds the same host copy of the whole global batch, rows aligned with the labels
and mask passed through alongside. Metrics are then plain numpy (`metric_math`). This never
needs file names or strings on devices, gives identical results on every process, and does not
depend on how the split divides into batches or processes.

Config of a `classification` evaluator (in `config.evals`):

    val=dict(type="classification", every_steps=1000, batch_size=512,
             data=dict(name="tfds", tfds_name="imagenet2012", split="validation"),
             pp="decode|resize(384)|onehot(1000)", top_k=(1, 5), per_class=False)

Results: `{name}/top1`, `{name}/top5` (one per top_k), `{name}/loss` (the training loss on the
pp's `labels`), `{name}/examples`; with `per_class=True` also the top-1 accuracy of each class
present in the split, `{name}/class_top1/{index} {class name}` (the data's names: image-folder
directories, TFDS label names, ImageNet's readable names for its WordNet ids, as the run's
class_names.txt; the index alone where the data names none); and `{name}/skipped_images` when the split holds damaged
images (classification data: masked by the pipeline, counted and the first few named in the log
by `GatheredPass`, as in every evaluator). Needs batch keys image, labels, label, _mask.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from coyo_vit.class_names import readable_names
from coyo_vit.config_keys import check_keys
from coyo_vit.training import sharding
from coyo_vit.training.evaluators import metric_math
from coyo_vit.training.step import compiler_options_for_mesh

# Damaged eval images named in the log per pass (per process); the rest are only counted.
LOG_FIRST_DAMAGED = 5
# Keys every evaluator config may hold; each type adds its own.
COMMON_KEYS = ("type", "every_steps", "data", "pp", "batch_size")
LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def as_dict(config: Any) -> dict[str, Any]:
    """A plain dict of an evaluator's config (ConfigDict or Mapping)."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise TypeError(f"an evaluator config must be a ConfigDict or dict, got {type(config).__name__}")
    return dict(config)


def check_every_steps(value: Any, name: str) -> int:
    """every_steps as an int >= 0; the error names the evaluator."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"config.evals.{name}.every_steps must be an int >= 0 (0 = only when "
                         f"asked, e.g. by evaluate.py), got {value!r}")
    return value


def local_eval_batches(data: Mapping[str, Any], pp: str, local_batch: int, *,
                       split: str | None = None, extra_input: Mapping[str, Any] | None = None
                       ) -> Iterator[dict[str, np.ndarray]]:
    """This process's padded eval batches (numpy) of classification data or COYO shards.

    `data` with name "tfds"/"imagefolder" goes to input_pipeline.classification_data (batches
    hold image, labels, label, file_name, _mask); anything else is COYO shards for
    input_pipeline.pipeline (image, labels, _mask), with `split` "holdout" or "all" and
    `extra_input` holding e.g. its `holdout` section.
    """
    return eval_dataset(data, pp, local_batch, split=split, extra_input=extra_input).as_numpy_iterator()


def eval_dataset(data: Mapping[str, Any], pp: str, local_batch: int, *, split: str | None = None,
                 extra_input: Mapping[str, Any] | None = None) -> Any:
    """The tf.data.Dataset behind `local_eval_batches`: building it finds the files (a pattern
    that matches nothing, a missing folder or an unprepared TFDS dataset fails here) and parses
    the pp, reading no image."""
    # Imported here: TensorFlow only where data is read.
    from input_pipeline import classification_data

    process = dict(process_index=jax.process_index(), process_count=jax.process_count())
    if classification_data.is_classification_data(data):
        return classification_data.build_eval_dataset(
            {"data": dict(data), "pp_eval": pp, **(extra_input or {})}, split=split,
            batch_size=local_batch, **process)
    import input_pipeline.pipeline as pipeline  # late, like classification_data above

    files = {k: v for k, v in dict(data).items() if k != "name"}
    return pipeline.build_eval_dataset(
        {"data": files, "pp_eval": pp, **(extra_input or {})}, split=split or "all",
        batch_size=local_batch, **process)


class GatheredPass:
    """Runs `fn(params, batch) -> {name: per-example array}` over eval batches.

    Yields, per global batch, the outputs plus the `passthrough` batch entries as replicated
    numpy arrays [global_batch, ...]. Every process must iterate the same number of batches
    (the eval pipelines guarantee it).
    """

    def __init__(self, fn: Callable[[Any, dict[str, jax.Array]], dict[str, jax.Array]],
                 params_shardings: Any, mesh: Mesh, device_keys: Sequence[str],
                 passthrough: Sequence[str] = ("_mask",)):
        self._device_keys = tuple(dict.fromkeys((*device_keys, *passthrough)))
        self._batch_sharding = sharding.batch_sharding(mesh)

        def step(params, batch):
            return {**fn(params, batch), **{k: batch[k] for k in passthrough}}

        self._step = jax.jit(step, in_shardings=(params_shardings, self._batch_sharding),
                             out_shardings=sharding.replicated(mesh),
                             compiler_options=compiler_options_for_mesh(mesh))

    def run(self, params: Any, local_batches: Iterator[dict[str, np.ndarray]],
            host_extra: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None
            ) -> Iterator[dict[str, np.ndarray]]:
        """`host_extra(local_batch)` adds numeric arrays computed on the host (e.g. ReaL
        targets from file names) to what is sent to devices; list them in passthrough."""
        self._damaged = 0
        for local in local_batches:
            if "_damaged" in local:  # classification data: damaged images, already masked
                self._note_damaged(local)
            if host_extra is not None:
                local = {**local, **host_extra(local)}
            batch = sharding.to_global({k: local[k] for k in self._device_keys}, self._batch_sharding)
            yield {k: np.asarray(v) for k, v in jax.device_get(self._step(params, batch)).items()}

    def _note_damaged(self, local: Mapping[str, np.ndarray]) -> None:
        damaged = np.asarray(local["_damaged"], bool)
        for name in np.asarray(local.get("_name", local.get("file_name")))[damaged]:
            self._damaged += 1
            if self._damaged <= LOG_FIRST_DAMAGED:
                logging.warning("eval: skipped damaged image %s%s", name.decode(),
                                " (further ones are only counted)"
                                if self._damaged == LOG_FIRST_DAMAGED else "")

    def damaged_images(self) -> int:
        """Damaged images the last `run` skipped, over all processes (all must call it)."""
        count = np.asarray([getattr(self, "_damaged", 0)], np.int64)
        if jax.process_count() > 1:
            count = np.asarray(multihost_utils.process_allgather(count))
        return int(count.sum())


def local_batch_size(global_batch: Any, mesh: Mesh, name: str) -> int:
    """The per-process batch of an evaluator; errors name the evaluator and the numbers."""
    if not isinstance(global_batch, int) or isinstance(global_batch, bool) or global_batch < 1:
        raise ValueError(f"config.evals.{name}.batch_size must be a positive int, got {global_batch!r}")
    try:
        return sharding.check_batch_size(global_batch, mesh, jax.process_count())
    except ValueError as e:
        raise ValueError(f"config.evals.{name}: {e}") from None


def check_top_k(top_k: Any, name: str, field: str = "top_k") -> tuple[int, ...]:
    """A tuple of positive ints (top_k, or few-shot `shots`); errors name the field."""
    ks = tuple(top_k) if isinstance(top_k, (list, tuple)) else (top_k,)
    if not ks or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks):
        raise ValueError(f"config.evals.{name}.{field} must be positive ints, e.g. (1, 5), "
                         f"got {top_k!r}")
    return ks


class EvalSection:
    """What every configured evaluator shares: its name, cadence, data, pp and batch split.

    Subclasses list their own extra keys in KEYS; an unknown key in the section is an error.
    """

    KEYS: tuple[str, ...] = COMMON_KEYS
    label_classes: int | None = None  # the class count the pp's `labels` must have (None: any)

    def __init__(self, name: str, config: Any, mesh: Mesh):
        cfg = as_dict(config)
        check_keys(cfg, self.KEYS, f"config.evals.{name}")
        self.name = name
        self.every_steps = check_every_steps(cfg.get("every_steps", 0), name)
        self._data, self._pp = require(cfg, "data", name), require(cfg, "pp", name)
        self._local_batch = local_batch_size(cfg.get("batch_size"), mesh, name)
        self._cfg = cfg

    @property
    def data(self) -> Mapping[str, Any]:
        """The data section this evaluator reads."""
        return as_dict(self._data)

    def _splits(self) -> list[tuple[str | None, Mapping[str, Any] | None]]:
        """(split, extra input section) of every pass `evaluate` makes."""
        return [(None, None)]

    def check_data(self) -> None:
        """Finds the data of every split this evaluator reads and checks the pp's label classes
        against the model, reading no image: the loop calls it before training starts."""
        for split, extra in self._splits():
            spec = eval_dataset(self._data, self._pp, self._local_batch, split=split,
                                extra_input=extra).element_spec
            classes = spec["labels"].shape[-1] if "labels" in spec else None
            if self.label_classes and classes is not None and classes != self.label_classes:
                raise ValueError(f"config.evals.{self.name}.pp makes labels over {classes} classes "
                                 f"but the model has {self.label_classes}: {self._pp!r}; fix its "
                                 f"onehot(...) or use type='imagenet_from_21k' for a 21k model on "
                                 f"ImageNet-1k")


class ClassificationEvaluator(EvalSection):
    """Top-k accuracy of the integer `label` and the mean loss over one eval split."""

    KEYS = COMMON_KEYS + ("top_k", "per_class")

    def __init__(self, name: str, config: Any, *, model: nn.Module, mesh: Mesh,
                 params_shardings: Any, loss_fn: LossFn, train_input: Any = None):
        super().__init__(name, config, mesh)
        cfg = self._cfg
        self._top_k = check_top_k(cfg.get("top_k", (1, 5)), name)
        self._per_class = cfg.get("per_class", False)
        if not isinstance(self._per_class, bool):
            raise ValueError(f"config.evals.{name}.per_class must be True or False, got {self._per_class!r}")
        self.label_classes = model.num_classes

        def fn(params, batch):
            logits = model.apply({"params": params}, batch["image"], train=False)
            check_classes(logits, batch["labels"], name)
            return {"logits": logits, "loss": loss_fn(logits, batch["labels"])}

        self._pass = GatheredPass(fn, params_shardings, mesh, ("image", "labels"),
                                  passthrough=("label", "_mask"))

    def evaluate(self, params: Any, prefix: str | None = None) -> dict[str, float]:
        """One pass; keys `{prefix or name}/top{k}`, `/loss`, `/examples`."""
        prefix = prefix or self.name
        count, loss = 0, 0.0
        hits = {k: 0 for k in self._top_k}
        class_seen, class_hits = 0, 0  # per-class counts (per_class), arrays once a batch came
        for out in self._pass.run(params, local_eval_batches(self._data, self._pp, self._local_batch)):
            mask = out["_mask"].astype(bool)
            logits, labels = out["logits"][mask], out["label"][mask]
            if not mask.any():
                continue
            count += int(mask.sum())
            loss += float(out["loss"][mask].sum())
            for k in self._top_k:
                hits[k] += int(metric_math.top_k_correct(logits, labels, min(k, logits.shape[1])).sum())
            if self._per_class:
                correct = labels[metric_math.top_k_correct(logits, labels, 1).astype(bool)]
                class_seen = class_seen + np.bincount(labels, minlength=logits.shape[1])
                class_hits = class_hits + np.bincount(correct, minlength=logits.shape[1])
        if count == 0:
            raise ValueError(f"evaluator {self.name!r}: the eval split has no examples")
        results = {f"{prefix}/top{k}": hits[k] / count for k in self._top_k}
        results.update({f"{prefix}/loss": loss / count, f"{prefix}/examples": float(count)})
        if self._per_class:
            names = self._class_names(len(class_seen))
            results.update({f"{prefix}/class_top1/{label}{names[label]}": float(class_hits[label] / seen)
                            for label, seen in enumerate(class_seen) if seen})
        damaged = self._pass.damaged_images()
        if damaged:
            results[f"{prefix}/skipped_images"] = float(damaged)
        return results


    def _class_names(self, num_classes: int) -> list[str]:
        """` name` per class index as the per-class keys show it ("" where the data names none)."""
        # Late, like eval_dataset's: TensorFlow only where data is read.
        from input_pipeline import classification_data

        data = self.data
        found = (classification_data.class_names(data)
                 if classification_data.is_classification_data(data) else None)
        names = readable_names(found, num_classes)
        if names is None or len(names) != num_classes:
            return [""] * num_classes
        return [f" {name}" for name in names]


def check_classes(logits: jax.Array, labels: jax.Array, name: str) -> None:
    """Raises (at trace time) when the model's classes differ from the pp's label classes."""
    if logits.shape[-1] != labels.shape[-1]:
        raise ValueError(f"evaluator {name!r}: the model has {logits.shape[-1]} classes but the pp "
                         f"makes labels over {labels.shape[-1]}; fix the pp's onehot(...) or use "
                         f"type='imagenet_from_21k' for a 21k model on ImageNet-1k")


def require(cfg: Mapping[str, Any], key: str, name: str) -> Any:
    """cfg[key], or an error naming the evaluator and the missing key."""
    if cfg.get(key) in (None, "", {}):
        raise ValueError(f"config.evals.{name} needs `{key}`")
    return cfg[key]

