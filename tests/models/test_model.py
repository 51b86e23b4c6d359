"""Tests for the ViT model: sizes, parameter layout, numerics against vit_jax, transforms."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util
from flax.linen import meta

from coyo_vit.models import VARIANTS, Model, count_params, decode_variant, layers
from coyo_vit.models.layers import padded_dot_product_attention
from coyo_vit.models.vit import REMAT_POLICIES, posemb_sincos_2d
from tests.conftest import SHARED

VIT_JAX_NPZ = SHARED / "fixtures" / "vit_jax_npz"

TINY = dict(patch_size=8, width=32, depth=2, mlp_dim=64, num_heads=4)


def tiny(**overrides) -> Model:
    return Model(**{"num_classes": 5, **TINY, **overrides})


def images(batch: int = 2, size: int = 16, seed: int = 0) -> jnp.ndarray:
    return jax.random.uniform(jax.random.key(seed), (batch, size, size, 3), minval=-1.0, maxval=1.0)


def param_shapes(model: Model, x: jnp.ndarray):
    """Boxed parameter tree of ShapeDtypeStructs: the model's real init, traced but not compiled."""
    return jax.eval_shape(model.init, jax.random.key(0), x)["params"]


def random_params(model: Model, x: jnp.ndarray, seed: int = 0, boxed: bool = False):
    """Every parameter random and non-zero (so no branch hides behind a zero init).

    Compiling the real random init costs ~10 s per model on a 2-core CPU; these tests need
    values, not the init distribution, which test_initialisation_follows_the_recipe checks.
    """
    rng = np.random.default_rng(seed)
    shapes = param_shapes(model, x)
    params = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.normal(0.0, 0.2, s.shape), jnp.float32), shapes)
    return params if boxed else meta.unbox(params)


def flat(tree) -> dict:
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(meta.unbox(tree)).items()}


def load_vit_jax_fixture():
    arrays = np.load(VIT_JAX_NPZ / "params.npz")
    params = traverse_util.unflatten_dict({tuple(k.split("/")): arrays[k] for k in arrays.files})
    return params, np.load(VIT_JAX_NPZ / "input.npy"), np.load(VIT_JAX_NPZ / "logits.npy")


VIT_JAX_FIXTURE_MODEL = dict(num_classes=10, patch_size=8, width=64, depth=2, mlp_dim=128,
                             num_heads=4, rep_size=48)


# ---------------------------------------------------------------- sizes

@pytest.mark.parametrize("kwargs, resolution, expected", [
    (dict(variant="B/16", num_classes=1000), 224, 86_567_656),
    (dict(variant="L/16", num_classes=1000), 384, 304_715_752),
    (dict(variant="L/16", num_classes=21_841, rep_size=1024), 224, 326_738_257),
    (dict(variant="Ti/16", num_classes=1000, pool_type="gap"), 224, 5_717_032),
])
def test_parameter_counts_match_vit_jax_reference(kwargs, resolution, expected):
    for scan in (False, True):
        shapes = jax.eval_shape(
            lambda: Model(**kwargs, scan=scan).init(jax.random.key(0), jnp.zeros((1, resolution, resolution, 3))))
        assert count_params(shapes["params"]) == expected, (kwargs, scan)


def test_decode_variant_merges_name_and_patch():
    assert decode_variant("L/14") == dict(width=1024, depth=24, mlp_dim=4096, num_heads=16, patch_size=14)
    assert decode_variant("g/14")["width"] == 1408
    assert set(VARIANTS) == {"Ti", "S", "M", "B", "L", "H", "g", "G"}


def test_explicit_sizes_override_variant():
    dims = Model(variant="B/16", depth=3, patch_size=32).dims
    assert (dims.width, dims.depth, dims.patch_size, dims.num_heads) == (768, 3, 32, 12)


# ---------------------------------------------------------------- layout and numerics

def test_reproduces_vit_jax_logits_from_its_npz():
    """The released vit_jax layout loads by name alone and gives that model's logits."""
    params, x, expected = load_vit_jax_fixture()
    model = Model(**VIT_JAX_FIXTURE_MODEL)
    ours = param_shapes(model, x)
    assert {k: v.shape for k, v in flat(ours).items()} == \
        {k: v.shape for k, v in flat(params).items()}
    logits, features = model.apply({"params": params}, x, return_features=True)
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    # Features are the pre-logits output: the head alone maps them to the logits.
    np.testing.assert_allclose(features @ params["head"]["kernel"] + params["head"]["bias"], logits, atol=1e-5)
    assert features.shape == (4, 48)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    params, x, expected = load_vit_jax_fixture()
    model = Model(**VIT_JAX_FIXTURE_MODEL, dtype="bfloat16")
    fresh = param_shapes(model, x)
    assert {v.dtype for v in flat(fresh).values()} == {jnp.dtype(jnp.float32)}
    logits, features = model.apply({"params": params}, x, return_features=True)
    assert logits.dtype == jnp.float32 and features.dtype == jnp.float32
    error = np.abs(np.asarray(logits) - expected).max()
    assert 0 < error < 0.05  # bf16 really ran (not exact) and stays close to the f32 reference


@pytest.mark.parametrize("pool_type", ["tok", "gap", "map"])
@pytest.mark.parametrize("scan", [False, True])
def test_output_shapes(pool_type, scan):
    model = tiny(pool_type=pool_type, scan=scan, rep_size=24)
    x = images(batch=3)
    params = random_params(model, x)
    logits, features = model.apply({"params": params}, x, return_features=True)
    assert logits.shape == (3, 5) and features.shape == (3, 24)
    assert ("cls" in params) == (pool_type == "tok")
    assert ("MAPHead_0" in params) == (pool_type == "map")
    tokens = 4 + (pool_type == "tok")
    assert flat(params)["Transformer/posembed_input/pos_embedding"].shape == (1, tokens, 32)


def test_scan_layout_stacks_layers():
    model = tiny(scan=True)
    params = flat(param_shapes(model, images()))
    assert params["Transformer/encoderblock/MultiHeadDotProductAttention_1/query/kernel"].shape == (2, 32, 4, 8)
    assert params["Transformer/encoderblock/MlpBlock_3/Dense_0/kernel"].shape == (2, 32, 64)
    assert not any("encoderblock_" in k for k in params)


@pytest.mark.parametrize("pool_type", ["tok", "map"])
def test_scan_and_loop_agree_for_the_same_weights(pool_type):
    x = images()
    loop = tiny(pool_type=pool_type, rep_size=True)
    loop_params = random_params(loop, x)
    encoder = dict(loop_params["Transformer"])
    blocks = [encoder.pop(f"encoderblock_{i}") for i in range(2)]
    encoder["encoderblock"] = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *blocks)
    scan_params = {**loop_params, "Transformer": encoder}
    expected = loop.apply({"params": loop_params}, x)
    got = tiny(pool_type=pool_type, rep_size=True, scan=True).apply({"params": scan_params}, x)
    np.testing.assert_allclose(got, expected, atol=1e-5)


# Every policy goes through the same wiring; two per layout keep the compile count down.
@pytest.mark.parametrize("scan, policies", [
    (False, ["full", "dots_with_no_batch_dims_saveable"]),
    (True, ["dots_saveable"]),
])
def test_remat_policies_match_no_remat(scan, policies):
    x = images()
    params = random_params(tiny(scan=scan), x)

    def loss_and_grads(policy):
        model = tiny(scan=scan, remat_policy=policy)
        loss = lambda p: jnp.sum(model.apply({"params": p}, x) ** 2)
        # The remat really happens: the traced model holds a remat/checkpoint primitive.
        has_remat = re.search(r"= (remat|checkpoint)", str(jax.make_jaxpr(loss)(params))) is not None
        assert has_remat == (policy != "none"), policy
        return jax.jit(jax.value_and_grad(loss))(params)

    ref_loss, ref_grads = loss_and_grads("none")
    assert float(jnp.abs(ref_grads["embedding"]["kernel"]).max()) > 0
    for policy in policies:
        loss, grads = loss_and_grads(policy)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, ref_grads)


def test_remat_policy_names_map_to_jax_policies():
    assert REMAT_POLICIES["none"] is None
    assert REMAT_POLICIES["full"] is REMAT_POLICIES["nothing_saveable"] is jax.checkpoint_policies.nothing_saveable
    for name in ("dots_saveable", "dots_with_no_batch_dims_saveable", "everything_saveable"):
        assert REMAT_POLICIES[name] is getattr(jax.checkpoint_policies, name)


def test_initialisation_follows_the_recipe():
    """One real init: constant head (the recipe's -10 bias), zero cls, xavier attention fans."""
    model = tiny(head_kernel_init=0.5, head_bias_init=-10.0, rep_size=16)
    x = images()
    nested = model.init(jax.random.key(0), x)["params"]
    params = flat(nested)
    assert {v.dtype for v in params.values()} == {jnp.dtype(jnp.float32)}
    np.testing.assert_array_equal(params["head/bias"], np.full((5,), -10.0))
    np.testing.assert_array_equal(params["head/kernel"], np.full((16, 5), 0.5))
    logits, features = model.apply({"params": nested}, x, return_features=True)
    np.testing.assert_allclose(logits, 0.5 * features.sum(-1, keepdims=True) - 10.0 + np.zeros((2, 5)), atol=1e-5)
    np.testing.assert_array_equal(params["cls"], np.zeros((1, 1, 32)))
    assert 0.015 < float(params["Transformer/posembed_input/pos_embedding"].std()) < 0.025
    # xavier_uniform over the flattened heads: limit sqrt(6 / (D + H*D/H)) = sqrt(6 / 64).
    for name in ("query", "out"):
        kernel = np.abs(params[f"Transformer/encoderblock_0/MultiHeadDotProductAttention_1/{name}/kernel"])
        assert np.sqrt(6 / 64) * 0.9 < kernel.max() <= np.sqrt(6 / 64)
    default = Model(variant="Ti/16")
    assert default.head_kernel_init == 0.0 and default.head_bias_init == 0.0


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("regulariser", [dict(dropout=0.3), dict(stoch_depth=0.5)])
def test_dropout_and_stoch_depth_act_only_in_training(scan, regulariser):
    x = images(batch=8)
    plain = tiny(scan=scan)
    params = random_params(plain, x)
    model = tiny(scan=scan, **regulariser)
    reference = plain.apply({"params": params}, x)
    np.testing.assert_array_equal(model.apply({"params": params}, x, train=False), reference)
    train_a = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(1)})
    train_b = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(train_a, reference)
    assert not np.allclose(train_a, train_b)


def test_training_without_regularisers_needs_no_rng():
    x = images()
    model = tiny()
    params = random_params(model, x)
    np.testing.assert_array_equal(model.apply({"params": params}, x, train=True), model.apply({"params": params}, x))


def test_stoch_depth_rate_starts_at_zero_for_the_first_block():
    """Linear schedule (timm/big_vision): a one-block model has rate 0, whatever stoch_depth is."""
    x = images(batch=8)
    model = tiny(depth=1, stoch_depth=0.9)
    params = random_params(model, x)
    trained = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(3)})
    np.testing.assert_allclose(trained, model.apply({"params": params}, x), atol=1e-6)


def test_sincos2d_has_no_position_parameter_but_encodes_position():
    x = images()
    model = tiny(posemb="sincos2d", pool_type="gap")
    params = flat(param_shapes(model, x))
    assert not any("posembed_input" in k for k in params)
    assert not any("pos_embedding" in k for k in params)
    # Patches are position-aware: swapping two patches of the image changes the pooled output.
    swapped = x.at[:, :8, :8].set(x[:, 8:, 8:]).at[:, 8:, 8:].set(x[:, :8, :8])
    values = random_params(model, x)
    features = lambda imgs: model.apply({"params": values}, imgs, return_features=True)[1]
    assert not np.allclose(features(x), features(swapped), atol=1e-4)
    table = np.asarray(posemb_sincos_2d(2, 3, 8))
    assert table.shape == (1, 6, 8)
    np.testing.assert_allclose(table[0, 0], [0, 0, 1, 1, 0, 0, 1, 1], atol=1e-7)  # sin 0, cos 0
    np.testing.assert_allclose(table[0, 1, 0], np.sin(1.0))  # column 1, highest frequency


def test_headless_model_returns_features():
    x = images()
    model = tiny(num_classes=0, rep_size=12)
    params = random_params(model, x)
    assert "head" not in params
    features = model.apply({"params": params}, x)
    assert features.shape == (2, 12)
    np.testing.assert_array_equal(model.apply({"params": params}, x, return_features=True)[1], features)
    headless = tiny(num_classes=None)
    assert headless.apply({"params": random_params(headless, x)}, x).shape == (2, 32)


# ---------------------------------------------------------------- sharding metadata

def test_logical_axis_metadata_on_every_parameter():
    boxed = param_shapes(tiny(pool_type="map", rep_size=16), images())
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(leaf, nn.LogicallyPartitioned) for leaf in leaves)
    block = boxed["Transformer"]["encoderblock_0"]
    assert block["MultiHeadDotProductAttention_1"]["query"]["kernel"].names == ("embed", "heads", "kv")
    assert block["MultiHeadDotProductAttention_1"]["out"]["kernel"].names == ("heads", "kv", "embed")
    assert block["MlpBlock_3"]["Dense_0"]["kernel"].names == ("embed", "mlp")
    assert boxed["embedding"]["kernel"].names == ("patch_h", "patch_w", "channels", "embed")
    assert boxed["head"]["kernel"].names == ("rep", "classes")
    assert boxed["Transformer"]["posembed_input"]["pos_embedding"].names == (None, "length", "embed")

    scanned = param_shapes(tiny(scan=True), images())
    query = scanned["Transformer"]["encoderblock"]["MultiHeadDotProductAttention_1"]["query"]["kernel"]
    assert query.names == ("layers", "embed", "heads", "kv")


def test_boxed_and_plain_params_give_the_same_output():
    x = images()
    model = tiny()
    boxed = random_params(model, x, boxed=True)
    assert isinstance(boxed["head"]["kernel"], nn.LogicallyPartitioned)
    np.testing.assert_array_equal(model.apply({"params": boxed}, x), model.apply({"params": meta.unbox(boxed)}, x))


@pytest.mark.parametrize("scan", [False, True])
def test_runs_under_a_global_mesh_with_logical_rules(scan):
    """Under jax.set_mesh the boxes turn into sharding constraints; shapes and names must agree."""
    x = images()
    model = tiny(scan=scan, pool_type="map")
    boxed = random_params(model, x, boxed=True)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    rules = (("batch", "data"), ("mlp", "model"), ("heads", "model"), ("layers", None), ("embed", None))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        jax.eval_shape(model.init, jax.random.key(0), x)  # traces every initializer under the mesh
        specs = nn.get_partition_spec(boxed)
        sharded = jax.jit(lambda p, im: model.apply({"params": p}, im))(boxed, x)
    stacked = ("layers",) if scan else ()
    block = specs["Transformer"]["encoderblock" if scan else "encoderblock_0"]
    assert block["MlpBlock_3"]["Dense_0"]["kernel"] == jax.sharding.PartitionSpec(*stacked, "embed", "mlp")
    np.testing.assert_allclose(sharded, model.apply({"params": meta.unbox(boxed)}, x), atol=1e-5)


@pytest.mark.parametrize("pool_type", ["tok", "map"])
def test_auto_attention_is_xla_off_gpu(pool_type):
    # "auto" (the default) picks cuDNN only on GPUs; on this CPU it must be XLA's attention, exactly.
    assert Model.attention_impl == "auto"
    x = images()
    params = random_params(tiny(pool_type=pool_type), x)
    np.testing.assert_array_equal(tiny(pool_type=pool_type, attention_impl="xla").apply({"params": params}, x),
                                  tiny(pool_type=pool_type).apply({"params": params}, x))


@pytest.mark.parametrize("q_len, multiple", [(197, 64), (197, 2), (1, 64), (64, 64)])
def test_padded_attention_equals_unpadded_with_gradients(q_len, multiple):
    # The path cuDNN runs on GPUs (sequences padded, padded keys masked), checked through XLA's
    # implementation of the same masking: outputs and all three input gradients unchanged.
    rng = np.random.default_rng(q_len)
    q = jnp.asarray(rng.standard_normal((2, q_len, 3, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, 197 if q_len != 64 else 64, 3, 8)), jnp.float32)
            for _ in range(2))
    cotangent = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def loss(attention):
        return lambda *qkv: (attention(*qkv) * cotangent).sum()

    # Compiled whole: op by op, each first use of an op compiles on its own (seconds per test).
    plain = jax.jit(jax.value_and_grad(loss(jax.nn.dot_product_attention), argnums=(0, 1, 2)))(q, k, v)
    padded = jax.jit(jax.value_and_grad(
        loss(lambda *qkv: padded_dot_product_attention(*qkv, multiple, "xla")), argnums=(0, 1, 2)))(q, k, v)
    # A sum of ~10k terms near 1 that nearly cancel: compiled, its order varies by a few 1e-6.
    np.testing.assert_allclose(padded[0], plain[0], rtol=1e-5, atol=1e-4)
    for got, want in zip(padded[1], plain[1]):
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("pool_type, scan, multiple", [
    ("tok", False, 2), ("map", True, 2), ("gap", False, 64), ("tok", True, 64)])
def test_padding_the_sequence_once_changes_no_output_or_gradient(pool_type, scan, multiple):
    # The tiny model has 16/8 squared + 1 = 5 tokens: padded once to 6 (or 64), the extra tokens
    # are masked as keys in every block and dropped before pooling.
    x = images()
    plain = tiny(pool_type=pool_type, scan=scan, attention_impl="xla")
    padded = tiny(pool_type=pool_type, scan=scan, attention_impl="xla", attention_pad_multiple=multiple)
    params = random_params(plain, x)

    def loss(model):
        return lambda p: (model.apply({"params": p}, x) ** 2).sum()

    want, want_grads = jax.jit(jax.value_and_grad(loss(plain)))(params)
    got, got_grads = jax.jit(jax.value_and_grad(loss(padded)))(params)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for (path, g), w in zip(flat(got_grads).items(), flat(want_grads).values()):
        np.testing.assert_allclose(g, w, atol=1e-5, err_msg=path)


@pytest.mark.parametrize("scan, remat", [(False, "none"), (True, "none"), (False, "full")])
def test_gelu_recompute_keeps_parameters_values_and_gradients(scan, remat):
    # The byte-saving GELU (on by default) against the plain one: same parameter tree, so the
    # same checkpoints load, and the same loss and gradients, under scan and remat too.
    x = images()
    plain = tiny(scan=scan, remat_policy=remat, attention_impl="xla", gelu_recompute=False)
    params = random_params(plain, x)

    def loss_and_grads(model):
        loss = lambda p: (model.apply({"params": p}, x) ** 2).sum()
        return jax.jit(jax.value_and_grad(loss))(params)

    want, want_grads = loss_and_grads(plain)
    model = tiny(scan=scan, remat_policy=remat, attention_impl="xla", gelu_recompute=True)
    assert flat(param_shapes(model, x)).keys() == flat(param_shapes(plain, x)).keys()
    got, got_grads = loss_and_grads(model)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for (path, g), w in zip(flat(got_grads).items(), flat(want_grads).values()):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=path)


def test_gelu_recompute_keeps_only_the_input_for_the_backward_pass():
    # What it is for: autodiff's backward pass of tanh-GELU reads a saved tanh; the custom VJP
    # keeps x alone, so the saved residuals lose one array of x's shape.
    x = jnp.linspace(-4.0, 4.0, 24, dtype=jnp.float32).reshape(4, 6)
    # The pullback jax.vjp returns is a pytree whose leaves are exactly the saved residuals.
    shapes = {name: [leaf.shape for leaf in jax.tree_util.tree_leaves(jax.vjp(fn, x)[1])]
              for name, fn in (("autodiff", layers.gelu),
                               ("recompute", layers.gelu_recomputed))}
    assert shapes["recompute"] == [(4, 6)], shapes
    assert shapes["autodiff"].count((4, 6)) > 1, shapes
    # ... and XLA really computes tanh again in the backward pass of an MLP, planning fewer
    # temporary bytes (without the optimization barrier its CSE pass merged the two tanh and the
    # plan was the same as autodiff's).
    h, w1, w2 = (jnp.ones(shape) for shape in ((256, 64), (64, 256), (256, 64)))
    compiled = {}
    for name, act in (("autodiff", layers.gelu), ("recompute", layers.gelu_recomputed)):
        loss = lambda *args, act=act: ((act(args[0] @ args[1]) @ args[2]) ** 2).sum()
        compiled[name] = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(h, w1, w2).compile()
    assert len(re.findall(r"\btanh\(", compiled["recompute"].as_text())) == 2
    temp = {name: c.memory_analysis().temp_size_in_bytes for name, c in compiled.items()}
    assert temp["recompute"] < temp["autodiff"], temp
    np.testing.assert_array_equal(layers.gelu_recomputed(x), nn.gelu(x))
    np.testing.assert_array_equal(jax.grad(lambda v: layers.gelu_recomputed(v).sum())(x),
                                  jax.grad(lambda v: nn.gelu(v).sum())(x))


def _refusing_cudnn(calls: list):
    """A stand-in for jax's cuDNN attention on this GPU-less machine, refusing as jax 0.11.2 did
    on an H100: the inference call accepts any length, the training (forward-for-VJP) rule
    refuses odd ones. Inside, it computes XLA's attention, so results can be compared."""
    real = jax.nn.dot_product_attention

    def xla(q, k, v, lengths):
        return real(q, k, v, key_value_seq_lengths=lengths, implementation="xla")

    @jax.custom_vjp
    def attention(q, k, v, lengths):
        calls.append(("inference", q.shape[1]))
        return xla(q, k, v, lengths)

    def forward_for_training(q, k, v, lengths):
        calls.append(("training", q.shape[1]))
        if q.shape[1] % 2 or k.shape[1] % 2:
            raise NotImplementedError(f"Unsupported sequence length Q {q.shape[1]}, KV {k.shape[1]}.")
        out, pullback = jax.vjp(lambda *qkv: xla(*qkv, lengths), q, k, v)
        return out, pullback

    attention.defvjp(forward_for_training, lambda pullback, g: (*pullback(g), None))

    def dispatch(q, k, v, *, key_value_seq_lengths=None, implementation=None):
        if implementation != "cudnn":
            return real(q, k, v, key_value_seq_lengths=key_value_seq_lengths, implementation=implementation)
        lengths = key_value_seq_lengths
        if lengths is None:
            lengths = jnp.full((q.shape[0],), k.shape[1], jnp.int32)
        return attention(q, k, v, lengths)
    return dispatch


@pytest.mark.parametrize("scan, remat", [(False, "none"), (True, "none"), (False, "full")])
def test_auto_attention_falls_back_when_cudnn_refuses_training_shapes(monkeypatch, scan, remat):
    # Under nn.scan or remat the training rule would only run when the step is differentiated,
    # outside the fallback; `auto` runs it up front. Padded once to 7 tokens (refused), it must
    # retry at 8 tokens (an even length, accepted) and train exactly like XLA's attention.
    calls: list = []
    monkeypatch.setattr(jax.nn, "dot_product_attention", _refusing_cudnn(calls))
    monkeypatch.setattr(layers, "cudnn_attention_is_default", lambda: True)
    x = images()
    auto = tiny(scan=scan, remat_policy=remat, attention_pad_multiple=7)
    xla = tiny(scan=scan, remat_policy=remat, attention_impl="xla")
    params = random_params(xla, x)

    def grads(model):
        return jax.jit(jax.grad(lambda p: (model.apply({"params": p}, x, train=True) ** 2).sum()))(params)

    got = grads(auto)
    assert ("training", 7) in calls and ("training", 8) in calls and ("training", 64) not in calls
    for (path, g), w in zip(flat(got).items(), flat(grads(xla)).values()):
        np.testing.assert_allclose(g, w, atol=1e-5, err_msg=path)
    with pytest.raises(NotImplementedError, match="Q 7"):  # asked for cuDNN alone: the refusal shows
        jax.eval_shape(lambda q: jax.vjp(lambda q: padded_dot_product_attention(
            q, q, q, 7, "cudnn"), q)[0], jnp.zeros((1, 5, 2, 8)))


def test_cudnn_refusing_every_length_raises_its_first_refusal_or_falls_back(monkeypatch):
    real = jax.nn.dot_product_attention

    def refusing(q, k, v, *, key_value_seq_lengths=None, implementation=None):
        if implementation == "cudnn":
            raise NotImplementedError(f"Unsupported sequence length Q {q.shape[1]}")
        return real(q, k, v, key_value_seq_lengths=key_value_seq_lengths, implementation=implementation)

    monkeypatch.setattr(jax.nn, "dot_product_attention", refusing)
    monkeypatch.setattr(layers, "cudnn_attention_is_default", lambda: True)
    q = jax.random.normal(jax.random.key(0), (2, 5, 2, 8))
    with pytest.raises(NotImplementedError, match=r"Q 5\b"):  # the shapes as given, not a padding
        layers.attend(q, q, q, "cudnn")
    np.testing.assert_allclose(layers.attend(q, q, q, "auto"),
                               real(q, q, q, implementation="xla"), rtol=1e-6)


def test_on_a_cudnn_gpu_16bit_models_pad_their_tokens_once_to_an_even_length(monkeypatch):
    # Where cuDNN attention runs, the model pads 5 tokens to 6 before the blocks (so no block
    # pads q/k/v); float32 (cuDNN's fused kernel has none), XLA attention, CPUs and an explicit
    # attention_pad_multiple=1 keep the sequence as it is.
    monkeypatch.setattr(layers, "cudnn_attention_is_default", lambda: False)
    assert tiny(dtype="bfloat16").token_pad_multiple is None  # a CPU or TPU: XLA's attention
    monkeypatch.setattr(layers, "cudnn_attention_is_default", lambda: True)
    assert tiny(dtype="bfloat16").token_pad_multiple == 2
    assert tiny(dtype="bfloat16", attention_impl="cudnn").token_pad_multiple == 2
    assert tiny(dtype="float32").token_pad_multiple is None
    assert tiny(dtype="bfloat16", attention_impl="xla").token_pad_multiple is None
    assert tiny(dtype="bfloat16", attention_pad_multiple=1).token_pad_multiple == 1

    calls: list = []
    monkeypatch.setattr(jax.nn, "dot_product_attention", _refusing_cudnn(calls))
    x = images()
    model = tiny(dtype="bfloat16")
    params = random_params(model, x)
    jax.jit(jax.grad(lambda p: model.apply({"params": p}, x, train=True).astype(jnp.float32).sum()))(params)
    assert calls and {length for _, length in calls} == {6}


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs, message", [
    (dict(variant="X/16"), "'X/16'"),
    (dict(variant="B16"), "'Ti'"),
    (dict(variant="B/16", pool_type="cls"), "'map'"),
    (dict(variant="B/16", remat_policy="sometimes"), "'dots_saveable'"),
    (dict(variant="B/16", posemb="rope"), "'sincos2d'"),
    (dict(variant="B/16", attention_impl="flash"), "'cudnn'"),
    (dict(variant="B/16", attention_pad_multiple=0), "attention_pad_multiple"),
    (dict(variant="B/16", dropout=1.0), "dropout"),
    (dict(variant="B/16", gelu_recompute=1), "gelu_recompute"),
    (dict(variant="B/16", rep_size=-3), "rep_size"),
    (dict(width=64, depth=2, mlp_dim=128, num_heads=4), "patch_size"),
    (dict(variant="B/16", num_heads=5), "num_heads=5"),
])
def test_bad_configuration_is_rejected_with_the_valid_choices(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Model(**kwargs)


def test_image_size_must_be_a_multiple_of_the_patch():
    with pytest.raises(ValueError, match="patch_size=8"):
        tiny().init(jax.random.key(0), jnp.zeros((1, 20, 20, 3)))


CONFIGS = (("coyo_pretrain", None), ("demo", None), ("demo_finetune", None),
           ("finetune", "folder=/data/flowers,classes=102"), ("imagenet_finetune", None))


def _concrete(model: dict, num_classes: int, shared_fixtures) -> dict:
    """A config's model section as Model kwargs: variant='auto' takes a real checkpoint's shape."""
    if model.get("variant") != "auto":
        return dict(model)
    from coyo_vit.training.run_config import resolve_model  # late: the runtime, for 'auto' only

    return resolve_model(dict(model), str(shared_fixtures / "vit_jax_npz" / "params.npz"), num_classes)


def test_every_config_lists_every_model_field_at_the_model_defaults_but_what_it_changes(shared_fixtures):
    # So `--config.model.<field>=...` works for every recipe (rep_size and the other None
    # defaults too), evaluate.py can take the speed options, and a config spells out only what
    # it changes from the model's defaults.
    import dataclasses
    import importlib

    from configs import common
    from coyo_vit.models import SPEED_OPTIONS
    settable = {f.name for f in dataclasses.fields(Model)} - {"num_classes", "parent", "name"}
    assert set(SPEED_OPTIONS) <= settable
    defaults = common.model_config()
    assert set(defaults) == settable
    for field in dataclasses.fields(Model):
        if field.name in settable:
            assert defaults[field.name] == field.default, field.name
    for name, arg in CONFIGS:
        config = importlib.import_module(f"configs.{name}").get_config(arg)
        assert set(config.model) == settable, name
        # Valid as it stands (with variant='auto', once given a checkpoint's shape).
        Model(num_classes=config.num_classes, **_concrete(config.model, config.num_classes, shared_fixtures))
    with pytest.raises(ValueError, match="Did you mean 'rep_size'"):
        common.model_config(repsize=8)


def test_model_fields_can_be_set_on_the_command_line(shared_fixtures):
    # The documented overrides, and fields whose default is None (typed placeholders).
    from absl import flags
    from ml_collections import config_flags

    argv = ["prog", "--config=configs/finetune.py:dataset=cifar10,classes=10",
            "--config.model.attention_impl=xla", "--config.model.remat_policy=dots_saveable",
            "--config.model.rep_size=48", "--config.model.attention_pad_multiple=4",
            "--config.model.gelu_recompute=false", "--config.model.dtype=float32"]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)  # reads overrides from argv
    values(argv)
    num_classes = values.config.num_classes
    model = Model(num_classes=num_classes, **_concrete(values.config.model.to_dict(), num_classes,
                                                       shared_fixtures))
    assert (model.attention_impl, model.remat_policy, model.rep_size, model.attention_pad_multiple,
            model.gelu_recompute, model.dtype) == ("xla", "dots_saveable", 48, 4, False, "float32")
