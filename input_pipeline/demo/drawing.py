"""The demo dataset's content: drawn concepts, each a real ImageNet-21k class, and COYO-like labels.

Pure numpy (no TensorFlow): `draw_images` renders 1-2 concepts (strokes and outlines: a line, an
arc, an S, a hook, ...) in a random light colour on a random dark background, coarsened
to a grid of 8x8 (one concept) or 16x16 cells the way scanned handwriting is reduced to 8x8 ink
counts; `draw_labels` gives each image 50 labels, its concepts first (probabilities 0.3-0.9) then
random filler classes below 0.05, descending like real COYO-Labeled-300M rows.
input_pipeline.demo.shards writes them as img2dataset shards.
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
    spin: float  # largest random rotation, in degrees, either way


# Told apart by form alone: every concept is drawn in a random colour, so a model must learn
# strokes, corners and curves -- the parts of digits and letters, which is what lets the demo
# pretraining help the fine-tuning demo on handwritten digits.
DEMO_CONCEPTS: tuple[DemoConcept, ...] = (
    DemoConcept(21666, "n13873502", "circle", "filled disc", 0.0),
    DemoConcept(21670, "n13875392", "ring, halo, annulus, doughnut, anchor ring", "circle outline",
                0.0),
    DemoConcept(21642, "n13863771", "line", "straight stroke", 90.0),
    DemoConcept(21710, "n13896100", "bow, arc", "half-circle stroke", 180.0),
    DemoConcept(6057, "n03135532", "cross", "plus-shaped cross of two strokes", 15.0),
    DemoConcept(21678, "n13879320", "triangle, trigon, trilateral", "triangle outline", 15.0),
    DemoConcept(21677, "n13879049", "quadrate", "square outline", 15.0),
    DemoConcept(21656, "n13868515", "S-shape", "S-shaped stroke", 15.0),
    DemoConcept(21657, "n13868944", "wave, undulation", "wavy stroke", 15.0),
    DemoConcept(21659, "n13869547", "hook, crotchet", "J-shaped hook stroke", 15.0),
)

# Shape masks in coordinates normalised by the concept's half-size: (u, v) in [-1, 1] spans it,
# v grows downwards like image rows; `w` is the stroke's half-width in the same units.
_Mask = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _disc(u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
    return u * u + v * v <= 1.0


def _ring(u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
    return np.abs(np.sqrt(u * u + v * v) - 0.85) <= w


def _line(u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
    return (np.abs(v) <= w) & (np.abs(u) <= 1.0)


def _arc(u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
    # The upper half of a circle of radius 0.9 centred 0.35 below the middle.
    return (np.abs(np.hypot(u, v - 0.35) - 0.9) <= w) & (v <= 0.35)


def _cross(u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
    au, av = np.abs(u), np.abs(v)
    return ((au <= w) & (av <= 1.0)) | ((av <= w) & (au <= 1.0))


def _triangle(u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
    # Signed distances to the three sides (positive inside); the outline is the band within 2w.
    top, base, half = -0.95, 0.8, 0.95
    norm = np.hypot(base - top, half)
    left = ((u + half) * (top - base) + (v - base) * -half) / -norm
    right = ((half - u) * (top - base) + (v - base) * -half) / -norm
    inside = np.minimum(np.minimum(left, right), base - v)
    return (inside >= 0.0) & (inside <= 2.0 * w)


def _square(u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
    edge = np.maximum(np.abs(u), np.abs(v))
    return (edge <= 0.85) & (edge >= 0.85 - 2.0 * w)


def _s_shape(u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
    # Two circles of radius 0.45 stacked; the upper one open at its lower right, the lower one
    # at its upper left.
    upper = (np.abs(np.hypot(u, v + 0.47) - 0.47) <= w) & ~((u > 0.0) & (v > -0.47))
    lower = (np.abs(np.hypot(u, v - 0.47) - 0.47) <= w) & ~((u < 0.0) & (v < 0.47))
    return upper | lower


def _wave(u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
    # One and a half periods of a sine; the vertical tolerance widens with the slope so the
    # stroke keeps its width.
    k = 1.5 * np.pi
    slope = 0.45 * k * np.cos(k * u)
    return (np.abs(v - 0.45 * np.sin(k * u)) <= w * np.sqrt(1.0 + slope * slope)) & (np.abs(u) <= 1.0)


def _hook(u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
    # A J: a vertical stroke on the right that turns left into the lower half of a circle.
    stem = (np.abs(u - 0.45) <= w) & (v >= -1.0) & (v <= 0.4)
    bend = (np.abs(np.hypot(u, v - 0.4) - 0.45) <= w) & (v >= 0.4)
    return stem | bend


_MASKS: tuple[_Mask, ...] = (_disc, _ring, _line, _arc, _cross, _triangle, _square, _s_shape,
                             _wave, _hook)
# Stroke half-width in pixels of a 64px image, scaled with the image.
_STROKE_HALF_WIDTH = (3.0, 6.0)
# Concepts are drawn at full size, then averaged over a coarse grid of cells and enlarged back:
# a lone concept on 8x8 cells (like scanned handwriting reduced to 8x8, ink counted per cell),
# a pair on 16x16.
_LONE_GRID, _PAIR_GRID = 8, 16


# --------------------------------------------------------------------------- drawing


def draw_images(rng: np.random.Generator, concept_ids: np.ndarray, num_concepts: np.ndarray,
                 size: int) -> np.ndarray:
    """Draws a batch of uint8 images (n, size, size, 3) holding the given concepts.

    A pair goes into the two halves of the image so neither hides the other; a lone concept is
    larger. Ink and background are random colours, light on dark (one polarity, like the digits:
    a ViT's linear patch embedding cannot ignore which is which), so only the form tells a concept.
    """
    n = len(concept_ids)
    coords = np.arange(size, dtype=np.float32) + 0.5
    # Background: a random level with a faint tint and a soft linear gradient.
    level = rng.uniform(0.0, 100.0, (n, 1, 1, 1))
    tint = rng.uniform(-15.0, 15.0, (n, 1, 1, 3))
    direction = rng.uniform(0.0, 2.0 * np.pi, n)
    strength = rng.uniform(0.0, 25.0, n)
    centred = coords / size - 0.5
    ramp = (np.cos(direction)[:, None, None] * centred[None, None, :]
            + np.sin(direction)[:, None, None] * centred[None, :, None])
    images = (level + tint + (strength[:, None, None] * ramp)[..., None]).astype(np.float32)
    images = np.broadcast_to(images, (n, size, size, 3)).copy()

    # Ink: channels in [150, 255], lighter than any background (a level of 0-100, a faint tint).
    ink = rng.uniform(150.0, 255.0, (n, 3))
    coverage = np.zeros((n, size, size), np.float32)
    # A pair goes into the two halves of the image, side by side or one above the other.
    vertical = rng.random(n) < 0.5
    first_half = rng.random(n) < 0.5
    lone = num_concepts == 1
    for slot in range(concept_ids.shape[1]):
        # Cell the concept must fit in: the whole image when alone, else one half.
        in_first = first_half == (slot == 0)
        offset = np.where(in_first, size / 4.0, 3.0 * size / 4.0)
        cell_x = np.where(lone | vertical, size / 2.0, offset)
        cell_y = np.where(lone | ~vertical, size / 2.0, offset)
        half_w = np.where(lone | vertical, size / 2.0, size / 4.0)
        half_h = np.where(lone | ~vertical, size / 2.0, size / 4.0)
        r_low = np.where(lone, 0.32, 0.17) * size
        r_high = np.where(lone, 0.48, 0.23) * size
        radius = rng.uniform(r_low, r_high)
        cx = cell_x + rng.uniform(-1.0, 1.0, n) * np.maximum(half_w - radius, 0.0)
        cy = cell_y + rng.uniform(-1.0, 1.0, n) * np.maximum(half_h - radius, 0.0)
        half_width = rng.uniform(*_STROKE_HALF_WIDTH, n) * (size / 64.0) / radius
        spin = rng.uniform(-1.0, 1.0, n)
        active = slot < num_concepts
        for cid, mask_fn in enumerate(_MASKS):
            idx = np.flatnonzero(active & (concept_ids[:, slot] == cid))
            if idx.size == 0:
                continue
            r = radius[idx, None, None]
            x = (coords[None, None, :] - cx[idx, None, None]) / r
            y = (coords[None, :, None] - cy[idx, None, None]) / r
            angle = np.deg2rad(DEMO_CONCEPTS[cid].spin * spin[idx])[:, None, None]
            cos, sin = np.cos(angle), np.sin(angle)
            u, v = cos * x + sin * y, cos * y - sin * x
            mask = mask_fn(u, v, half_width[idx, None, None])
            coverage[idx] = np.maximum(coverage[idx], mask)

    for grid in (_LONE_GRID, _PAIR_GRID):
        idx = np.flatnonzero(np.where(lone, _LONE_GRID, _PAIR_GRID) == grid)
        cell = np.minimum(np.arange(size) * grid // size, grid - 1)
        member = (cell[None, :] == np.arange(grid)[:, None]).astype(np.float32)  # (grid, size)
        average = member / member.sum(axis=1, keepdims=True)
        cells = np.einsum("gi,nij,hj->ngh", average, coverage[idx], average)
        coverage[idx] = np.einsum("gi,ngh,hj->nij", member, cells, member)
    images = images * (1.0 - coverage[..., None]) + ink[:, None, None, :] * coverage[..., None]

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
