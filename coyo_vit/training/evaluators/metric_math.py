"""Evaluation metrics as plain numpy functions of scores and labels.

Evaluators run the model on devices and hand the (replicated) outputs to these functions, so
every number an evaluator reports is defined once, here, in code small enough to check by hand.
Conventions that change numbers are stated where they apply:

- Ranking ties go to the lower class index (as `jax.lax.top_k` and a stable argsort do), so a
  freshly zero-initialised head predicts class 0 for every image instead of "everything".
- Padded examples are removed by the callers (`mask`); functions here see real examples only.
"""
from __future__ import annotations

import numpy as np

# ImageNet-ReaL covers the 50,000 ILSVRC2012 validation images.
NUM_IMAGENET_VAL = 50_000


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices [N, k] of the k highest scores per row, best first; ties -> lower index first."""
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [examples, classes], got shape {scores.shape}")
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k must be in [1, {scores.shape[1]}] (the number of classes), got {k}")
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def top_k_correct(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """bool [N]: the integer label is among the k best-scored classes."""
    labels = np.asarray(labels)
    if labels.shape != (np.shape(scores)[0],):
        raise ValueError(f"labels must be integer class indices [{np.shape(scores)[0]}], "
                         f"got shape {labels.shape}")
    return (top_k_indices(scores, k) == labels[:, None]).any(axis=1)


def top1_in_set(scores: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """bool [N]: the best-scored class is one of the example's positives (multi-hot [N, C] > 0).

    This is COYO's prec@1 and, with ImageNet-ReaL's label sets as positives, ReaL accuracy.
    """
    positives = np.asarray(positives)
    if positives.shape != np.shape(scores):
        raise ValueError(f"positives {positives.shape} must match scores {np.shape(scores)}")
    best = top_k_indices(scores, 1)[:, 0]
    return positives[np.arange(len(best)), best] > 0


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """AP of one class: the mean, over its positive examples, of the precision at their rank.

    Examples are ranked by score, best first, ties broken by example order (earlier first).
    Raises for a class without positives, whose AP is undefined.
    """
    scores, positives = np.asarray(scores, np.float64), np.asarray(positives) > 0
    if scores.shape != positives.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and positives {positives.shape} must be equal 1-D")
    if not positives.any():
        raise ValueError("average precision is undefined for a class without positive examples")
    hits = positives[np.argsort(-scores, kind="stable")]
    precision_at_hit = np.cumsum(hits)[hits] / (np.flatnonzero(hits) + 1)
    return float(precision_at_hit.mean())


def mean_average_precision(scores: np.ndarray, positives: np.ndarray) -> tuple[float, int]:
    """(mAP, number of classes it averages): AP averaged over classes with >= 1 positive.

    Classes nobody in the evaluated set carries are left out (their AP is undefined); the count
    says how many classes the mean covers. Returns (nan, 0) when no class has a positive.
    """
    scores, positives = np.asarray(scores), np.asarray(positives) > 0
    if scores.shape != positives.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and positives {positives.shape} must be equal "
                         f"[examples, classes]")
    present = np.flatnonzero(positives.any(axis=0))
    if present.size == 0:
        return float("nan"), 0
    aps = [average_precision(scores[:, c], positives[:, c]) for c in present]
    return float(np.mean(aps)), int(present.size)


def f1_counts(predicted: np.ndarray, positives: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class true positive, false positive, false negative and positive counts [C] (int64).

    Counts add over batches, so evaluators accumulate these instead of keeping every prediction.
    """
    predicted, positives = np.asarray(predicted) > 0, np.asarray(positives) > 0
    if predicted.shape != positives.shape or predicted.ndim != 2:
        raise ValueError(f"predicted {predicted.shape} and positives {positives.shape} must be "
                         f"equal [examples, classes]")
    return {"tp": (predicted & positives).sum(0, dtype=np.int64),
            "fp": (predicted & ~positives).sum(0, dtype=np.int64),
            "fn": (~predicted & positives).sum(0, dtype=np.int64),
            "positives": positives.sum(0, dtype=np.int64)}


def f1_scores(counts: dict[str, np.ndarray]) -> dict[str, float]:
    """Micro and macro F1 from (summed) `f1_counts`.

    micro: 2TP / (2TP + FP + FN) over all classes and examples together (0 when all are 0).
    macro: per-class F1 averaged over classes with >= 1 positive, as for mAP; a class with
    positives but no correct prediction counts 0. False positives in classes without positives
    lower micro F1 only.
    """
    tp, fp, fn = (counts[k].astype(np.float64) for k in ("tp", "fp", "fn"))
    denominator = 2 * tp.sum() + fp.sum() + fn.sum()
    micro = float(2 * tp.sum() / denominator) if denominator else 0.0
    present = counts["positives"] > 0
    if not present.any():
        return {"micro_f1": micro, "macro_f1": float("nan")}
    per_class = 2 * tp[present] / (2 * tp[present] + fp[present] + fn[present])
    return {"micro_f1": micro, "macro_f1": float(per_class.mean())}


def logits_1k_from_21k(logits21k: np.ndarray, index21k: np.ndarray) -> np.ndarray:
    """ImageNet-1k scores [N, 1000] read from a 21k head: column i is logit[index21k[i]].

    A 1k class without a 21k counterpart (index -1: teddy bear) gets -inf, so it is never
    predicted and its images always count as errors. The device-side twin is
    `coyo_vit.training.evaluators.imagenet_from_21k.select_1k_logits`.
    """
    logits21k, index21k = np.asarray(logits21k), np.asarray(index21k)
    if index21k.ndim != 1 or (index21k >= logits21k.shape[-1]).any():
        raise ValueError(f"index21k must be 1-D indices below {logits21k.shape[-1]}, "
                         f"got shape {index21k.shape}, max {index21k.max(initial=-1)}")
    picked = logits21k[..., np.maximum(index21k, 0)].astype(np.float32)
    return np.where(index21k >= 0, picked, -np.inf).astype(np.float32)


def real_index(file_name: str) -> int | None:
    """ReaL label row of an ILSVRC2012 validation file name, or None for any other name.

    `ILSVRC2012_val_00000001.JPEG` -> 0 (the json lists the 50,000 images in file-name order).
    A directory part is ignored, so image-folder paths match as well as TFDS file names.
    """
    base = file_name.rsplit("/", 1)[-1]
    prefix, suffix = "ILSVRC2012_val_", ".JPEG"
    if not (base.startswith(prefix) and base.endswith(suffix)):
        return None
    digits = base[len(prefix):-len(suffix)]
    if len(digits) != 8 or not digits.isdigit():
        return None
    number = int(digits)
    return number - 1 if 1 <= number <= NUM_IMAGENET_VAL else None


def real_targets(file_names: list[str], real_labels: list[list[int]], num_classes: int = 1000
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(multi-hot [N, num_classes] bool, has_label [N] bool) for a batch of file names.

    has_label is False for names that are not ImageNet validation images and for the images
    ReaL left without any label; those are excluded from ReaL accuracy.
    """
    targets = np.zeros((len(file_names), num_classes), bool)
    has_label = np.zeros(len(file_names), bool)
    for row, name in enumerate(file_names):
        index = real_index(name)
        if index is None or index >= len(real_labels) or not real_labels[index]:
            continue
        targets[row, real_labels[index]] = True
        has_label[row] = True
    return targets, has_label


def ridge_fit(features: np.ndarray, labels: np.ndarray, num_classes: int, l2_reg: float
              ) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form ridge regression linear probe: (weights [D, C], bias [C]).

    Targets are +1 for the example's class and -1 elsewhere (the ViT paper's few-shot probe).
    Solves min ||X W + b - Y||^2 + l2_reg ||W||^2 in float64; the bias is not regularised
    (it is fit on centred features, which is the same thing).
    """
    x = np.asarray(features, np.float64)
    labels = np.asarray(labels)
    if x.ndim != 2 or labels.shape != (x.shape[0],):
        raise ValueError(f"features must be [N, D] and labels [N], got {x.shape} and {labels.shape}")
    if l2_reg < 0:
        raise ValueError(f"l2_reg must be >= 0, got {l2_reg}")
    y = np.full((len(labels), num_classes), -1.0)
    y[np.arange(len(labels)), labels] = 1.0
    mean_x, mean_y = x.mean(0), y.mean(0)
    xc, yc = x - mean_x, y - mean_y
    gram = xc.T @ xc + l2_reg * np.eye(x.shape[1])
    weights = np.linalg.lstsq(gram, xc.T @ yc, rcond=None)[0]
    return weights, mean_y - mean_x @ weights


def ridge_predict(features: np.ndarray, weights: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Scores [N, C] of a probe from `ridge_fit`."""
    return np.asarray(features, np.float64) @ weights + bias
