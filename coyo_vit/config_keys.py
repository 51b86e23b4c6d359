"""Loud failure on misspelled config keys inside free-form config sections."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def require_known_keys(section: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    """Raises naming the unknown keys of `section` and the valid ones (a typo must not be ignored)."""
    allowed = set(allowed)
    unknown = sorted(set(section.keys()) - allowed)
    if unknown:
        raise ValueError(f"Unknown key(s) {unknown} in config.{where}; valid keys: {sorted(allowed)}.")
