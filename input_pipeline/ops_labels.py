"""Turns COYO's top-50 (label, probability) lists into dense training targets.

Each COYO image carries 50 ImageNet-21k indices with descending machine-label probabilities; the
label mode decides what the model learns from them (the modes: `coyo_labels`).
"""
from __future__ import annotations

import tensorflow as tf

from coyo_vit.class_names import NUM_COYO_CLASSES
from input_pipeline.registry import Features, OpFn, register

MODES = ("threshold", "topk", "top1", "soft")


def _check_args(mode: str, arg: float | int | None, num_classes: int) -> None:
    """Validates the mode's argument; errors say what each mode expects."""
    if mode not in MODES:
        raise ValueError(f"coyo_labels: unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes <= 0:
        raise ValueError(f"coyo_labels: num_classes must be a positive int, got {num_classes!r}")
    is_number = isinstance(arg, (int, float)) and not isinstance(arg, bool)
    if mode == "threshold" and not (is_number and 0 <= arg <= 1):
        raise ValueError(f"coyo_labels('threshold', t): t must be a probability in [0, 1], "
                         f"got {arg!r}")
    if mode == "topk" and not (isinstance(arg, int) and not isinstance(arg, bool) and arg >= 1):
        raise ValueError(f"coyo_labels('topk', k): k must be an int >= 1, got {arg!r}")
    if mode in ("top1", "soft") and arg is not None:
        raise ValueError(f"coyo_labels({mode!r}) takes no argument, got {arg!r}")


@register("coyo_labels")
def coyo_labels(mode: str, arg: float | int | None = None, num_classes: int = NUM_COYO_CLASSES,
                drop_empty: bool = True, key: str = "labels",
                probs_key: str = "label_probs") -> OpFn:
    """Replaces the label list `key` with a float32 [num_classes] target; drops `probs_key`.

    Modes: `threshold` (multi-hot of labels with probability >= arg), `topk` (multi-hot of the
    first arg labels), `top1` (one-hot of the first label, for softmax), `soft` (each label's
    target is its probability). An image left without labels gets `_keep` = False when
    drop_empty (the pipeline then drops it), else stays as an all-negative target.

    Labels outside [0, num_classes), or label and probability lists of different lengths, raise
    a TF error instead of producing a wrong target; the pipeline drops such records.
    """
    _check_args(mode, arg, num_classes)

    def fn(features: Features) -> Features:
        if key not in features:
            raise ValueError(f"coyo_labels: feature {key!r} missing; present: {sorted(features)}")
        labels = tf.cast(features.pop(key), tf.int64)
        probs = tf.cast(features.pop(probs_key, tf.zeros([0], tf.float32)), tf.float32)
        num_labels, num_probs = tf.size(labels), tf.size(probs)
        lengths_ok = tf.equal(num_labels, num_probs)
        if mode in ("topk", "top1"):
            lengths_ok = tf.logical_or(lengths_ok, tf.equal(num_probs, 0))  # probs not needed
        # Plain Assert ops: tf.debugging.Assert wraps an assert whose data is not all string or
        # int32 (the labels, int64) in a cond, adding control-flow nodes to every record's graph.
        checks = [
            tf.raw_ops.Assert(condition=lengths_ok, data=[
                "coyo_labels: labels and label_probs differ in length:", num_labels, num_probs]),
            tf.raw_ops.Assert(condition=tf.reduce_all((labels >= 0) & (labels < num_classes)),
                              data=[f"coyo_labels: label outside [0, {num_classes}):", labels],
                              summarize=64),
        ]
        with tf.control_dependencies(checks):
            labels = tf.identity(labels)
            probs = tf.identity(probs)

        if mode == "threshold":
            # Every label is scattered, those below the threshold with 0, which max() ignores:
            # the same target as picking the chosen labels first, in fewer nodes.
            chosen = probs >= tf.constant(arg, tf.float32)
            targets, values = labels, tf.cast(chosen, tf.float32)
            has_labels = tf.reduce_any(chosen)
        else:
            if mode == "topk":
                targets = labels[:arg]
            elif mode == "top1":
                targets = labels[:1]
            else:  # soft
                targets = labels
            values = probs if mode == "soft" else tf.ones_like(targets, tf.float32)
            has_labels = tf.size(targets) > 0
        # max, not sum: a label listed twice must not get a target above its value.
        features[key] = tf.tensor_scatter_nd_max(tf.zeros([num_classes], tf.float32),
                                                 targets[:, None], values)
        if drop_empty:
            features["_keep"] = (tf.logical_and(features["_keep"], has_labels)
                                 if "_keep" in features else has_labels)
        return features

    return fn
