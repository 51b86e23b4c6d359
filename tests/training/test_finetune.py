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


def test_a_missing_init_fails_before_anything_is_written(tmp_path):
    # It once failed only after the digits were written and config.json created in the workdir.
    workdir = tmp_path / "ft"
    result = subprocess.run(
        [sys.executable, str(REPO / "finetune.py"), "--config", f"{REPO / 'configs/demo_finetune.py'}:8",
         "--workdir", str(workdir), f"--config.init={tmp_path / 'no_such_run'}",
         "--config.schedule.warmup_steps=2"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert f"config.init '{tmp_path / 'no_such_run'}' does not exist" in result.stderr
    assert not workdir.exists()
