"""coyo_vit.tools.predict and the shipped class lists, on the fixture model and real image files."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from checkpoints import export_npz, load
from coyo_vit.class_names import class_list_for, load_class_list
from coyo_vit.tools.predict import load_image, native_image_size, predict
from tests.conftest import REPO, SHARED

NPZ = SHARED / "fixtures" / "vit_jax_npz"


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image * 127.5 + 127.5), 0, 255).astype(np.uint8)


def test_shipped_class_lists_match_the_data_card():
    in21k = load_class_list("imagenet21k")
    assert len(in21k) == 21841 and in21k.index21k is None
    # The dataset card's table-lamp preview row: labels [8087, 11054, ...].
    assert (in21k.wnids[8087], in21k.names[8087]) == ("n03636649", "lamp")
    assert in21k.names[11054] == "table lamp"
    in1k = load_class_list("imagenet1k")
    assert len(in1k) == 1000
    assert in1k.names[0] == "tench, Tinca tinca" and in1k.index21k[0] == 359
    assert in21k.wnids[in1k.index21k[0]] == in1k.wnids[0]
    teddy = in1k.wnids.index("n04399382")
    assert in1k.index21k[teddy] == -1
    assert class_list_for(21841) is in21k and class_list_for(1000) is in1k
    assert class_list_for(10) is None and class_list_for(None) is None
    with pytest.raises(ValueError, match=r"Unknown class list 'imagenet22k'; valid: \['imagenet1k', 'imagenet21k'\]"):
        load_class_list("imagenet22k")


def test_load_image_decodes_and_scales_to_minus_one_one(tmp_path):
    image = np.load(NPZ / "input.npy")[0]
    Image.fromarray(_to_uint8(image)).save(tmp_path / "x.png")
    decoded = load_image(tmp_path / "x.png", (32, 32))
    assert decoded.shape == (32, 32, 3) and decoded.dtype == np.float32
    np.testing.assert_allclose(decoded, image, atol=0.5 / 127.5 + 1e-6)
    assert load_image(tmp_path / "x.png", (48, 64)).shape == (48, 64, 3)


def test_predict_ranks_classes_like_the_fixture_logits():
    params, kwargs = load(NPZ / "params.npz")
    assert native_image_size(params, kwargs) == (32, 32)
    images = np.load(NPZ / "input.npy")
    want = np.load(NPZ / "logits.npy")
    results = predict(params, kwargs, images, top_k=3)
    for row, preds in zip(want, results):
        assert [p.index for p in preds] == list(np.argsort(-row)[:3])
        assert preds[0].name is None and preds[0].wnid is None  # 10 classes: indices only
        softmax = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        np.testing.assert_allclose([p.score for p in preds], softmax[np.argsort(-row)[:3]], rtol=1e-4)


def test_21k_head_gets_names_and_sigmoid_scores():
    params, kwargs = load(NPZ / "params.npz", num_classes=21841)
    bias = np.full(21841, -10.0, np.float32)
    bias[[8087, 11054]] = [2.0, 1.0]
    params["head"]["bias"] = bias
    (first, second, *_), = predict(params, kwargs, np.load(NPZ / "input.npy")[:1], top_k=5)
    assert (first.index, first.wnid, first.name) == (8087, "n03636649", "lamp")
    assert (second.index, second.name) == (11054, "table lamp")
    np.testing.assert_allclose(first.score, 1 / (1 + np.exp(-2.0)), rtol=1e-5)


def test_predict_cli_prints_top5_imagenet1k_names(tmp_path):
    params, _ = load(NPZ / "params.npz", num_classes=1000)
    params["head"]["bias"] = np.linspace(-1, 1, 1000, dtype=np.float32)  # ranks 999, 998, ...
    export_npz(params, tmp_path / "in1k.npz")
    images = np.load(NPZ / "input.npy")
    Image.fromarray(_to_uint8(images[0])).save(tmp_path / "a.png")
    Image.fromarray(_to_uint8(images[1])).resize((96, 64)).save(tmp_path / "b.jpg", quality=90)
    result = subprocess.run(
        [sys.executable, "-m", "coyo_vit.tools.predict", "--checkpoint", str(tmp_path / "in1k.npz"),
         str(tmp_path / "a.png"), str(tmp_path / "b.jpg")],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == str(tmp_path / "a.png") and lines[6] == str(tmp_path / "b.jpg")
    names = load_class_list("imagenet1k")
    for rank, line in enumerate(lines[1:6], 1):
        index = 1000 - rank
        assert line.startswith(f"  {rank}. ") and line.endswith(f"{index} {names.wnids[index]} {names.names[index]}")
    assert lines[1].endswith("999 n15075141 toilet tissue, toilet paper, bathroom tissue")


def test_load_image_resizes_like_the_eval_pipeline(tmp_path):
    # A photo's pixels (the fixture's 1024x512 JPEG, decoded by TensorFlow) saved losslessly,
    # then resized by load_image and by the pipeline's resize op: the pixels the fine-tuning eval
    # saw (PIL's antialiasing bilinear differed by up to 0.49 in [-1, 1]). JPEG decoders differ
    # by a level or so, which is not the resize's doing, so the image goes in as a PNG.
    import tensorflow as tf

    from input_pipeline.ops_image import resize_uint8
    shards = sorted((SHARED / "fixtures" / "coyo_shards" / "shards").glob("*.tfrecord"))
    record = next(iter(tf.data.TFRecordDataset([str(shards[0])])))
    jpeg = tf.io.parse_single_example(record, {"jpg": tf.io.FixedLenFeature([], tf.string)})["jpg"]
    pixels = tf.io.decode_jpeg(jpeg, channels=3)
    Image.fromarray(pixels.numpy()).save(tmp_path / "x.png")
    for size in ((224, 224), (96, 160)):
        want = resize_uint8(pixels, size).numpy().astype(np.float32)
        got = load_image(tmp_path / "x.png", size) * 127.5 + 127.5
        assert np.abs(got - want).max() <= 1.0 + 1e-4, size  # a .5 tie may round either way
        assert np.mean(np.abs(got - want) > 0.5) < 1e-3, size
