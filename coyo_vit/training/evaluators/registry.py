"""Builds the evaluators a config asks for: `config.evals = {name: dict(type=..., ...)}`.

Every evaluator has `name`, `every_steps` and `evaluate(params, prefix=None) -> dict[str,
float]` whose keys are `{prefix or name}/{metric}` (e.g. `val/top1`). `is_due` is the cadence
rule the train loop applies. Types and their keys are documented in their modules; the
`holdout` type reads the run's own input section (`train_input`), the others their own data.
"""
from __future__ import annotations

from typing import Any, Protocol

from flax import linen as nn
from jax.sharding import Mesh

from coyo_vit.training.evaluators.classification import ClassificationEvaluator, LossFn, as_dict
from coyo_vit.training.evaluators.fewshot import FewshotEvaluator
from coyo_vit.training.evaluators.holdout import HoldoutEvaluator
from coyo_vit.training.evaluators.imagenet_from_21k import Imagenet1kFrom21kEvaluator
from coyo_vit.training.evaluators.multilabel import MultilabelEvaluator
from coyo_vit.training.evaluators.real import RealEvaluator


class Evaluator(Protocol):
    name: str
    every_steps: int

    def check_data(self) -> None: ...

    def evaluate(self, params: Any, prefix: str | None = None) -> dict[str, float]: ...


EVALUATOR_TYPES: dict[str, type] = {
    "classification": ClassificationEvaluator,
    "holdout": HoldoutEvaluator,
    "real": RealEvaluator,
    "multilabel": MultilabelEvaluator,
    "fewshot": FewshotEvaluator,
    "imagenet_from_21k": Imagenet1kFrom21kEvaluator,
}


def build_evaluators(evals_config: Any, *, model: nn.Module, mesh: Mesh, params_shardings: Any,
                     loss_fn: LossFn, train_input: Any = None) -> dict[str, Evaluator]:
    """One evaluator per entry of `config.evals` (None or empty: none).

    Construction validates each section (unknown keys, batch sizes against the mesh, label
    files) without touching the data; each evaluator's `check_data()` then finds its data and
    checks its class count (the loop calls it before training, once the run's own data is
    written or prepared), so a bad eval config fails before training starts.
    """
    sections = as_dict(evals_config) if evals_config is not None else {}
    evaluators: dict[str, Evaluator] = {}
    for name, section in sections.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"evaluator names must be non-empty strings without '/', got {name!r}")
        cfg = as_dict(section)
        kind = cfg.get("type")
        if kind not in EVALUATOR_TYPES:
            raise ValueError(f"config.evals.{name}.type={kind!r} is not a known evaluator type; "
                             f"valid: {sorted(EVALUATOR_TYPES)}")
        evaluators[name] = EVALUATOR_TYPES[kind](name, cfg, model=model, mesh=mesh,
                                                 params_shardings=params_shardings, loss_fn=loss_fn,
                                                 train_input=train_input)
    return evaluators


def run_sections(config: Any) -> dict[str, dict[str, Any]]:
    """The evaluator sections a run evaluates (the loop) and `evaluate.py` runs: `config.evals`,
    plus the `holdout` that `config.eval_every_steps` adds (batch `config.eval_batch_size`)."""
    evals_config = config.get("evals")
    evals = {name: dict(as_dict(section)) for name, section in
             (as_dict(evals_config) if evals_config is not None else {}).items()}
    if config.get("eval_every_steps"):
        if "holdout" in evals:
            raise ValueError("config.evals.holdout clashes with the holdout evaluator that "
                             "config.eval_every_steps adds (both would write holdout/...): rename "
                             "the entry of config.evals, or set eval_every_steps=0")
        evals["holdout"] = dict(type="holdout", every_steps=int(config.eval_every_steps),
                                batch_size=config.eval_batch_size)
    return evals


def is_due(every_steps: int, step: int, total_steps: int) -> bool:
    """Run at multiples of every_steps and at the last step; every_steps 0 = never in training."""
    return every_steps > 0 and (step % every_steps == 0 or step == total_steps)
