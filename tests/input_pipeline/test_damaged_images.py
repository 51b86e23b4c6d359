"""Damaged images in an image folder, made from real JPEG bytes: a truncated JPEG and a 100-byte
garbage.jpg are skipped and counted like damaged shard records (the first few logged by file
name), masked in eval batches, and stop a strict run with an error naming the file. One run of
finetune.py on such a folder goes to the end with them counted (evaluator included), saving the
folder's class names, which predict and an export then use."""
from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from checkpoints import convert
from input_pipeline import classification_data, data_source
from tests.conftest import REPO

GOOD = 6  # per split: 3 per class
PP_TRAIN = "decode_jpeg_and_inception_crop(16)|flip_lr|onehot(2)"
PP_EVAL = "decode|resize(16)|onehot(2)"


def _jpeg(seed: int) -> bytes:
    pixels = tf.random.stateless_uniform([40, 48, 3], [seed, 1], 0, 255, tf.int32)
    return tf.io.encode_jpeg(tf.cast(pixels, tf.uint8), quality=90).numpy()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> dict:
    """ROOT/{train,test}/{cat,dog}/: 6 real JPEGs per split; train/cat also holds cut.jpg (a
    real JPEG cut in half) and garbage.jpg (100 random bytes)."""
    root = tmp_path_factory.mktemp("folder")
    for split in ("train", "test"):
        for i in range(GOOD):
            path = root / split / ("cat", "dog")[i % 2] / f"img{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_jpeg(i))
    whole = _jpeg(99)
    damaged = {"undecodable_image": root / "train" / "cat" / "cut.jpg",
               "not_an_image": root / "train" / "cat" / "garbage.jpg"}
    damaged["undecodable_image"].write_bytes(whole[:len(whole) // 2])
    damaged["not_an_image"].write_bytes(np.random.default_rng(0).bytes(100))
    return {"root": root, "damaged": damaged}


def _config(root: Path, split: str = "train", **overrides) -> dict:
    config = {"data": {"name": "imagefolder", "root": str(root), "split": split},
              "pp_train": PP_TRAIN, "pp_eval": PP_EVAL, "shuffle_buffer": 1, "cycle_length": 1}
    config.update(overrides)
    return config


def test_training_skips_and_counts_each_damaged_image_and_logs_its_name(folder, caplog):
    source = data_source.open_source(data_source.parse_input(_config(folder["root"])))
    batches = source.batches(batch_size=4, seed=0)
    with caplog.at_level(logging.WARNING):
        for _ in range(6):  # 24 examples: the 6 good images of 4 epochs of 8 files
            source.observe(next(batches))
    state = source.state()
    assert 24 + 6 <= state["position"] <= 32  # the last epoch's damaged pair may be read or not
    counts = {k: v for k, v in state.items() if k.startswith("skipped/") and v}
    # Exactly the two damaged files, once per epoch read, under their reasons; nothing else.
    assert set(counts) <= {"skipped/unreadable", "skipped/not_an_image"}
    assert all(3 <= n <= 4 for n in counts.values()) and len(counts) == 2
    assert sum(counts.values()) == state["skipped"] == state["position"] - 24
    meta = source.checkpoint_meta({k: [v] for k, v in state.items()})
    assert meta["skipped_by_reason"][0]["not_an_image"] == state["skipped/not_an_image"]
    named = [r.getMessage() for r in caplog.records if "skipped damaged image" in r.getMessage()]
    # A JPEG that does not decode is dropped by the pipeline (`unreadable`, as in shards).
    logged_as = {"undecodable_image": "unreadable", "not_an_image": "not_an_image"}
    for reason, path in folder["damaged"].items():
        assert any(f"{logged_as[reason]}: {path}" in m for m in named), named
    assert len(named) == 5 and "further ones are only counted" in named[-1]


def test_a_resumed_source_keeps_counting_from_the_checkpoint(folder):
    config = data_source.parse_input(_config(folder["root"]))
    first = data_source.open_source(config)
    first.observe(next(first.batches(batch_size=6, seed=0)))
    meta = first.checkpoint_meta({k: [v] for k, v in first.state().items()})
    resumed = data_source.open_source(config)
    resumed.restore(meta, 0)
    resumed.observe(next(resumed.batches(batch_size=6, seed=0)))
    whole = data_source.open_source(config)
    batches = whole.batches(batch_size=6, seed=0)
    for _ in range(2):
        whole.observe(next(batches))
    assert resumed.state() == whole.state()


def test_strict_stops_at_a_damaged_image_naming_the_file(folder):
    ds = classification_data.build_train_dataset(_config(folder["root"], strict=True),
                                                 batch_size=8, seed=0)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"input.strict: (undecodable_image|not_an_image) \S*/train/cat/"
                             r"(cut|garbage).jpg"):
        next(iter(ds))
    with pytest.raises(ValueError, match="strict must be True or False"):
        classification_data.ClassificationInputConfig.from_config(
            _config(folder["root"], strict="yes"))


def test_a_folder_of_only_damaged_images_raises_instead_of_spinning(folder, tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / "train" / name).mkdir(parents=True)
        (tmp_path / "train" / name / "x.jpg").write_bytes(folder["damaged"]["not_an_image"]
                                                           .read_bytes())
    ds = classification_data.build_train_dataset(_config(tmp_path), batch_size=1, seed=0)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"whole epoch.*not_an_image=4.*check their images"):
        next(iter(ds))
    for name in ("cat", "dog"):  # truncated JPEGs: dropped, so found before the stream starts
        (tmp_path / "train" / name / "x.jpg").write_bytes(
            folder["damaged"]["undecodable_image"].read_bytes())
    with pytest.raises(ValueError, match="pp_train failed on each of the first 2 images"):
        classification_data.build_train_dataset(_config(tmp_path), batch_size=1, seed=0)


def test_eval_masks_damaged_images_and_marks_them(folder, tmp_path):
    batches = list(classification_data.build_eval_dataset(
        _config(folder["root"]), split="train", batch_size=5).as_numpy_iterator())
    assert len(batches) == 2  # 8 files
    names = np.concatenate([b["file_name"] for b in batches])
    damaged = np.concatenate([b["_damaged"] for b in batches])
    mask = np.concatenate([b["_mask"] for b in batches])
    assert sorted(names[damaged].tolist()) == [b"cut.jpg", b"garbage.jpg"]
    paths = np.concatenate([b["_name"] for b in batches])[damaged]
    assert sorted(p.decode() for p in paths) == sorted(map(str, folder["damaged"].values()))
    assert mask.sum() == GOOD and not (mask & damaged).any()


def test_finetune_on_a_folder_with_damaged_images_runs_to_the_end_counting_them(folder, tmp_path,
                                                                              shared_fixtures):
    # The command line of the issue: it once stopped at the first batch with
    # `jpeg::Uncompress failed` and no file name. test/dog/cut.jpg: the evaluator skips one too.
    (folder["root"] / "test" / "dog" / "cut.jpg").write_bytes(
        folder["damaged"]["undecodable_image"].read_bytes())
    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(REPO / "finetune.py"), "--config",
         f"configs/finetune.py:folder={folder['root']},classes=2,res=32,steps=2,batch=4,warmup=1",
         "--workdir", str(workdir), f"--config.init={shared_fixtures / 'vit_jax_npz/params.npz'}",
         "--config.evals.val.every_steps=2"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    (folder["root"] / "test" / "dog" / "cut.jpg").unlink()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "input: skipped damaged image, " in result.stderr
    assert f"eval: skipped damaged image {folder['root']}/test/dog/cut.jpg" in result.stderr
    # Default output: the damage is in the skip counts, not in libjpeg's line per truncated
    # image; no note of JAX's search for a TPU; only the per-reason counts that are not zero.
    assert "Premature end of JPEG data" not in result.stderr, result.stderr[-3000:]
    assert "Unable to initialize backend" not in result.stderr
    assert not re.search(r"data/skipped/\w+=0[,\s]", result.stderr), result.stderr[-3000:]
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    train = next(r for r in records if "train/loss" in r)
    skipped = {k: v for k, v in train.items() if k.startswith("data/skipped/")}
    # 8 examples, 6 good images of 8 per epoch: the 2 damaged ones of epoch 1, maybe those of epoch 2
    assert set(skipped) <= {"data/skipped/not_an_image", "data/skipped/unreadable"}
    assert train["data/skipped_records"] == sum(skipped.values()) >= 2
    val = next(r for r in records if "val/top1" in r)
    assert (val["val/examples"], val["val/skipped_images"]) == (6.0, 1.0)
    meta = json.load(open(workdir / "checkpoints" / "2" / "meta" / "metadata"))
    assert sum(meta["skipped_by_reason"][0].values()) == train["data/skipped_records"]

    # The same run's class names (issue 19, item 9): the folder's, saved with the run and
    # printed by predict (it once printed the indices 0 and 1 alone), carried by an export.
    assert (workdir / "class_names.txt").read_text() == "cat\ndog\n"
    image = folder["root"] / "test" / "cat" / "img0.jpg"
    result = subprocess.run(
        [sys.executable, "-m", "coyo_vit.tools.predict", "--checkpoint", str(workdir), "--top_k", "2",
         str(image)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == str(image) and len(lines) == 3
    ranked = [re.fullmatch(r"  [12]\. [01]\.\d{4} +([01]) (cat|dog)", line) for line in lines[1:]]
    assert all(ranked), lines
    assert sorted((m[1], m[2]) for m in ranked) == [("0", "cat"), ("1", "dog")]
    assert convert.main([str(workdir), str(tmp_path / "run.npz")]) == 0
    assert (tmp_path / "run.class_names.txt").read_text() == "cat\ndog\n"  # where predict looks
