"""The fine-tuning configs' training augmentation, at config level (nothing is trained): digits
need crops that keep every stroke and no mirror, so the demo and configs/finetune.py must say so."""
import pytest

from configs import demo_finetune, finetune
from input_pipeline import pp_parser


def test_demo_finetune_crops_gently_and_never_flips():
    config = demo_finetune.get_config()
    assert "flip_lr" not in pp_parser.op_names(config.input.pp_train)
    (crop,) = pp_parser.op_arguments(config.input.pp_train, "inception_crop")
    assert crop["area_min"] >= 50  # a crop to 5% (the ImageNet default) cuts digits apart
    assert "flip_lr" not in config.input.pp_eval and "crop" not in config.input.pp_eval
    assert config.input.pp_eval.endswith("|onehot(10)")  # smoothing is for training labels only


def test_finetune_area_min_and_flip_arguments():
    default = finetune.get_config("folder=/data,classes=10").input.pp_train
    assert default == "decode_jpeg_and_inception_crop(224)|flip_lr|onehot(10)"  # unchanged
    digits = finetune.get_config("folder=/d,classes=10,res=32,area_min=75,flip=false").input.pp_train
    assert digits == "decode_jpeg_and_inception_crop(32, area_min=75.0)|onehot(10)"
    whole = finetune.get_config("folder=/d,classes=10,res=32,area_min=100").input.pp_train
    assert whole == "decode|resize(32)|flip_lr|onehot(10)"
    with pytest.raises(ValueError, match=r"area_min must be in \(0, 100\]"):
        finetune.get_config("folder=/d,classes=10,area_min=0")
