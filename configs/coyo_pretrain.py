"""The published COYO-Labeled-300M pretraining recipe (kakaobrain/coyo-vit), in JAX.

ViT-L/16 by default; other sizes by argument:
    python train.py --config configs/coyo_pretrain.py:variant=B/16 --workdir DIR \
        --config.input.data.files='/data/coyo/*.tfrecord'
Recipe: 224px, global batch 4096, 7 epochs of 300M images, sigmoid cross-entropy summed over the
21,841 classes (multi-hot of the labels with probability >= `threshold`, an argument, 0.1 by
default: the published recipe does not fix it), AdamW (0.9, 0.999, 1e-7,
wd 0.1), clip 1.0, warmup 10k steps to 6e-4 then linear to 1e-5, pre-logits 1024 (tanh),
class-token pooling, no dropout, head zeros / bias -10, bfloat16 activations.
"""
from __future__ import annotations

import ml_collections

from configs import common

DATASET_IMAGES = 300_000_000


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = common.parse_args(arg, dict(variant="L/16", epochs=7, batch=4096, res=224,
                                       threshold=0.1, files=""))
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.num_classes = common.NUM_COYO_CLASSES
    config.image_size = args["res"]
    config.batch_size = args["batch"]
    config.grad_accum_steps = 1
    config.total_steps = int(args["epochs"] * DATASET_IMAGES / args["batch"])
    config.loss = "sigmoid_xent"
    config.model = common.model_config(variant=args["variant"], rep_size=1024, head_bias_init=-10.0,
                                       dtype="bfloat16")
    labels = f"coyo_labels('threshold', {args['threshold']})"
    config.input = common.input_config(
        files=args["files"],
        pp_train=f"decode_jpeg_and_inception_crop({args['res']}, area_min=5)|flip_lr|{labels}",
        # The usual 224/256 crop ratio at any resolution (a 256 resize cannot be cropped to 384).
        # decode_and_resize_small = decode|resize_small, decoding at 1/2 DCT scale when the image
        # is twice the resize (a 512px COYO download); exact=True decodes at full scale.
        pp_eval=(f"decode_and_resize_small({args['res'] * 256 // 224})|central_crop({args['res']})"
                 f"|{labels}"),
        shuffle_buffer=250_000, holdout_examples=50_000)
    config.optimizer = dict(name="adamw", b1=0.9, b2=0.999, eps=1e-7, weight_decay=0.1,
                            decay_pattern=r".*/kernel", grad_clip_norm=1.0,
                            skip_nonfinite=False)  # True: skip steps whose loss/gradients are inf/nan
    config.schedule = dict(base_lr=6e-4, end_lr=1e-5, warmup_steps=10_000, decay="linear")
    config.eval_batch_size = 1024
    common.run_control(config, log_every=100, eval_every=5_000, checkpoint_every=2_000)
    return config
