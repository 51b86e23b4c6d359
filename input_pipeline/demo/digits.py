"""Writes scikit-learn's handwritten digits as an image folder, for the CPU fine-tuning demo.

    python -m input_pipeline.demo.digits --out_dir /tmp/digits

Layout: ROOT/{train,test}/<digit>/<n>.png, where n is the image's index in
`sklearn.datasets.load_digits` (1,797 images of 8x8 pixels, ink 0-16). Each image is scaled to
0-255 grey, enlarged by pixel repetition (nearest neighbour, exact) to `image_size` and stored
as RGB PNG, so it passes through the same decode path as any photo folder. Split: every fifth
image (n % 5 == 0, 360 images) is test, the rest (1,437) train; this depends on nothing but n.

Completeness: images are written under temporary names and renamed into place, and
`digits_manifest.json` (parameters and every file with its size) is written last. A folder is
reused only if its manifest matches the parameters and every listed file has its recorded size;
otherwise (a killed run, a deleted file, another image size) the train/ and test/ directories
this module wrote are deleted and written again. An owner mark written first keeps it from ever
deleting a folder it did not write. Concurrent callers on one machine wait on a lock file.
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from input_pipeline.demo import generated_files

MANIFEST_NAME = "digits_manifest.json"
GENERATOR_VERSION = 1
SPLITS = ("train", "test")
TEST_EVERY = 5
NUM_CLASSES = 10
_SOURCE_SIZE = 8     # load_digits images are 8x8
_INK_MAX = 16.0      # ... with ink values 0..16
_OWNER_MARK = ".coyo_vit_digits"
_LOCK_NAME = ".digits.lock"
_TMP_SUFFIX = ".digits_tmp"


def split_of(index: int) -> str:
    """The split of load_digits image `index`: every fifth image is test."""
    return "test" if index % TEST_EVERY == 0 else "train"


def digit_images(image_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 RGB images [1797, S, S, 3], digit labels [1797]) enlarged to `image_size`."""
    _check_size(image_size)
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the digits demo needs scikit-learn: pip install -e '.[demo]'") from e
    digits = load_digits()
    grey = np.rint(digits.images * (255.0 / _INK_MAX)).astype(np.uint8)
    factor = image_size // _SOURCE_SIZE
    big = np.repeat(np.repeat(grey, factor, axis=1), factor, axis=2)
    return np.repeat(big[..., None], 3, axis=-1), digits.target.astype(np.int64)


def _check_size(image_size: int) -> None:
    if (not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < _SOURCE_SIZE
            or image_size % _SOURCE_SIZE):
        raise ValueError(f"image_size must be a positive multiple of {_SOURCE_SIZE} (the digits are "
                         f"8x8 and are enlarged by pixel repetition), got {image_size!r}")


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _relative_path(index: int, label: int) -> str:
    return f"{split_of(index)}/{label}/{index:04d}.png"


def _params(image_size: int) -> dict[str, int]:
    return {"generator_version": GENERATOR_VERSION, "image_size": image_size,
            "test_every": TEST_EVERY}


def _is_complete(root: Path, image_size: int) -> bool:
    try:
        manifest = json.loads((root / MANIFEST_NAME).read_text())
        if manifest.get("params") != _params(image_size):
            return False
        return all((root / rel).stat().st_size == size for rel, size in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _claim(root: Path) -> None:
    """Marks `root` as ours, refusing when it already holds split folders someone else wrote."""
    if (root / _OWNER_MARK).exists():
        return
    foreign = [s for s in SPLITS if (root / s).exists()]
    if foreign:
        raise FileExistsError(f"{root} already holds {', '.join(foreign)}/ not written by "
                              f"input_pipeline/demo/digits.py; refusing to replace them. Give an "
                              f"empty directory or one that only holds the digits demo.")
    (root / _OWNER_MARK).write_text("Written by input_pipeline/demo/digits.py.\n")


def _write_atomic(path: Path, data: bytes) -> None:
    # ~1,800 small PNGs: no fsync each; the folder is trusted only once the manifest lists them.
    generated_files.write_atomic(path, data, _TMP_SUFFIX, sync=False)


def _generate(root: Path, image_size: int) -> None:
    _claim(root)
    (root / MANIFEST_NAME).unlink(missing_ok=True)  # first: the folder is now "incomplete"
    for split in SPLITS:
        shutil.rmtree(root / split, ignore_errors=True)
    images, labels = digit_images(image_size)
    files = {}
    for index, (image, label) in enumerate(zip(images, labels)):
        rel = _relative_path(index, int(label))
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _png(image)
        _write_atomic(path, data)
        files[rel] = len(data)
    manifest = {"description": "scikit-learn load_digits as an image folder, written by "
                               "input_pipeline/demo/digits.py",
                "params": _params(image_size), "num_classes": NUM_CLASSES,
                "counts": {s: sum(r.startswith(s + "/") for r in files) for s in SPLITS},
                "files": files}
    _write_atomic(root / MANIFEST_NAME, json.dumps(manifest, indent=1).encode())


def ensure_digits_folder(out_dir: str, *, image_size: int = 32) -> str:
    """Makes sure `out_dir` holds the complete digits folder for `image_size`; returns out_dir.

    Reuses a complete folder untouched and (re)writes an incomplete or different one. Raises
    FileExistsError instead of replacing train/ or test/ folders this module did not write.
    """
    _check_size(image_size)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    with generated_files.exclusive_lock(root / _LOCK_NAME):
        if not _is_complete(root, image_size):
            _generate(root, image_size)
    return str(root)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m input_pipeline.demo.digits",
        description="Write scikit-learn's digits as ROOT/{train,test}/<digit>/<n>.png "
                    "(unless the folder is already complete).")
    parser.add_argument("--out_dir", required=True, help="root of the image folder")
    parser.add_argument("--image_size", type=int, default=32, help="side in pixels, multiple of 8")
    args = parser.parse_args(argv)
    start = time.time()
    try:
        root = ensure_digits_folder(args.out_dir, image_size=args.image_size)
    except (ValueError, FileExistsError) as e:
        parser.error(str(e))
    counts = json.loads((Path(root) / MANIFEST_NAME).read_text())["counts"]
    print(f"digits in {root}: {counts['train']} train, {counts['test']} test images "
          f"[{time.time() - start:.1f} s]")


if __name__ == "__main__":
    main()
