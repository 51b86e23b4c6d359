r"""Fine-tune a pretrained ViT (ours, coyo-vit TensorFlow, vision_transformer or big_vision).

    python finetune.py --config configs/imagenet_finetune.py:variant=L/16,res=384 --workdir DIR \
        --config.init=/ckpt/coyo_l16 --config.input.data.manual_dir=/data/imagenet
    python finetune.py --config configs/demo_finetune.py --workdir /tmp/coyo_vit_digits

The same loop and flags as train.py (coyo_vit.training.loop). `config.init` is read by
checkpoints.load, which replaces the head for `config.num_classes`, keeps or drops the
pre-logits layer and resizes the position embeddings to `config.image_size`.
"""
from absl import flags

from coyo_vit.training import cli, run_config  # cli.run sets TF's log level before TF starts

flags.adopt_module_key_flags(run_config)  # --help lists --config, --workdir, ... (defined there)

if __name__ == "__main__":
    cli.run(lambda argv: run_config.main(argv, require_init=True))
