"""class_names.txt: which names a run saves (image folder, TFDS, the shipped 21k / 1k lists),
that a workdir's names are never replaced, and where predict and the exports find them. The
command line end to end: tests/input_pipeline/test_damaged_images.py (finetune.py on an image
folder, then predict and convert) and tests/training/test_finetune.py (TFDS imagenet2012)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from checkpoints.class_names_files import find_class_names, names_file_for, write_class_names_beside
from coyo_vit.class_names import load_class_list, parse_class_names, readable_names
from coyo_vit.config_keys import ConfigError
from coyo_vit.training import workdir as workdir_record
from input_pipeline import classification_data
from tests.input_pipeline.test_classification_data import VAL_LABELS, VAL_NAMES, write_imagenet2012


def test_the_names_a_run_saves():
    in1k, in21k = load_class_list("imagenet1k"), load_class_list("imagenet21k")
    assert readable_names(("roses", "tulips"), 2) == ("roses", "tulips")
    assert readable_names(in1k.wnids, 1000) == in1k.names  # TFDS imagenet2012's label names
    assert readable_names(None, 21841) == in21k.names  # COYO shards: indices only
    assert readable_names(("0", "1", "2"), 3) == ("0", "1", "2")  # e.g. the digits folder
    assert readable_names(None, 10) is None


def test_a_workdirs_names_are_written_once_and_never_replaced(tmp_path):
    path = workdir_record.write_class_names(str(tmp_path), ("daisy", "rose"), 2)
    assert open(path).read() == "daisy\nrose\n"
    assert workdir_record.write_class_names(str(tmp_path), ("daisy", "rose"), 2) == path  # a resume
    with pytest.raises(ConfigError, match=r"first differ at class 1: 'rose' \(saved\) vs 'tulip' "
                                          r"\(this run\)\. Train in a new --workdir"):
        workdir_record.write_class_names(str(tmp_path), ("daisy", "tulip"), 2)
    assert open(path).read() == "daisy\nrose\n"
    assert find_class_names(tmp_path) == ("daisy", "rose")
    # Nothing to name, or names that do not fit the head: no file.
    assert workdir_record.write_class_names(str(tmp_path / "b"), None, 10) is None
    assert workdir_record.write_class_names(str(tmp_path / "c"), ("a", "b", "c"), 2) is None
    with pytest.raises(ValueError, match=r"class 1 has name 'a\\nb'; a class name must be one"):
        workdir_record.write_class_names(str(tmp_path / "d"), ("x", "a\nb"), 2)


def test_tfds_label_names_in_label_order(tmp_path):
    write_imagenet2012(tmp_path, VAL_NAMES, VAL_LABELS, [0, 1])
    data = dict(name="tfds", tfds_name="imagenet2012", data_dir=str(tmp_path), split="train")
    names = classification_data.class_names(data)
    assert names == load_class_list("imagenet1k").wnids
    assert readable_names(names, 1000)[0] == "tench, Tinca tinca"


def test_tfds_labels_that_only_number_the_classes_are_no_names(monkeypatch):
    import tensorflow_datasets as tfds  # late: TensorFlow only for the tests that need it

    features = {"label": tfds.features.ClassLabel(num_classes=3)}
    monkeypatch.setattr(classification_data, "_tfds_builder",
                        lambda name, data_dir: SimpleNamespace(info=SimpleNamespace(features=features)))
    data = dict(name="tfds", tfds_name="numbered", split="train")
    assert classification_data.class_names(data) is None
    features["label"] = tfds.features.ClassLabel(names=["no", "yes"])
    assert classification_data.class_names(data) == ("no", "yes")


def test_image_folder_names_are_the_union_of_every_splits_classes(tmp_path):
    for split, name in (("train", "rose"), ("train", "daisy"), ("test", "tulip")):
        (tmp_path / split / name).mkdir(parents=True)
        (tmp_path / split / name / "x.jpg").write_bytes(b"")
    data = dict(name="imagefolder", root=str(tmp_path), split="train")
    assert classification_data.class_names(data) == ("daisy", "rose", "tulip")


def test_where_predict_and_the_exports_find_names(tmp_path):
    workdir = tmp_path / "run"
    step = workdir / "checkpoints" / "40"
    step.mkdir(parents=True)
    (workdir / "class_names.txt").write_text("cat\ndog\n")
    for path in (workdir, workdir / "checkpoints", step):
        assert find_class_names(path) == ("cat", "dog"), path
    (tmp_path / "vit.npz").write_bytes(b"")
    assert find_class_names(tmp_path / "vit.npz") is None
    assert write_class_names_beside(tmp_path / "vit.npz", ["a", "b"]) == names_file_for(tmp_path / "vit.npz")
    assert (tmp_path / "vit.class_names.txt").read_text() == "a\nb\n"
    assert find_class_names(tmp_path / "vit.npz") == ("a", "b")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"id2label": {"1": "dog", "0": "cat"}}')
    assert find_class_names(hf) == ("cat", "dog")
    (hf / "config.json").write_text('{"id2label": {"0": "LABEL_0", "1": "LABEL_1"}}')
    assert find_class_names(hf) is None
    assert parse_class_names("a\r\nb") == ("a", "b") and parse_class_names("") == ()
