"""uint8 batches: the pipeline keeps pixels as uint8 and the model maps them to [-1, 1] on device.

Checks the two ends agree with the float path they replace (value_range(-1, 1) on the host), on
the real fixture shards and a real tiny ViT.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf

from coyo_vit.models import Model, layers
from coyo_vit.training.step import mixup
from input_pipeline import ops_image, pipeline
from tests.conftest import SHARED

SHARDS = SHARED / "fixtures" / "coyo_shards" / "shards"
PP_UINT8 = 'decode_jpeg_and_inception_crop(16)|flip_lr|coyo_labels("soft")'


def _train_batch(pp: str) -> dict[str, np.ndarray]:
    config = {"data": {"files": str(SHARDS / "*.tfrecord")}, "pp_train": pp,
              "shuffle_buffer": 8, "cycle_length": 2}
    return next(pipeline.build_train_dataset(config, batch_size=4, seed=3).as_numpy_iterator())


def test_pipeline_sends_uint8_without_value_range_and_it_equals_the_float_path():
    as_uint8 = _train_batch(PP_UINT8)
    as_float = _train_batch(PP_UINT8.replace("flip_lr|", "flip_lr|value_range(-1, 1)|"))
    assert as_uint8["image"].dtype == np.uint8 and as_float["image"].dtype == np.float32
    np.testing.assert_array_equal(as_uint8["_index"], as_float["_index"])
    on_device = np.asarray(layers.to_model_range(jnp.asarray(as_uint8["image"])))
    np.testing.assert_allclose(on_device, as_float["image"], atol=1e-6)
    assert on_device.min() >= -1.0 and on_device.max() <= 1.0


def test_model_gives_the_same_logits_for_uint8_pixels_and_their_float_range():
    model = Model(num_classes=5, patch_size=4, width=16, depth=1, mlp_dim=32, num_heads=2)
    pixels_u8 = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    as_float = pixels_u8.astype(np.float32) / 127.5 - 1.0
    params = model.init(jax.random.PRNGKey(0), as_float)["params"]
    np.testing.assert_allclose(model.apply({"params": params}, pixels_u8),
                               model.apply({"params": params}, as_float), rtol=1e-5, atol=1e-6)
    extremes = layers.to_model_range(jnp.asarray([0, 255], jnp.uint8))
    np.testing.assert_array_equal(np.asarray(extremes), [-1.0, 1.0])


def test_mixup_of_uint8_mixes_in_the_float_range_without_rounding():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (4, 2, 2, 3), dtype=np.uint8)
    labels = np.eye(4, dtype=np.float32)
    key = jax.random.PRNGKey(2)
    mixed_u8, _ = mixup(key, jnp.asarray(images), jnp.asarray(labels), 0.5)
    mixed_f, _ = mixup(key, layers.to_model_range(jnp.asarray(images)), jnp.asarray(labels), 0.5)
    assert mixed_u8.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(mixed_u8), np.asarray(mixed_f), atol=1e-6)
    assert not np.allclose(np.asarray(mixed_u8) * 127.5, np.round(np.asarray(mixed_u8) * 127.5))


def test_uint8_resize_rounds_the_exact_uint8_resize_to_nearest():
    """resize_uint8 casts to float32 before resizing unless the input is over 5x the output's
    pixels (faster either way); both paths must give the rounded output of TF's own uint8
    kernels, bit for bit, down- and upscaling, with and without antialiasing, with static shapes
    (the path picked in Python) and unknown ones (picked by a cond in the graph)."""
    image = tf.constant(np.random.default_rng(2).integers(0, 256, (37, 23, 3)), tf.uint8)
    for size in ((16, 11), (50, 41), (8, 5)):  # 4.8x, 0.4x and 21x the output's pixels
        for method, antialias in (("bilinear", False), ("bilinear", True), ("area", False),
                                  ("bicubic", False), ("bicubic", True), ("lanczos3", False),
                                  ("lanczos3", True)):
            exact = tf.image.resize(image, size, method=method, antialias=antialias).numpy()
            if method in ("bilinear", "area"):  # convex: +0.5 and truncate
                want = np.floor(exact + 0.5)
            else:  # may overshoot: rounded half to even, then saturated
                want = np.clip(np.round(exact), 0, 255)
            unknown_shape = tf.function(
                lambda x, m=method, a=antialias, s=size: ops_image.resize_uint8(x, s, m, a),
                input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
            for got in (ops_image.resize_uint8(image, size, method, antialias),
                        unknown_shape(image)):
                assert got.dtype == tf.uint8
                np.testing.assert_array_equal(got, want, err_msg=f"{method} {antialias} {size}")
    nearest = ops_image.resize_uint8(image, (16, 11), "nearest")
    assert nearest.dtype == tf.uint8
    np.testing.assert_array_equal(nearest, tf.image.resize(image, (16, 11), method="nearest"))


def test_cast_before_resize_only_when_the_input_is_at_most_5x_the_output():
    small, large = tf.zeros([100, 50, 3], tf.uint8), tf.zeros([100, 51, 3], tf.uint8)
    assert ops_image.cast_before_resize(small, (50, 20)) is True  # 5,000 <= 5 x 1,000
    assert ops_image.cast_before_resize(large, (50, 20)) is False
    assert ops_image.cast_before_resize(tf.zeros([2, 100, 51, 3], tf.uint8), (50, 20)) is False
    decide = tf.function(ops_image.cast_before_resize,
                         input_signature=[tf.TensorSpec([None, None, 3], tf.uint8),
                                          tf.TensorSpec([2], tf.int32)])
    assert bool(decide(small, tf.constant([50, 20]))) and not bool(decide(large, tf.constant([50, 20])))


def test_resizing_a_float_image_keeps_its_values():
    image = tf.constant(np.random.default_rng(3).uniform(-1, 1, (20, 20, 3)), tf.float32)
    got = ops_image.resize_uint8(image, (10, 10))
    assert got.dtype == tf.float32
    np.testing.assert_allclose(got, tf.image.resize(image, (10, 10)), atol=1e-6)
    assert len(np.unique(np.round(got.numpy(), 3))) > 3  # not snapped to -1, 0, 1
