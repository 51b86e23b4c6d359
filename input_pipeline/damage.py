"""What counts as damaged data, and how to recognise it without crashing.

One vocabulary of reasons serves the training pipeline (in-graph checks, `pipeline.py`), the
shard validator (`validate_shards.py`) and the TFDS builder, so that counts from all three can be
compared. The pipeline cannot tell some causes apart (tf.data reports a truncated file and a bad
checksum the same way; a missing `labels` feature parses like an empty one), so the validator's
finer reasons map onto coarser ones with `coarse_reason`.

Reasons, in the order they are checked (a record is counted under the first that applies):
  damaged_file        the TFRecord file is truncated or fails a checksum at this record; tf.data
                      cannot read past it, so the rest of the file is lost (validator:
                      `truncated_file` or `bad_checksum`)
  not_an_example      the record does not parse as a tf.train.Example
  excluded            listed in `input.exclude_keys_file` (pipeline only; not damage)
  no_image            neither `jpg` (img2dataset) nor `image` (TFDS) holds bytes
  not_an_image        the bytes do not start like a JPEG, PNG, GIF, BMP or WebP file
  no_labels           no `labels`, or an empty list (validator: `missing_labels`, `empty_labels`)
  label_out_of_range  a label outside [0, NUM_CLASSES) (the 21,841 COYO classes)
  label_length_mismatch  `labels` and `label_probs` differ in length
  undecodable_image   the image bytes look right but do not decode (pipeline: or preprocessing
                      failed on them)
  no_positive_label   the label mode kept no label, e.g. none above the threshold (pipeline only;
                      not damage: it is how `coyo_labels(..., drop_empty=True)` filters)
`not_an_example` and `undecodable_image` can only be found by trying to parse or decode. Training
(default mode) lets those records fail and drops them, and `skip_accounting.SkipCounter` reports them
together as `unreadable`; strict mode isolates each try (`try_apply`) to name them.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import tensorflow as tf

from coyo_vit.class_names import NUM_COYO_CLASSES as NUM_CLASSES

# Pipeline reasons, in check order. Their positions are the codes used in-graph (0 = usable).
SKIP_REASONS = ("damaged_file", "not_an_example", "excluded", "no_image", "not_an_image",
                "no_labels", "label_out_of_range", "label_length_mismatch", "undecodable_image",
                "no_positive_label")
# Reasons that are not damage: strict mode does not stop for them.
NOT_DAMAGE = ("excluded", "no_positive_label")
# Validator reasons that the pipeline cannot separate.
_FINE_TO_COARSE = {"truncated_file": "damaged_file", "bad_checksum": "damaged_file",
                   "missing_labels": "no_labels", "empty_labels": "no_labels"}
VALIDATOR_REASONS = ("truncated_file", "bad_checksum", "not_an_example", "no_image",
                     "not_an_image", "missing_labels", "empty_labels", "label_out_of_range",
                     "label_length_mismatch", "undecodable_image")

# File signatures tf.io.decode_image accepts: (offset, bytes).
_SIGNATURES = {
    "jpeg": ((0, b"\xff\xd8\xff"),),
    "png": ((0, b"\x89PNG\r\n\x1a\n"),),
    "gif": ((0, b"GIF8"),),
    "bmp": ((0, b"BM"),),
    "webp": ((0, b"RIFF"), (8, b"WEBP")),
}


def code(reason: str) -> int:
    """In-graph code of a pipeline reason (1-based; 0 means the record is usable)."""
    if reason not in SKIP_REASONS:
        raise ValueError(f"unknown skip reason {reason!r}; valid: {', '.join(SKIP_REASONS)}")
    return SKIP_REASONS.index(reason) + 1


def coarse_reason(reason: str) -> str:
    """The pipeline reason a validator reason is counted under."""
    if reason not in VALIDATOR_REASONS and reason not in SKIP_REASONS:
        raise ValueError(f"unknown reason {reason!r}; valid: {', '.join(VALIDATOR_REASONS)}")
    return _FINE_TO_COARSE.get(reason, reason)


def image_format(data: bytes) -> str | None:
    """'jpeg', 'png', 'gif', 'bmp' or 'webp' from the leading bytes; None for anything else."""
    for name, parts in _SIGNATURES.items():
        if all(data[offset:offset + len(magic)] == magic for offset, magic in parts):
            return name
    return None


# ------------------------------------------------------------------- in-graph (tf.data) checks


def _signature_table() -> tuple[np.ndarray, np.ndarray]:
    """The signatures as one byte table: row f holds format f's magic bytes at their offsets;
    the boolean twin marks the positions of row f that must match."""
    magic_bytes = np.zeros((len(_SIGNATURES), _SIGNATURE_WIDTH), np.uint8)
    care = np.zeros(magic_bytes.shape, bool)
    for row, parts in enumerate(_SIGNATURES.values()):
        for offset, magic in parts:
            magic_bytes[row, offset:offset + len(magic)] = np.frombuffer(magic, np.uint8)
            care[row, offset:offset + len(magic)] = True
    return magic_bytes, care


_SIGNATURE_WIDTH = max(offset + len(magic) for parts in _SIGNATURES.values() for offset, magic in parts)
_SIGNATURE_BYTES, _SIGNATURE_CARE = _signature_table()


def looks_like_image(data: tf.Tensor) -> tf.Tensor:
    """In-graph `image_format(data) is not None` for a scalar string tensor.

    One byte comparison against the whole signature table: it runs for every training record,
    where each graph node costs time: 19 nodes, 9 of them not constants (the per-signature string
    ops it replaces took 50 and 23). No signature holds a NUL byte, so the NUL padding of short
    data never matches.
    """
    head = tf.strings.join([tf.strings.substr(data, 0, _SIGNATURE_WIDTH, unit="BYTE"),
                            "\0" * _SIGNATURE_WIDTH])
    head = tf.io.decode_raw(head, tf.uint8)[:_SIGNATURE_WIDTH]
    matches = tf.logical_or(tf.equal(head, _SIGNATURE_BYTES), ~_SIGNATURE_CARE)
    return tf.reduce_any(tf.reduce_all(matches, axis=1))


def label_conditions(labels: tf.Tensor, probs: tf.Tensor, num_classes: int = NUM_CLASSES
                     ) -> list[tuple[tf.Tensor, str]]:
    """(condition, reason) pairs for label problems, in check order, for `first_reason`.

    Computed without assertions, unlike the label ops, so a bad record gets a reason instead of
    an error."""
    in_range = tf.reduce_all((labels >= 0) & (labels < num_classes))
    return [(tf.equal(tf.size(labels), 0), "no_labels"),
            (tf.logical_not(in_range), "label_out_of_range"),
            (tf.not_equal(tf.size(labels), tf.size(probs)), "label_length_mismatch")]


def first_reason(conditions: list[tuple[tf.Tensor, str]]) -> tf.Tensor:
    """int32 code of the first (condition, reason) whose condition holds, else 0."""
    result = tf.constant(0, tf.int32)
    for condition, reason in reversed(conditions):
        result = tf.where(condition, tf.constant(code(reason), tf.int32), result)
    return result


def reason_name(reason_code: tf.Tensor) -> tf.Tensor:
    """In-graph name of a reason code ('ok' for 0)."""
    return tf.gather(tf.constant(("ok",) + SKIP_REASONS), reason_code)


def try_apply(fn: Callable[[Any], Any], inputs: Any, run: tf.Tensor | bool = True
              ) -> tuple[tf.Tensor, Any]:
    """Runs `fn(inputs)` so that a TF error in it does not escape: returns (ok, outputs).

    tf.data can only drop elements whose function fails (ignore_errors), which loses where the
    element came from and why. Running `fn` as a one-element dataset with ignore_errors, followed
    by a zero-filled stand-in, keeps the element: `ok` says which one came out. With `run` False,
    `fn` is not run at all (ok False), which saves decoding images already known to be skipped.
    Unknown dimensions of the stand-in are 0. The cost, a small dataset per call, is negligible
    next to decoding an image. `inputs` must be a tensor or a dict (a tuple would be unpacked).
    """
    plain = tf.autograph.experimental.do_not_convert  # TF ops only: no need to transpile
    attempt = tf.data.Dataset.from_tensors(inputs).filter(plain(lambda _: run)).map(plain(fn))
    fallback = tf.nest.map_structure(
        lambda spec: tf.zeros([d if d is not None else 0 for d in spec.shape], spec.dtype),
        attempt.element_spec)
    attempt = attempt.map(plain(lambda out: (tf.constant(True), out))).ignore_errors()
    fallback_ds = tf.data.Dataset.from_tensors((tf.constant(False), fallback))
    return attempt.concatenate(fallback_ds).take(1).get_single_element()
