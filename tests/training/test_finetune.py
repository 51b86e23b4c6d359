"""finetune.py end to end: a coyo-vit TensorFlow checkpoint fine-tuned at a new resolution and
class count on a real (small) TFDS imagenet2012, with EMA, top-1 and ImageNet-ReaL evaluators."""
import json
import subprocess
import sys

import pytest

from checkpoints.orbax_io import CHECKPOINT_SUBDIR
from tests.conftest import REPO, SHARED
from tests.input_pipeline.test_classification_data import VAL_LABELS, VAL_NAMES, write_imagenet2012


def test_finetune_tf_checkpoint_new_resolution_and_classes(tmp_path):
    data_dir = tmp_path / "tfds"
    data_dir.mkdir()
    # A learnable task: 10 training images, each its own class, seen repeatedly.
    write_imagenet2012(data_dir, VAL_NAMES, VAL_LABELS, list(range(10)))
    workdir = tmp_path / "ft"
    result = subprocess.run(
        [sys.executable, str(REPO / "finetune.py"), "--config",
         f"{REPO / 'tests/finetune_tiny_config.py'}:{data_dir}", "--workdir", str(workdir)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Initialised from" in result.stderr
    assert "Replaced head" in result.stderr  # 100 -> 1000 classes, logged by checkpoints.load

    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert losses[-1] < 0.5 * losses[0]  # the new head and the encoder learn the task
    val = [r for r in records if "val/top1" in r]
    real = [r for r in records if "real/top1" in r]
    assert [r["step"] for r in val] == [15, 30] and [r["step"] for r in real] == [30]
    assert 0.0 <= real[-1]["real/top1"] <= 1.0

    meta = json.load(open(workdir / CHECKPOINT_SUBDIR / "30" / "meta" / "metadata"))
    assert meta["model"]["num_classes"] == 1000
    # TFDS imagenet2012's label names are WordNet ids: the run saves the shipped 1k names.
    names = (workdir / "class_names.txt").read_text().splitlines()
    assert len(names) == 1000 and names[0] == "tench, Tinca tinca"
    state_items = {p.name for p in (workdir / CHECKPOINT_SUBDIR / "30" / "state").iterdir()}
    assert state_items  # written; the EMA weights are part of the state (restore_params prefers them)

    # evaluate.py on the finished workdir sees the EMA weights the loop evaluated at step 30,
    # with the config's speed options (tokens padded once to 10 here: the same values).
    output = tmp_path / "eval.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "evaluate.py"), "--config",
         f"{REPO / 'tests/finetune_tiny_config.py'}:{data_dir}", "--checkpoint", str(workdir),
         "--evals", "val,real", "--output", str(output), "--config.model.attention_pad_multiple=10"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "speed options {'attention_impl': 'auto', 'attention_pad_multiple': 10" in result.stderr
    evaluated = json.load(open(output))
    assert evaluated["checkpoint"] == str(workdir) and set(evaluated["seconds"]) == {"val", "real"}
    for name in ("val/top1", "val/top5", "real/top1"):
        assert abs(evaluated["results"][name] - [r for r in records if name in r][-1][name]) < 1e-6, name
    assert "val/top1" in result.stdout  # the printed table


def test_fine_tuning_init_with_another_position_embedding_is_named():
    # A learned-posemb checkpoint into a sincos2d model once failed deep inside init_state with a
    # pytree-structure error that never said why.
    import ml_collections

    from coyo_vit.models import Model
    from coyo_vit.training.loop import _init_params

    fixture = SHARED / "fixtures" / "coyo_vit_tf" / "pretrain"
    kwargs = dict(patch_size=8, width=64, depth=2, mlp_dim=128, num_heads=4, pool_type="tok",
                  rep_size=None)
    config = ml_collections.ConfigDict(dict(init=str(fixture), num_classes=1000, image_size=48))
    assert _init_params(config, Model(num_classes=1000, **kwargs)) is not None
    with pytest.raises(ValueError, match="posemb checkpoint=learn config=sincos2d"):
        _init_params(config, Model(num_classes=1000, posemb="sincos2d", **kwargs))


NPZ = SHARED / "fixtures" / "vit_jax_npz" / "params.npz"  # width 64, depth 2, 4 heads, patch 8
TF_PRETRAIN = SHARED / "fixtures" / "coyo_vit_tf" / "pretrain"  # the same sizes; heads not stored


def _finetune(tmp_path, *overrides):
    return subprocess.run(
        [sys.executable, str(REPO / "finetune.py"), "--config",
         f"configs/finetune.py:folder={tmp_path / 'no_images'},classes=3,res=32,steps=2,batch=4,warmup=1",
         "--workdir", str(tmp_path / "ft"), *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=120)


def test_finetune_config_takes_the_model_shape_from_the_checkpoint(tmp_path):
    # configs/finetune.py assumed B/16: a width-64 checkpoint needed a hand-written config. With
    # variant="auto" only --config.init is needed; the run builds the model, loads the checkpoint
    # into it, and stops at the image folder, which this test does not write.
    result = _finetune(tmp_path, f"--config.init={NPZ}")
    assert ("config.model.variant='auto': the shape of " f"{NPZ}: {{'patch_size': 8, 'width': 64, "
            "'depth': 2, 'mlp_dim': 128, 'num_heads': 4, 'pool_type': 'tok', 'posemb': 'learn', "
            "'rep_size': None}") in result.stderr, result.stderr[-3000:]
    # The checks that come before any work then find the image folder missing (loading the
    # checkpoint into the resolved model: test_auto_variant_resolves_against_the_checkpoint_...).
    assert "no_images' is not a directory" in result.stderr.splitlines()[-1], result.stderr[-3000:]


def test_tf_checkpoint_of_a_nonstandard_width_names_the_head_count_key(tmp_path):
    # Was: "num_heads=12 does not divide the checkpoint's width 64", from inside the loop.
    result = _finetune(tmp_path, f"--config.init={TF_PRETRAIN}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1] == (
        f"error: config.init '{TF_PRETRAIN}' does not record its attention head count and its "
        "width 64 is not a standard ViT's: set --config.model.num_heads (a divisor of 64; "
        "standard ViTs have 64 channels per head)")
    assert "Traceback" not in result.stderr


def test_auto_variant_resolves_against_the_checkpoint_and_loads_it():
    import ml_collections

    from configs import finetune
    from coyo_vit.config_keys import ConfigError
    from coyo_vit.models import Model
    from coyo_vit.training.loop import _init_params
    from coyo_vit.training.run_config import resolve_model

    model = finetune.get_config("dataset=cifar10,classes=3").model.to_dict()
    for init, overrides in ((NPZ, {}), (TF_PRETRAIN, {"num_heads": 4}),
                            (NPZ, {"rep_size": True, "dropout": 0.1})):
        kwargs = resolve_model({**model, **overrides}, str(init), 3)
        assert kwargs["width"] == 64 and kwargs["variant"] is None and kwargs["num_heads"] == 4
        assert kwargs["rep_size"] == (48 if overrides.get("rep_size") else None)
        run_cfg = ml_collections.ConfigDict(dict(init=str(init), num_classes=3, image_size=48))
        assert _init_params(run_cfg, Model(num_classes=3, **kwargs)) is not None
    with pytest.raises(ConfigError, match=r"checkpoint: patch 8, width 64, depth 2, mlp_dim 128, "
                                          r"heads 4; config: B/16 \(patch 16, width 768, depth 12, "
                                          r"mlp_dim 3072, heads 12\)"):
        resolve_model({**model, "variant": "B/16"}, str(NPZ), 3)
    with pytest.raises(ConfigError, match=r"checkpoint: width 64; config: width 96"):
        resolve_model({**model, "width": 96, "num_heads": 4}, str(TF_PRETRAIN), 3)
    with pytest.raises(ConfigError, match="config.model.variant='auto' takes the model's shape "
                                          "from config.init, which is unset"):
        resolve_model(model, None, 3)


def test_a_missing_init_fails_before_anything_is_written(tmp_path):
    # It once failed only after the digits were written and config.json created in the workdir.
    workdir = tmp_path / "ft"
    result = subprocess.run(
        [sys.executable, str(REPO / "finetune.py"), "--config", f"{REPO / 'configs/demo_finetune.py'}:8",
         "--workdir", str(workdir), f"--config.init={tmp_path / 'no_such_run'}",
         "--config.schedule.warmup_steps=2"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    last = result.stderr.splitlines()[-1]
    assert "does not exist" in last and str(tmp_path / "no_such_run") in last, result.stderr[-2000:]
    assert not workdir.exists()
