"""The train and eval steps' per-platform XLA options (coyo_vit/training/step.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coyo_vit.models import Model
from coyo_vit.training import sharding
from coyo_vit.training.evaluators.holdout import make_eval_step
from coyo_vit.training.step import _BY_PLATFORM, compiler_options_for_platform, get_loss
from tests.training import test_train_step


def test_options_per_platform_and_xla_flags_win():
    assert compiler_options_for_platform("gpu", "") == {"xla_gpu_enable_triton_gemm": False}
    assert compiler_options_for_platform("cpu", "") == {"xla_backend_optimization_level": 1}
    assert compiler_options_for_platform("tpu", "") is None
    # A flag in XLA_FLAGS, with or without a value, leaves ours out; other flags do not.
    assert compiler_options_for_platform("gpu", "--xla_gpu_enable_triton_gemm=true") is None
    assert compiler_options_for_platform("gpu", "--xla_dump_to=/tmp/x --xla_gpu_enable_triton_gemm") is None
    assert compiler_options_for_platform("gpu", "--xla_dump_to=/tmp/x") == {"xla_gpu_enable_triton_gemm": False}
    assert compiler_options_for_platform("cpu", "--xla_backend_optimization_level=3") is None
    # As in XLA, flags end at the first token without a dash.
    assert compiler_options_for_platform("gpu", "--xla_dump_to=/tmp/a b --xla_gpu_enable_triton_gemm=true") \
        == {"xla_gpu_enable_triton_gemm": False}
    assert compiler_options_for_platform("gpu", "--xla_dump_to='/tmp/a b' --xla_gpu_enable_triton_gemm=1") is None


def test_xla_flags_naming_a_file_are_read_from_it(tmp_path):
    # XLA_FLAGS without a leading dash is a file of flags (XLA's own rule).
    flags_file = tmp_path / "flags"
    flags_file.write_text("--xla_gpu_enable_triton_gemm=true\n--xla_dump_to=/tmp/x\n")
    assert compiler_options_for_platform("gpu", str(flags_file)) is None
    flags_file.write_text("--xla_dump_to=/tmp/x\n")
    assert compiler_options_for_platform("gpu", str(flags_file)) == {"xla_gpu_enable_triton_gemm": False}
    # Unreadable: XLA's flags decide alone.
    assert compiler_options_for_platform("gpu", str(tmp_path / "missing")) is None


def test_environment_is_read_when_no_flags_are_given(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2 --xla_gpu_enable_triton_gemm=true")
    assert compiler_options_for_platform("gpu") is None
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    assert compiler_options_for_platform("gpu") == {"xla_gpu_enable_triton_gemm": False}


@pytest.mark.parametrize("platform", ["cpu", "gpu"])
def test_every_option_is_one_xla_knows(platform):
    # XLA rejects a misspelt option ("No such compile option"); the GPU ones must be real names
    # even though this CPU ignores them.
    options = compiler_options_for_platform(platform, "")
    square = jax.jit(lambda x: x @ x, compiler_options=options)
    assert float(square(jnp.eye(2)).sum()) == 2.0
    with pytest.raises(Exception, match="No such compile option"):
        jax.jit(lambda x: x @ x, compiler_options={"xla_gpu_enable_trition_gemm": False})(jnp.eye(2))


def test_train_and_eval_steps_are_compiled_with_them(monkeypatch, tmp_path, no_compilation_cache):
    # An option that leaves a trace on disk (an HLO dump) shows that each step gets the options.
    model = Model(num_classes=50, **test_train_step.TINY)
    mesh = sharding.make_mesh({"data": -1}, jax.devices()[:1])
    batch_sharding = sharding.batch_sharding(mesh)
    train_dump, eval_dump = tmp_path / "train", tmp_path / "eval"
    monkeypatch.setitem(_BY_PLATFORM, "cpu", {"xla_dump_to": str(train_dump)})
    state, _ = test_train_step._run_steps(jax.devices()[:1], steps=1)
    assert any("step" in p.name for p in train_dump.iterdir())

    monkeypatch.setitem(_BY_PLATFORM, "cpu", {"xla_dump_to": str(eval_dump)})
    params_shardings = jax.tree.map(lambda _: sharding.replicated(mesh), state.params)
    eval_step = make_eval_step(model, get_loss("sigmoid_xent"), params_shardings, batch_sharding)
    batch = {**test_train_step._batch(), "_mask": np.ones(8, bool)}
    with jax.set_mesh(mesh):
        sums = eval_step(state.params, batch)
    assert float(sums["count"]) == 8
    assert any("step" in p.name for p in eval_dump.iterdir())
