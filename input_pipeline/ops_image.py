"""Image preprocessing ops: decoding, crops, resizes, flips and value scaling.

Images stay uint8 through crops and resizes (4x smaller than float in buffers); only
`value_range` turns them into float32. Training recipes leave it out and send uint8 batches:
the model maps pixels to [-1, 1] on the device (coyo_vit/models/layers.py:to_model_range).

Random ops are stateless: they read the example's `rng` seed (int [2], added by the pipeline from
the example's position in the data stream) and fold in a constant of their own, so an example's
augmentation depends on nothing but the seed, whatever the parallelism or the machine.

Reduced-scale JPEG decoding: when a crop window (training) or a whole image (eval) is at least
2, 4 or 8 times the output size on both sides, libjpeg decodes it at 1/2, 1/4 or 1/8 scale (its
DCT scaling, the `ratio` of TF's JPEG decoders) before the usual resize. That is less work, and
the DCT scaling is a better low-pass filter before a downsampling resize than bilinear alone;
the pixels differ from a full-scale decode (tests/test_reduced_scale_decode.py states by how
much). `exact=True` on the ops keeps full-scale decoding, bit for bit.
"""
from __future__ import annotations

import zlib
from typing import Callable, Sequence

import tensorflow as tf

from input_pipeline.registry import Features, OpFn, register

# Inception-crop aspect ratios, as in the Inception/ViT recipes.
_ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
# Resize methods whose output is a convex combination of input pixels (no overshoot).
_CONVEX_METHODS = ("bilinear", "area")


def decode_image(data: tf.Tensor) -> tf.Tensor:
    """Decodes JPEG, PNG, GIF (first frame), BMP or WebP bytes to uint8 [H, W, 3].

    img2dataset's skip_reencode keeps the original bytes, so a `jpg` field can hold any format.
    """
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def op_seed(features: Features, op_name: str) -> tf.Tensor:
    """This op's stateless seed: the example's `rng` with a per-op constant folded in."""
    if "rng" not in features:
        raise ValueError(f"pp op {op_name!r} is random and needs an 'rng' feature (a stateless seed, "
                         f"int [2]) in the example; the training pipeline adds it. Features present: "
                         f"{sorted(features)}")
    constant = zlib.crc32(op_name.encode()) & 0x7FFFFFFF
    return tf.random.experimental.stateless_fold_in(tf.cast(features["rng"], tf.int64), constant)


# Above this many input pixels per output pixel, resizing uint8 directly beats casting first.
_CAST_FIRST_MAX_RATIO = 5


def resize_uint8(image: tf.Tensor, size: tf.Tensor | Sequence[int], method: str = "bilinear",
                 antialias: bool = False) -> tf.Tensor:
    """Resizes and rounds integer pixels back to their dtype, keeping images compact until
    value_range; float images (after a value_range) stay float, unrounded.

    Integer images are cast to float32 before the resize when that is faster (see
    `cast_before_resize`); the result is the same bits either way.
    """
    def resize(pixels: tf.Tensor) -> tf.Tensor:
        return tf.image.resize(pixels, size, method=method, antialias=antialias)

    if method == "nearest":  # keeps the input dtype: nothing to interpolate or round
        return resize(image)
    if image.dtype.is_floating:
        return tf.cast(resize(image), image.dtype)
    def from_floats() -> tf.Tensor:
        return resize(tf.cast(image, tf.float32))

    cast_first = cast_before_resize(image, size)
    if isinstance(cast_first, bool):  # static shapes: decided here, no cond in the graph
        resized = from_floats() if cast_first else resize(image)
    else:
        resized = tf.cond(cast_first, from_floats, lambda: resize(image))
    if method in _CONVEX_METHODS and image.dtype == tf.uint8:
        # Weighted means of uint8 pixels stay in [0, 255]: +0.5 and truncate rounds half up
        # with one pass over the image instead of round + saturate's three (~0.1 ms at 224px).
        return tf.cast(resized + 0.5, tf.uint8)
    return tf.saturate_cast(tf.round(resized), image.dtype)


def cast_before_resize(image: tf.Tensor, size: tf.Tensor | Sequence[int]) -> bool | tf.Tensor:
    """Whether to cast an integer image [..., H, W, C] to float32 before resizing it to `size`:
    a Python bool when both shapes are static, else a scalar bool tensor.

    TF's resize kernels convert every integer pixel they read to float32, each time they read it
    (4 reads per output value for bilinear, more for the others); casting once first gives the
    same values and is faster, but costs a pass over the input, so it loses when the input is
    much larger than the output. One core, uint8 to 224px: 0.32 vs 0.44 ms from 230px, 0.43 vs
    0.47 from 450px, equal from 530x512, 0.89 vs 0.60 ms from 800px.
    """
    static_in = image.shape[-3:-1]
    if static_in.is_fully_defined() and not isinstance(size, tf.Tensor):
        in_pixels, out_pixels = static_in[0] * static_in[1], int(size[0]) * int(size[1])
        return in_pixels <= _CAST_FIRST_MAX_RATIO * out_pixels
    shape = tf.shape(image, out_type=tf.int64)
    out_pixels = tf.reduce_prod(tf.cast(size, tf.int64))
    return shape[-3] * shape[-2] <= _CAST_FIRST_MAX_RATIO * out_pixels


def _sample_crop_window(image_shape: tf.Tensor, seed: tf.Tensor, area_min: float,
                        area_max: float) -> tuple[tf.Tensor, tf.Tensor]:
    """Samples an Inception-style crop (begin [y, x, 0], size [h, w, -1]) from the image shape."""
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        image_shape,
        bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
        seed=seed,
        area_range=(area_min / 100.0, area_max / 100.0),
        aspect_ratio_range=_ASPECT_RATIO_RANGE,
        min_object_covered=0.0,
        use_image_if_no_bounding_boxes=True)
    return begin, size


def jpeg_crop_window(data: tf.Tensor, seed: tf.Tensor, area_min: float, area_max: float
                     ) -> tf.Tensor:
    """An Inception crop window [y, x, height, width] of JPEG bytes, read from the header alone,
    as `tf.image.decode_and_crop_jpeg` takes it."""
    begin, crop = _sample_crop_window(tf.image.extract_jpeg_shape(data), seed, area_min, area_max)
    return tf.stack([begin[0], begin[1], crop[0], crop[1]])


# libjpeg's DCT scalings (scale 1/ratio), largest first; TF's decoders take them as `ratio`.
_DCT_RATIOS = (8, 4, 2)


def dct_ratio(size: tf.Tensor, target: tf.Tensor | Sequence[int]) -> tf.Tensor:
    """The largest of 8, 4, 2 with `size` [h, w] >= ratio * `target` [h, w] on both sides, else 1:
    the reduced scale that still leaves at least `target` pixels (never upsamples more than a
    full-scale decode would). A scalar int32 tensor."""
    size = tf.cast(size, tf.int32)
    target = tf.cast(target, tf.int32)
    ratio = tf.constant(1, tf.int32)
    for r in reversed(_DCT_RATIOS):  # 2, 4, 8: each larger one that fits overrides
        fits = tf.reduce_all(size >= r * target)
        ratio = tf.where(fits, tf.constant(r, tf.int32), ratio)
    return ratio


def scaled_window(window: tf.Tensor, ratio: int) -> tf.Tensor:
    """A full-resolution window [y, x, height, width] in the coordinates of the image decoded at
    1/`ratio` scale, where TF's decoders take it.

    Each edge is rounded to the nearest scaled pixel boundary (floor(v / ratio + 1/2)), so it
    moves by at most ratio/2 full-resolution pixels: under half an output pixel, since a window
    is only decoded at 1/ratio scale when it is at least `ratio` output pixels per output pixel.
    The rounded window keeps at least floor(size / ratio) pixels and ends at most at
    ceil(image size / ratio), the scaled image's edge, so it is always valid.
    """
    window = tf.cast(window, tf.int32)
    start, end = window[:2], window[:2] + window[2:]
    start = (2 * start + ratio) // (2 * ratio)
    end = (2 * end + ratio) // (2 * ratio)
    return tf.concat([start, end - start], axis=0)


def decode_jpeg_window_scaled(data: tf.Tensor, window: tf.Tensor, target: Sequence[int]
                              ) -> tf.Tensor:
    """Decodes crop `window` [y, x, h, w] (full-resolution coordinates) of JPEG bytes at the
    largest DCT scale (`dct_ratio`) that leaves the window at least `target` (h, w) pixels.

    Full scale is exactly `tf.image.decode_and_crop_jpeg(data, window)`, as before this option.
    """
    def at(ratio: int) -> Callable[[], tf.Tensor]:
        if ratio == 1:
            return lambda: tf.image.decode_and_crop_jpeg(data, window, channels=3)
        return lambda: tf.image.decode_and_crop_jpeg(data, scaled_window(window, ratio),
                                                     channels=3, ratio=ratio)

    return _switch_ratio(dct_ratio(window[2:], target), at)


def decode_jpeg_scaled(data: tf.Tensor, shape: tf.Tensor, target: tf.Tensor) -> tf.Tensor:
    """Decodes JPEG bytes of full size `shape` [h, w] at the largest DCT scale (`dct_ratio`) that
    leaves at least `target` (h, w) pixels. Full scale is exactly `decode_image`."""
    def at(ratio: int) -> Callable[[], tf.Tensor]:
        if ratio == 1:
            return lambda: decode_image(data)
        return lambda: tf.io.decode_jpeg(data, channels=3, ratio=ratio)

    return _switch_ratio(dct_ratio(shape, target), at)


def _switch_ratio(ratio: tf.Tensor, branch_at: Callable[[int], Callable[[], tf.Tensor]]
                  ) -> tf.Tensor:
    """Runs branch_at(r)() for the runtime `ratio` r in (1, 2, 4, 8); TF's decoders need the
    ratio as a constant attribute, hence one branch per scale."""
    ratios = (1,) + tuple(sorted(_DCT_RATIOS))
    index = tf.argmax(tf.cast(tf.equal(tf.constant(ratios, tf.int32), ratio), tf.int32),
                      output_type=tf.int32)
    image = tf.switch_case(index, [branch_at(r) for r in ratios])
    image.set_shape([None, None, 3])
    return image


def _check_size(size: int | Sequence[int] | None, op_name: str, allow_none: bool = False
                ) -> tuple[int, int] | None:
    """Normalises an int or (h, w) size; the error names the op and what is valid."""
    if size is None and allow_none:
        return None
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return (size, size)
    if (isinstance(size, (tuple, list)) and len(size) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        return (size[0], size[1])
    valid = "a positive int or (height, width)" + (" or None" if allow_none else "")
    raise ValueError(f"{op_name}: size must be {valid}, got {size!r}")


def _check_area(area_min: float, area_max: float, op_name: str) -> None:
    if not 0 < area_min <= area_max <= 100:
        raise ValueError(f"{op_name}: need 0 < area_min <= area_max <= 100 (percent of the image), "
                         f"got area_min={area_min!r}, area_max={area_max!r}")


def _require(features: Features, key: str, op_name: str) -> tf.Tensor:
    if key not in features:
        raise ValueError(f"pp op {op_name!r} needs feature {key!r}; features present: "
                         f"{sorted(features)}")
    return features[key]


def _bytes_key(features: Features, key: str | None) -> str:
    """The feature holding encoded bytes: `key` if given, else `jpg` (img2dataset) or `image`."""
    return key or ("jpg" if "jpg" in features else "image")


def _encoded_bytes(features: Features, key: str | None, op_name: str) -> tuple[str, tf.Tensor]:
    """(feature name, encoded image bytes) for a decoding op; decoded pixels are an error."""
    source = _bytes_key(features, key)
    data = _require(features, source, op_name)
    if data.dtype != tf.string:
        raise ValueError(f"{op_name}: feature {source!r} must hold encoded image bytes (tf.string),"
                         f" got {data.dtype.name}; is it decoded already?")
    return source, data


@register("decode")
def decode(key: str | None = None) -> OpFn:
    """Decodes image bytes from `key` (default: `jpg`, else `image`) into `image` uint8 [H,W,3]."""

    def fn(features: Features) -> Features:
        source, data = _encoded_bytes(features, key, "decode")
        features.pop(source)
        features["image"] = decode_image(data)
        return features

    return fn


@register("decode_jpeg_and_inception_crop")
def decode_jpeg_and_inception_crop(size: int | Sequence[int], area_min: float = 5,
                                   area_max: float = 100, key: str | None = None,
                                   exact: bool = False) -> OpFn:
    """Random Inception crop resized to `size`, decoding only the crop window of JPEG bytes.

    Decoding just the window is much cheaper on large images. A JPEG window at least 2, 4 or 8
    times `size` on both sides is decoded at 1/2, 1/4 or 1/8 DCT scale (`dct_ratio`) before the
    resize: less work, and less aliasing than bilinear alone; `exact=True` always decodes at full
    scale (the pixels of before this option, bit for bit). The window is drawn on the full image
    either way, so the augmentation's distribution does not change. Other formats are decoded
    whole and cropped with the same window sampler, so the window does not depend on the path.
    A truncated JPEG fails unless the window lies entirely in its intact rows (those pixels are
    correct, so the crop is kept).
    """
    if not isinstance(exact, bool):
        raise ValueError(f"decode_jpeg_and_inception_crop: exact must be True or False, got "
                         f"{exact!r}")
    out_size = _check_size(size, "decode_jpeg_and_inception_crop")
    _check_area(area_min, area_max, "decode_jpeg_and_inception_crop")

    def fn(features: Features) -> Features:
        source = _bytes_key(features, key)
        data = _require(features, source, "decode_jpeg_and_inception_crop")
        seed = op_seed(features, "decode_jpeg_and_inception_crop")

        def crop_jpeg() -> tf.Tensor:
            window = jpeg_crop_window(data, seed, area_min, area_max)
            if exact:
                return tf.image.decode_and_crop_jpeg(data, window, channels=3)
            return decode_jpeg_window_scaled(data, window, out_size)

        def crop_decoded() -> tf.Tensor:
            image = decode_image(data)
            begin, crop = _sample_crop_window(tf.shape(image), seed, area_min, area_max)
            return tf.slice(image, begin, crop)

        image = tf.cond(tf.io.is_jpeg(data), crop_jpeg, crop_decoded)
        image.set_shape([None, None, 3])
        features.pop(source)
        features["image"] = resize_uint8(image, out_size)
        return features

    return fn


@register("inception_crop")
def inception_crop(size: int | Sequence[int] | None = None, area_min: float = 5,
                   area_max: float = 100, key: str = "image") -> OpFn:
    """Random crop covering area_min..area_max percent, aspect 3/4..4/3; resized if size given."""
    out_size = _check_size(size, "inception_crop", allow_none=True)
    _check_area(area_min, area_max, "inception_crop")

    def fn(features: Features) -> Features:
        image = _require(features, key, "inception_crop")
        begin, crop = _sample_crop_window(tf.shape(image), op_seed(features, "inception_crop"),
                                          area_min, area_max)
        cropped = tf.slice(image, begin, crop)
        cropped.set_shape([None, None, image.shape[-1]])
        features[key] = cropped if out_size is None else resize_uint8(cropped, out_size)
        return features

    return fn


@register("resize")
def resize(size: int | Sequence[int], method: str = "bilinear", antialias: bool = False,
           key: str = "image") -> OpFn:
    """Resizes to exactly `size` (int: square, or (height, width)), ignoring aspect ratio."""
    out_size = _check_size(size, "resize")

    def fn(features: Features) -> Features:
        features[key] = resize_uint8(_require(features, key, "resize"), out_size, method, antialias)
        return features

    return fn


@register("resize_small")
def resize_small(size: int, method: str = "bilinear", antialias: bool = False,
                 key: str = "image") -> OpFn:
    """Resizes so the shorter side is `size`, keeping the aspect ratio (eval: 256 then crop)."""
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ValueError(f"resize_small: size must be a positive int, got {size!r}")

    def fn(features: Features) -> Features:
        image = _require(features, key, "resize_small")
        new_shape = resize_small_shape(tf.shape(image)[:2], size)
        features[key] = resize_uint8(image, new_shape, method, antialias)
        return features

    return fn


def resize_small_shape(shape: tf.Tensor, size: int) -> tf.Tensor:
    """The [h, w] int32 that `resize_small(size)` resizes an image of `shape` [h, w] to."""
    shape = tf.cast(shape, tf.float64)
    scale = size / tf.reduce_min(shape)
    return tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), size)


@register("decode_and_resize_small")
def decode_and_resize_small(size: int, method: str = "bilinear", antialias: bool = False,
                            key: str | None = None, exact: bool = False) -> OpFn:
    """`decode|resize_small(size, ...)` in one op, so the decoder knows the size it decodes for:
    a JPEG at least 2, 4 or 8 times the resized image on both sides is decoded at 1/2, 1/4 or 1/8
    DCT scale (`dct_ratio`; an eval image of a 512px COYO download, resized to 256, at 1/2),
    then resized to the same shape as `resize_small` gives. `exact=True` (or a non-JPEG image)
    is `decode|resize_small` itself, bit for bit."""
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ValueError(f"decode_and_resize_small: size must be a positive int, got {size!r}")
    if not isinstance(exact, bool):
        raise ValueError(f"decode_and_resize_small: exact must be True or False, got {exact!r}")
    decode_op = decode(key)
    resize_op = resize_small(size, method, antialias)
    if exact:
        return lambda features: resize_op(decode_op(features))

    def fn(features: Features) -> Features:
        source, data = _encoded_bytes(features, key, "decode_and_resize_small")

        def scaled_jpeg() -> tf.Tensor:
            shape = tf.image.extract_jpeg_shape(data)[:2]
            new_shape = resize_small_shape(shape, size)
            image = decode_jpeg_scaled(data, shape, new_shape)
            return resize_uint8(image, new_shape, method, antialias)

        def other() -> tf.Tensor:
            return resize_op(decode_op({source: data}))["image"]

        image = tf.cond(tf.io.is_jpeg(data), scaled_jpeg, other)
        image.set_shape([None, None, 3])
        features.pop(source)
        features["image"] = image
        return features

    return fn


@register("central_crop")
def central_crop(size: int | Sequence[int], key: str = "image") -> OpFn:
    """Crops the central `size` (int: square, or (height, width)); the image must be big enough."""
    crop_h, crop_w = _check_size(size, "central_crop")

    def fn(features: Features) -> Features:
        image = _require(features, key, "central_crop")
        shape = tf.shape(image)
        check = tf.debugging.assert_greater_equal(
            shape[:2], tf.constant([crop_h, crop_w]),
            message=f"central_crop({crop_h}, {crop_w}): image is smaller than the crop")
        with tf.control_dependencies([check]):
            top = (shape[0] - crop_h) // 2
            left = (shape[1] - crop_w) // 2
        cropped = tf.slice(image, tf.stack([top, left, 0]), [crop_h, crop_w, -1])
        cropped.set_shape([crop_h, crop_w, image.shape[-1]])
        features[key] = cropped
        return features

    return fn


@register("flip_lr")
def flip_lr(key: str = "image") -> OpFn:
    """Flips left-right with probability 1/2."""

    def fn(features: Features) -> Features:
        image = _require(features, key, "flip_lr")
        features[key] = tf.image.stateless_random_flip_left_right(image,
                                                                  op_seed(features, "flip_lr"))
        return features

    return fn


@register("value_range")
def value_range(vmin: float, vmax: float, in_min: float = 0, in_max: float = 255,
                clip_values: bool = False, key: str = "image") -> OpFn:
    """Maps [in_min, in_max] linearly to [vmin, vmax] as float32; value_range(-1, 1) is the
    recipe's (x - 127.5) / 127.5."""
    if in_max == in_min:
        raise ValueError(f"value_range: in_min and in_max must differ, both are {in_min!r}")

    def fn(features: Features) -> Features:
        image = tf.cast(_require(features, key, "value_range"), tf.float32)
        image = (image - in_min) / (in_max - in_min) * (vmax - vmin) + vmin
        if clip_values:
            image = tf.clip_by_value(image, min(vmin, vmax), max(vmin, vmax))
        features[key] = image
        return features

    return fn


@register("keep")
def keep(*keys: str) -> OpFn:
    """Keeps only `keys`, plus the pipeline's bookkeeping (`rng` and keys starting with `_`, such
    as `_keep`), so a trailing keep() cannot silently undo label filtering."""
    if not keys or not all(isinstance(k, str) for k in keys):
        raise ValueError(f"keep: give one or more feature names as strings, got {keys!r}")

    def fn(features: Features) -> Features:
        missing = [k for k in keys if k not in features]
        if missing:
            raise ValueError(f"keep: features {missing} do not exist; present: {sorted(features)}")
        return {k: v for k, v in features.items() if k in keys or k == "rng" or k.startswith("_")}

    return fn
