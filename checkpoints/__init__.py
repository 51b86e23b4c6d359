"""Checkpoints: orbax save/restore of our own runs, import of released ViT checkpoints, export.

`load` reads every supported format into `(params, model_kwargs)` (`describe`: the kwargs
alone, from shapes and metadata); `export_npz` writes the vit_jax or big_vision .npz layouts; `export_hf` / `export_timm` write transformers / timm
folders (`checkpoints.pytorch_io`, needs `pip install -e ".[torch]"` only when called);
`save_params` / `restore_params` are our orbax format.
"""
from checkpoints.export import export_npz
from checkpoints.load import CheckpointFormatError, HeadCountUnknown, describe, load
from checkpoints.orbax_io import restore_params, save_params
from checkpoints.pytorch_io import export_hf, export_timm

__all__ = ["CheckpointFormatError", "HeadCountUnknown", "describe", "export_hf", "export_npz",
           "export_timm", "load", "restore_params", "save_params"]
