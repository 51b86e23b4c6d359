"""tf.data input pipeline for coyo_vit.

TensorFlow is only used here to read and preprocess data, so importing this package hides every
GPU/TPU from TensorFlow: otherwise TF would reserve accelerator memory that JAX needs.
"""
import tensorflow as tf

for _device_type in ("GPU", "TPU"):
    try:
        tf.config.set_visible_devices([], _device_type)
    except (RuntimeError, ValueError):
        # RuntimeError: TF already initialised its devices (TF was used before this import);
        # ValueError: this TF build does not know the device type. Nothing left to hide then.
        pass
del _device_type
