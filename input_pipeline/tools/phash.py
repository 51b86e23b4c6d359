"""Perceptual hashes (pHash) as COYO's metadata `imagehash` column defines them.

COYO computed `imagehash` with the `imagehash` library's `phash`, so decontamination compares like
with like only if we hash exactly the same way: greyscale (PIL's "L" conversion), a 32x32 LANCZOS
resize, a type-II DCT over rows then columns, the top-left 8x8 coefficients, each bit set where the
coefficient is above their median, bits read row-major into 16 hex digits (first bit = most
significant). The DCT's scale factor does not change the comparison with the median, so scipy's
unnormalised DCT-II is used as is.

Hashes are handled as uint64 numbers: the Hamming distance of two hashes is the popcount of their
XOR, which numpy computes for whole arrays at once.
"""
from __future__ import annotations

import io
from typing import Union

import numpy as np
import scipy.fft
from PIL import Image

HASH_SIZE = 8            # 8x8 low-frequency coefficients = 64 bits
HIGHFREQ_FACTOR = 4      # images are reduced to 32x32 before the DCT
_IMG_SIZE = HASH_SIZE * HIGHFREQ_FACTOR
_HEX_DIGITS = HASH_SIZE * HASH_SIZE // 4

ImageLike = Union[bytes, Image.Image, np.ndarray]


def phash(image: ImageLike) -> int:
    """The 64-bit pHash of encoded image bytes, a PIL image or a uint8 array [H, W(, C)].

    Raises ValueError (naming the problem) for bytes PIL cannot decode, so callers can skip and
    count such images instead of hashing garbage.
    """
    grey = _to_grey(image).resize((_IMG_SIZE, _IMG_SIZE), Image.Resampling.LANCZOS)
    pixels = np.asarray(grey, dtype=np.float64)
    coefficients = scipy.fft.dct(scipy.fft.dct(pixels, type=2, axis=0), type=2, axis=1)
    low = coefficients[:HASH_SIZE, :HASH_SIZE]
    bits = (low > np.median(low)).reshape(-1)
    return int("".join("1" if b else "0" for b in bits), 2)


def to_hex(value: int) -> str:
    """16 lowercase hex digits, as in the metadata's `imagehash` column."""
    if not 0 <= value < 2**64:
        raise ValueError(f"a pHash is a 64-bit unsigned value, got {value!r}")
    return f"{value:0{_HEX_DIGITS}x}"


def from_hex(text: str) -> int:
    """Parses a 16-digit hex pHash (the metadata's `imagehash`)."""
    if not isinstance(text, str) or len(text) != _HEX_DIGITS:
        raise ValueError(f"a pHash is {_HEX_DIGITS} hex digits, got {text!r}")
    try:
        return int(text, 16)
    except ValueError:
        raise ValueError(f"a pHash is {_HEX_DIGITS} hex digits, got {text!r}") from None


def hex_array(texts: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """(hashes uint64 [n], valid bool [n]) from hex strings; None or malformed entries are invalid.

    The metadata has 300M rows: this stays vectorised instead of calling from_hex per row.
    """
    n = len(texts)
    valid = np.array([isinstance(t, str) and len(t) == _HEX_DIGITS and t.isascii()
                      for t in texts], dtype=bool)
    hashes = np.zeros(n, dtype=np.uint64)
    if valid.any():
        chosen = np.array([t for t, ok in zip(texts, valid) if ok], dtype=f"S{_HEX_DIGITS}")
        digits = np.frombuffer(chosen.tobytes(), dtype=np.uint8).reshape(-1, _HEX_DIGITS)
        nibbles = np.full(digits.shape, 255, dtype=np.uint8)
        for lo, hi, offset in ((48, 57, 48), (97, 102, 87), (65, 70, 55)):  # 0-9, a-f, A-F
            in_range = (digits >= lo) & (digits <= hi)
            nibbles[in_range] = digits[in_range] - offset
        good = (nibbles != 255).all(axis=1)
        shifts = np.arange(_HEX_DIGITS - 1, -1, -1, dtype=np.uint64) * np.uint64(4)
        values = (nibbles.astype(np.uint64) << shifts).sum(axis=1, dtype=np.uint64)
        positions = np.flatnonzero(valid)
        hashes[positions] = np.where(good, values, 0)
        valid[positions[~good]] = False
    return hashes, valid


def hamming(a: int | np.ndarray, b: int | np.ndarray) -> int | np.ndarray:
    """Number of differing bits between hashes (ints or uint64 arrays, broadcast)."""
    if isinstance(a, int) and isinstance(b, int):
        return (a ^ b).bit_count()
    return np.bitwise_count(np.asarray(a, np.uint64) ^ np.asarray(b, np.uint64)).astype(np.int64)


def _to_grey(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("L")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(f"phash: arrays must be uint8 [H, W] or [H, W, C], got "
                             f"{image.dtype} {image.shape}")
        return Image.fromarray(image[..., :3] if image.ndim == 3 else image).convert("L")
    if isinstance(image, (bytes, bytearray, memoryview)):
        try:
            with Image.open(io.BytesIO(bytes(image))) as opened:
                opened.load()
                return opened.convert("L")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"phash: bytes do not decode as an image ({e})") from None
    raise TypeError(f"phash: expected bytes, a PIL image or a uint8 array, got "
                    f"{type(image).__name__}")
