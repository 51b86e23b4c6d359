"""Analytic FLOP count of a ViT training step, and the peak bf16 FLOP/s of known chips.

MFU convention (the one the ViT / PaLM papers use, stated once here so every benchmark agrees):

    forward multiply-adds per image = L * (12*N*D^2 + 2*N^2*D) + n_patches * 3*P^2*D + D*classes

with L layers, width D, N = (R/P)^2 + 1 tokens (patches plus the class token) at resolution R
and patch size P. Per layer, 12*N*D^2 counts the q, k, v and output projections (4*N*D^2) and
the MLP (2*N*D*mlp_dim = 8*N*D^2 at the standard mlp_dim = 4*D); 2*N^2*D counts the score and
value products. Normalisations, softmax, GELU, biases and the optimizer update are left out:
they are memory-bound and would only flatter the figure. FLOPs = 2 x MACs, and one training
step costs 3 x the forward pass (backward = 2 x forward), recomputation under remat NOT counted,
so MFU measures useful work whatever the memory trade-off. ViT-B/16 at 224px with 1000 classes:
17.56 G multiply-adds per image.

The formula is a pure function of the sizes (no tracing, no device); nothing here imports
TensorFlow, so the accelerator benchmark can use it on a TF-free host.
"""
from __future__ import annotations

import dataclasses
import re

# The model's own size table: one source of truth for widths and depths.
from coyo_vit.models.vit import decode_variant

# Dense bf16 peak FLOP/s per chip (no 2:4 sparsity), from the vendors' data sheets. Matched
# against `jax.Device.device_kind` in order, so more specific names come first.
PEAK_BF16_FLOPS: tuple[tuple[str, str, float], ...] = (
    # (regex on device_kind, display name, FLOP/s)
    (r"H100.*PCIe", "NVIDIA H100 PCIe", 756e12),
    (r"H100.*NVL", "NVIDIA H100 NVL", 835e12),
    (r"H100", "NVIDIA H100 SXM", 989e12),
    (r"H200", "NVIDIA H200", 989e12),
    (r"A100", "NVIDIA A100", 312e12),
    (r"TPU v5 ?lite|TPU v5e", "TPU v5e", 197e12),
    (r"TPU v5p|TPU v5$", "TPU v5p", 459e12),
    (r"TPU v4", "TPU v4", 275e12),
)


@dataclasses.dataclass(frozen=True)
class ViTShape:
    """The sizes the FLOP formula needs; `rep_size` is the optional pre-logits width."""

    depth: int
    width: int
    mlp_dim: int
    patch_size: int
    image_size: int
    num_classes: int
    rep_size: int | None = None

    @classmethod
    def from_variant(cls, variant: str, image_size: int, num_classes: int,
                     rep_size: int | None = None, depth: int | None = None) -> "ViTShape":
        """Sizes of a named variant; `depth` overrides its number of blocks."""
        dims = decode_variant(variant)
        return cls(depth=depth or dims["depth"], width=dims["width"], mlp_dim=dims["mlp_dim"],
                   patch_size=dims["patch_size"], image_size=image_size,
                   num_classes=num_classes, rep_size=rep_size)

    @property
    def num_patches(self) -> int:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch size "
                             f"{self.patch_size}")
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        return self.num_patches + 1  # the class token


def forward_macs_per_image(shape: ViTShape) -> int:
    """Multiply-adds of one forward pass over one image (the convention in the module doc).

    The per-layer term is written with the real mlp_dim (4*N*D^2 + 2*N*D*mlp_dim), which equals
    the convention's 12*N*D^2 for every standard variant (mlp_dim = 4*D). A pre-logits layer,
    when present, replaces D*classes by D*rep + rep*classes.
    """
    d, n = shape.width, shape.num_tokens
    per_layer = 4 * n * d * d + 2 * n * d * shape.mlp_dim + 2 * n * n * d
    embedding = shape.num_patches * 3 * shape.patch_size ** 2 * d
    if shape.rep_size:
        head = d * shape.rep_size + shape.rep_size * shape.num_classes
    else:
        head = d * shape.num_classes
    return shape.depth * per_layer + embedding + head


def train_flops_per_image(shape: ViTShape) -> int:
    """FLOPs of one training step per image: 2 FLOPs per MAC, backward = 2 x forward."""
    return 3 * 2 * forward_macs_per_image(shape)


def peak_flops(device_kind: str, platform: str) -> tuple[str | None, float | None]:
    """(matched chip name, dense bf16 peak FLOP/s) for a device, or (None, None) if unknown.

    CPUs have no entry on purpose: their peak depends on the core count, vector units and
    clocks of the machine, so an MFU figure for them would mean nothing.
    """
    if platform == "cpu":
        return None, None
    for pattern, name, flops in PEAK_BF16_FLOPS:
        if re.search(pattern, device_kind, flags=re.IGNORECASE):
            return name, flops
    return None, None


def mfu(flops_per_step: float, step_seconds: float, peak_per_chip: float | None,
        num_chips: int) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the chips' summed peak (None: n/a)."""
    if not peak_per_chip or step_seconds <= 0:
        return None
    return flops_per_step / (step_seconds * peak_per_chip * num_chips)
