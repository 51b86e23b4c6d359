"""checkpoints.load on the real fixtures: reproduction, fine-tuning adaptation, bad input."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from checkpoints import CheckpointFormatError, load
from checkpoints.adapt import resize_posemb
from checkpoints.npz_layouts import flatten_tree, ours_to_npz
from coyo_vit.models import Model
from tests.conftest import REPO, SHARED

FIXTURES = SHARED / "fixtures"
NPZ = FIXTURES / "vit_jax_npz"
TF = FIXTURES / "coyo_vit_tf"
TOL = 1e-4

FIXTURE_KWARGS = dict(num_classes=10, patch_size=8, width=64, depth=2, mlp_dim=128, num_heads=4,
                      pool_type="tok", rep_size=48, posemb="learn", scan=False)


def _apply(params, kwargs, images, features=False):
    return Model(**kwargs).apply({"params": params}, images, train=False, return_features=features)


def _npz_arrays() -> dict[str, np.ndarray]:
    with np.load(NPZ / "params.npz") as data:
        return {k: data[k] for k in data.files}


def _load_arrays(arrays, **overrides):
    """Writes arrays to a temp .npz and loads it (np.savez accepts '/' in names)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt.npz"
        np.savez(path, **arrays)
        return load(path, **overrides)


def test_vit_jax_npz_reproduces_logits():
    params, kwargs = load(NPZ / "params.npz")
    assert kwargs == FIXTURE_KWARGS
    logits = _apply(params, kwargs, np.load(NPZ / "input.npy"))
    np.testing.assert_allclose(logits, np.load(NPZ / "logits.npy"), atol=TOL, rtol=0)


def test_vit_jax_npz_with_linen_block_names_loads_the_same():
    linen = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
             "LayerNorm_2": "LayerNorm_1", "MlpBlock_3": "MlpBlock_0"}
    arrays = {}
    for key, value in _npz_arrays().items():
        parts = key.split("/")
        arrays["/".join(linen.get(p, p) for p in parts)] = value
    params, kwargs = _load_arrays(arrays)
    assert kwargs == FIXTURE_KWARGS
    np.testing.assert_allclose(_apply(params, kwargs, np.load(NPZ / "input.npy")),
                               np.load(NPZ / "logits.npy"), atol=TOL, rtol=0)


def test_big_vision_npz_under_params_prefix_with_optimizer_state():
    params, _ = load(NPZ / "params.npz")
    arrays = {f"params/{k}": v for k, v in ours_to_npz(flatten_tree(params), "big_vision").items()}
    arrays["opt/mu/embedding/kernel"] = np.ones(3, np.float32)
    arrays["step"] = np.asarray(1000)
    loaded, kwargs = _load_arrays(arrays)
    assert kwargs == FIXTURE_KWARGS
    np.testing.assert_array_equal(loaded["Transformer"]["posembed_input"]["pos_embedding"][0, 0], 0)
    np.testing.assert_allclose(_apply(loaded, kwargs, np.load(NPZ / "input.npy")),
                               np.load(NPZ / "logits.npy"), atol=TOL, rtol=0)


@pytest.mark.parametrize("name,by", [("pretrain", "prefix"), ("finetune", "directory")])
def test_coyo_tf_reproduces_logits_and_features(name, by):
    folder = TF / name
    params, kwargs = load(folder / "last_checkpoint" if by == "prefix" else folder, num_heads=4)
    assert kwargs["rep_size"] == (48 if name == "pretrain" else None)
    assert kwargs["num_classes"] == (100 if name == "pretrain" else 10)
    logits, features = _apply(params, kwargs, np.load(folder / "input.npy"), features=True)
    np.testing.assert_allclose(logits, np.load(folder / "logits.npy"), atol=TOL, rtol=0)
    np.testing.assert_allclose(features, np.load(folder / "features.npy"), atol=TOL, rtol=0)


def test_coyo_tf_directory_with_several_checkpoints_uses_the_state_file(tmp_path):
    for name in ("pretrain", "finetune"):
        for part in ("index", "data-00000-of-00001"):
            shutil.copy(TF / name / f"last_checkpoint.{part}", tmp_path / f"{name}.{part}")
    with pytest.raises(CheckpointFormatError, match="several checkpoints"):
        load(tmp_path, num_heads=4)
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "finetune"\n')
    _, kwargs = load(tmp_path, num_heads=4)
    assert kwargs == dict(FIXTURE_KWARGS, rep_size=None)


def test_coyo_tf_head_count_needs_variant_or_override_for_odd_widths():
    with pytest.raises(ValueError, match=r"width-64 .*num_heads="):
        load(TF / "pretrain")
    with pytest.raises(ValueError, match="num_heads=5 does not divide"):
        load(TF / "pretrain", num_heads=5)


def test_finetune_recipe_replaces_head_drops_prelogits_resizes_posemb(caplog):
    original, _ = load(TF / "pretrain", num_heads=4)
    with caplog.at_level(logging.INFO, logger="checkpoints"):
        params, kwargs = load(TF / "pretrain", num_heads=4, num_classes=10, rep_size=None, image_size=48)
    assert kwargs == dict(FIXTURE_KWARGS, rep_size=None)
    assert "pre_logits" not in params
    np.testing.assert_array_equal(params["head"]["kernel"], np.zeros((64, 10)))
    np.testing.assert_array_equal(params["head"]["bias"], np.zeros(10))
    posemb = params["Transformer"]["posembed_input"]["pos_embedding"]
    old = original["Transformer"]["posembed_input"]["pos_embedding"]
    assert posemb.shape == (1, 37, 64)
    np.testing.assert_array_equal(posemb[:, 0], old[:, 0])
    log = caplog.text
    assert "Dropped the pre-logits" in log and "new (64, 10) head" in log and "(1, 17, 64) -> (1, 37, 64)" in log
    logits, features = _apply(params, kwargs, np.load(TF / "finetune" / "input.npy"), features=True)
    assert logits.shape == (4, 10) and features.shape == (4, 64)
    assert np.all(logits == 0) and np.all(np.isfinite(features)) and np.any(features != 0)


def test_finetune_fixture_loads_at_other_resolution_and_class_count():
    params, kwargs = load(TF / "finetune", num_heads=4, num_classes=5, image_size=64, head_bias_init=-10.0)
    assert params["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 65, 64)
    np.testing.assert_array_equal(params["head"]["bias"], np.full(5, -10.0))
    images = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
    logits = _apply(params, kwargs, images)
    np.testing.assert_array_equal(logits, np.full((2, 5), -10.0))


def test_keeping_prelogits_and_class_count_keeps_every_value():
    original, _ = load(NPZ / "params.npz")
    params, kwargs = load(NPZ / "params.npz", num_classes=10, rep_size=48, image_size=32)
    assert kwargs == FIXTURE_KWARGS
    for key, value in flatten_tree(original).items():
        np.testing.assert_array_equal(flatten_tree(params)[key], value)
    with pytest.raises(ValueError, match=r"rep_size=32 .*checkpoint's own size \(48\)"):
        load(NPZ / "params.npz", rep_size=32)


def test_resize_posemb_keeps_cls_slot_and_constant_fields():
    rng = np.random.default_rng(0)
    posemb = np.concatenate([rng.normal(size=(1, 1, 8)), np.full((1, 16, 8), 0.25)], axis=1)
    resized = resize_posemb(posemb, (6, 6), has_cls=True)
    assert resized.shape == (1, 37, 8)
    np.testing.assert_array_equal(resized[:, 0], posemb[:, 0])
    np.testing.assert_allclose(resized[:, 1:], 0.25, atol=1e-6)
    np.testing.assert_array_equal(resize_posemb(posemb, (4, 4), has_cls=True), posemb)
    ramp = np.arange(4.0)[None, :, None].repeat(4, 0).reshape(1, 16, 1)  # grows along columns
    up = resize_posemb(ramp, (4, 8), has_cls=False).reshape(4, 8)
    assert np.all(np.diff(up, axis=1) >= 0) and np.allclose(up[0], up[3])
    with pytest.raises(ValueError, match="not a square patch grid"):
        resize_posemb(posemb[:, :15], (6, 6), has_cls=True)


def test_missing_path_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "nope.npz")


def test_unknown_file_names_every_format_tried(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointFormatError) as err:
        load(junk)
    message = str(err.value)
    for name in ("orbax:", "coyo-vit TensorFlow:", ".npz (vit_jax / big_vision):"):
        assert name in message


def test_truncated_npz_and_damaged_tf_checkpoint_are_reported(tmp_path):
    data = (NPZ / "params.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match=r"\.npz \(vit_jax / big_vision\): \w+"):
        load(tmp_path / "cut.npz")
    damaged = tmp_path / "tf"
    shutil.copytree(TF / "pretrain", damaged)
    blob = damaged / "last_checkpoint.data-00000-of-00001"
    os.chmod(blob, 0o644)
    blob.write_bytes(blob.read_bytes()[:1000])
    with pytest.raises(CheckpointFormatError, match=r"coyo-vit TensorFlow: reading .* failed"):
        load(damaged, num_heads=4)


def test_missing_and_unexpected_parameters_are_errors():
    arrays = _npz_arrays()
    del arrays["Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias"]
    with pytest.raises(ValueError, match=r"lacks parameters the model needs: \['Transformer/encoderblock_1/Mlp"):
        _load_arrays(arrays)
    arrays = _npz_arrays()
    arrays["Transformer/encoderblock_0/LayerScale/scale"] = np.ones(64, np.float32)
    with pytest.raises(ValueError, match="does not use: .*LayerScale"):
        _load_arrays(arrays)


def test_shape_mismatch_names_parameters_and_both_shapes():
    with pytest.raises(ValueError) as err:
        load(NPZ / "params.npz", num_heads=8)
    assert ("Transformer/encoderblock_0/MultiHeadDotProductAttention_1/key/bias: "
            "checkpoint (4, 16) vs model (8, 8)") in str(err.value)
    with pytest.raises(ValueError, match=r"Transformer/encoder_norm/bias: checkpoint \(64,\) vs model \(192,\)"):
        load(NPZ / "params.npz", variant="Ti/8")
    with pytest.raises(TypeError, match="unknown overrides"):
        load(NPZ / "params.npz", num_class=3)


def _run_blocked(blocked: list[str], code: str) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter in which importing `blocked` modules fails."""
    prelude = f"import sys\nfor m in {blocked!r}: sys.modules[m] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_coyo_tf_loads_without_keras():
    code = (f"import numpy as np\nfrom checkpoints import load\nfrom coyo_vit.models import Model\n"
            f"p, kw = load({str(TF / 'pretrain')!r}, num_heads=4)\n"
            f"out = Model(**kw).apply({{'params': p}}, np.load({str(TF / 'pretrain' / 'input.npy')!r}))\n"
            f"print(float(np.abs(out - np.load({str(TF / 'pretrain' / 'logits.npy')!r})).max()))\n")
    result = _run_blocked(["keras", "tf_keras"], code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.split()[-1]) < TOL


def test_checkpoints_and_npz_import_work_without_tensorflow():
    code = (f"from checkpoints import load, CheckpointFormatError\n"
            f"p, kw = load({str(NPZ / 'params.npz')!r})\n"
            f"try:\n    load({str(TF / 'pretrain')!r}, num_heads=4)\n"
            f"except CheckpointFormatError as e:\n    print('ERR', e)\n"
            f"print('tensorflow' in sys.modules and sys.modules['tensorflow'] is not None)\n")
    result = _run_blocked(["tensorflow"], code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "TensorFlow is needed to read it and is not installed" in result.stdout
    assert result.stdout.split()[-1] == "False"
