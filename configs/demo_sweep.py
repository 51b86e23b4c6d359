"""A 2-point learning-rate sweep over a small demo run: the worked example of coyo_vit.tools.sweep.

    python train.py --config configs/demo.py --workdir /tmp/coyo_vit_demo      # pretrain once
    python -m coyo_vit.tools.sweep --config configs/demo_sweep.py:mode=finetune --entry finetune.py \
        --workdir_root /tmp/coyo_vit_ft_sweep --parallel 2 --metric val/top1
    python -m coyo_vit.tools.sweep --config configs/demo_sweep.py --workdir_root /tmp/coyo_vit_sweep \
        --parallel 2 --metric holdout/prec@1                                  # needs nothing

Arguments (comma-separated key=value):
  mode   `pretrain` (default): configs/demo.py shrunk to a 2-layer ViT on 1,024 demo images,
         run by train.py; `finetune`: configs/demo_finetune.py (digits, starting from
         config.init, by default the demo pretraining workdir /tmp/coyo_vit_demo), run by
         finetune.py.
  steps  training steps per point (pretrain 150, finetune 200). Checkpoints are written at
         steps/2 and at the end; the holdout (pretrain, 128 images) or the digits test split
         (finetune, `val`) is evaluated 5 times.
The sweep: base learning rate {3e-3, 1e-2} (pretrain) or {0.1, 0.03} (finetune). The demo
images (or digits) are written once into a directory shared by all points (by default
TMPDIR/coyo_vit_demo_sweep_data or TMPDIR/coyo_vit_demo_sweep_digits; move it with
--config.demo_data.out_dir or --config.demo_digits.out_dir), not into each point's workdir.
"""
from __future__ import annotations

import os
import tempfile

import ml_collections

from configs import common
from coyo_vit.tools.sweep_expand import sweep

MODES = ("pretrain", "finetune")
DEFAULT_STEPS = {"pretrain": 150, "finetune": 200}
LEARNING_RATES = {"pretrain": [3e-3, 1e-2], "finetune": [0.1, 0.03]}
SHARED_DATA_DIR = os.path.join(tempfile.gettempdir(), "coyo_vit_demo_sweep_data")
SHARED_DIGITS_DIR = os.path.join(tempfile.gettempdir(), "coyo_vit_demo_sweep_digits")


def mode_and_steps(arg: str | None) -> tuple[str, int]:
    """(mode, steps) from `mode=...,steps=...`; steps 0 (the default) is the mode's own."""
    args = common.parse_args(arg, dict(mode="pretrain", steps=0))
    mode = args["mode"]
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")
    steps = args["steps"] or DEFAULT_STEPS[mode]
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (a checkpoint at steps/2 and one at the end), got {steps}")
    return mode, steps


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    mode, steps = mode_and_steps(arg)
    half = steps // 2
    if mode == "finetune":
        from configs import demo_finetune  # late: each mode loads only its own config

        config = demo_finetune.get_config(str(steps))
        config.demo_digits.out_dir = SHARED_DIGITS_DIR
        config.evals.val.every_steps = max(1, steps // 5)
        config.evals.fewshot.every_steps = 0  # the linear probe is slow for a sweep point
        config.schedule.warmup_steps = min(config.schedule.warmup_steps, half)
        config.log_every_steps = max(1, min(10, half // 2))
        config.checkpoint_every_steps = half
        return config

    from configs import demo  # late: each mode loads only its own config

    config = demo.get_config(str(steps))
    config.demo_data.out_dir = SHARED_DATA_DIR
    config.demo_data.num_images = 1024
    config.batch_size = 32
    config.model.depth = 2
    config.input.holdout = dict(files=0, examples=128)
    config.input.shuffle_buffer = 512
    config.eval_batch_size = 64
    config.schedule.warmup_steps = min(20, half)
    config.log_every_steps = max(1, min(10, half // 2))
    config.eval_every_steps = max(1, steps // 5)
    config.checkpoint_every_steps = half
    return config


def get_sweep(arg: str | None = None) -> list[dict]:
    mode, _ = mode_and_steps(arg)
    return sweep("config.schedule.base_lr", LEARNING_RATES[mode])
