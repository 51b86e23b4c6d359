"""Pieces shared by the pretraining configs: the input, optimizer and run-control sections."""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

NUM_COYO_CLASSES = 21841


def model_speed_options() -> dict:
    """Model fields that change speed and memory, not the parameters or (but for rounding) the
    values: listed in every config so `--config.model.NAME=...` can set them. What each does and
    what it measured: coyo_vit.models.vit.Model and docs/performance.md."""
    return dict(
        attention_impl="auto",                    # auto (cuDNN on GPUs, else XLA), xla or cudnn
        attention_pad_multiple=config_dict.placeholder(int),  # None = the model's choice; 1 = never
        gelu_recompute=True,                      # GELU backward recomputes tanh: less memory, and on
                                                  # GPUs bias + GELU fold into the GEMM
        fused_qkv=False,                          # one q/k/v product over the stacked kernels
    )


def input_config(*, files: str, pp_train: str, pp_eval: str, shuffle_buffer: int,
                 holdout_files: int = 0, holdout_examples: int = 0) -> ml_collections.ConfigDict:
    """The `config.input` section read by input_pipeline.pipeline."""
    return ml_collections.ConfigDict(dict(
        data=dict(files=files),                  # glob, comma list, list or directory; gs:// works
        holdout=dict(files=holdout_files, examples=holdout_examples),  # never seen by training
        pp_train=pp_train,
        pp_eval=pp_eval,
        shuffle_buffer=shuffle_buffer,
        cycle_length=16,                          # shards read in parallel per process
        num_parallel_calls=-1,                    # -1 = tf.data AUTOTUNE
        prefetch=4,                               # batches prefetched by tf.data
        ram_budget_gb=None,
        exclude_keys_file=None,                   # keys/urls never to train on (decontamination)
        strict=False,                             # True: stop at the first damaged record
    ))


def run_control(config: ml_collections.ConfigDict, *, log_every: int, eval_every: int,
                checkpoint_every: int, keep: int = 3) -> None:
    config.log_every_steps = log_every
    config.eval_every_steps = eval_every          # 0 disables holdout evaluation
    config.checkpoint_every_steps = checkpoint_every
    config.keep_checkpoints = keep
    config.checkpoint_compression = False         # zstd: ~7% smaller, 2-3x slower writes
    config.device_prefetch = 2                    # global batches built ahead on the devices
    config.compilation_cache_dir = ""             # keep compiled steps here (path or gs://): restarts
                                                  # skip compiling; "" = JAX_COMPILATION_CACHE_DIR or none
    config.mesh = dict(data=-1, fsdp=1, model=1)  # -1 = all remaining devices
    config.sharding_rules = None                  # None = coyo_vit.sharding.DEFAULT_RULES
    config.param_sharding = []                    # [regex, placement] overrides, see sharding.param_shardings
