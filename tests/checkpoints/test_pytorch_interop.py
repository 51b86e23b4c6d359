"""transformers and timm: export folders they load, import folders they write, round trips.

Real libraries (torch on CPU, transformers, timm, safetensors: `pip install -e ".[torch]"`),
tiny models built here (width 32, depth 2, patch 8, 32px) and the shared fixtures; nothing is
downloaded. Max logit differences are printed (`pytest -s`) for the record.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax.linen import meta

from checkpoints import export_hf, export_timm, load
from checkpoints.convert import main as convert_main
from checkpoints.npz_layouts import flatten_tree
from coyo_vit.models import Model
from tests.conftest import REPO, SHARED

torch = pytest.importorskip("torch", reason='needs pip install -e ".[torch]"')
transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")

FIXTURES = SHARED / "fixtures"
TOL = 1e-4
TINY = dict(patch_size=8, width=32, depth=2, mlp_dim=64, num_heads=4, num_classes=5, attention_impl="xla")
torch.set_num_threads(2)


def _random_params(kwargs: dict, size: int = 32, seed: int = 0) -> dict:
    """Every parameter non-zero, without paying for Model.init."""
    shapes = jax.eval_shape(lambda x: Model(**kwargs).init(jax.random.PRNGKey(0), x),
                            jax.ShapeDtypeStruct((1, size, size, 3), np.float32))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32), meta.unbox(shapes["params"]))


def _pixels(n: int = 4, size: int = 32, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _ours(params, kwargs, images) -> np.ndarray:
    return np.asarray(Model(**kwargs).apply({"params": params}, images))


def _nchw(images: np.ndarray, mean, std) -> "torch.Tensor":
    """uint8 NHWC -> the float NCHW pixels timm's and transformers' processors make."""
    x = (images.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _record(what: str, diff: float) -> None:
    print(f"\nmax |logit diff| {what}: {diff:.3g}")


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _hf_load(folder: Path):
    """from_pretrained, failing on any missing / unexpected / mismatched weight and on any warning."""
    handler = _Records()
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()
    try:
        model, info = transformers.ViTForImageClassification.from_pretrained(folder, output_loading_info=True)
    finally:
        transformers.logging.set_verbosity(level)
        hf_logger.removeHandler(handler)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    bad = [m for m in handler.messages if any(w in m.lower() for w in ("missing", "unexpected", "not initialized",
                                                                       "newly initialized", "not used"))]
    assert not bad, bad
    return model.eval()


@pytest.fixture(scope="module")
def tok_model():
    kwargs = dict(TINY, pool_type="tok")
    return _random_params(kwargs), kwargs


# --- export --------------------------------------------------------------------------------

def test_hf_export_loads_cleanly_and_gives_our_logits(tok_model, tmp_path):
    params, kwargs = tok_model
    from checkpoints import save_params

    save_params(str(tmp_path / "ours"), params, kwargs)
    assert convert_main([str(tmp_path / "ours"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["hidden_act"] == "gelu_pytorch_tanh" and config["layer_norm_eps"] == 1e-6
    assert config["problem_type"] == "single_label_classification" and len(config["id2label"]) == 5
    model = _hf_load(tmp_path / "hf")
    images = _pixels()
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")
    pixel_values = processor(images=list(images), return_tensors="pt")["pixel_values"]
    np.testing.assert_allclose(pixel_values.numpy(), _nchw(images, [0.5] * 3, [0.5] * 3).numpy(), atol=1e-6)
    with torch.no_grad():
        theirs = model(pixel_values=pixel_values).logits.numpy()
    diff = float(np.abs(theirs - _ours(params, kwargs, images)).max())
    _record("hf export (ours -> transformers)", diff)
    assert diff < TOL


def test_hf_export_of_a_coyo_vit_checkpoint_reproduces_its_keras_logits(tmp_path):
    # The released best_checkpoint layout (tok, no pre-logits, 48px), through our importer.
    fixture = FIXTURES / "coyo_vit_tf" / "finetune"
    for fmt in ("hf", "timm"):
        assert convert_main([str(fixture / "last_checkpoint"), str(tmp_path / fmt), "--to", fmt,
                             "--num_heads", "4"]) == 0
    images = np.load(fixture / "input.npy")  # already in [-1, 1]
    pixel_values = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        hf = _hf_load(tmp_path / "hf")(pixel_values=pixel_values).logits.numpy()
        tm = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()(pixel_values).numpy()
    want = np.load(fixture / "logits.npy")
    for name, got in (("hf", hf), ("timm", tm)):
        diff = float(np.abs(got - want).max())
        _record(f"{name} export of coyo-vit TF fixture vs its Keras logits", diff)
        assert diff < TOL
    # predict's check on a real photo: the exported model's top-5 is ours.
    from matplotlib import cbook
    from PIL import Image

    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as photo:
        photo.convert("RGB").resize((48, 48), Image.BILINEAR).save(tmp_path / "photo.png")
    with Image.open(tmp_path / "photo.png") as photo:
        pixels = np.asarray(photo)[None]
        inputs = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")(photo, return_tensors="pt")
    params, kwargs = load(fixture / "last_checkpoint", num_heads=4)
    with torch.no_grad():
        hf_top5 = np.argsort(-_hf_load(tmp_path / "hf")(**inputs).logits.numpy()[0], kind="stable")[:5]
    ours_top5 = np.argsort(-_ours(params, dict(kwargs, attention_impl="xla"), pixels)[0], kind="stable")[:5]
    np.testing.assert_array_equal(hf_top5, ours_top5)


def test_hf_export_labels_and_problem_type(tmp_path):
    kwargs = dict(TINY, pool_type="tok", num_classes=21841)
    export_hf(_random_params(kwargs), tmp_path / "coyo", kwargs)
    config = json.loads((tmp_path / "coyo" / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"  # sigmoid head, like predict scores it
    assert config["id2label"]["2397"].startswith("tabby")
    kwargs = dict(TINY, pool_type="tok")
    export_hf(_random_params(kwargs), tmp_path / "named", kwargs, class_names=list("abcde"),
              problem_type="multi_label_classification")
    assert json.loads((tmp_path / "named" / "config.json").read_text())["id2label"] == dict(zip("01234", "abcde"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(pool_type="gap"), "classifies from the CLS token only and this model pools with pool_type='gap'"),
    (dict(pool_type="map"), "pool_type='map'; use --to timm"),
    (dict(pool_type="tok", rep_size=16), "no pre-logits layer"),
    (dict(pool_type="tok", posemb="sincos2d"), "posemb='sincos2d'"),
])
def test_hf_export_refuses_what_vit_cannot_express(kwargs, message, tmp_path):
    kwargs = dict(TINY, **kwargs)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        export_hf(_random_params(kwargs), tmp_path / "out", kwargs)
    assert not (tmp_path / "out").exists()


def test_convert_cli_gives_a_one_line_error_for_pre_logits(tmp_path, capsys):
    assert convert_main([str(FIXTURES / "vit_jax_npz" / "params.npz"), str(tmp_path / "hf"), "--to", "hf"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pre-logits" in err and "rep_size=48" in err


@pytest.mark.parametrize("pool", ["tok", "gap", "map"])
def test_timm_export_gives_our_logits(pool, tmp_path):
    kwargs = dict(TINY, pool_type=pool)
    params = _random_params(kwargs)
    export_timm(params, tmp_path / "timm", kwargs)
    model = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    cfg = model.pretrained_cfg
    images = _pixels()
    with torch.no_grad():
        theirs = model(_nchw(images, cfg["mean"], cfg["std"])).numpy()
    diff = float(np.abs(theirs - _ours(params, kwargs, images)).max())
    _record(f"timm export pool={pool} (ours -> timm)", diff)
    assert diff < TOL
    # The same folder read as the hub layout: VisionTransformer(**model_args) + strict state dict.
    config = json.loads((tmp_path / "timm" / "config.json").read_text())
    direct = timm.models.vision_transformer.VisionTransformer(**config["model_args"])
    direct.load_state_dict(safetensors_torch.load_file(tmp_path / "timm" / "model.safetensors"), strict=True)


def test_timm_export_refuses_pre_logits_and_other_eps(tmp_path):
    kwargs = dict(TINY, pool_type="tok", rep_size=16)
    with pytest.raises(ValueError, match="no pre-logits layer"):
        export_timm(_random_params(kwargs), tmp_path / "a", kwargs)
    kwargs = dict(TINY, pool_type="tok", layer_norm_eps=1e-12)
    with pytest.raises(ValueError, match="eps 1e-06 and this model 1e-12; use --to hf"):
        export_timm(_random_params(kwargs), tmp_path / "b", kwargs)


# --- round trips ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, pool", [("hf", "tok"), ("timm", "tok"), ("timm", "gap"), ("timm", "map")])
def test_round_trip_gives_identical_parameters(fmt, pool, tmp_path):
    kwargs = dict(TINY, pool_type=pool, gelu_approximate=(pool != "gap"))
    params = _random_params(kwargs)
    (export_hf if fmt == "hf" else export_timm)(params, tmp_path / fmt, kwargs)
    back, back_kwargs = load(tmp_path / fmt)
    original, loaded = flatten_tree(params), flatten_tree(back)
    assert sorted(original) == sorted(loaded)
    for key, value in original.items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)
    assert {k: back_kwargs[k] for k in kwargs if k != "attention_impl"} == \
        {k: v for k, v in kwargs.items() if k != "attention_impl"}


# --- import --------------------------------------------------------------------------------

def _hf_tiny(**config_overrides):
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                    image_size=32, patch_size=8, num_labels=5, **config_overrides)
    model = transformers.ViTForImageClassification(config).eval()
    with torch.no_grad():  # Random non-zero values everywhere (init leaves biases at zero).
        for tensor in model.state_dict().values():
            tensor.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("naming", ["transformers5", "transformers4"])
def test_hf_import_gives_the_torch_logits(naming, tmp_path):
    # google/vit-* defaults: exact GELU, eps 1e-12; ImageNet mean/std to exercise the pixel fold.
    model = _hf_tiny()
    folder = tmp_path / "hub"
    model.save_pretrained(folder)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    transformers.ViTImageProcessor(image_mean=mean, image_std=std, size={"height": 32, "width": 32}
                                   ).save_pretrained(folder)
    names = sorted(safetensors_torch.load_file(folder / "model.safetensors"))
    # save_pretrained writes transformers 4 names (as on the hub); the modules have 5's.
    assert "vit.encoder.layer.0.attention.attention.query.weight" in names
    if naming == "transformers5":
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        assert "vit.layers.0.attention.q_proj.weight" in state
        safetensors_torch.save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    params, kwargs = load(folder)  # the folder, as downloaded
    assert kwargs["gelu_approximate"] is False and kwargs["layer_norm_eps"] == 1e-12
    images = _pixels()
    with torch.no_grad():
        theirs = model(pixel_values=_nchw(images, mean, std)).logits.numpy()
    diff = float(np.abs(theirs - _ours(params, dict(kwargs, attention_impl="xla"), images)).max())
    _record(f"hf import {naming} naming (transformers -> ours)", diff)
    assert diff < TOL
    params_file, _ = load(folder / "model.safetensors")  # or just its weights file
    np.testing.assert_array_equal(flatten_tree(params_file)["head/kernel"], flatten_tree(params)["head/kernel"])


def test_hf_import_of_a_vit_model_pooler_is_the_pre_logits_layer(tmp_path):
    torch.manual_seed(1)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                    image_size=32, patch_size=8, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    model = transformers.ViTModel(config).eval()
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.normal_(0, 0.3)
    model.save_pretrained(tmp_path / "in21k")
    params, kwargs = load(tmp_path / "in21k")
    assert kwargs["rep_size"] == 32 and kwargs["num_classes"] is None and kwargs["gelu_approximate"] is True
    images = _pixels()
    with torch.no_grad():
        theirs = model(pixel_values=_nchw(images, [0.5] * 3, [0.5] * 3)).pooler_output.numpy()
    diff = float(np.abs(theirs - _ours(params, dict(kwargs, attention_impl="xla"), images)).max())
    _record("hf import ViTModel pooler output (transformers -> ours features)", diff)
    assert diff < TOL


def _timm_tiny(tmp_path: Path, **model_args) -> tuple:
    """A timm ViT saved the way the hub holds timm weights: config.json without model_args."""
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=5,
                **model_args)
    model = timm.models.vision_transformer.VisionTransformer(**args).eval()
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.normal_(0, 0.3)
    folder = tmp_path / "timm_hub"
    folder.mkdir()
    safetensors_torch.save_file(model.state_dict(), folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({
        "architecture": "vit_base_patch16_224", "num_classes": 5, "num_features": 32,
        "global_pool": args.get("global_pool", "token"),
        "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 0.9}}))
    return model, folder


def test_timm_import_gives_the_torch_logits(tmp_path):
    model, folder = _timm_tiny(tmp_path)
    with pytest.raises(ValueError, match="num_heads= or variant="):  # width 32 is no standard ViT
        load(folder)
    params, kwargs = load(folder, num_heads=4)
    assert kwargs["gelu_approximate"] is False and kwargs["pool_type"] == "tok"
    images = _pixels()
    with torch.no_grad():
        theirs = model(_nchw(images, [0.5] * 3, [0.5] * 3)).numpy()
    diff = float(np.abs(theirs - _ours(params, dict(kwargs, attention_impl="xla"), images)).max())
    _record("timm import tok (timm -> ours)", diff)
    assert diff < TOL


def test_timm_import_refuses_norm_after_pooling(tmp_path):
    _, folder = _timm_tiny(tmp_path, global_pool="avg", class_token=False)  # timm's default fc_norm
    with pytest.raises(ValueError, match="normalises after pooling"):
        load(folder, num_heads=4)


def test_fine_tuning_an_hf_checkpoint_replaces_head_and_resizes_posemb(tmp_path):
    _hf_tiny().save_pretrained(tmp_path / "hub")
    params, kwargs = load(tmp_path / "hub", num_classes=3, image_size=48)
    flat = flatten_tree(params)
    assert flat["head/kernel"].shape == (32, 3) and not flat["head/kernel"].any()
    assert flat["Transformer/posembed_input/pos_embedding"].shape == (1, 37, 32)
    logits = _ours(params, dict(kwargs, attention_impl="xla"), _pixels(size=48))
    assert logits.shape == (4, 3)


def test_a_missing_safetensors_package_is_a_one_line_error(tok_model, tmp_path):
    params, kwargs = tok_model
    from checkpoints import export_npz

    export_npz(params, tmp_path / "tiny.npz")  # no TensorFlow needed to read it back
    code = ("import sys; sys.modules['safetensors'] = None\n"  # as if the extra were not installed
            "from checkpoints.convert import main\n"
            f"sys.exit(main([{str(tmp_path / 'tiny.npz')!r}, {str(tmp_path / 'out')!r}, '--to', 'timm', "
            "'--num_heads', '4']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == 'error: the PyTorch formats need the safetensors package: pip install -e ".[torch]"'


def test_config_init_from_an_hf_checkpoint_needs_its_gelu_and_eps(tmp_path):
    # transformers' ViTs use the exact GELU and LayerNorm eps 1e-12: fine-tuning one with our
    # defaults would silently change its function, so the loop names both keys instead.
    from configs import finetune
    from coyo_vit.training import loop, run_config

    _hf_tiny().save_pretrained(tmp_path / "hub")
    config = finetune.get_config(f"folder={tmp_path / 'digits'},classes=3,res=32,batch=8,steps=10,warmup=2")
    with config.unlocked():
        config.init = str(tmp_path / "hub")
        config.model.update(variant=None, patch_size=8, width=32, depth=2, mlp_dim=64, num_heads=4,
                            dtype="float32")
    parsed = run_config.parse(config, str(tmp_path / "run"))
    with pytest.raises(ValueError, match=r"gelu_approximate checkpoint=False config=True, "
                                         r"layer_norm_eps checkpoint=1e-12 config=1e-06"):
        loop._init_params(parsed, parsed.model)
    with config.unlocked():
        config.model.update(gelu_approximate=False, layer_norm_eps=1e-12)
    parsed = run_config.parse(config, str(tmp_path / "run"))
    params = loop._init_params(parsed, parsed.model)
    assert flatten_tree(params)["head/kernel"].shape == (32, 3)
