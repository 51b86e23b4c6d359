"""Evaluation metrics equal hand-computed values: first the numpy definitions on small cases,
then each evaluator end to end (real TFDS imagenet2012 files, the digits folder, 2 devices) with
a model whose logits are known: a zero head kernel makes every image's logits the head bias."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from PIL import Image

from coyo_vit.models import Model
from coyo_vit.training import sharding
from coyo_vit.training.evaluators import metric_math as mm
from coyo_vit.training.evaluators.imagenet_from_21k import load_index21k, select_1k_logits
from coyo_vit.training.evaluators.registry import build_evaluators, is_due
from coyo_vit.training.step import sigmoid_xent, softmax_xent
from tests.conftest import SHARED
from tests.input_pipeline.test_classification_data import write_imagenet2012

REAL_JSON = str(SHARED / "data" / "imagenet_real_labels.json")
MAPPING_TSV = str(SHARED / "data" / "imagenet1k_classes.tsv")
PP_1K = "decode|resize(16)|value_range(-1, 1)|onehot(1000)"
# Validation images: 7 ILSVRC2012 names (ReaL rows 0-6: [], [970, 795], [230, 231], [809],
# [516, 850], [57], [334]) and one train-style name that ReaL does not cover.
NAMES = [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, 8)] + ["n04399382_10016.JPEG"]
LABELS = [3, 1, 4, 1, 5, 9, 2, 850]


# --------------------------------------------------------------------------- metric math


def test_top_k_with_ties_going_to_the_lower_class():
    scores = np.array([[0.1, 0.5, 0.4], [0.3, 0.3, 0.2], [0.0, 0.0, 1.0]])
    labels = np.array([2, 1, 0])
    assert mm.top_k_correct(scores, labels, 1).tolist() == [False, False, False]
    assert mm.top_k_correct(scores, labels, 2).tolist() == [True, True, True]
    assert mm.top_k_indices(scores, 2).tolist() == [[1, 2], [0, 1], [2, 0]]
    ties = np.random.default_rng(0).integers(0, 3, size=(50, 7)).astype(np.float32)
    _, device = jax.lax.top_k(jnp.asarray(ties), 4)  # the device rule agrees
    assert np.array_equal(mm.top_k_indices(ties, 4), np.asarray(device))
    with pytest.raises(ValueError, match=r"k must be in \[1, 3\].*got 4"):
        mm.top_k_indices(scores, 4)


def test_average_precision_by_hand_and_against_sklearn():
    # Ranked: pos, neg, pos, neg -> precision at the hits 1/1 and 2/3.
    assert mm.average_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0])) == pytest.approx(5 / 6)
    # Ties rank in example order: the positive (last) comes after the two tied negatives.
    assert mm.average_precision(np.array([0.5, 0.5, 0.5]), np.array([0, 0, 1])) == pytest.approx(1 / 3)
    scores = np.array([[0.9, 0.1, 0.3], [0.2, 0.8, 0.4], [0.7, 0.6, 0.5], [0.1, 0.2, 0.9]])
    positives = np.array([[1, 0, 0], [0, 1, 0], [0, 1, 0], [1, 0, 0]])  # class 2: no positive
    # Class 0 ranks its positives 1st and 4th: (1 + 2/4) / 2; class 1 ranks them 1st and 2nd: 1.
    value, classes = mm.mean_average_precision(scores, positives)
    assert classes == 2 and value == pytest.approx(((1 + 2 / 4) / 2 + 1) / 2)
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    s, y = rng.random((200, 6)), rng.random((200, 6)) < 0.3  # continuous scores: no ties
    want = np.mean([average_precision_score(y[:, c], s[:, c]) for c in range(6)])
    assert mm.mean_average_precision(s, y)[0] == pytest.approx(want, rel=1e-9)
    with pytest.raises(ValueError, match="undefined for a class without positive"):
        mm.average_precision(np.array([0.1, 0.2]), np.array([0, 0]))


def test_micro_and_macro_f1_by_hand():
    predicted = np.array([[1, 1, 0, 1], [0, 1, 0, 0], [1, 0, 0, 0]])
    positives = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0]])
    counts = mm.f1_counts(predicted, positives)
    assert counts["tp"].tolist() == [1, 1, 0, 0] and counts["fp"].tolist() == [1, 1, 0, 1]
    assert counts["fn"].tolist() == [0, 1, 1, 0]
    scores = mm.f1_scores(counts)
    assert scores["micro_f1"] == pytest.approx(2 * 2 / (2 * 2 + 3 + 2))
    # Classes 0-2 have positives: F1 2/3, 1/2 and 0; class 3 (no positive) is left out.
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)


def test_real_file_name_matching_and_accuracy():
    assert mm.real_index("ILSVRC2012_val_00000001.JPEG") == 0
    assert mm.real_index("val/n01440764/ILSVRC2012_val_00050000.JPEG") == 49_999
    for other in ("ILSVRC2012_val_00000000.JPEG", "ILSVRC2012_val_00050001.JPEG",
                  "ILSVRC2012_val_1.JPEG", "n01440764_10026.JPEG", ""):
        assert mm.real_index(other) is None
    labels = [[], [970, 795], [230, 231]]
    targets, has = mm.real_targets(["ILSVRC2012_val_00000002.JPEG", "ILSVRC2012_val_00000001.JPEG",
                                    "x.jpg", "ILSVRC2012_val_00000003.JPEG"], labels)
    assert has.tolist() == [True, False, False, True]
    assert np.flatnonzero(targets[0]).tolist() == [795, 970] and not targets[1].any()
    scores = np.zeros((2, 1000))
    scores[0, 795] = scores[1, 232] = 1.0
    assert mm.top1_in_set(scores, targets[[0, 3]]).tolist() == [True, False]


def test_ridge_probe_closed_form_by_hand():
    x, y = np.array([[0.0], [1.0]]), np.array([0, 1])
    w, b = mm.ridge_fit(x, y, 2, l2_reg=0.0)  # exact fit of the +-1 targets
    assert np.allclose(w, [[-2.0, 2.0]]) and np.allclose(b, [1.0, -1.0])
    # l2 = 1: centred x = -+1/2, x'x + 1 = 3/2, x'y0 = -1 -> w0 = -2/3, b0 = 0 - 1/2 * w0.
    w, b = mm.ridge_fit(x, y, 2, l2_reg=1.0)
    assert np.allclose(w, [[-2 / 3, 2 / 3]]) and np.allclose(b, [1 / 3, -1 / 3])
    assert mm.ridge_predict(np.array([[0.0], [1.0]]), w, b).argmax(1).tolist() == [0, 1]


def test_1k_from_21k_selection_numpy_and_device_agree():
    logits = np.arange(2 * 21841, dtype=np.float32).reshape(2, 21841) % 997
    index21k = load_index21k(MAPPING_TSV)
    assert index21k[850] == -1 and index21k[0] == 359 and (index21k >= 0).sum() == 999
    host = mm.logits_1k_from_21k(logits, index21k)
    assert host[0, 0] == logits[0, 359] and host[1, 1] == logits[1, 368] and np.isneginf(host[:, 850]).all()
    assert np.array_equal(np.asarray(select_1k_logits(jnp.asarray(logits), index21k)), host)
    # Teddy bear can never be predicted, so its images are errors even when everything ties.
    assert not mm.top_k_correct(np.zeros((1, 1000)) + mm.logits_1k_from_21k(np.zeros((1, 21841)), index21k),
                                np.array([850]), 5).any()


# --------------------------------------------------------------------------- evaluators end to end

MESH = sharding.make_mesh({"data": -1})  # the 2 host CPU devices of conftest


def _model(num_classes: int, bias: dict[int, float] | None = None, seed: int = 0):
    """(model, params on MESH, their shardings). The head kernel is zero, so logits == head
    bias; the other weights are seeded numpy draws (compiling model.init costs more than
    every evaluation here)."""
    model = Model(num_classes=num_classes, patch_size=8, width=16, depth=1, mlp_dim=32, num_heads=2)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"])
    shardings = sharding.param_shardings(boxed, MESH, sharding.DEFAULT_RULES)
    rng = np.random.default_rng(seed)

    def value(path, leaf) -> np.ndarray:
        name = jax.tree_util.keystr(path)
        if "head" in name or "'bias'" in name:
            return np.zeros(leaf.shape, np.float32)
        if "'scale'" in name:
            return np.ones(leaf.shape, np.float32)
        return rng.normal(0.0, 0.3, leaf.shape).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(value, nn.meta.unbox(boxed))
    if bias:
        params["head"]["bias"][list(bias)] = list(bias.values())
    return model, jax.device_put(params, shardings), shardings


def _evaluators(evals: dict, model, shardings, loss_fn=softmax_xent):
    return build_evaluators(evals, model=model, mesh=MESH, params_shardings=shardings, loss_fn=loss_fn)


@pytest.fixture(scope="module")
def imagenet_val(tmp_path_factory) -> dict:
    data_dir = tmp_path_factory.mktemp("tfds")
    write_imagenet2012(data_dir, NAMES, LABELS, train_labels=[0, 1])
    return {"name": "tfds", "tfds_name": "imagenet2012", "split": "validation", "data_dir": str(data_dir)}


def test_classification_top_k_and_loss(imagenet_val):
    bias = {1: 2.0, 4: 1.5, 9: 1.0}
    model, params, shardings = _model(1000, bias)
    (evaluator,) = _evaluators({"val": dict(type="classification", data=imagenet_val, pp=PP_1K,
                                            batch_size=4, every_steps=10, per_class=True)},
                               model, shardings).values()
    results = evaluator.evaluate(params)
    per_class = {k: results.pop(k) for k in list(results) if "/class_top1/" in k}
    # Every image predicts 1; the top 5 are 1, 4, 9, then the tied zeros 0 and 2.
    logits = np.zeros(1000)
    logits[list(bias)] = list(bias.values())
    loss = np.mean([np.log(np.exp(logits).sum()) - logits[label] for label in LABELS])
    assert results == pytest.approx({"val/top1": 2 / 8, "val/top5": 5 / 8, "val/loss": loss,
                                     "val/examples": 8.0}, rel=1e-5)
    # per_class (issue 19, item 9): each class of the split by index and name (TFDS
    # imagenet2012's WordNet ids become the shipped readable names, as in class_names.txt).
    assert per_class == {"val/class_top1/1 goldfish, Carassius auratus": 1.0,
                         "val/class_top1/2 great white shark, white shark, man-eater, man-eating shark, "
                         "Carcharodon carcharias": 0.0,
                         "val/class_top1/3 tiger shark, Galeocerdo cuvieri": 0.0,
                         "val/class_top1/4 hammerhead, hammerhead shark": 0.0,
                         "val/class_top1/5 electric ray, crampfish, numbfish, torpedo": 0.0,
                         "val/class_top1/9 ostrich, Struthio camelus": 0.0,
                         "val/class_top1/850 teddy, teddy bear": 0.0}
    assert evaluator.every_steps == 10
    assert {k for k in evaluator.evaluate(params, prefix="val_ema") if "/class_top1/" not in k} == {
        "val_ema/top1", "val_ema/top5", "val_ema/loss", "val_ema/examples"}


def test_per_class_keys_are_checked_and_logged_as_they_are(imagenet_val, tmp_path):
    with pytest.raises(ValueError, match=r"config.evals.val.per_class must be True or False, got 'yes'"):
        # Checked before the model is used: a stand-in with a class count is enough.
        _evaluators({"val": dict(type="classification", data=imagenet_val, pp=PP_1K, batch_size=4,
                                 per_class="yes")}, SimpleNamespace(num_classes=1000), None)
    # The metric writers (TensorBoard, metrics.jsonl) take such keys, spaces and commas included.
    from coyo_vit.training.metric_logging import MetricLogger  # late: only this test writes logs
    logger = MetricLogger(str(tmp_path), is_main=True, resume_step=0, batch_size=4)
    logger.write(1, {"val/class_top1/1 goldfish, Carassius auratus": 1.0})
    logger.close()
    assert "val/class_top1/1 goldfish, Carassius auratus" in (tmp_path / "metrics.jsonl").read_text()


def test_real_accuracy_matches_file_names_to_label_sets(imagenet_val):
    model, params, shardings = _model(1000)
    (evaluator,) = _evaluators({"real": dict(type="real", data=imagenet_val, pp=PP_1K, batch_size=4,
                                             labels_path=REAL_JSON)}, model, shardings).values()
    # Rows 1-6 have label sets; val_00000001 (empty set) and the train-style name are excluded.
    for predicted, want_hits in [(230, 1), (57, 1), (850, 1), (334, 1), (5, 0)]:
        head_bias = np.zeros(1000, np.float32)
        head_bias[predicted] = 3.0
        params["head"]["bias"] = jax.device_put(head_bias, shardings["head"]["bias"])
        assert evaluator.evaluate(params) == {"real/top1": want_hits / 6, "real/examples": 6.0,
                                              "real/unlabeled": 2.0}, predicted


def test_imagenet_from_21k_reads_only_the_1k_logits(imagenet_val):
    index21k = load_index21k(MAPPING_TSV)
    # 21k logits: high on goldfish's and hammerhead's synsets (1k classes 1 and 4) and on a
    # 21k-only class that must be ignored.
    model, params, shardings = _model(21841, {int(index21k[1]): 2.0, int(index21k[4]): 1.5, 0: 9.0})
    evaluators = _evaluators({
        "in1k": dict(type="imagenet_from_21k", data=imagenet_val, pp=PP_1K, batch_size=4),
        "real21k": dict(type="real", data=imagenet_val, pp=PP_1K, batch_size=4, from_21k=True,
                        labels_path=REAL_JSON)}, model, shardings)
    # 1k logits: 2 (class 1), 1.5 (class 4), 0 elsewhere, -inf for teddy bear (850, the last
    # image's label): top 5 = 1, 4, 0, 2, 3.
    assert evaluators["in1k"].evaluate(params) == {"in1k/top1": 2 / 8, "in1k/top5": 5 / 8,
                                                   "in1k/examples": 8.0}
    # ReaL: class 1 is in no label set of rows 1-6.
    assert evaluators["real21k"].evaluate(params)["real21k/top1"] == 0.0


def test_multilabel_prec1_map_and_f1(imagenet_val):
    model, params, shardings = _model(1000, {1: 5.0, 4: 3.0})
    (evaluator,) = _evaluators({"ml": dict(type="multilabel", data=imagenet_val, pp=PP_1K,
                                           batch_size=4, threshold=0.6)}, model, shardings,
                               loss_fn=sigmoid_xent).values()
    results = evaluator.evaluate(params)
    # Every image predicts {1, 4} (sigmoid 0.99, 0.95 >= 0.6; sigmoid(0) = 0.5 < 0.6).
    # TP = 3 (labels 1, 4, 1), FP = 8 * 2 - 3 = 13, FN = 8 - 3 = 5.
    # Per class F1 over the 7 classes present: class 1 -> 2*2/(4+6+0), class 4 -> 2/(2+7+0).
    # AP with tied scores ranks images in order: class 1's positives at ranks 2 and 4 give
    # (1/2 + 2/4)/2; each other class has one positive at rank r (1-based) -> 1/r.
    aps = [0.5, 1 / 1, 1 / 3, 1 / 5, 1 / 6, 1 / 7, 1 / 8]  # classes 1, 3, 4, 5, 9, 2, 850
    logits = np.zeros(1000)
    logits[[1, 4]] = [5.0, 3.0]
    prob = 1 / (1 + np.exp(-logits))
    targets = np.eye(1000)[LABELS]
    loss = np.mean(-(targets * np.log(prob) + (1 - targets) * np.log(1 - prob)).sum(1))
    assert results == pytest.approx({
        "ml/prec@1": 2 / 8, "ml/micro_f1": 6 / (6 + 13 + 5), "ml/macro_f1": (0.4 + 2 / 9) / 7,
        "ml/mAP": np.mean(aps), "ml/map_classes": 7.0, "ml/loss": loss, "ml/examples": 8.0}, rel=1e-5)


def test_fewshot_probe_equals_sklearn_ridge_on_independently_computed_features(tmp_path):
    from sklearn.linear_model import Ridge

    from input_pipeline import imagefolder
    from input_pipeline.demo import digits as demo_digits

    root = demo_digits.ensure_digits_folder(str(tmp_path / "digits"), image_size=16)
    model, params, shardings = _model(10, seed=1)
    data = {"name": "imagefolder", "root": root, "split": "train"}
    (evaluator,) = _evaluators({"fs": dict(type="fewshot", data=data, test_split="test",
                                           pp="decode|resize(16)|value_range(-1, 1)|onehot(10)",
                                           batch_size=240, num_classes=10, shots=(2, 5), l2_reg=0.5)},
                               model, shardings).values()
    results = evaluator.evaluate(params)

    host_params = jax.device_get(params)
    features = jax.jit(lambda x: model.apply({"params": host_params}, x, return_features=True)[1])

    def load(split: str) -> tuple[np.ndarray, np.ndarray]:
        listing = imagefolder.list_split(root, split)
        pixels = np.stack([np.asarray(Image.open(p).convert("RGB"), np.float32) for p in listing.paths])
        return np.asarray(features(pixels / 127.5 - 1.0)), np.asarray(listing.labels)

    (train_x, train_y), (test_x, test_y) = load("train"), load("test")
    for k in (2, 5):
        chosen = np.concatenate([np.flatnonzero(train_y == c)[:k] for c in range(10)])  # sorted order
        targets = np.where(np.arange(10)[None] == train_y[chosen, None], 1.0, -1.0)
        probe = Ridge(alpha=0.5, fit_intercept=True).fit(train_x[chosen].astype(np.float64), targets)
        want = float((probe.predict(test_x.astype(np.float64)).argmax(1) == test_y).mean())
        assert results[f"fs/{k}shot_top1"] == pytest.approx(want, abs=1 / 360 + 1e-9)
    assert results["fs/test_examples"] == 360.0


def test_registry_errors_name_the_bad_value(imagenet_val):
    model, _, shardings = _model(10)
    good = dict(type="classification", data=imagenet_val, pp=PP_1K, batch_size=4)
    with pytest.raises(ValueError, match="type='top1' is not a known evaluator type; valid: "
                                         r"\['classification', 'fewshot', 'holdout', 'imagenet_from_21k', 'multilabel', 'real'\]"):
        _evaluators({"val": dict(good, type="top1")}, model, shardings)
    with pytest.raises(ValueError, match=r"config.evals.val has unknown keys \['topk'\]"):
        _evaluators({"val": dict(good, topk=5)}, model, shardings)
    with pytest.raises(ValueError, match="config.evals.val: Batch size 3 is not divisible by the 2"):
        _evaluators({"val": dict(good, batch_size=3)}, model, shardings)
    with pytest.raises(ValueError, match="config.evals.val needs `pp`"):
        _evaluators({"val": dict(good, pp="")}, model, shardings)
    with pytest.raises(ValueError, match="expected a list of 50000 lists"):
        _evaluators({"real": dict(good, type="real", labels_path=_bad_json(Path(imagenet_val["data_dir"])))},
                    model, shardings)
    # Their data and classes: checked by check_data(), which the loop calls before training.
    with pytest.raises(ValueError, match=r"config.evals.val.pp makes labels over 1000 classes but the "
                                         r"model has 10: 'decode"):
        _evaluators({"val": good}, model, shardings)["val"].check_data()
    with pytest.raises(Exception, match="/nonexistent/coyo-"):
        _evaluators({"ml": dict(good, type="multilabel", data=dict(files="/nonexistent/coyo-*.tfrecord"))},
                    model, shardings)["ml"].check_data()
    assert _evaluators(None, model, shardings) == {}
    assert [is_due(100, s, 250) for s in (99, 100, 200, 250)] == [False, True, True, True]
    assert not is_due(0, 250, 250)


def _bad_json(directory: Path) -> str:
    path = directory / "short_real.json"
    path.write_text(json.dumps([[1], [2]]))
    return str(path)


def _holdout(model, shardings, input_section):
    """The registered `holdout` evaluator over the run's own (parsed) input section."""
    from input_pipeline.pipeline import InputConfig

    return build_evaluators({"holdout": dict(type="holdout", every_steps=1, batch_size=8)},
                            model=model, mesh=MESH, params_shardings=shardings,
                            loss_fn=sigmoid_xent,
                            train_input=InputConfig.from_config(input_section))["holdout"]


def test_holdout_with_no_usable_example_raises_instead_of_reporting_zeros(shared_fixtures):
    # A pp_eval that fails on every record (a crop larger than the resized image) once gave
    # holdout/loss = holdout/prec@1 = 0 at every eval, silently.
    from configs import common

    shards = shared_fixtures / "coyo_shards" / "shards"
    model, params, shardings = _model(21841)

    def section(pp_eval):
        return common.input_config(files=str(shards / "*.tfrecord"), pp_train="decode",
                                   pp_eval=pp_eval, shuffle_buffer=8, holdout_files=1)

    labels = "coyo_labels('threshold', 0.1)"
    evaluator = _holdout(model, shardings, section(f"decode|resize_small(20)|central_crop(16)|{labels}"))
    assert evaluator.evaluate(params)["holdout/examples"] > 0
    evaluator = _holdout(model, shardings, section(f"decode|resize_small(12)|central_crop(16)|{labels}"))
    with pytest.raises(ValueError, match="The holdout gave no example"):
        evaluator.evaluate(params)


def test_holdout_evaluator_rejects_a_missing_holdout_or_other_classes_before_training(shared_fixtures):
    # Both once surfaced only at the first evaluation, a whole eval interval into the run.
    from configs import common

    shards = shared_fixtures / "coyo_shards" / "shards"
    model, _, shardings = _model(1000)

    def section(holdout_files: int):
        return common.input_config(files=str(shards / "*.tfrecord"), pp_train="decode",
                                   pp_eval="decode|resize(16)|coyo_labels('threshold', 0.1)",
                                   shuffle_buffer=8, holdout_files=holdout_files)

    with pytest.raises(ValueError, match="no holdout"):
        _holdout(model, shardings, section(0)).check_data()  # the loop calls it before training
    with pytest.raises(ValueError, match="labels over 21841 classes but the model has 1000"):
        _holdout(model, shardings, section(1)).check_data()


def test_a_configured_holdout_evaluator_may_not_shadow_the_one_eval_every_steps_adds(shared_fixtures, tmp_path):
    from coyo_vit.training import run_config
    from tests import tiny_config

    shards = shared_fixtures / "coyo_shards" / "shards"
    config = tiny_config.get_config(str(shards / "*.tfrecord"))
    pp = "decode|resize_small(20)|central_crop(16)|coyo_labels('threshold', 0.1)"
    evals = dict(type="multilabel", every_steps=1, batch_size=8,
                 data=dict(name="coyo_shards", files=str(shards / "*.tfrecord")),
                 holdout=dict(files=1, examples=0), split="holdout", pp=pp)
    with config.unlocked():
        config.evals = dict(holdout=evals)
    with pytest.raises(ValueError, match="config.evals.holdout clashes"):
        run_config.parse(config, str(tmp_path))
    with config.unlocked():
        config.evals = dict(multilabel=evals)
    parsed = run_config.parse(config, str(tmp_path))
    assert set(parsed.evals) == {"multilabel", "holdout"}
    assert parsed.evals["holdout"] == dict(type="holdout", every_steps=6, batch_size=16)
