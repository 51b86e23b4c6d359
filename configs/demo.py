"""The embedded demo: a tiny ViT pretrained on drawn images with real ImageNet-21k multi-labels.

    python train.py --config configs/demo.py --workdir /tmp/coyo_demo
    python train.py --config configs/demo.py:60 --workdir /tmp/coyo_demo_short   # 60 steps
                                                     # (configs/demo.py:steps=60 alike)

The data (img2dataset TFRecord shards, written on first use into WORKDIR/demo_data, or
`--config.demo_data.out_dir`; `--config.input.data.files` is refused: the demo trains on its own
data) holds 10 drawn glyph-like concepts (a line, an arc, an S-shape, a hook, a ring, ...), each
labeled with a real ImageNet-21k class; labels are read in `threshold` mode exactly like
COYO-Labeled-300M. About 4 minutes on 2 CPU cores; watch holdout/prec@1 climb far above chance
(to ~0.79). configs/demo_finetune.py fine-tunes the result on handwritten digits.
"""
from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    steps = common.parse_args(arg, dict(steps=2400), bare="steps")["steps"]
    if steps < 2:
        raise ValueError(f"configs/demo.py:STEPS needs at least 2 steps, got {steps}")
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.demo_data = dict(out_dir="", num_images=4096, image_size=64)  # "" = WORKDIR/demo_data
    config.num_classes = common.NUM_COYO_CLASSES
    config.image_size = 32
    config.batch_size = 64
    config.grad_accum_steps = 1
    config.total_steps = steps
    config.loss = "sigmoid_xent"
    config.model = common.model_config(patch_size=8, width=96, depth=4, mlp_dim=192, num_heads=4,
                                       head_bias_init=-10.0)
    labels = "coyo_labels('threshold', 0.1)"
    config.input = common.input_config(
        files="",  # filled in with the demo data directory
        # No crop, no flip: the images' 8x8 (or 16x16) cells then meet the ViT's 8px patches
        # exactly as the fine-tuning demo's digits do, and mirrored glyphs are other glyphs.
        pp_train=f"decode|resize(32)|{labels}",
        pp_eval=f"decode|resize(32)|{labels}",
        shuffle_buffer=2048, holdout_files=1)
    config.optimizer = dict(name="adamw", b1=0.9, b2=0.999, eps=1e-7, weight_decay=0.1,
                            decay_pattern=r".*/kernel", grad_clip_norm=1.0,
                            skip_nonfinite=False)  # True: skip steps whose loss/gradients are inf/nan
    # Short runs (configs/demo.py:STEPS) warm up over at most half of their steps.
    config.schedule = dict(base_lr=3e-3, end_lr=1e-5, warmup_steps=min(100, steps // 2),
                           decay="linear")
    config.eval_batch_size = 256
    common.run_control(config, log_every=50, eval_every=300, checkpoint_every=300)
    config.input.cycle_length = 4
    return config
