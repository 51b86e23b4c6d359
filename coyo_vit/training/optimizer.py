"""Optimizer and learning-rate schedule from config, built from optax parts.

The published COYO recipe: AdamW (b1 0.9, b2 0.999, eps 1e-7, decoupled weight decay 0.1),
global-norm clipping at 1.0, linear warmup to 6e-4 over 10k steps, linear decay to 1e-5.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import optax

from coyo_vit.config_keys import ConfigError, check_keys

SCHEDULE_DECAYS = ("linear", "cosine", "constant")
OPTIMIZERS = ("adamw", "sgd")


def make_schedule(cfg: Mapping[str, Any], total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `base_lr`, then `decay` to `end_lr` at `total_steps`."""
    check_keys(cfg, ("base_lr", "end_lr", "warmup_steps", "decay"), "config.schedule")
    base, end = float(cfg["base_lr"]), float(cfg.get("end_lr", 0.0))
    warmup = int(cfg.get("warmup_steps", 0))
    decay = cfg.get("decay", "linear")
    if decay not in SCHEDULE_DECAYS:
        raise ConfigError(f"Unknown schedule decay {decay!r}; valid: {list(SCHEDULE_DECAYS)}.")
    if warmup >= total_steps and decay != "constant":
        raise ConfigError(f"warmup_steps={warmup} must be smaller than total_steps={total_steps}.")
    decay_steps = max(total_steps - warmup, 1)
    if decay == "linear":
        after = optax.linear_schedule(base, end, decay_steps)
    elif decay == "cosine":
        after = optax.cosine_decay_schedule(base, decay_steps, alpha=end / base if base else 0.0)
    else:
        after = optax.constant_schedule(base)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, base, warmup), after], [warmup])


def decay_mask(pattern: str):
    """Returns a params -> bool-tree function: True where the '/'-joined path matches `pattern`."""
    regex = re.compile(pattern)

    def mask(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: bool(regex.fullmatch("/".join(_key_name(k) for k in path))), params)
    return mask


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def make_optimizer(cfg: Mapping[str, Any], schedule: optax.Schedule) -> optax.GradientTransformation:
    """Clipping, then the optimizer, with weight decay only where `decay_pattern` matches.

    `skip_nonfinite` is accepted here but acts in the train step (train_step.make_train_step),
    which keeps the state of a step with a non-finite loss or gradient.
    """
    name = cfg.get("name", "adamw")
    common = ("name", "grad_clip_norm", "weight_decay", "decay_pattern", "skip_nonfinite")
    allowed = {"adamw": common + ("b1", "b2", "eps"), "sgd": common + ("momentum", "nesterov")}
    if name not in allowed:
        raise ConfigError(f"Unknown optimizer {name!r}; valid: {list(OPTIMIZERS)}.")
    check_keys(cfg, allowed[name], "config.optimizer")
    clip = cfg.get("grad_clip_norm")
    parts = [optax.clip_by_global_norm(float(clip))] if clip else []
    if name == "adamw":
        parts.append(optax.adamw(
            schedule, b1=float(cfg.get("b1", 0.9)), b2=float(cfg.get("b2", 0.999)),
            eps=float(cfg.get("eps", 1e-8)), weight_decay=float(cfg.get("weight_decay", 0.0)),
            mask=decay_mask(cfg.get("decay_pattern", r".*/kernel"))))
    else:  # sgd
        wd = float(cfg.get("weight_decay", 0.0))
        if wd:
            parts.append(optax.add_decayed_weights(wd, mask=decay_mask(cfg.get("decay_pattern", r".*/kernel"))))
        parts.append(optax.sgd(schedule, momentum=cfg.get("momentum", 0.9) or None,
                               nesterov=bool(cfg.get("nesterov", False))))
    if not isinstance(cfg.get("skip_nonfinite", False), bool):
        raise ConfigError(f"optimizer.skip_nonfinite must be True or False, got "
                         f"{cfg.get('skip_nonfinite')!r}")
    return optax.chain(*parts)
