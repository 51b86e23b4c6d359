"""Checkpoints: orbax save/restore of our own runs, import of released ViT checkpoints, export.

`load` reads every supported format into `(params, model_kwargs)`; `export_npz` writes the
vit_jax or big_vision .npz layouts; `save_params` / `restore_params` are our orbax format.
"""
from checkpoints.export import export_npz
from checkpoints.load import CheckpointFormatError, load
from checkpoints.orbax_io import restore_params, save_params

__all__ = ["CheckpointFormatError", "export_npz", "load", "restore_params", "save_params"]
