r"""Pretrain a ViT on COYO-Labeled-300M shards (or the embedded demo data).

    python train.py --config configs/demo.py --workdir /tmp/demo
    python train.py --config configs/coyo_pretrain.py:variant=B/16 --workdir gs://bucket/run \
        --config.input.data.files='gs://bucket/coyo/*.tfrecord'

Starting again in a workdir that holds a checkpoint resumes from it. Any config value can be
overridden with --config.key=value; unknown keys are an error.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # before anything imports TensorFlow

from absl import flags  # noqa: E402

from coyo_vit.training import cli, run_config  # noqa: E402

flags.adopt_module_key_flags(run_config)  # --help lists --config, --workdir, ... (defined there)

if __name__ == "__main__":
    cli.run(lambda argv: run_config.main(argv, require_init=False))
