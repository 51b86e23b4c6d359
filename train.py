r"""Pretrain a ViT on COYO-Labeled-300M shards (or the embedded demo data).

    python train.py --config configs/demo.py --workdir /tmp/demo
    python train.py --config configs/coyo_pretrain.py:variant=B/16 --workdir gs://bucket/run \
        --config.input.data.files='gs://bucket/coyo/*.tfrecord'

Starting again in a workdir that holds a checkpoint resumes from it. Any config value can be
overridden with --config.key=value; unknown keys are an error.
"""
from absl import flags

from coyo_vit.training import cli, run_config  # cli.run sets TF's log level before TF starts

flags.adopt_module_key_flags(run_config)  # --help lists --config, --workdir, ... (defined there)

if __name__ == "__main__":
    cli.run(lambda argv: run_config.main(argv, require_init=False))
