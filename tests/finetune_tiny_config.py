"""A tiny fine-tuning config for tests: the coyo-vit TF pretrain fixture on a real TFDS imagenet2012.

Argument: the TFDS data_dir. The fixture (32px, 100 classes, pre-logits 48) is fine-tuned at 48px
with 1000 classes and no pre-logits, with an EMA, evaluated by `val` (top-1) and `real` (ReaL).
"""
from pathlib import Path

import ml_collections
from ml_collections import config_dict

from configs import common

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "coyo_vit_tf" / "pretrain"
PP = "decode|resize(48)|value_range(-1, 1)|onehot(1000)"


def get_config(data_dir: str) -> ml_collections.ConfigDict:
    data = dict(name="tfds", tfds_name="imagenet2012", data_dir=data_dir)
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.init = str(FIXTURE)
    config.num_classes = 1000
    config.image_size = 48
    config.batch_size = 8
    config.grad_accum_steps = 1
    config.total_steps = 30
    config.loss = "softmax_xent"
    config.model = common.model_config(patch_size=8, width=64, depth=2, mlp_dim=128, num_heads=4)
    config.input = dict(data=dict(data, split="train"), pp_train=PP, pp_eval=PP, shuffle_buffer=16,
                        cycle_length=2, num_parallel_calls=-1, prefetch=2, ram_budget_gb=config_dict.placeholder(float))  # None = tf.data's own
    config.optimizer = dict(name="sgd", momentum=0.9, grad_clip_norm=1.0)
    config.schedule = dict(base_lr=0.05, end_lr=0.0, warmup_steps=3, decay="cosine")
    config.ema_decay = 0.9
    config.mixup_alpha = 0.0
    config.evals = dict(
        val=dict(type="classification", every_steps=15, batch_size=8,
                 data=dict(data, split="validation"), pp=PP, top_k=(1, 5)),
        real=dict(type="real", every_steps=30, batch_size=8, data=dict(data, split="validation"), pp=PP))
    config.eval_batch_size = 8
    common.run_control(config, log_every=5, eval_every=0, checkpoint_every=15)
    return config
