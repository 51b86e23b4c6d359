"""Reduced-scale JPEG decoding (1/2, 1/4, 1/8 DCT scale) in the crop and eval-resize ops, on the
real JPEGs of the img2dataset fixture shards (145 images, 240-512px on the shorter side).

The pixel bounds below were measured on these shards with the recipe's settings (224px crops,
area_min=5, seeds (i, 0..7); eval resize_small(256)); each bound is the measured worst case with
some margin. Reduced and exact windows are the same content through different low-pass
filters (libjpeg's DCT scaling vs none before a bilinear resize), not the same pixels.
"""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from input_pipeline import ops_image, pp_parser, sources
from tests.conftest import SHARED

SHARDS = SHARED / "fixtures" / "coyo_shards" / "shards"
CROP = "decode_jpeg_and_inception_crop"


@pytest.fixture(scope="module")
def jpegs() -> list[tf.Tensor]:
    """The `jpg` bytes of all 145 fixture records (all JPEGs), in file order."""
    files = sorted(str(p) for p in SHARDS.glob("*.tfrecord"))
    return [sources.parse_example(r)["jpg"] for r in tf.data.TFRecordDataset(files)]


def _rng(*values: int) -> tf.Tensor:
    return tf.constant(values, tf.int64)


def _window(jpg: tf.Tensor, rng: tf.Tensor, area_min: float = 5) -> tf.Tensor:
    """The crop op's window for this example seed (its own seed derivation)."""
    return ops_image.jpeg_crop_window(jpg, ops_image.op_seed({"rng": rng}, CROP), area_min, 100)


def _crop_before_this_option(jpg: tf.Tensor, rng: tf.Tensor, size: int, area_min: float
                             ) -> np.ndarray:
    """decode_jpeg_and_inception_crop's JPEG path as it was before reduced-scale decoding
    (commit 6732993): full-scale crop-window decode, then resize_uint8."""
    window = _window(jpg, rng, area_min)
    image = tf.image.decode_and_crop_jpeg(jpg, window, channels=3)
    return ops_image.resize_uint8(image, (size, size)).numpy()


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def _mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.abs(a.astype(np.float64) - b.astype(np.float64))))


# ---------------------------------------------------------------- choosing the scale


@pytest.mark.parametrize("size, target, ratio", [
    ((448, 448), (224, 224), 2), ((447, 900), (224, 224), 1), ((900, 447), (224, 224), 1),
    ((900, 1000), (224, 224), 4), ((1792, 1800), (224, 224), 8), ((5000, 5000), (224, 224), 8),
    ((512, 683), (256, 342), 1), ((512, 684), (256, 342), 2), ((64, 64), (32, 32), 2),
    ((63, 64), (32, 32), 1), ((200, 300), (224, 224), 1),
])
def test_dct_ratio_is_the_largest_scale_leaving_the_target_size(size, target, ratio):
    assert int(ops_image.dct_ratio(tf.constant(size), target)) == ratio


def test_scaled_window_moves_edges_under_half_a_scaled_pixel_and_keeps_the_target(jpegs):
    for i, jpg in enumerate(jpegs):
        height, width = (int(v) for v in tf.image.extract_jpeg_shape(jpg)[:2])
        for s in range(4):
            window = _window(jpg, _rng(i, s)).numpy()
            for ratio in (2, 4, 8):
                y, x, h, w = ops_image.scaled_window(tf.constant(window), ratio).numpy()
                assert abs(y * ratio - window[0]) <= ratio / 2
                assert abs(x * ratio - window[1]) <= ratio / 2
                assert abs((y + h) * ratio - (window[0] + window[2])) <= ratio / 2
                assert abs((x + w) * ratio - (window[1] + window[3])) <= ratio / 2
                assert h >= window[2] // ratio and w >= window[3] // ratio
                assert y + h <= -(-height // ratio) and x + w <= -(-width // ratio)


def test_reduced_window_is_that_window_of_the_scaled_image(jpegs):
    # TF's decoders take the window in the scaled image's coordinates: the op's window decode must
    # equal the same window cut from the whole image decoded at that scale.
    seen = set()
    for i, jpg in enumerate(jpegs[:40]):
        for s in range(4):
            window = _window(jpg, _rng(i, s))
            for target in ((224, 224), (112, 112), (56, 56)):
                ratio = int(ops_image.dct_ratio(window[2:], target))
                if ratio == 1:
                    continue
                seen.add(ratio)
                got = ops_image.decode_jpeg_window_scaled(jpg, window, target).numpy()
                y, x, h, w = ops_image.scaled_window(window, ratio).numpy()
                whole = tf.io.decode_jpeg(jpg, channels=3, ratio=ratio).numpy()
                np.testing.assert_array_equal(got, whole[y:y + h, x:x + w])
                assert got.shape[0] >= target[0] and got.shape[1] >= target[1]
    assert seen == {2, 4, 8}


def test_windows_reaching_the_image_edges_decode_at_every_scale(jpegs):
    # The rounded window must stay inside ceil(size / ratio), also for odd image sizes.
    sizes = set()
    for jpg in jpegs:
        height, width = (int(v) for v in tf.image.extract_jpeg_shape(jpg)[:2])
        if (height % 8, width % 8) in sizes:
            continue
        sizes.add((height % 8, width % 8))
        for ratio in (2, 4, 8):
            for window in ([0, 0, height, width], [1, 3, height - 1, width - 3],
                           [height // 3, width // 5, height - height // 3, width - width // 5]):
                scaled = ops_image.scaled_window(tf.constant(window), ratio)
                image = tf.image.decode_and_crop_jpeg(jpg, scaled, channels=3, ratio=ratio)
                assert tuple(image.shape[:2]) == tuple(scaled.numpy()[2:])
    assert len(sizes) > 1  # not only multiples of 8


# ---------------------------------------------------------------- exact path, bit for bit


def test_exact_crop_is_the_crop_of_before_bit_for_bit(jpegs):
    exact = ops_image.decode_jpeg_and_inception_crop(224, area_min=5, exact=True)
    reduced = ops_image.decode_jpeg_and_inception_crop(224, area_min=5)
    full_scale_windows = 0
    for i, jpg in enumerate(jpegs):
        for s in range(2):
            rng = _rng(i, s)
            before = _crop_before_this_option(jpg, rng, 224, 5)
            np.testing.assert_array_equal(exact({"jpg": jpg, "rng": rng})["image"].numpy(), before)
            if int(ops_image.dct_ratio(_window(jpg, rng)[2:], (224, 224))) == 1:
                full_scale_windows += 1  # the default decodes these at full scale: same bits
                np.testing.assert_array_equal(reduced({"jpg": jpg, "rng": rng})["image"].numpy(),
                                              before)
    assert full_scale_windows > 200


def test_exact_eval_resize_is_decode_then_resize_small_bit_for_bit(jpegs):
    before = pp_parser.parse("decode|resize_small(256)")
    exact = pp_parser.parse("decode_and_resize_small(256, exact=True)")
    reduced = pp_parser.parse("decode_and_resize_small(256)")
    full_scale = 0
    for jpg in jpegs:
        expected = before({"jpg": jpg})["image"].numpy()
        np.testing.assert_array_equal(exact({"jpg": jpg})["image"].numpy(), expected)
        shape = tf.image.extract_jpeg_shape(jpg)[:2]
        if int(ops_image.dct_ratio(shape, ops_image.resize_small_shape(shape, 256))) == 1:
            full_scale += 1
            np.testing.assert_array_equal(reduced({"jpg": jpg})["image"].numpy(), expected)
    assert full_scale >= 90  # the shards' 240, 320 and 480px images


@pytest.mark.parametrize("pp_reduced, pp_exact", [
    ("decode_jpeg_and_inception_crop(64)", "decode_jpeg_and_inception_crop(64, exact=True)"),
    ("decode_and_resize_small(64)", "decode|resize_small(64)"),
])
def test_png_takes_the_full_scale_path(jpegs, pp_reduced, pp_exact):
    # Only JPEG bytes have DCT scales; other formats must come out exactly as before.
    reduced, exact = pp_parser.parse(pp_reduced), pp_parser.parse(pp_exact)
    for i in (0, 1, 5):
        png = tf.io.encode_png(tf.io.decode_jpeg(jpegs[i], channels=3))
        for s in range(3):
            a = reduced({"jpg": png, "rng": _rng(i, s)})["image"].numpy()
            b = exact({"jpg": png, "rng": _rng(i, s)})["image"].numpy()
            np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- how much the pixels change


def test_reduced_crop_windows_against_exact_on_the_fixture(jpegs):
    # Measured (224px, area_min=5, 8 seeds per image, 1,160 crops): 56 windows decoded at 1/2
    # scale (the rest at full scale, identical); MAE mean 3.06, max 9.67; PSNR min 25.6 dB,
    # median 34.8 dB.
    reduced = ops_image.decode_jpeg_and_inception_crop(224, area_min=5)
    maes, psnrs = [], []
    for i, jpg in enumerate(jpegs):
        for s in range(8):
            rng = _rng(i, s)
            if int(ops_image.dct_ratio(_window(jpg, rng)[2:], (224, 224))) == 1:
                continue
            a = reduced({"jpg": jpg, "rng": rng})["image"].numpy()
            b = _crop_before_this_option(jpg, rng, 224, 5)
            assert a.shape == b.shape == (224, 224, 3)
            maes.append(_mae(a, b))
            psnrs.append(_psnr(a, b))
    assert len(maes) >= 40
    assert np.mean(maes) <= 4.0 and max(maes) <= 12.0, (np.mean(maes), max(maes))
    assert min(psnrs) >= 24.0 and np.median(psnrs) >= 32.0, (min(psnrs), np.median(psnrs))


def test_reduced_eval_resize_against_exact_on_the_fixture(jpegs):
    # Measured: 44 of 145 images decoded at 1/2 scale (the 512px ones whose both sides reach
    # twice the resize), MAE mean 1.11, max 5.40; PSNR min 28.4 dB, median 45.0 dB.
    before = pp_parser.parse("decode|resize_small(256)")
    reduced = pp_parser.parse("decode_and_resize_small(256)")
    maes, psnrs = [], []
    for jpg in jpegs:
        a, b = reduced({"jpg": jpg})["image"].numpy(), before({"jpg": jpg})["image"].numpy()
        assert a.shape == b.shape  # the resize target comes from the full-resolution size
        if not np.array_equal(a, b):
            maes.append(_mae(a, b))
            psnrs.append(_psnr(a, b))
    assert len(maes) >= 40
    assert np.mean(maes) <= 1.6 and max(maes) <= 7.0, (np.mean(maes), max(maes))
    assert min(psnrs) >= 26.0 and np.median(psnrs) >= 40.0, (min(psnrs), np.median(psnrs))


# ---------------------------------------------------------------- ops, strings and recipes


def test_recipe_uses_reduced_scale_and_shapes_are_static_in_graph_mode(jpegs):
    from configs import coyo_pretrain
    config = coyo_pretrain.get_config("res=224")
    assert config.input.pp_train.startswith(f"{CROP}(224, area_min=5)|")
    assert config.input.pp_eval.startswith("decode_and_resize_small(256)|central_crop(224)|")
    for pp in (f"{CROP}(224, area_min=5)", "decode_and_resize_small(256)|central_crop(224)"):
        preprocess = pp_parser.parse(pp)
        ds = tf.data.Dataset.from_tensor_slices(tf.stack(jpegs[:16])).map(
            lambda jpg: preprocess({"jpg": jpg, "rng": tf.constant([0, 1], tf.int64)}))
        assert tuple(ds.element_spec["image"].shape) == (224, 224, 3)
        assert sum(1 for _ in ds) == 16


@pytest.mark.parametrize("pp, pattern", [
    (f"{CROP}(32, exact=1)", "exact must be True or False"),
    ("decode_and_resize_small(32, exact='yes')", "exact must be True or False"),
    ("decode_and_resize_small(0)", "positive int"),
])
def test_bad_arguments_raise_naming_the_op(pp, pattern):
    with pytest.raises(ValueError, match=pattern):
        pp_parser.parse(pp)


def test_truncated_jpeg_still_fails_when_the_window_needs_missing_rows(jpegs):
    # As at full scale: a window reaching rows the file lacks raises; one in the intact rows
    # decodes (its pixels are correct).
    jpg = jpegs[0].numpy()
    truncated = tf.constant(jpg[: len(jpg) // 2])
    height, width = (int(v) for v in tf.image.extract_jpeg_shape(truncated)[:2])
    with pytest.raises(tf.errors.InvalidArgumentError):
        ops_image.decode_jpeg_window_scaled(truncated, tf.constant([0, 0, height, width]),
                                            (height // 2, width // 2))
    top = ops_image.decode_jpeg_window_scaled(truncated, tf.constant([0, 0, 64, width]), (32, 32))
    assert tuple(top.shape) == (32, -(-width // 2), 3)
