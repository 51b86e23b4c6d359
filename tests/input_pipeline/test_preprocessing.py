"""Preprocessing ops and pp strings, on real img2dataset records from the fixtures."""
from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow as tf
from PIL import Image

from input_pipeline import ops_image, ops_labels, pp_parser, registry, sources
from tests.conftest import SHARED

SHARDS = SHARED / "fixtures" / "coyo_shards" / "shards"
NUM_CLASSES = 21841


@pytest.fixture(scope="module")
def records() -> list[bytes]:
    """All 145 serialized tf.Examples of the fixture shards, in file order."""
    files = sorted(str(p) for p in SHARDS.glob("*.tfrecord"))
    return [r.numpy() for r in tf.data.TFRecordDataset(files)]


@pytest.fixture(scope="module")
def parquet_rows() -> dict[str, dict]:
    """The shards' own per-sample metadata, successful samples only, by key."""
    rows = [r for p in sorted(SHARDS.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    return {r["key"]: r for r in rows if r["status"] == "success"}


def _example(record: bytes) -> dict[str, tf.Tensor]:
    return sources.parse_example(tf.constant(record))


def _rng(*values: int) -> tf.Tensor:
    return tf.constant(values, tf.int64)


# ---------------------------------------------------------------- pp strings


def test_pp_string_applies_ops_in_order(records):
    pp = pp_parser.parse("decode|resize_small(24)|central_crop((16, 20))|value_range(-1, 1)")
    out = pp(_example(records[0]))
    assert out["image"].shape == (16, 20, 3)
    assert out["image"].dtype == tf.float32
    assert -1.0 <= float(tf.reduce_min(out["image"])) <= float(tf.reduce_max(out["image"])) <= 1.0
    assert "jpg" not in out and "labels" in out


@pytest.mark.parametrize("res", [224, 384])
def test_pretraining_recipe_eval_pp_works_at_every_resolution(records, res):
    # The recipe's pp_eval crops the usual 224/256 of the shorter side at any resolution (it
    # once resized to 256 and then could not crop 384: every holdout record failed, silently).
    from configs import coyo_pretrain
    config = coyo_pretrain.get_config(f"res={res}")
    out = pp_parser.parse(config.input.pp_eval)(_example(records[0]))
    assert out["image"].shape == (res, res, 3)


def test_pp_string_keeps_separators_inside_string_arguments():
    # A `|` inside a string is an argument, not an op separator.
    with pytest.raises(ValueError, match=r"features \['a\|b'\] do not exist"):
        pp_parser.parse("keep('a|b')")({"image": tf.zeros([2, 2, 3], tf.uint8)})


@pytest.mark.parametrize("pp, shape", [
    ("decode_jpeg_and_inception_crop(16)|flip_lr", (16, 16, 3)),
    ("decode|inception_crop(16)|flip_lr", (16, 16, 3)),
    ("decode|inception_crop|resize((12, 16))", (12, 16, 3)),
    ("decode|resize_small(20)|central_crop(16)", (16, 16, 3)),
])
def test_pp_output_shapes_are_static_in_graph_mode(records, pp, shape):
    # tf.data traces ops on unknown-size images; batching needs the final shape known statically.
    preprocess = pp_parser.parse(pp)
    ds = tf.data.Dataset.from_tensor_slices(records[:2]).map(
        lambda r: preprocess({**sources.parse_example(r), "rng": tf.constant([0, 1], tf.int64)}))
    assert tuple(ds.element_spec["image"].shape) == shape
    assert next(iter(ds))["image"].shape == shape


def test_pp_unknown_op_names_it_and_lists_registered_ops():
    with pytest.raises(ValueError, match=r"unknown pp op 'resize_big'.*central_crop.*decode"):
        pp_parser.parse("decode|resize_big(3)")


def test_pp_op_arguments_include_defaults_and_build_nothing():
    pp = "decode|coyo_labels('topk', 3)|resize(8)|coyo_labels('soft', num_classes=1000)"
    calls = pp_parser.op_arguments(pp, "coyo_labels")
    assert [(c["mode"], c["arg"], c["num_classes"]) for c in calls] == [
        ("topk", 3, ops_labels.NUM_COYO_CLASSES), ("soft", None, 1000)]
    assert pp_parser.op_arguments(pp, "flip_lr") == []
    with pytest.raises(ValueError, match="'resize' got bad arguments"):
        pp_parser.op_arguments("resize(1, 2, 3, 4, 5, 6)", "resize")


@pytest.mark.parametrize("pp, pattern", [
    ("decode|resize(0)", r"'resize'.*positive int"),
    ("resize(1, 2, 3, 4, 5, 6)", r"'resize' got bad arguments.*signature: resize\("),
    ("flip_lr(wrong_kw=1)", r"'flip_lr' got bad arguments"),
    ("resize(size)", r"'resize'.*'size' is not a Python literal"),
    ("decode|", r"not `op\|op\(args\)"),
    ("", r"non-empty"),
    ("coyo_labels('sigmoid')", r"unknown mode 'sigmoid'.*threshold, topk, top1, soft"),
    ("coyo_labels('threshold', 1.5)", r"'coyo_labels'.*probability in \[0, 1\], got 1.5"),
    ("coyo_labels('topk', 0.5)", r"'coyo_labels'.*int >= 1"),
    ("inception_crop(32, area_min=0)", r"'inception_crop'.*area_min"),
    ("decode.x", r"not an op name"),
])
def test_pp_bad_strings_raise_naming_the_op(pp, pattern):
    with pytest.raises(ValueError, match=pattern):
        pp_parser.parse(pp)


def test_registry_refuses_a_second_op_with_the_same_name():
    with pytest.raises(ValueError, match="'decode' is already registered"):
        registry.register("decode")(lambda: (lambda features: features))


# ---------------------------------------------------------------- decoding


def test_decode_jpeg_record_gives_uint8_rgb_of_the_recorded_size(records):
    example = tf.train.Example.FromString(records[0])
    width = example.features.feature["width"].int64_list.value[0]
    height = example.features.feature["height"].int64_list.value[0]
    image = ops_image.decode()(_example(records[0]))["image"]
    assert image.dtype == tf.uint8 and tuple(image.shape) == (height, width, 3)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_decode_reads_png_bytes_as_three_channels(mode):
    # skip_reencode keeps originals, so a `jpg` field may hold a PNG (grey, with alpha...).
    pixels = np.random.default_rng(0).integers(0, 256, (10, 7, len(mode)), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1) if mode == "L" else pixels, mode).save(buffer, "PNG")
    image = ops_image.decode()({"jpg": tf.constant(buffer.getvalue())})["image"].numpy()
    assert image.shape == (10, 7, 3)
    expected = np.repeat(pixels, 3, axis=-1) if mode == "L" else pixels[..., :3]
    np.testing.assert_array_equal(image, expected)


def test_decode_reads_the_image_key_when_there_is_no_jpg(records):
    jpg = _example(records[3])["jpg"]
    out = ops_image.decode()({"image": jpg})
    assert out["image"].dtype == tf.uint8 and out["image"].shape[-1] == 3


def test_decode_jpeg_and_inception_crop_shape_and_determinism(records):
    op = ops_image.decode_jpeg_and_inception_crop(32)
    jpg = _example(records[5])["jpg"]
    first = op({"jpg": jpg, "rng": _rng(1, 2)})["image"].numpy()
    again = op({"jpg": jpg, "rng": _rng(1, 2)})["image"].numpy()
    other = op({"jpg": jpg, "rng": _rng(1, 3)})["image"].numpy()
    assert first.shape == (32, 32, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert tuple(ops_image.decode_jpeg_and_inception_crop((24, 40))(
        {"jpg": jpg, "rng": _rng(0, 0)})["image"].shape) == (24, 40, 3)


def test_decode_jpeg_and_inception_crop_same_window_for_jpeg_and_png(records):
    # JPEG bytes take the crop-before-decode path, PNG bytes decode then crop: the same seed must
    # pick the same window (pixels differ at most by chroma upsampling at the window edge).
    # exact=True: JPEG windows decoded at full scale, as PNGs are (tests/test_reduced_scale_decode).
    op = ops_image.decode_jpeg_and_inception_crop(32, exact=True)
    for i, record in enumerate(records[:6]):
        jpg = _example(record)["jpg"]
        png = tf.io.encode_png(tf.io.decode_jpeg(jpg, channels=3))
        for s in range(3):
            a = op({"jpg": jpg, "rng": _rng(i, s)})["image"].numpy().astype(int)
            b = op({"jpg": png, "rng": _rng(i, s)})["image"].numpy().astype(int)
            assert np.abs(a - b).max() <= 2, (i, s)


def test_decode_fails_loudly_on_truncated_jpeg(records):
    jpg = _example(records[0])["jpg"].numpy()
    with pytest.raises(tf.errors.InvalidArgumentError):
        ops_image.decode()({"jpg": tf.constant(jpg[: len(jpg) // 2])})


# ---------------------------------------------------------------- image ops


@pytest.fixture(scope="module")
def image(records) -> tf.Tensor:
    return ops_image.decode()(_example(records[1]))["image"]  # 960 x 480


def test_inception_crop_area_and_aspect_within_bounds(image):
    height, width = image.shape[:2]
    op = ops_image.inception_crop(area_min=20, area_max=60)
    areas = []
    for s in range(20):
        crop = op({"image": image, "rng": _rng(7, s)})["image"]
        h, w = crop.shape[:2]
        areas.append(h * w / (height * width))
        assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
    assert 0.19 <= min(areas) and max(areas) <= 0.61
    assert len(set(np.round(areas, 4))) > 10  # actually random across seeds
    resized = ops_image.inception_crop(32)({"image": image, "rng": _rng(0, 1)})["image"]
    assert tuple(resized.shape) == (32, 32, 3) and resized.dtype == tf.uint8


def test_resize_small_keeps_aspect_and_central_crop_takes_the_middle(image):
    height, width = image.shape[:2]
    small = ops_image.resize_small(32)({"image": image})["image"]
    expected = (round(height * 32 / width), 32) if width < height else (32, round(width * 32 / height))
    assert tuple(small.shape[:2]) == expected
    crop = ops_image.central_crop(32)({"image": small})["image"].numpy()
    top = (small.shape[0] - 32) // 2
    left = (small.shape[1] - 32) // 2
    np.testing.assert_array_equal(crop, small.numpy()[top:top + 32, left:left + 32])


def test_central_crop_larger_than_image_is_an_error(image):
    with pytest.raises(tf.errors.InvalidArgumentError, match="smaller than the crop"):
        ops_image.central_crop(4000)({"image": image})


def test_resize_to_exact_size(image):
    out = ops_image.resize((20, 30))({"image": image})["image"]
    assert tuple(out.shape) == (20, 30, 3) and out.dtype == tf.uint8


def test_flip_lr_flips_about_half_the_seeds(image):
    small = ops_image.resize(16)({"image": image})["image"].numpy()
    flipped = 0
    for s in range(40):
        out = ops_image.flip_lr()({"image": tf.constant(small), "rng": _rng(3, s)})["image"].numpy()
        if np.array_equal(out, small[:, ::-1]):
            flipped += 1
        else:
            np.testing.assert_array_equal(out, small)
    assert 8 <= flipped <= 32


def test_random_ops_without_rng_say_what_is_missing(image):
    with pytest.raises(ValueError, match="'flip_lr' is random and needs an 'rng'"):
        ops_image.flip_lr()({"image": image})


def test_random_ops_use_distinct_sub_seeds(image):
    # Same example seed, different ops: flip_lr and inception_crop must not share their stream.
    assert not np.array_equal(ops_image.op_seed({"rng": _rng(1, 1)}, "flip_lr").numpy(),
                              ops_image.op_seed({"rng": _rng(1, 1)}, "inception_crop").numpy())


def test_value_range_maps_0_to_minus_1_and_255_to_1():
    pixels = tf.constant([[[0, 127, 255]]], tf.uint8)
    out = ops_image.value_range(-1, 1)({"image": pixels})["image"].numpy()
    np.testing.assert_allclose(out, [[[-1.0, (127 - 127.5) / 127.5, 1.0]]], atol=1e-6)
    assert out[0, 0, 0] == -1.0 and out[0, 0, 2] == 1.0
    unit = ops_image.value_range(0, 1, in_min=-1, in_max=1)({"image": tf.constant([-1.0, 1.0])})
    np.testing.assert_array_equal(unit["image"].numpy(), [0.0, 1.0])


def test_keep_drops_other_keys_but_not_bookkeeping():
    features = {"image": 1, "labels": 2, "key": 3, "rng": 4, "_keep": 5}
    assert set(ops_image.keep("image")(features)) == {"image", "rng", "_keep"}
    with pytest.raises(ValueError, match=r"keep: features \['nope'\] do not exist"):
        ops_image.keep("nope")(features)


# ---------------------------------------------------------------- labels


def _targets(records: list[bytes], mode: str, arg=None, **kwargs) -> tuple[list[str], np.ndarray,
                                                                           np.ndarray | None]:
    """Runs coyo_labels over all records in one tf.data pass: keys, targets, _keep."""
    op = ops_labels.coyo_labels(mode, arg, **kwargs)

    def run(serialized):
        features = sources.parse_example(serialized)
        out = op({"labels": features["labels"], "label_probs": features["label_probs"]})
        out["key"] = features["key"]
        return out

    batch = next(iter(tf.data.Dataset.from_tensor_slices(records).map(run).batch(len(records))))
    keep = batch["_keep"].numpy() if "_keep" in batch else None
    assert "label_probs" not in batch
    return [k.decode() for k in batch["key"].numpy()], batch["labels"].numpy(), keep


def _expected(row: dict, mode: str, arg=None) -> np.ndarray:
    """Independent numpy target from the shard's parquet metadata."""
    labels = np.asarray(row["labels"], np.int64)
    probs = np.asarray(row["label_probs"], np.float32)
    target = np.zeros(NUM_CLASSES, np.float32)
    if mode == "threshold":
        target[labels[probs >= np.float32(arg)]] = 1.0
    elif mode == "topk":
        target[labels[:arg]] = 1.0
    elif mode == "top1":
        target[labels[0]] = 1.0
    else:
        target[labels] = probs
    return target


@pytest.mark.parametrize("mode, arg", [("threshold", 0.1), ("threshold", 0.05), ("topk", 3),
                                       ("top1", None), ("soft", None)])
def test_label_targets_equal_numpy_from_parquet(records, parquet_rows, mode, arg):
    keys, targets, keep = _targets(records, mode, arg)
    assert sorted(keys) == sorted(parquet_rows)
    assert targets.shape == (145, NUM_CLASSES) and targets.dtype == np.float32
    for key, target in zip(keys, targets):
        np.testing.assert_array_equal(target, _expected(parquet_rows[key], mode, arg), err_msg=key)
    assert keep is not None
    np.testing.assert_array_equal(keep, targets.max(axis=1) > 0)


def test_threshold_flags_images_left_without_labels(records, parquet_rows):
    keys, targets, keep = _targets(records, "threshold", 0.3)
    expected_keep = [max(parquet_rows[k]["label_probs"]) >= np.float32(0.3) for k in keys]
    assert keep.tolist() == expected_keep
    assert 0 < sum(expected_keep) < len(keys)  # the fixture has both kinds at 0.3
    _, _, no_flag = _targets(records, "threshold", 0.3, drop_empty=False)
    assert no_flag is None  # kept as all-negative targets instead


def test_labels_outside_the_class_range_raise():
    op = ops_labels.coyo_labels("top1", num_classes=10)
    with pytest.raises(tf.errors.InvalidArgumentError, match="outside"):
        op({"labels": tf.constant([10], tf.int64), "label_probs": tf.constant([0.9])})
    with pytest.raises(tf.errors.InvalidArgumentError, match="outside"):
        op({"labels": tf.constant([-1], tf.int64), "label_probs": tf.constant([0.9])})


def test_labels_and_probs_of_different_length_raise():
    op = ops_labels.coyo_labels("threshold", 0.1, num_classes=10)
    with pytest.raises(tf.errors.InvalidArgumentError, match="differ in length"):
        op({"labels": tf.constant([1, 2], tf.int64), "label_probs": tf.constant([0.9])})


def test_topk_works_without_probabilities_and_duplicates_count_once():
    out = ops_labels.coyo_labels("topk", 2, num_classes=6)({"labels": tf.constant([4, 4, 1],
                                                                                  tf.int64)})
    np.testing.assert_array_equal(out["labels"].numpy(), [0, 0, 0, 0, 1, 0])
    assert bool(out["_keep"])


def test_threshold_keeps_a_label_listed_twice_if_either_copy_passes():
    # Threshold mode scatters every label, those below the threshold with 0: max() must keep the
    # copy that passes, in graph mode (as in the pipeline) as in eager mode.
    op = ops_labels.coyo_labels("threshold", 0.5, num_classes=5)
    features = {"labels": tf.constant([3, 1, 3, 2], tf.int64),
                "label_probs": tf.constant([0.1, 0.2, 0.9, float("nan")])}
    for run in (op, tf.function(lambda f: op(dict(f)))):
        out = run(dict(features))
        np.testing.assert_array_equal(out["labels"].numpy(), [0, 0, 0, 1, 0])
        assert bool(out["_keep"])
    below = run({"labels": tf.constant([3, 3], tf.int64), "label_probs": tf.constant([0.1, 0.4])})
    assert not bool(below["_keep"]) and float(tf.reduce_sum(below["labels"])) == 0.0


def test_missing_labels_give_empty_target_flagged_for_dropping():
    example = tf.train.Example()
    example.features.feature["jpg"].bytes_list.value.append(b"x")
    features = sources.parse_example(tf.constant(example.SerializeToString()))
    assert features["labels"].shape == (0,) and features["label_probs"].shape == (0,)
    out = ops_labels.coyo_labels("top1", num_classes=5)(features)
    assert not bool(out["_keep"]) and float(tf.reduce_sum(out["labels"])) == 0.0
