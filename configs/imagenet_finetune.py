"""Fine-tuning a COYO-Labeled-300M (or any) ViT on ImageNet-1k: the published recipe.

    python finetune.py --config configs/imagenet_finetune.py:variant=L/16,res=384 \
        --workdir DIR --config.init=/ckpt/coyo_l16_pretrain \
        --config.input.data.data_dir=/data/tfds --config.input.data.manual_dir=/data/imagenet

Recipe (kakaobrain/coyo-vit's): 384 or 512px, batch 512, 20k steps (8 epochs; the sweep is lr
{0.06, 0.03, 0.01} x steps {20k, 40k}), SGD momentum 0.9, no weight decay, global-norm clip 1.0, cosine
schedule with 500 warmup steps, softmax cross-entropy, pre-logits dropped, a new zero-initialised
head, position embeddings resized bilinearly to the new grid (`checkpoints.load(init,
num_classes=1000, rep_size=None, image_size=res)`), EMA of the parameters with decay 0.9999 for
the 512px run. Train aug: Inception crop + flip; eval: plain resize to res, no crop. Evaluators:
ImageNet validation top-1/top-5 and ImageNet-ReaL.

Arguments (comma-separated key=value): variant (auto: config.init's shape; L/16 etc. are
checked against it), res (384 | 512), steps (20000), lr (0.03),
batch (512), ema (default: 0.9999 at 512px, off at 384px; 0 = off). data_dir, manual_dir and
init are set with --config.* flags; data_dir / manual_dir given once reach the evaluators too.
The ImageNet TFDS data must be prepared once (input_pipeline.classification_data.prepare).
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from configs import common
from coyo_vit.class_names import NUM_IMAGENET1K_CLASSES as NUM_CLASSES

RECIPE_EMA = {512: 0.9999}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = common.parse_args(arg, dict(variant="auto", res=384, steps=20_000, lr=0.03, batch=512,
                                       ema=-1.0))
    res = args["res"]
    if res not in (384, 512):
        raise ValueError(f"res must be 384 or 512 (the published runs), got {res}")
    ema = RECIPE_EMA.get(res) if args["ema"] < 0 else (args["ema"] or None)

    config = ml_collections.ConfigDict()
    config.seed = 0
    config.init = config_dict.placeholder(str)       # pretrained checkpoint (any checkpoints.load format)
    config.num_classes = NUM_CLASSES
    config.image_size = res
    config.batch_size = args["batch"]
    config.grad_accum_steps = 1
    config.total_steps = args["steps"]
    config.loss = "softmax_xent"
    config.model = common.model_config(variant=args["variant"], pool_type=None, posemb=None,
                                       dtype="bfloat16")  # None: config.init's
    data_dir, manual_dir = config_dict.placeholder(str), config_dict.placeholder(str)
    imagenet = dict(name="tfds", tfds_name="imagenet2012", data_dir=data_dir, manual_dir=manual_dir)
    labels = f"onehot({NUM_CLASSES})"
    pp_eval = f"decode|resize({res})|{labels}"
    config.input = dict(
        data=dict(imagenet, split="train"),
        pp_train=f"decode_jpeg_and_inception_crop({res})|flip_lr|{labels}",
        pp_eval=pp_eval,
        shuffle_buffer=25_000,          # serialized JPEGs (~110 KB each): ~2.7 GB per host
        cycle_length=16,
        num_parallel_calls=-1,
        prefetch=4,
        ram_budget_gb=config_dict.placeholder(float),  # None = tf.data's own
        strict=False)  # True: stop at the first damaged image instead of skipping it
    config.optimizer = dict(name="sgd", momentum=0.9, nesterov=False, weight_decay=0.0,
                            grad_clip_norm=1.0,
                            skip_nonfinite=False)  # True: skip steps whose loss/gradients are inf/nan
    config.schedule = dict(base_lr=args["lr"], end_lr=0.0, warmup_steps=500, decay="cosine")
    config.ema_decay = config_dict.placeholder(float)
    config.ema_decay = ema
    config.mixup_alpha = 0.0
    validation = dict(imagenet, split="validation")
    config.evals = dict(
        val=dict(type="classification", every_steps=2_000, batch_size=512, data=validation,
                 pp=pp_eval, top_k=(1, 5)),
        real=dict(type="real", every_steps=2_000, batch_size=512, data=validation, pp=pp_eval,
                  labels_path=config_dict.placeholder(str)))  # None: the copy in coyo_vit/data
    config.eval_batch_size = 512
    # eval_every_steps drives the COYO holdout evaluator, which fine-tuning has no use for.
    common.run_control(config, log_every=50, eval_every=0, checkpoint_every=1_000)
    return config


def get_sweep(arg: str | None = None) -> list[dict]:
    """The published fine-tuning sweep: lr {0.06, 0.03, 0.01} x steps {20k, 40k} at 384 and 512px.

    12 points; 512px turns EMA on by this config's own rule. See docs/experiments.md.
    """
    from coyo_vit.tools.sweep_expand import product, sweep  # late: get_config needs no sweep tools
    return product([sweep("arg.res", [384, 512]),
                    sweep("config.schedule.base_lr", [0.06, 0.03, 0.01]),
                    sweep("config.total_steps", [20_000, 40_000])])
