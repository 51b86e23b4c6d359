"""The published COYO-vs-JFT-300M comparison (the kakaobrain/coyo-vit README's table) as data, for coyo_vit.tools.report.

ViT-L/16 pretrained on each upstream dataset, then fine-tuned on ImageNet-1k (kakaobrain/coyo-vit:
SGD momentum 0.9, batch 512, cosine, EMA 0.9999 at 512px) and evaluated on the ImageNet
validation set (top-1) and ImageNet-ReaL, in percent. Kept in one place so the report and its
test compare against the same published numbers.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

JFT = "JFT-300M"
COYO = "COYO-Labeled-300M"
UPSTREAMS = (JFT, COYO)
SOURCE = "kakaobrain/coyo-vit (published)"
# Spellings users type for --upstream, mapped to the names the table uses.
UPSTREAM_ALIASES = {"jft": JFT, "jft300m": JFT, "jft-300m": JFT,
                    "coyo": COYO, "coyo300m": COYO, "coyo-labeled-300m": COYO, "coyo-300m": COYO}


@dataclass(frozen=True)
class PublishedResult:
    """One row: top-1 accuracies in percent after fine-tuning at `res` pixels."""
    model: str
    upstream: str
    res: int
    imagenet: float
    real: float

    def as_dict(self) -> dict:
        return asdict(self)


RESULTS: tuple[PublishedResult, ...] = (
    PublishedResult("ViT-L/16", JFT, 512, 87.76, 90.54),
    PublishedResult("ViT-L/16", COYO, 512, 87.24, 90.03),
    PublishedResult("ViT-L/16", JFT, 384, 87.12, 89.99),
    PublishedResult("ViT-L/16", COYO, 384, 86.72, 89.84),
)


def canonical_upstream(name: str) -> str:
    """`coyo` -> COYO-Labeled-300M, `jft` -> JFT-300M; other names (e.g. ImageNet-21k) as given."""
    return UPSTREAM_ALIASES.get(name.strip().lower(), name.strip())


def lookup(model: str, upstream: str, res: int) -> PublishedResult | None:
    """The published row for this model, upstream and resolution, or None."""
    for row in RESULTS:
        if (row.model, row.upstream, row.res) == (model, upstream, res):
            return row
    return None
