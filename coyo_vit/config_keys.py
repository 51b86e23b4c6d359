"""The one check for config sections: a misspelled key must fail loudly, never be ignored; and
ConfigError, which the scripts report on one line (coyo_vit/training/cli.py)."""
from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any


class ConfigError(ValueError):
    """A config value (or key) that cannot work, with what would be valid: the scripts print its
    message on one line, `error: ...`, and exit with status 2 (a usage error, not a crash)."""


def check_keys(section: Mapping[str, Any], valid: Iterable[str], where: str) -> None:
    """Raises ConfigError (a ValueError) naming the unknown keys of `section`, the nearest valid ones and all
    valid ones, e.g. "config.optimizer has unknown keys ['weight_decy'] (did you mean
    weight_decay?); valid keys: [...]"."""
    valid = sorted(set(valid))
    unknown = sorted(set(section) - set(valid))
    if not unknown:
        return
    near = [match for key in unknown for match in difflib.get_close_matches(key, valid, n=1)]
    hint = f" (did you mean {', '.join(near)}?)" if near else ""
    raise ConfigError(f"{where} has unknown keys {unknown}{hint}; valid keys: {valid}")
