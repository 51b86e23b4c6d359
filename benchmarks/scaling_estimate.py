"""Time, chips and input rate to pretrain ViTs on COYO-Labeled-300M (the recipe: 7 epochs).

    python -m benchmarks.scaling_estimate --mfu 0.4 --pp_images_per_core 637 --out scaling.json

days = epochs x images x training FLOPs per image / (chips x peak bf16 FLOP/s x MFU), with the
analytic FLOP count of benchmarks/flops.py. MFU is an input: replace the default with the figure
`benchmarks.accelerator` measures on the chip in question. Input: every host must decode and
augment (images/s of the whole job) / hosts images per second; `--pp_images_per_core` (from
`benchmarks.input_pipeline`) turns that into CPU cores per host.
"""
from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence

from benchmarks.flops import ViTShape, peak_flops, train_flops_per_image
from coyo_vit.class_names import NUM_COYO_CLASSES

DATASET_IMAGES = 300_000_000
NUM_SHARDS = 30_000  # img2dataset shards of ~10k images for the full set

# (name, device_kind as JAX reports it, platform, chips, chips per host). TPU v3 is absent from
# flops.PEAK_BF16_FLOPS (JAX reports "TPU v3"): its 123 TFLOP/s per chip is added here.
SYSTEMS = (
    ("TPU v3-512", "TPU v3", "tpu", 256, 4),
    ("TPU v4-256", "TPU v4", "tpu", 128, 4),
    ("TPU v5e-256", "TPU v5 lite", "tpu", 256, 4),
    ("TPU v5p-256", "TPU v5p", "tpu", 128, 4),
    ("8x8 H100 SXM", "NVIDIA H100 80GB HBM3", "gpu", 64, 8),
)
EXTRA_PEAKS = {"TPU v3": 123e12}


def estimate(variant: str, mfu: float, epochs: float, pp_per_core: float) -> list[dict]:
    shape = ViTShape.from_variant(variant, image_size=224, num_classes=NUM_COYO_CLASSES, rep_size=1024)
    flops_per_image = train_flops_per_image(shape)
    images = epochs * DATASET_IMAGES
    rows = []
    for name, kind, platform, chips, per_host in SYSTEMS:
        peak = EXTRA_PEAKS.get(kind) or peak_flops(kind, platform)[1]
        seconds = images * flops_per_image / (chips * peak * mfu)
        hosts = chips // per_host
        per_host_rate = images / seconds / hosts
        rows.append({"variant": variant, "system": name, "chips": chips, "hosts": hosts,
                     "peak_tflops_per_chip": peak / 1e12, "mfu": mfu,
                     "train_gflops_per_image": flops_per_image / 1e9,
                     "days": seconds / 86400, "chip_days": seconds * chips / 86400,
                     "images_per_sec_per_chip": images / seconds / chips,
                     "images_per_sec_per_host": per_host_rate,
                     "cpu_cores_per_host": math.ceil(per_host_rate / pp_per_core),
                     "files_per_host": math.ceil(NUM_SHARDS / hosts)})
    return rows


def to_markdown(rows: list[dict]) -> str:
    head = ("| model | system | chips | days | chip-days | img/s per chip | img/s per host "
            "| CPU cores per host | shards per host |\n|---|---|---|---|---|---|---|---|---|")
    lines = [f"| {r['variant']} | {r['system']} | {r['chips']} | {r['days']:.1f} | {r['chip_days']:.0f} "
             f"| {r['images_per_sec_per_chip']:.0f} | {r['images_per_sec_per_host']:,.0f} "
             f"| {r['cpu_cores_per_host']} | {r['files_per_host']} |" for r in rows]
    return "\n".join([head, *lines])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="B/16,L/16", help="comma-separated ViT variants")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation to assume (0-1]")
    parser.add_argument("--epochs", type=float, default=7.0, help="passes over the 300M images")
    parser.add_argument("--pp_images_per_core", type=float, default=637.0,
                        help="pretraining preprocessing rate of one CPU core (benchmarks.input_pipeline)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if not 0 < args.mfu <= 1:
        parser.error(f"--mfu must be in (0, 1], got {args.mfu}")
    rows = [r for v in args.variants.split(",") for r in estimate(v, args.mfu, args.epochs, args.pp_images_per_core)]
    print(to_markdown(rows))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
