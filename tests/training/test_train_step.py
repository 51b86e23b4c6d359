"""The jit-compiled train step, sharding set-up, optimizer and losses (no TensorFlow)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from coyo_vit.models import Model
from coyo_vit.training import optimizer, sharding
from coyo_vit.training.evaluators.holdout import make_eval_step
from coyo_vit.training.step import (
    compiler_options_for_platform,
    get_loss,
    init_state,
    make_train_step,
    sigmoid_xent,
    softmax_xent,
    state_shardings,
)

TINY = dict(patch_size=8, width=32, depth=2, mlp_dim=64, num_heads=4, pool_type="tok", rep_size=16,
            head_bias_init=-10.0)
OPT = dict(name="adamw", b1=0.9, b2=0.999, eps=1e-7, weight_decay=0.1, decay_pattern=r".*/kernel",
           grad_clip_norm=1.0)
SCHED = dict(base_lr=1e-3, end_lr=1e-5, warmup_steps=2, decay="linear")


def _batch(n=8, classes=50, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.uniform(-1, 1, (n, 16, 16, 3)).astype(np.float32),
            "labels": (rng.uniform(size=(n, classes)) > 0.9).astype(np.float32)}


def _run_steps(devices, *, steps=3, accum=1, mesh_axes=None, model_kwargs=TINY):
    model = Model(num_classes=50, **model_kwargs)
    schedule = optimizer.make_schedule(SCHED, 10)
    tx = optimizer.make_optimizer(OPT, schedule)
    mesh = sharding.make_mesh(mesh_axes or {"data": -1}, devices)
    rules = sharding.DEFAULT_RULES
    with nn.logical_axis_rules(rules):
        _, shardings = state_shardings(model, tx, (16, 16, 3), mesh, rules)
    state = init_state(model, tx, (16, 16, 3), 0, shardings)
    step = make_train_step(model, tx, get_loss("sigmoid_xent"), shardings,
                           sharding.batch_sharding(mesh), schedule, grad_accum_steps=accum)
    history = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        for i in range(steps):
            batch = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in _batch(seed=i).items()}
            state, metrics = step(state, batch)
            history.append(jax.device_get(metrics))
    return jax.device_get(state), history


@functools.cache
def _unsharded(steps: int):
    """The plain one-device run that the sharded and accumulated runs are compared with: the
    same for each comparison, so it is trained once per length (each run traces and compiles)."""
    return _run_steps(jax.devices()[:1], steps=steps)


def test_two_devices_equal_one_device():
    assert jax.device_count() >= 2, "conftest should provide 2 host devices"
    one, hist1 = _unsharded(3)
    two, hist2 = _run_steps(jax.devices()[:2])
    assert int(one.step) == int(two.step) == 3
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params)):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose([h["train/loss"] for h in hist1], [h["train/loss"] for h in hist2], rtol=1e-5)


@pytest.mark.parametrize("mesh_axes", [{"data": 1, "fsdp": 2}, {"data": 1, "model": 2}],
                         ids=["fsdp", "tensor_parallel"])
def test_fsdp_and_tensor_parallel_axes_match_unsharded(mesh_axes):
    ref, _ = _unsharded(2)
    sharded, _ = _run_steps(jax.devices()[:2], steps=2, mesh_axes=mesh_axes)
    for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(sharded.params)):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5)


def test_gradient_accumulation_equals_full_batch():
    full, _ = _unsharded(2)  # accum=1
    accum, _ = _run_steps(jax.devices()[:1], steps=2, accum=2)
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(accum.params)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_loss_falls_on_a_repeated_batch():
    model = Model(num_classes=50, **TINY)
    schedule = optimizer.make_schedule(dict(base_lr=1e-2, warmup_steps=0, decay="constant"), 30)
    tx = optimizer.make_optimizer(OPT, schedule)
    mesh = sharding.make_mesh({"data": -1}, jax.devices()[:1])
    _, shardings = state_shardings(model, tx, (16, 16, 3), mesh, sharding.DEFAULT_RULES)
    state = init_state(model, tx, (16, 16, 3), 0, shardings)
    step = make_train_step(model, tx, sigmoid_xent, shardings, sharding.batch_sharding(mesh), schedule)
    batch = _batch()
    first = None
    for _ in range(30):
        state, metrics = step(state, batch)
        first = first if first is not None else float(metrics["train/loss"])
    assert float(metrics["train/loss"]) < 0.7 * first


def test_state_shardings_follow_logical_rules():
    model = Model(num_classes=50, **TINY)
    tx = optimizer.make_optimizer(OPT, optimizer.make_schedule(SCHED, 10))
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2}, jax.devices()[:2])
    abstract, shardings = state_shardings(model, tx, (16, 16, 3), mesh, sharding.DEFAULT_RULES)
    q = shardings.params["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_1"]["query"]["kernel"]
    assert q.spec[0] == "fsdp"  # "embed" -> fsdp
    mu = shardings.opt_state[1][0].mu["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_1"]["query"]["kernel"]
    assert mu.spec == q.spec  # Adam moments follow their parameter
    assert sharding.bytes_per_device(abstract) < sharding.bytes_per_device(jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract))


def test_mesh_and_batch_errors_name_the_numbers():
    mesh = sharding.make_mesh({"data": -1}, jax.devices()[:2])
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "model": 1}
    with pytest.raises(ValueError, match=r"Batch size 7 .* 2 data-parallel"):
        sharding.check_batch_size(7, mesh, 1)
    with pytest.raises(ValueError, match="needs 4 devices"):
        sharding.make_mesh({"data": 4}, jax.devices()[:2])
    with pytest.raises(ValueError, match="Unknown mesh axes"):
        sharding.make_mesh({"tensor": 2})
    # The `model` axis over two processes (simulated: these two devices as one process of two)
    # would have each process feed its own rows to devices that must share them.
    tensor_parallel = sharding.make_mesh({"data": 1, "model": 2}, jax.devices()[:2])
    assert sharding.check_batch_size(8, tensor_parallel, 1) == 8
    with pytest.raises(ValueError, match="devices 8 of the 8 batch rows, but each of the 2 "
                                         "processes feeds 4"):
        sharding.check_batch_size(8, tensor_parallel, 2)


def test_schedule_shape_and_decay_mask():
    schedule = optimizer.make_schedule(dict(base_lr=6e-4, end_lr=1e-5, warmup_steps=10, decay="linear"), 110)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(3e-4)
    assert float(schedule(10)) == pytest.approx(6e-4)
    assert float(schedule(110)) == pytest.approx(1e-5)
    mask = optimizer.decay_mask(r".*/kernel")({"head": {"kernel": 1, "bias": 2}, "cls": 3})
    assert mask == {"head": {"kernel": True, "bias": False}, "cls": False}
    with pytest.raises(ValueError, match=r"unknown keys \['weight_decy'\] \(did you mean weight_decay\?\)"):
        optimizer.make_optimizer(dict(name="adamw", weight_decy=0.1), schedule)
    with pytest.raises(ValueError, match="Unknown optimizer 'adam'"):
        optimizer.make_optimizer(dict(name="adam"), schedule)


def test_sigmoid_loss_is_summed_over_classes():
    logits = jnp.zeros((2, 4))
    targets = jnp.array([[1.0, 0, 0, 0], [0, 0, 0, 0]])
    per_example = sigmoid_xent(logits, targets)
    np.testing.assert_allclose(per_example, [4 * np.log(2)] * 2, rtol=1e-6)
    np.testing.assert_allclose(softmax_xent(logits, jnp.eye(4)[:2]), [np.log(4)] * 2, rtol=1e-6)
    with pytest.raises(ValueError, match="Unknown loss"):
        get_loss("focal")


def test_regex_param_rules_fsdp_auto_and_explicit_placements():
    model = Model(num_classes=50, **TINY)
    tx = optimizer.make_optimizer(OPT, optimizer.make_schedule(SCHED, 10))
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2}, jax.devices()[:2])
    rules = (("batch", sharding.BATCH_AXES),)  # logical rules place nothing on fsdp here
    param_rules = [(r"head/kernel", ["fsdp", None]), (r"pre_logits/.*", "replicated"),
                   (r".*", "fsdp_auto:1000")]
    _, shardings = state_shardings(model, tx, (16, 16, 3), mesh, rules, param_rules)
    p = shardings.params
    assert p["head"]["kernel"].spec == jax.sharding.PartitionSpec("fsdp", None)
    assert p["pre_logits"]["kernel"].spec == jax.sharding.PartitionSpec()
    mlp = p["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_0"]["kernel"]  # (32, 64): largest dim
    assert mlp.spec == jax.sharding.PartitionSpec(None, "fsdp")
    bias = p["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_0"]["bias"]  # 64 < 1000: too small
    assert "fsdp" not in tuple(bias.spec)
    # Adam moments follow their parameter through optax.tree_map_params.
    assert shardings.opt_state[1][0].mu["head"]["kernel"].spec == p["head"]["kernel"].spec
    with pytest.raises(ValueError, match="Bad placement 'diagonal'"):
        state_shardings(model, tx, (16, 16, 3), mesh, rules, [(".*", "diagonal")])


def test_cpu_compile_options_keep_results_bitwise():
    """The steps' CPU-only LLVM level 1 (faster compiles) must not change a single bit: compare
    three train steps and an eval step against the same programs compiled at XLA's default level
    2, scanned and unrolled."""
    schedule = optimizer.make_schedule(SCHED, 10)
    tx = optimizer.make_optimizer(OPT, schedule)
    mesh = sharding.make_mesh({"data": -1}, jax.devices()[:1])
    rules = sharding.DEFAULT_RULES
    for scan in (False, True):
        model = Model(num_classes=50, **dict(TINY, scan=scan))
        with nn.logical_axis_rules(rules):
            _, shardings = state_shardings(model, tx, (16, 16, 3), mesh, rules)
        step = make_train_step(model, tx, get_loss("sigmoid_xent"), shardings,
                               sharding.batch_sharding(mesh), schedule)
        results = []
        # Named explicitly: the suite's own XLA_FLAGS (tests/conftest.py) would leave ours out.
        for options in (compiler_options_for_platform("cpu", ""), {"xla_backend_optimization_level": 2}):
            state = init_state(model, tx, (16, 16, 3), 0, shardings)
            with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
                batches = [{k: jax.device_put(v, sharding.batch_sharding(mesh))
                            for k, v in _batch(seed=i).items()} for i in range(3)]
                compiled = step.lower(state, batches[0]).compile(compiler_options=options)
                for batch in batches:
                    state, metrics = compiled(state, batch)
                eval_step = make_eval_step(model, get_loss("sigmoid_xent"), shardings.params,
                                           sharding.batch_sharding(mesh))
                eval_batch = {**batches[0], "_mask": jnp.ones(8, bool)}
                sums = eval_step.lower(state.params, eval_batch).compile(compiler_options=options)(
                    state.params, eval_batch)
            results.append(jax.device_get((state.params, state.opt_state, metrics, sums)))
        for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
            np.testing.assert_array_equal(a, b)


def test_tokens_padded_once_train_the_same_under_data_and_model_sharding():
    # What GPUs do by default for cuDNN (5 tokens padded to 6, the extra one masked through
    # key_value_seq_lengths laid out like the batch), here through XLA's attention on two host
    # devices: the same losses and parameters as the unpadded model on one device.
    ref, ref_hist = _unsharded(2)
    for mesh_axes in ({"data": 2}, {"data": 1, "model": 2}):
        padded, hist = _run_steps(jax.devices()[:2], steps=2, mesh_axes=mesh_axes,
                                  model_kwargs=dict(TINY, attention_impl="xla", attention_pad_multiple=2))
        np.testing.assert_allclose([h["train/loss"] for h in hist], [h["train/loss"] for h in ref_hist],
                                   rtol=1e-5, err_msg=str(mesh_axes))
        for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(padded.params)):
            np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5, err_msg=str(mesh_axes))


def test_gelu_recompute_trains_the_same_under_model_sharding():
    # The byte-saving GELU with the heads split over two devices ("model" axis): losses and
    # parameters match the plain GELU on one device.
    ref, ref_hist = _run_steps(jax.devices()[:1], steps=2, model_kwargs=dict(TINY, gelu_recompute=False))
    got, hist = _run_steps(jax.devices()[:2], steps=2, mesh_axes={"data": 1, "model": 2},
                           model_kwargs=dict(TINY, gelu_recompute=True))
    np.testing.assert_allclose([h["train/loss"] for h in hist], [h["train/loss"] for h in ref_hist],
                               rtol=1e-5)
    for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(got.params)):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5)


def test_skip_nonfinite_keeps_the_state_of_bad_steps_and_never_gives_up():
    # 12 poisoned steps in a row (more than optax.apply_if_finite's 10 before it applies a NaN
    # update), then good ones: the poisoned steps change nothing but the step counter, the good
    # ones train, and the optimizer state has the same layout as without the option.
    model = Model(num_classes=50, **TINY)
    schedule = optimizer.make_schedule(SCHED, 20)
    tx = optimizer.make_optimizer(dict(OPT, skip_nonfinite=True), schedule)
    plain_tx = optimizer.make_optimizer(OPT, schedule)
    mesh = sharding.make_mesh({"data": -1}, jax.devices()[:1])
    abstract, shardings = state_shardings(model, tx, (16, 16, 3), mesh, sharding.DEFAULT_RULES)
    plain_abstract, _ = state_shardings(model, plain_tx, (16, 16, 3), mesh, sharding.DEFAULT_RULES)
    assert jax.tree.structure(abstract) == jax.tree.structure(plain_abstract)
    state = init_state(model, tx, (16, 16, 3), 0, shardings)
    # Copies: on the CPU device_get may alias buffers that the donating step then overwrites.
    snapshot = lambda s: jax.tree.map(np.array, jax.device_get(s))
    start = snapshot(state)
    step = make_train_step(model, tx, sigmoid_xent, shardings, sharding.batch_sharding(mesh),
                           schedule, skip_nonfinite=True)
    poisoned = _batch()
    poisoned["image"][0, 0, 0, 0] = np.nan
    for _ in range(12):
        state, metrics = step(state, poisoned)
        assert not np.isfinite(float(metrics["train/loss"]))
        assert float(metrics["train/skipped_nonfinite"]) == 1.0
    after_bad = snapshot(state)
    assert int(after_bad.step) == 12
    adam, _, schedule_state = after_bad.opt_state[1]  # clip, then adamw's (adam, decay, schedule)
    assert int(schedule_state.count) == 12 and int(adam.count) == 0  # only the lr schedule goes on
    is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
    for a, b in zip(jax.tree.leaves((start.params, start.opt_state), is_leaf=is_schedule),
                    jax.tree.leaves((after_bad.params, after_bad.opt_state), is_leaf=is_schedule)):
        if not is_schedule(a):
            np.testing.assert_array_equal(a, b)
    state, metrics = step(state, _batch())
    assert float(metrics["train/skipped_nonfinite"]) == 0.0 and np.isfinite(float(metrics["train/param_norm"]))
    trained = snapshot(state)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after_bad.params),
                                                         jax.tree.leaves(trained.params)))
    with pytest.raises(ValueError, match="skip_nonfinite must be True or False"):
        optimizer.make_optimizer(dict(OPT, skip_nonfinite="yes"), schedule)
