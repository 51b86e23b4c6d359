"""A tiny pretraining config over given shards, for tests that run train.py for real.

Argument: the shard files spec, e.g. `tests/tiny_config.py:/path/shards/*.tfrecord`.
"""
import ml_collections

from configs import common


def get_config(files: str) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 3
    config.num_classes = common.NUM_COYO_CLASSES
    config.image_size = 32
    config.batch_size = 8
    config.grad_accum_steps = 1
    config.total_steps = 12
    config.loss = "sigmoid_xent"
    config.model = common.model_config(patch_size=8, width=32, depth=2, mlp_dim=64, num_heads=4,
                                       rep_size=16, head_bias_init=-10.0)
    labels = "coyo_labels('threshold', 0.05)"
    config.input = common.input_config(
        files=files,
        pp_train=f"decode_jpeg_and_inception_crop(32, area_min=30)|flip_lr|{labels}",
        pp_eval=f"decode|resize(32)|{labels}",
        shuffle_buffer=64, holdout_examples=16)
    config.input.cycle_length = 2
    config.optimizer = dict(name="adamw", b1=0.9, b2=0.999, eps=1e-7, weight_decay=0.1,
                            grad_clip_norm=1.0)
    config.schedule = dict(base_lr=1e-3, end_lr=1e-5, warmup_steps=2, decay="linear")
    config.eval_batch_size = 16
    common.run_control(config, log_every=2, eval_every=6, checkpoint_every=4)
    return config
