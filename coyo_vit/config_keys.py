"""The one check for config sections: a misspelled key must fail loudly, never be ignored."""
from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any


def check_keys(section: Mapping[str, Any], valid: Iterable[str], where: str) -> None:
    """Raises ValueError naming the unknown keys of `section`, the nearest valid ones and all
    valid ones, e.g. "config.optimizer has unknown keys ['weight_decy'] (did you mean
    weight_decay?); valid keys: [...]"."""
    valid = sorted(set(valid))
    unknown = sorted(set(section) - set(valid))
    if not unknown:
        return
    near = [match for key in unknown for match in difflib.get_close_matches(key, valid, n=1)]
    hint = f" (did you mean {', '.join(near)}?)" if near else ""
    raise ValueError(f"{where} has unknown keys {unknown}{hint}; valid keys: {valid}")
