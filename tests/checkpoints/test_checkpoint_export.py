"""checkpoints.export_npz / convert CLI: round trips through every layout, atomic writes."""
from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
import pytest
from flax.linen import meta

from checkpoints import export_npz, load, save_params
from checkpoints.convert import main as convert_main
from checkpoints.export import write_npz_atomically
from coyo_vit.models import Model
from tests.conftest import SHARED

NPZ = SHARED / "fixtures" / "vit_jax_npz"
TOL = 1e-4


@pytest.fixture(scope="module")
def fixture_model():
    params, kwargs = load(NPZ / "params.npz")
    return params, kwargs, np.load(NPZ / "input.npy"), np.load(NPZ / "logits.npy")


def _logits(params, kwargs, images):
    return np.asarray(Model(**kwargs).apply({"params": params}, images, train=False))


def _random_params(kwargs, images):
    """Every parameter non-zero (like the fixtures), without paying for Model.init."""
    shapes = jax.eval_shape(lambda x: Model(**kwargs).init(jax.random.PRNGKey(0), x), images)
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: rng.normal(0, 0.2, s.shape).astype(s.dtype), meta.unbox(shapes["params"]))


def _read(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def test_vit_jax_round_trip_reproduces_the_original_file(fixture_model, tmp_path):
    params, _, _, _ = fixture_model
    export_npz(params, tmp_path / "out.npz", layout="vit_jax")
    original, exported = _read(NPZ / "params.npz"), _read(tmp_path / "out.npz")
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
        assert exported[key].shape == value.shape and exported[key].dtype == value.dtype, key
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    assert os.listdir(tmp_path) == ["out.npz"]  # No temp file left behind.


def test_orbax_export_load_gives_the_same_logits(fixture_model, tmp_path):
    params, kwargs, images, want = fixture_model
    # Saved kwargs may name a variant and carry fields shapes cannot tell (dropout, dtype).
    save_params(str(tmp_path / "orbax"), params, dict(kwargs, variant="Ti/8", dropout=0.1))
    restored, restored_kwargs = load(tmp_path / "orbax")
    assert restored_kwargs == dict(kwargs, dropout=0.1)
    np.testing.assert_allclose(_logits(restored, restored_kwargs, images), want, atol=TOL, rtol=0)
    assert convert_main([str(tmp_path / "orbax"), str(tmp_path / "from_orbax.npz")]) == 0
    reloaded, reloaded_kwargs = load(tmp_path / "from_orbax.npz")
    assert reloaded_kwargs == kwargs
    np.testing.assert_allclose(_logits(reloaded, reloaded_kwargs, images), want, atol=TOL, rtol=0)


def test_convert_cli_npz_to_orbax(tmp_path, capsys):
    assert convert_main([str(NPZ / "params.npz"), str(tmp_path / "ckpt"), "--to", "orbax"]) == 0
    params, kwargs = load(tmp_path / "ckpt")
    np.testing.assert_allclose(_logits(params, kwargs, np.load(NPZ / "input.npy")),
                               np.load(NPZ / "logits.npy"), atol=TOL, rtol=0)
    # An existing destination is an error before anything is loaded; --overwrite replaces an .npz.
    assert convert_main([str(NPZ / "params.npz"), str(tmp_path / "ckpt"), "--to", "orbax"]) == 1
    assert "exists; choose a new directory" in capsys.readouterr().err
    (tmp_path / "old.npz").write_bytes(b"old")
    assert convert_main([str(NPZ / "params.npz"), str(tmp_path / "old.npz")]) == 1
    assert "pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "old.npz").read_bytes() == b"old"
    assert convert_main([str(NPZ / "params.npz"), str(tmp_path / "old.npz"), "--overwrite"]) == 0
    assert sorted(_read(tmp_path / "old.npz")) == sorted(_read(NPZ / "params.npz"))
    # Readable by others as any plain write would be (mkstemp alone made it owner-only).
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "old.npz").stat().st_mode & 0o777 == 0o666 & ~umask


def test_big_vision_layout_loop_and_scan_give_the_same_logits(fixture_model, tmp_path):
    params, kwargs, images, want = fixture_model
    assert convert_main([str(NPZ / "params.npz"), str(tmp_path / "bv.npz"), "--layout", "big_vision"]) == 0
    loop = _read(tmp_path / "bv.npz")
    assert loop["pos_embedding"].shape == (1, 16, 64)
    assert "Transformer/encoderblock_1/MultiHeadDotProductAttention_0/query/kernel" in loop
    assert "Transformer/encoderblock_1/MlpBlock_0/Dense_1/bias" in loop
    posemb = params["Transformer"]["posembed_input"]["pos_embedding"]
    np.testing.assert_allclose(loop["cls"], params["cls"] + posemb[:, :1])  # cls slot folded in
    loop_params, loop_kwargs = load(tmp_path / "bv.npz")
    np.testing.assert_allclose(_logits(loop_params, loop_kwargs, images), want, atol=TOL, rtol=0)

    scan_params, scan_kwargs = load(tmp_path / "bv.npz", scan=True)
    assert scan_kwargs == dict(kwargs, scan=True)
    export_npz(scan_params, tmp_path / "bv_scan.npz", layout="big_vision")
    stacked = _read(tmp_path / "bv_scan.npz")
    assert stacked["Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel"].shape == (2, 64, 4, 16)
    assert not any(k.startswith("Transformer/encoderblock_") for k in stacked)
    for wanted_scan in (True, False):
        got, got_kwargs = load(tmp_path / "bv_scan.npz", scan=wanted_scan)
        assert got_kwargs["scan"] is wanted_scan
        np.testing.assert_allclose(_logits(got, got_kwargs, images), want, atol=TOL, rtol=0)
    # vit_jax files are always per-layer, whatever the tree's layout.
    export_npz(scan_params, tmp_path / "vj.npz", layout="vit_jax")
    assert "Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel" in _read(tmp_path / "vj.npz")


@pytest.mark.parametrize("pool_type,posemb,scan", [("map", "learn", False), ("gap", "sincos2d", True)])
def test_big_vision_map_and_sincos_models_round_trip(pool_type, posemb, scan, tmp_path):
    kwargs = dict(num_classes=7, patch_size=8, width=32, depth=2, mlp_dim=64, num_heads=2,
                  pool_type=pool_type, rep_size=None, posemb=posemb, scan=scan)
    images = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    params = _random_params(kwargs, images)
    export_npz(params, tmp_path / "bv.npz", layout="big_vision")
    if pool_type == "map":
        assert "MAPHead_0/probe" in _read(tmp_path / "bv.npz")
    loaded, loaded_kwargs = load(tmp_path / "bv.npz")
    assert loaded_kwargs == kwargs
    np.testing.assert_allclose(_logits(loaded, loaded_kwargs, images),
                               _logits(params, kwargs, images), atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="layout='big_vision'"):
        export_npz(params, tmp_path / "vj.npz", layout="vit_jax")
    assert not (tmp_path / "vj.npz").exists()


def test_failed_write_leaves_the_old_file_and_no_temp_file(fixture_model, tmp_path):
    target = tmp_path / "model.npz"
    target.write_bytes(b"previous export")

    class FailsMidWrite:
        def __array__(self, dtype=None, copy=None):
            raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_npz_atomically({"a": np.ones(3), "b": FailsMidWrite()}, target)
    assert target.read_bytes() == b"previous export"
    assert os.listdir(tmp_path) == ["model.npz"]
    with pytest.raises(ValueError, match=r"Unknown .npz layout 'timm'; valid layouts: \['vit_jax', 'big_vision'\]"):
        export_npz(fixture_model[0], target, layout="timm")
    export_npz(fixture_model[0], target)
    assert sorted(_read(target)) == sorted(_read(NPZ / "params.npz"))
    assert os.listdir(tmp_path) == ["model.npz"]


def test_convert_carries_class_names_beside_or_inside_the_export(tmp_path, capsys):
    # Issue 19, item 9: names given once (or saved with a workdir) follow every export, where
    # predict finds them: beside an .npz, inside an orbax directory.
    from checkpoints.class_names_files import find_class_names  # late: only this test reads them

    names = [f"class {i}" for i in range(10)]  # the fixture's head has 10 classes
    (tmp_path / "names.txt").write_text("".join(f"{n}\n" for n in names))
    assert convert_main([str(NPZ / "params.npz"), str(tmp_path / "a.npz"),
                         "--class_names", str(tmp_path / "names.txt")]) == 0
    assert "with 10 class names" in capsys.readouterr().out
    assert (tmp_path / "a.class_names.txt").read_text() == (tmp_path / "names.txt").read_text()
    assert convert_main([str(tmp_path / "a.npz"), str(tmp_path / "orbax"), "--to", "orbax"]) == 0
    assert (tmp_path / "orbax" / "class_names.txt").is_file()
    assert convert_main([str(tmp_path / "orbax"), str(tmp_path / "b.npz"), "--layout", "big_vision"]) == 0
    assert find_class_names(tmp_path / "b.npz") == tuple(names)
    assert convert_main([str(NPZ / "params.npz"), str(tmp_path / "plain.npz")]) == 0
    assert find_class_names(tmp_path / "plain.npz") is None  # nothing to carry: no file
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    assert convert_main([str(NPZ / "params.npz"), str(tmp_path / "c.npz"),
                         "--class_names", str(tmp_path / "three.txt")]) == 1
    assert f"--class_names {tmp_path / 'three.txt'} lists 3 names; the head has 10 classes" in capsys.readouterr().err
    assert not (tmp_path / "c.npz").exists()
