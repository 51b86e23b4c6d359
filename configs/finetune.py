"""Fine-tuning a ViT checkpoint on any classification dataset: a TFDS dataset or an image folder.

    python finetune.py --config configs/finetune.py:dataset=cifar10,classes=10,res=224,steps=10000 \
        --workdir DIR --config.init=/ckpt/coyo_b16 --config.input.data.data_dir=/data/tfds
    python finetune.py --config configs/finetune.py:folder=/data/flowers,classes=102,res=384 \
        --workdir DIR --config.init=/ckpt/coyo_b16

Arguments (comma-separated key=value): dataset (a TFDS name) or folder (an image folder root,
ROOT/<split>/<class>/<image>), classes (required), res (224), steps (10000), batch (512),
lr (0.01), warmup (500), variant (auto: config.init's shape; or e.g. B/16, checked against it), train_split (train), val_split (test; imagenet2012
calls it validation), ema (0 = off), mixup (0 = off), smoothing (0: label smoothing eps),
area_min (5: the training crop's smallest share of the image, in percent; 100 = no crop), flip
(true: random left-right flips; false for digits, text and other data a mirror changes).
Small digits-like folders want gentle augmentation, e.g. from the demo pretraining
(configs/demo_finetune.py measures this recipe on scikit-learn's digits):
`folder=ROOT,classes=10,res=32,steps=1500,batch=64,lr=0.1,warmup=50,area_min=75,flip=false,
 smoothing=0.1,ema=0.998`.
The recipe is the ImageNet one (SGD momentum 0.9, no weight decay, clip 1.0, cosine, softmax
cross-entropy, new zero head, pre-logits dropped, position embeddings resized); eval resizes
without a crop. Evaluator `val` reports top-1/top-5 on val_split.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from configs import common

DEFAULTS = dict(dataset="", folder="", classes=0, res=224, steps=10_000, batch=512, lr=0.01,
                warmup=500, variant="auto", train_split="train", val_split="test", ema=0.0,
                mixup=0.0, smoothing=0.0, area_min=5.0, flip=True)


def onehot_pp(classes: int, smoothing: float) -> str:
    """The pp op making `labels`; with smoothing eps: on = 1 - eps + eps/C, off = eps/C."""
    if not smoothing:
        return f"onehot({classes})"
    off = smoothing / classes
    return f"onehot({classes}, on={1 - smoothing + off!r}, off={off!r})"


def train_pp(res: int, classes: int, area_min: float, flip: bool, smoothing: float) -> str:
    """The training pp: an Inception crop of at least `area_min`% (none at 100), maybe a flip."""
    if not 0 < area_min <= 100:
        raise ValueError(f"area_min must be in (0, 100] (percent of the image), got {area_min}")
    area = "" if area_min == DEFAULTS["area_min"] else f", area_min={area_min!r}"
    crop = (f"decode|resize({res})" if area_min == 100
            else f"decode_jpeg_and_inception_crop({res}{area})")
    return "|".join([crop] + ["flip_lr"] * flip + [onehot_pp(classes, smoothing)])


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = common.parse_args(arg, DEFAULTS)
    if bool(args["dataset"]) == bool(args["folder"]):
        raise ValueError("give exactly one of dataset=<TFDS name> or folder=<image folder root>")
    if args["classes"] < 2:
        raise ValueError(f"classes=<number of classes> is required (>= 2), got {args['classes']}")
    res, classes = args["res"], args["classes"]

    config = ml_collections.ConfigDict()
    config.seed = 0
    config.init = config_dict.placeholder(str)
    config.num_classes = classes
    config.image_size = res
    config.batch_size = args["batch"]
    config.grad_accum_steps = 1
    config.total_steps = args["steps"]
    config.loss = "softmax_xent"
    config.model = common.model_config(variant=args["variant"], pool_type=None, posemb=None,
                                       dtype="bfloat16")  # None: config.init's
    if args["dataset"]:
        source = dict(name="tfds", tfds_name=args["dataset"], data_dir=config_dict.placeholder(str),
                      manual_dir=config_dict.placeholder(str))
    else:
        source = dict(name="imagefolder", root=args["folder"])
    pp_eval = f"decode|resize({res})|{onehot_pp(classes, 0.0)}"
    config.input = dict(
        data=dict(source, split=args["train_split"]),
        pp_train=train_pp(res, classes, args["area_min"], args["flip"], args["smoothing"]),
        pp_eval=pp_eval,
        shuffle_buffer=25_000,
        cycle_length=16,
        num_parallel_calls=-1,
        prefetch=4,
        ram_budget_gb=config_dict.placeholder(float),  # None = tf.data's own
        strict=False)  # True: stop at the first damaged image instead of skipping it
    config.optimizer = dict(name="sgd", momentum=0.9, nesterov=False, weight_decay=0.0,
                            grad_clip_norm=1.0,
                            skip_nonfinite=False)  # True: skip steps whose loss/gradients are inf/nan
    config.schedule = dict(base_lr=args["lr"], end_lr=0.0, warmup_steps=args["warmup"],
                           decay="cosine")
    config.ema_decay = config_dict.placeholder(float)
    config.ema_decay = args["ema"] or None
    config.mixup_alpha = args["mixup"]
    every = max(args["steps"] // 10, 1)
    config.evals = dict(
        val=dict(type="classification", every_steps=every, batch_size=args["batch"],
                 data=dict(source, split=args["val_split"]), pp=pp_eval, top_k=(1, 5),
                 per_class=False))  # True: each class's top-1, by name
    config.eval_batch_size = args["batch"]
    common.run_control(config, log_every=50, eval_every=0, checkpoint_every=every)
    return config
