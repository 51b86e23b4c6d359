"""Preprocessing ops for single-label classification data (TFDS datasets, image folders).

`onehot` turns the integer `label` into the dense float `labels` target the train step and the
softmax loss read; `on` / `off` give label smoothing. The integer label stays in the example so
evaluators can compute top-k without decoding the target.
"""
from __future__ import annotations

import tensorflow as tf

from input_pipeline.registry import Features, OpFn, register


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@register("onehot")
def onehot(num_classes: int, key: str = "label", key_result: str = "labels", on: float = 1.0,
           off: float = 0.0) -> OpFn:
    """float32 [num_classes] target from the integer class `key` (a scalar, or a 1-D list of
    classes for a multi-hot target), written to `key_result`; `key` is kept.

    Label smoothing by eps: on = 1 - eps + eps / num_classes, off = eps / num_classes.
    A label outside [0, num_classes) stops the pipeline with an error naming it: with a wrong
    class count, silently all-zero targets would train on nothing.
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"onehot: num_classes must be a positive int, got {num_classes!r}")
    if not (_is_number(on) and _is_number(off)):
        raise ValueError(f"onehot: on and off must be numbers, got on={on!r}, off={off!r}")
    if not (isinstance(key, str) and isinstance(key_result, str)):
        raise ValueError(f"onehot: key and key_result must be feature names, got {key!r}, "
                         f"{key_result!r}")

    def fn(features: Features) -> Features:
        if key not in features:
            raise ValueError(f"onehot: feature {key!r} missing; present: {sorted(features)}")
        label = tf.cast(features[key], tf.int64)
        if label.shape.rank not in (0, 1):
            raise ValueError(f"onehot: feature {key!r} must be a class index or a list of them, "
                             f"got shape {label.shape}")
        in_range = tf.reduce_all((label >= 0) & (label < num_classes))
        check = tf.debugging.Assert(in_range, [f"onehot: label outside [0, {num_classes}) in "
                                               f"feature {key!r}:", label])
        with tf.control_dependencies([check]):
            hot = tf.one_hot(label, num_classes, on_value=1.0, off_value=0.0, dtype=tf.float32)
        if label.shape.rank == 1:  # multi-hot; a zero row first so an empty list gives all-off
            hot = tf.reduce_max(tf.concat([tf.zeros([1, num_classes]), hot], axis=0), axis=0)
        features[key_result] = hot * (float(on) - float(off)) + float(off)
        return features

    return fn
