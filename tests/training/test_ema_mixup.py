"""EMA of parameters against a plain numpy reference; mixup's defining properties."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coyo_vit.training import sharding
from coyo_vit.training.step import ema_decay, ema_update, init_ema, mixup, mixup_batch


def _params(rng: np.random.Generator) -> dict:
    return {"dense": {"kernel": rng.normal(size=(3, 4)).astype(np.float32),
                      "bias": rng.normal(size=(4,)).astype(np.float32)}}


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_matches_numpy_reference(warmup):
    rng = np.random.default_rng(0)
    trajectory = [_params(rng) for _ in range(30)]
    decay = 0.9
    update = jax.jit(lambda e, p, s: ema_update(e, p, decay, s, warmup=warmup))
    ema = init_ema(trajectory[0])
    reference = jax.tree.map(np.copy, trajectory[0])
    for step, params in enumerate(trajectory[1:]):
        ema = update(ema, params, jnp.int32(step))
        d = min(decay, (1 + step) / (10 + step)) if warmup else decay
        reference = jax.tree.map(lambda r, p: d * r + (1 - d) * p, reference, params)
    for got, want in zip(jax.tree.leaves(ema), jax.tree.leaves(reference)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_ema_decay_warms_up_then_caps():
    assert float(ema_decay(0.9999, 0)) == pytest.approx(0.1)           # (1 + 0) / (10 + 0)
    assert float(ema_decay(0.9999, 90)) == pytest.approx(91 / 100)
    assert float(ema_decay(0.9999, 10**7)) == pytest.approx(0.9999)  # capped at the decay
    assert float(ema_decay(0.9999, 0, warmup=False)) == pytest.approx(0.9999)


def test_ema_starts_as_a_float32_copy_and_rejects_bad_decay():
    params = {"w": jnp.ones((2,), jnp.bfloat16)}
    ema = init_ema(params)
    assert ema["w"].dtype == jnp.float32 and np.array_equal(ema["w"], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\].*1.5"):
        ema_update(ema, params, 1.5, 0)


# One compiled mixup per batch shape (jax.random.beta compiles slowly).
_mixup = jax.jit(mixup, static_argnums=3)


def _one_hot_batch(n: int = 8, classes: int = 5):
    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, size=(n, 4, 4, 3)).astype(np.float32)
    labels = np.eye(classes, dtype=np.float32)[np.arange(n) % classes]
    return jnp.asarray(images), jnp.asarray(labels)


def test_mixup_mixes_each_example_with_its_predecessor_with_one_weight():
    images, labels = _one_hot_batch()
    mixed_images, mixed_labels = _mixup(jax.random.PRNGKey(3), images, labels, 0.4)
    np.testing.assert_allclose(mixed_labels.sum(-1), 1.0, rtol=1e-6)  # still distributions
    # Example 0 is class 0 mixed with example 7 (class 2): its label row reveals the weight.
    lam = float(mixed_labels[0, 0])
    assert 0.5 <= lam <= 1.0
    want_images = lam * images + (1 - lam) * jnp.roll(images, 1, axis=0)
    want_labels = lam * labels + (1 - lam) * jnp.roll(labels, 1, axis=0)
    np.testing.assert_allclose(mixed_images, want_images, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mixed_labels, want_labels, rtol=1e-5, atol=1e-6)


def test_mixup_weight_follows_folded_beta():
    images, labels = _one_hot_batch(n=2, classes=2)  # row 0 = class 0, its predecessor class 1
    keys = jax.random.split(jax.random.PRNGKey(0), 2000)
    lams = jax.jit(jax.vmap(lambda k: mixup(k, images, labels, 1.0)[1][0, 0]))(keys)
    # Beta(1, 1) folded to >= 0.5 is uniform on [0.5, 1]: mean 0.75, variance 1/48.
    assert float(lams.min()) >= 0.5 and float(lams.max()) <= 1.0
    assert float(lams.mean()) == pytest.approx(0.75, abs=0.01)
    assert float(lams.var()) == pytest.approx(1 / 48, abs=0.003)


def test_mixup_is_deterministic_per_key_and_off_at_alpha_zero():
    images, labels = _one_hot_batch()
    a = _mixup(jax.random.PRNGKey(5), images, labels, 0.4)
    b = _mixup(jax.random.PRNGKey(5), images, labels, 0.4)
    c = _mixup(jax.random.PRNGKey(6), images, labels, 0.4)
    assert np.array_equal(a[0], b[0]) and not np.array_equal(a[1], c[1])
    same_images, same_labels = mixup(jax.random.PRNGKey(5), images, labels, 0.0)
    assert same_images is images and same_labels is labels
    with pytest.raises(ValueError, match="alpha must be a number >= 0.*-1"):
        mixup(jax.random.PRNGKey(5), images, labels, -1)


def test_mixup_batch_on_a_sharded_global_batch_equals_unsharded():
    images, labels = _one_hot_batch()
    spec = sharding.batch_sharding(sharding.make_mesh({"data": -1}))  # the train loop's mesh
    batch = {"image": jax.device_put(images, spec), "labels": jax.device_put(labels, spec),
             "_mask": jax.device_put(jnp.ones(8, bool), spec)}
    out = jax.jit(lambda r, b: mixup_batch(r, b, 0.4))(jax.random.PRNGKey(3), batch)
    want_images, want_labels = _mixup(jax.random.PRNGKey(3), images, labels, 0.4)
    np.testing.assert_allclose(out["image"], want_images, rtol=1e-6)
    np.testing.assert_allclose(out["labels"], want_labels, rtol=1e-6)
    assert np.array_equal(out["_mask"], np.ones(8, bool))
