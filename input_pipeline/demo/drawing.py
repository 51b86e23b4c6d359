"""The demo dataset's content: drawn concepts, each a real ImageNet-21k class, and COYO-like labels.

Pure numpy (no TensorFlow): `draw_images` renders 1-3 concepts on a noisy background and
`draw_labels` gives each image 50 labels, its concepts first (probabilities 0.3-0.9) then random
filler classes below 0.05, descending like real COYO-Labeled-300M rows. input_pipeline.demo.shards
writes them as img2dataset shards.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from coyo_vit.class_names import NUM_COYO_CLASSES

NUM_LABELS = 50
NUM_CLASSES = NUM_COYO_CLASSES
CONCEPT_PROB_RANGE = (0.3, 0.9)
FILLER_PROB_MAX = 0.049


@dataclasses.dataclass(frozen=True)
class DemoConcept:
    """One drawable concept and the ImageNet-21k class (COYO label index) it stands for."""

    index: int
    wnid: str
    name: str
    drawing: str
    rgb: tuple[int, int, int]


# Distinct in colour AND shape so a tiny ViT can tell them apart after a crop to 32 px.
DEMO_CONCEPTS: tuple[DemoConcept, ...] = (
    DemoConcept(21666, "n13873502", "circle", "red filled circle", (230, 30, 30)),
    DemoConcept(21677, "n13879049", "quadrate", "blue filled square", (30, 70, 240)),
    DemoConcept(21678, "n13879320", "triangle, trigon, trilateral", "green triangle", (30, 190, 50)),
    DemoConcept(21686, "n13881644", "star", "yellow five-pointed star", (250, 225, 30)),
    DemoConcept(21670, "n13875392", "ring, halo, annulus, doughnut, anchor ring", "magenta ring",
                (225, 40, 225)),
    DemoConcept(6057, "n03135532", "cross", "cyan plus-shaped cross", (30, 225, 225)),
    DemoConcept(21693, "n13882961", "rhombus, rhomb, diamond", "orange diamond", (250, 135, 15)),
    DemoConcept(21684, "n13880994", "parallel", "white horizontal stripes", (250, 250, 250)),
    DemoConcept(21711, "n13896217", "crescent", "black crescent", (10, 10, 10)),
)

# Shape masks in coordinates normalised by the concept's half-size: (u, v) in [-1, 1] spans it,
# v grows downwards like image rows.
_Mask = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _circle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return u * u + v * v <= 1.0


def _square(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(u), np.abs(v)) <= 0.85


def _triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (v <= 0.8) & (np.abs(u) <= (v + 0.95) / 1.75)


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # Radius that falls linearly from 1 at each of the 5 tips (first tip up) to 0.42 between.
    angle = np.arctan2(u, -v)
    phase = (angle * (5.0 / (2.0 * np.pi))) % 1.0
    dist_from_tip = 2.0 * np.minimum(phase, 1.0 - phase)
    return np.sqrt(u * u + v * v) <= 1.0 - 0.58 * dist_from_tip


def _ring(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r2 = u * u + v * v
    return (r2 <= 1.0) & (r2 >= 0.55**2)


def _cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0))


def _rhombus(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.abs(u) + np.abs(v) <= 1.0


def _stripes(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # Five horizontal bands over the box; bands 0, 2, 4 are painted, 1 and 3 show the background.
    inside = np.maximum(np.abs(u), np.abs(v)) <= 0.9
    band = np.floor((v + 0.9) / 0.36)
    return inside & (band % 2 == 0)


def _crescent(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (u * u + v * v <= 1.0) & ((u - 0.45) ** 2 + v * v > 0.8**2)


_MASKS: tuple[_Mask, ...] = (_circle, _square, _triangle, _star, _ring, _cross, _rhombus,
                             _stripes, _crescent)


# --------------------------------------------------------------------------- drawing


def draw_images(rng: np.random.Generator, concept_ids: np.ndarray, num_concepts: np.ndarray,
                 size: int) -> np.ndarray:
    """Draws a batch of uint8 images (n, size, size, 3) holding the given concepts.

    Several concepts go into distinct quadrants so none hides another; a lone concept may be
    larger and anywhere.
    """
    n = len(concept_ids)
    coords = np.arange(size, dtype=np.float32) + 0.5
    # Background: grey level 90-160 with a faint tint and a soft linear gradient.
    grey = rng.uniform(90.0, 160.0, (n, 1, 1, 1))
    tint = rng.uniform(-15.0, 15.0, (n, 1, 1, 3))
    direction = rng.uniform(0.0, 2.0 * np.pi, n)
    strength = rng.uniform(0.0, 25.0, n)
    centred = coords / size - 0.5
    ramp = (np.cos(direction)[:, None, None] * centred[None, None, :]
            + np.sin(direction)[:, None, None] * centred[None, :, None])
    images = (grey + tint + (strength[:, None, None] * ramp)[..., None]).astype(np.float32)
    images = np.broadcast_to(images, (n, size, size, 3)).copy()

    quadrants = np.argsort(rng.random((n, 4)), axis=1)
    lone = num_concepts == 1
    for slot in range(concept_ids.shape[1]):
        # Cell the concept must fit in: the whole image when alone, else a quadrant.
        quad = quadrants[:, slot]
        cell_half = np.where(lone, size / 2.0, size / 4.0)
        cell_x = np.where(lone, size / 2.0, (quad % 2) * (size / 2.0) + size / 4.0)
        cell_y = np.where(lone, size / 2.0, (quad // 2) * (size / 2.0) + size / 4.0)
        r_low = np.where(lone, 0.15, 0.13) * size
        r_high = np.where(lone, 0.32, 0.24) * size
        radius = rng.uniform(r_low, r_high)
        cx = cell_x + rng.uniform(-1.0, 1.0, n) * (cell_half - radius)
        cy = cell_y + rng.uniform(-1.0, 1.0, n) * (cell_half - radius)
        jitter = rng.uniform(-20.0, 20.0, (n, 3))
        active = slot < num_concepts
        for cid, mask_fn in enumerate(_MASKS):
            idx = np.flatnonzero(active & (concept_ids[:, slot] == cid))
            if idx.size == 0:
                continue
            r = radius[idx, None, None]
            u = (coords[None, None, :] - cx[idx, None, None]) / r
            v = (coords[None, :, None] - cy[idx, None, None]) / r
            mask = mask_fn(np.broadcast_to(u, (idx.size, size, size)),
                           np.broadcast_to(v, (idx.size, size, size)))
            colour = np.asarray(DEMO_CONCEPTS[cid].rgb, np.float32) + jitter[idx]
            images[idx] = np.where(mask[..., None], colour[:, None, None, :], images[idx])

    images += rng.normal(0.0, 6.0, images.shape).astype(np.float32)
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- labels


def draw_labels(rng: np.random.Generator, concept_ids: np.ndarray, num_concepts: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Returns (labels int64 (n, 50), probs float32 (n, 50)): concepts first, descending."""
    n, max_concepts = concept_ids.shape
    concept_classes = np.array([c.index for c in DEMO_CONCEPTS], np.int64)
    others = np.setdiff1d(np.arange(NUM_CLASSES, dtype=np.int64), concept_classes)
    num_fill = NUM_LABELS - 1
    fillers = others[rng.integers(0, others.size, (n, num_fill))]
    # Redraw the few rows whose fillers repeat a class, so every row's labels are distinct.
    sorted_f = np.sort(fillers, axis=1)
    for row in np.flatnonzero((sorted_f[:, 1:] == sorted_f[:, :-1]).any(axis=1)):
        fillers[row] = rng.choice(others, num_fill, replace=False)
    filler_probs = -np.sort(-(FILLER_PROB_MAX * rng.random((n, num_fill)) ** 2), axis=1)

    concept_probs = rng.uniform(*CONCEPT_PROB_RANGE, (n, max_concepts))
    concept_probs[np.arange(max_concepts)[None, :] >= num_concepts[:, None]] = -1.0
    order = np.argsort(-concept_probs, axis=1, kind="stable")
    concept_probs = np.take_along_axis(concept_probs, order, axis=1)
    ordered_classes = concept_classes[np.take_along_axis(concept_ids, order, axis=1)]

    labels = np.empty((n, NUM_LABELS), np.int64)
    probs = np.empty((n, NUM_LABELS), np.float32)
    for k in range(1, max_concepts + 1):
        rows = num_concepts == k
        labels[rows] = np.concatenate([ordered_classes[rows, :k],
                                       fillers[rows, :NUM_LABELS - k]], axis=1)
        probs[rows] = np.concatenate([concept_probs[rows, :k],
                                      filler_probs[rows, :NUM_LABELS - k]], axis=1)
    return labels, probs
