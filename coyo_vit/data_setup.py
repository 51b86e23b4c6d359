"""Gets a run's input ready before any compute: embedded demo data, TFDS preparation, checks.

Returns the module that builds the run's datasets: input_pipeline.pipeline for COYO shards,
input_pipeline.classification_data for TFDS / image-folder data. Both have the same
`build_train_dataset` / `build_eval_dataset` signatures, so the loop does not care which.
"""
from __future__ import annotations

import os
from types import ModuleType

import jax
import ml_collections
from jax.experimental import multihost_utils


def prepare_inputs(config: ml_collections.ConfigDict, workdir: str) -> ModuleType:
    """Writes demo data the config asks for (process 0), then validates the input section."""
    import input_pipeline.pipeline as shard_pipeline  # TensorFlow only from here on
    from input_pipeline import classification_data, demo_data, demo_digits, sources

    is_main = jax.process_index() == 0
    if config.get("demo_data") is not None:
        out = config.demo_data.out_dir or os.path.join(workdir, "demo_data")
        if is_main:
            demo_data.ensure_demo_shards(out, num_images=config.demo_data.num_images,
                                         image_size=config.demo_data.image_size)
        with config.unlocked():
            config.input.data.files = out
    if config.get("demo_digits") is not None:
        out = config.demo_digits.out_dir or os.path.join(workdir, "digits")
        if is_main:
            demo_digits.ensure_digits_folder(out, image_size=config.demo_digits.image_size)
        with config.unlocked():
            config.input.data.root = out  # a shared field: the evaluators' data follow it
    if classification_data.is_classification_data(config.input.data):
        if is_main:
            classification_data.prepare(config.input.data)
        multihost_utils.sync_global_devices("inputs_prepared")
        classification_data.ClassificationInputConfig.from_config(config.input)
        return classification_data
    multihost_utils.sync_global_devices("inputs_prepared")
    # Fail fast: a bad input section or a pattern that matches nothing stops before compiling.
    sources.list_files(shard_pipeline.InputConfig.from_config(config.input).files)
    return shard_pipeline
