"""Classification pipelines on real data: an image folder of the fixture shards' real photos, a
real TFDS `imagenet2012` directory (written in TFDS's own format from those photos), TFDS's
mock of imagenet2012, and the digits demo folder; plus the errors for bad input."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from input_pipeline import classification_data as cd
from input_pipeline import imagefolder, pp_parser
from input_pipeline.demo import digits as demo_digits
from tests.conftest import SHARED

SHARDS = SHARED / "fixtures" / "coyo_shards" / "shards"
PP_TRAIN_1K = "decode_jpeg_and_inception_crop(16)|flip_lr|value_range(-1, 1)|onehot(1000)"
PP_EVAL_1K = "decode|resize(16)|value_range(-1, 1)|onehot(1000)"


def fixture_photos() -> list[dict]:
    """The successful records of the img2dataset fixture: key, encoded bytes, first label."""
    photos = []
    for shard in sorted(SHARDS.glob("*.tfrecord")):
        for record in tf.data.TFRecordDataset(str(shard)):
            ex = tf.train.Example.FromString(record.numpy()).features.feature
            photos.append({"key": ex["key"].bytes_list.value[0].decode(),
                           "bytes": ex["jpg"].bytes_list.value[0],
                           "label": int(ex["labels"].int64_list.value[0])})
    return photos


def write_imagenet2012(data_dir: Path, val_names: list[str], val_labels: list[int],
                       train_labels: list[int], train_files: int = 3) -> None:
    """Writes a small but real TFDS imagenet2012 dataset: TFDS's own features serialize the
    examples into its tfrecord shards and `write_metadata` adds dataset_info.json, so it
    loads through tfds.builder / as_dataset exactly like a prepared ImageNet."""
    jpegs = [p["bytes"] for p in fixture_photos() if p["bytes"][:2] == b"\xff\xd8"]
    builder = tfds.builder("imagenet2012", data_dir=str(data_dir))
    features = builder.info.features
    out = Path(builder.data_dir)
    out.mkdir(parents=True, exist_ok=True)

    def write(split: str, examples: list[dict], num_files: int) -> tfds.core.SplitInfo:
        lengths = []
        for i in range(num_files):
            part = examples[i::num_files]
            name = out / f"imagenet2012-{split}.tfrecord-{i:05d}-of-{num_files:05d}"
            with tf.io.TFRecordWriter(str(name)) as writer:
                for ex in part:
                    writer.write(features.serialize_example(ex))
            lengths.append(len(part))
        return tfds.core.SplitInfo(name=split, shard_lengths=lengths, num_bytes=0,
                                   filename_template=None)

    val = [dict(image=jpegs[i % len(jpegs)], label=label, file_name=name)
           for i, (name, label) in enumerate(zip(val_names, val_labels))]
    train = [dict(image=jpegs[-1 - i % len(jpegs)], label=label, file_name=f"n{label:08d}_{i}.JPEG")
             for i, label in enumerate(train_labels)]
    splits = [write("validation", val, 1), write("train", train, train_files)]
    tfds.folder_dataset.write_metadata(data_dir=str(out), features=features, split_infos=splits,
                                       filename_template=None, check_data=True)


VAL_NAMES = [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, 8)]
VAL_LABELS = [i % 3 for i in range(7)]
TRAIN_LABELS = [7 * i % 10 for i in range(10)]


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory) -> Path:
    data_dir = tmp_path_factory.mktemp("tfds")
    write_imagenet2012(data_dir, VAL_NAMES, VAL_LABELS, TRAIN_LABELS)
    return data_dir


def _imagenet(data_dir: Path, split: str, **input_overrides) -> dict:
    return {"data": {"name": "tfds", "tfds_name": "imagenet2012", "split": split,
                     "data_dir": str(data_dir)},
            "pp_train": PP_TRAIN_1K, "pp_eval": PP_EVAL_1K, "shuffle_buffer": 4, **input_overrides}


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> tuple[Path, list[dict]]:
    """ROOT/train/<first label>/<key>.<ext>: 40 of the fixture's real photos, the last 8 of them
    re-encoded as PNG (the shards hold only JPEGs) so both decoders run."""
    root = tmp_path_factory.mktemp("photos")
    photos = fixture_photos()[:40]
    for i, p in enumerate(photos):
        if i >= 32:
            buffer = io.BytesIO()
            Image.open(io.BytesIO(p["bytes"])).convert("RGB").save(buffer, format="PNG")
            p["bytes"] = buffer.getvalue()
        p["path"] = root / "train" / str(p["label"]) / f"{p['key']}{'.jpg' if i < 32 else '.png'}"
        p["path"].parent.mkdir(parents=True, exist_ok=True)
        p["path"].write_bytes(p["bytes"])
    (root / "train" / ".DS_Store").write_bytes(b"junk")  # hidden files are not images
    return root, photos


def _all(ds: tf.data.Dataset) -> list[dict[str, np.ndarray]]:
    return list(ds.as_numpy_iterator())


def test_image_folder_of_real_photos_decodes_with_labels_and_file_names(photo_folder):
    root, photos = photo_folder
    classes = sorted({str(p["label"]) for p in photos})
    config = {"data": {"name": "imagefolder", "root": str(root), "split": "train"},
              "pp_eval": f"decode|resize(16)|value_range(0, 255)|onehot({len(classes)})"}
    batches = _all(cd.build_eval_dataset(config, batch_size=16))
    assert len(batches) == 3  # ceil(40 / 16), the last one padded
    got = {name.decode(): (label, image) for b in batches
           for name, label, image, m in zip(b["file_name"], b["label"], b["image"], b["_mask"]) if m}
    assert len(got) == len(photos) and sum(b["_mask"].sum() for b in batches) == len(photos)
    for p in photos:
        label, image = got[p["path"].name]
        assert label == classes.index(str(p["label"]))  # class index = sorted class directories
        reference = np.asarray(Image.open(p["path"]).convert("RGB"), np.float32)
        reference = tf.image.resize(reference, (16, 16)).numpy()
        assert np.abs(image - reference).mean() < 3.0  # PIL and TF decoders differ by rounding
    onehot = np.concatenate([b["labels"][b["_mask"]] for b in batches])
    labels = np.concatenate([b["label"][b["_mask"]] for b in batches])
    assert np.array_equal(onehot.argmax(1), labels) and np.all(onehot.sum(1) == 1)


def test_image_folder_train_stream_is_a_seeded_permutation_per_epoch_and_resumes(photo_folder):
    root, photos = photo_folder
    n_classes = len({p["label"] for p in photos})
    config = {"data": {"name": "imagefolder", "root": str(root), "split": "train"},
              "pp_train": f"decode_jpeg_and_inception_crop(8)|flip_lr|value_range(-1, 1)|onehot({n_classes})"}
    run = _all(cd.build_train_dataset(config, batch_size=10, seed=3).take(8))  # two epochs
    again = _all(cd.build_train_dataset(config, batch_size=10, seed=3).take(8))
    other = _all(cd.build_train_dataset(config, batch_size=10, seed=4).take(4))
    assert np.array_equal(np.concatenate([b["_index"] for b in run]), np.arange(80))
    for a, b in zip(run, again):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    epoch = [np.concatenate([b["labels"].argmax(1) for b in run[e * 4:(e + 1) * 4]]) for e in (0, 1)]
    folder = imagefolder.list_split(str(root), "train")
    assert sorted(epoch[0]) == sorted(folder.labels) == sorted(epoch[1])  # each image once an epoch
    assert not np.array_equal(epoch[0], epoch[1])                         # reshuffled
    assert not np.array_equal(run[0]["labels"], other[0]["labels"])
    resumed = _all(cd.build_train_dataset(config, batch_size=10, seed=3, start_position=50).take(3))
    for a, b in zip(resumed, run[5:]):                                     # mid second epoch
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_tfds_imagenet2012_eval_keeps_file_names_labels_and_pads(imagenet_dir):
    batches = _all(cd.build_eval_dataset(_imagenet(imagenet_dir, "validation"), batch_size=4))
    assert len(batches) == 2 and [int(b["_mask"].sum()) for b in batches] == [4, 3]
    names = [n.decode() for b in batches for n, m in zip(b["file_name"], b["_mask"]) if m]
    labels = [int(l) for b in batches for l, m in zip(b["label"], b["_mask"]) if m]
    assert names == VAL_NAMES and labels == VAL_LABELS
    assert batches[1]["file_name"][3] == b"" and not batches[1]["labels"][3].any()
    assert np.array_equal(batches[0]["labels"].argmax(1), VAL_LABELS[:4])
    assert batches[0]["image"].shape == (4, 16, 16, 3) and batches[0]["image"].dtype == np.float32
    # Two processes: contiguous halves, the same number of batches each.
    shares = [_all(cd.build_eval_dataset(_imagenet(imagenet_dir, "validation"), batch_size=4,
                                         process_index=p, process_count=2)) for p in (0, 1)]
    assert [len(s) for s in shares] == [1, 1]
    joined = [n.decode() for s in shares for n, m in zip(s[0]["file_name"], s[0]["_mask"]) if m]
    assert joined == VAL_NAMES


def test_tfds_train_stream_is_deterministic_disjoint_per_process_and_resumes(imagenet_dir):
    config = _imagenet(imagenet_dir, "train")
    per_process = []
    for p in (0, 1):
        run = _all(cd.build_train_dataset(config, batch_size=1, seed=0, process_index=p,
                                          process_count=2).take(10))
        assert np.array_equal([int(b["_index"][0]) for b in run], np.arange(10))
        labels = [int(b["labels"][0].argmax()) for b in run]
        assert sorted(labels[:5]) == sorted(labels[5:])  # epochs of the same 5 examples
        per_process.append(sorted(labels[:5]))
    assert sorted(per_process[0] + per_process[1]) == sorted(TRAIN_LABELS)
    run = _all(cd.build_train_dataset(config, batch_size=2, seed=0).take(8))
    again = _all(cd.build_train_dataset(config, batch_size=2, seed=0).take(8))
    resumed = _all(cd.build_train_dataset(config, batch_size=2, seed=0, start_position=6).take(5))
    for a, b in zip(run, again):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    for a, b in zip(resumed, run[3:]):
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_tfds_mock_imagenet2012_train_and_validation():
    config = {"data": {"name": "tfds", "tfds_name": "imagenet2012", "split": "train"},
              "pp_train": PP_TRAIN_1K, "pp_eval": PP_EVAL_1K, "shuffle_buffer": 8}
    with tfds.testing.mock_data(num_examples=6):
        train = _all(cd.build_train_dataset(config, batch_size=4, seed=0).take(2))
        val = _all(cd.build_eval_dataset(config, split="validation", batch_size=4))
    assert train[0]["image"].shape == (4, 16, 16, 3) and train[0]["labels"].shape == (4, 1000)
    assert np.array_equal(np.concatenate([b["_index"] for b in train]), np.arange(8))
    assert [int(b["_mask"].sum()) for b in val] == [4, 2]
    mask = np.concatenate([b["_mask"] for b in val])
    labels = np.concatenate([b["label"] for b in val])[mask]
    assert np.array_equal(np.concatenate([b["labels"] for b in val])[mask].argmax(1), labels)
    assert all(isinstance(n, bytes) and n for n in np.concatenate([b["file_name"] for b in val])[mask])


def test_digits_folder_holds_load_digits_pixels_and_is_reused(tmp_path):
    from sklearn.datasets import load_digits

    root = Path(demo_digits.ensure_digits_folder(str(tmp_path / "digits"), image_size=16))
    train, test = (imagefolder.list_split(str(root), s) for s in ("train", "test"))
    assert (len(train), len(test)) == (1437, 360) and train.classes == tuple("0123456789")
    digits = load_digits()
    for index in (0, 1, 5, 1796):
        path = root / demo_digits.split_of(index) / str(digits.target[index]) / f"{index:04d}.png"
        pixels = np.asarray(Image.open(path))
        assert pixels.shape == (16, 16, 3)
        want = np.rint(digits.images[index] * 255 / 16).astype(np.uint8)
        assert np.array_equal(pixels[::2, ::2, 0], want) and np.array_equal(pixels[1::2, 1::2, 2], want)
    sample = root / "test" / "0" / "0000.png"
    mtime = sample.stat().st_mtime_ns
    demo_digits.ensure_digits_folder(str(root), image_size=16)
    assert sample.stat().st_mtime_ns == mtime                     # complete: reused untouched
    (root / "train" / "3" / os.listdir(root / "train" / "3")[0]).unlink()
    demo_digits.ensure_digits_folder(str(root), image_size=16)     # incomplete: rewritten
    assert len(imagefolder.list_split(str(root), "train")) == 1437
    foreign = tmp_path / "foreign"
    (foreign / "train").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not written by"):
        demo_digits.ensure_digits_folder(str(foreign))
    with pytest.raises(ValueError, match="multiple of 8.*20"):
        demo_digits.ensure_digits_folder(str(tmp_path / "x"), image_size=20)


def test_onehot_targets_smoothing_and_out_of_range_labels():
    smooth = pp_parser.parse("onehot(4, on=0.85, off=0.05)")({"label": tf.constant(2)})
    assert np.allclose(smooth["labels"], [0.05, 0.05, 0.85, 0.05]) and int(smooth["label"]) == 2
    multi = pp_parser.parse("onehot(4, key='tags', key_result='t')")({"tags": tf.constant([0, 3, 3])})
    assert np.array_equal(multi["t"], [1, 0, 0, 1])
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"outside \[0, 4\)"):
        pp_parser.parse("onehot(4)")({"label": tf.constant(4)})
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        pp_parser.parse("onehot(0)")


def test_bad_inputs_fail_with_named_values(tmp_path, imagenet_dir, photo_folder):
    with pytest.raises(ValueError, match="unknown TFDS dataset 'imagenet2013'"):
        cd.build_train_dataset(_imagenet(imagenet_dir, "train") | {
            "data": {"name": "tfds", "tfds_name": "imagenet2013", "split": "train"}},
            batch_size=2, seed=0)
    empty = tmp_path / "empty_tfds"
    empty.mkdir()
    with pytest.raises(ValueError, match="not prepared.*manual_dir"):
        cd.build_eval_dataset(_imagenet(empty, "validation"), batch_size=2)
    with pytest.raises(ValueError, match="needs a manual download: set data.manual_dir"):
        cd.prepare(_imagenet(empty, "train")["data"])
    with pytest.raises(FileNotFoundError, match="manual_dir '/nonexistent/imagenet'"):
        cd.prepare(dict(_imagenet(empty, "train")["data"], manual_dir="/nonexistent/imagenet"))
    cd.prepare(_imagenet(imagenet_dir, "train")["data"])  # prepared already: no manual_dir needed
    with pytest.raises(ValueError, match="no split 'val'.*'train', 'validation'"):
        cd.build_eval_dataset(_imagenet(imagenet_dir, "val"), batch_size=2)
    root, _ = photo_folder
    folder = {"name": "imagefolder", "root": str(root), "split": "test"}
    with pytest.raises(ValueError, match="no split 'test'; splits found: \\['train'\\]"):
        cd.build_eval_dataset({"data": folder, "pp_eval": PP_EVAL_1K}, batch_size=2)
    (tmp_path / "hollow" / "train" / "cat").mkdir(parents=True)
    hollow = {"name": "imagefolder", "root": str(tmp_path / "hollow"), "split": "train"}
    with pytest.raises(ValueError, match="holds no images"):
        cd.build_train_dataset({"data": hollow, "pp_train": PP_TRAIN_1K}, batch_size=2, seed=0)
    num_classes = len(imagefolder.list_classes(str(root)))
    with pytest.raises(ValueError, match=f"labels over 1000 classes but image folder .* has {num_classes};"):
        cd.build_eval_dataset({"data": dict(folder, split="train"), "pp_eval": PP_EVAL_1K},
                              batch_size=2)
    with pytest.raises(ValueError, match="unknown keys \\['files'\\]"):
        cd.build_eval_dataset({"data": dict(folder, files="x"), "pp_eval": PP_EVAL_1K}, batch_size=2)
    for budget in (0, -2.0, "4", True):  # the COYO input config has always refused these
        with pytest.raises(ValueError, match=f"ram_budget_gb must be a positive number or None, got {budget!r}"):
            cd.build_eval_dataset({"data": dict(folder, split="train"), "pp_eval": PP_EVAL_1K,
                                   "ram_budget_gb": budget}, batch_size=2)
    with pytest.raises(ValueError, match="not a classification source; valid: tfds, imagefolder"):
        cd.build_eval_dataset({"data": {"name": "coyo", "split": "x"}, "pp_eval": "decode"},
                              batch_size=2)


@pytest.mark.parametrize("kind", ["imagefolder", "tfds"])
def test_streams_continue_on_another_process_count_with_each_example_once(kind, photo_folder,
                                                                         imagenet_dir):
    """A 2-process run stopped with process 0 into its second epoch and process 1 in its first
    continues on 3 processes (input_pipeline.relayout): the examples the old processes read plus
    the new processes' preludes hold each example of epochs 0 and 1 exactly once; the resume
    state goes through data_source.ClassificationSource.restore as the loop calls it."""
    from input_pipeline import data_source, relayout  # late: the sources module, for restore

    if kind == "imagefolder":
        config = {"data": {"name": "imagefolder", "root": str(photo_folder[0]), "split": "train"},
                  "pp_train": "decode_jpeg_and_inception_crop(8)|value_range(-1, 1)|onehot("
                              f"{len({p['label'] for p in photo_folder[1]})})"}
        name_key, total = "_path", 40
    else:
        config, name_key, total = _imagenet(imagenet_dir, "train"), "file_name", len(TRAIN_LABELS)
    cfg = cd.ClassificationInputConfig.from_config(config)
    source = cd._make_source(cfg.data)
    lengths = [cd.train_epoch_length(cfg.data, process_index=p, process_count=2) for p in range(2)]
    positions = [lengths[0] + 2, lengths[1] - 3]

    def names(process: int, count: int, stop: int, layout=None) -> list[str]:
        stream, _ = cd._train_stream(source, cfg, 5, process, count, 0, layout)
        return [ex[name_key].decode() for _, ex in stream.take(stop).as_numpy_iterator()]

    read = [(name, i // lengths[p]) for p in range(2)
            for i, name in enumerate(names(p, 2, positions[p]))]
    restored = []
    for q in range(3):
        new = data_source.ClassificationSource(cfg, process_index=q, process_count=3)
        new.restore({"data_positions": positions, "skipped_records": [1, 2],
                     "skipped_by_reason": [{"unreadable": 1}, {"unreadable": 2}]}, q)
        restored.append(new)
    layout = restored[0].layout
    assert layout == relayout.relayout(relayout.Layout(2), positions, lengths, 3).layout
    assert [s.state()["skipped"] for s in restored] == [3, 0, 0]  # the totals, kept once
    for q in range(3):
        epochs = [piece.epoch for piece in layout.preludes[q] for _ in range(piece.length)]
        read += list(zip(names(q, 3, layout.prelude_length(q), layout), epochs))
    for epoch in (0, 1):
        seen = sorted(name for name, e in read if e == epoch)
        assert len(seen) == len(set(seen)) == total, (kind, epoch)
    assert layout.base_epoch == 2
    # and the new processes' batches build from the restored state
    batch = next(restored[1].batches(2, 5))
    assert batch["image"].shape[0] == 2 and batch["_index"].tolist() == [0, 1]
