"""Sweep points: the helpers configs use in `get_sweep()`, and expansion + validation of a sweep.

A sweep is a list of *points*; a point is a dict from key to value. Keys are either config
overrides, spelled as on the command line (`"config.schedule.base_lr"`), or parts of the config
argument (`"arg"`: the whole argument after the colon; `"arg.res"`: the `res=` item of a
`k=v,k=v` argument, merged into the base argument). Arguments matter because some settings are
arguments, not fields: `configs/imagenet_finetune.py:res=512` also changes the pp strings and
turns EMA on, which no single override does.

    from coyo_vit.tools.sweep_expand import product, sweep, zipped

    def get_sweep():
        return product([sweep("arg.res", [384, 512]),
                        sweep("config.schedule.base_lr", [0.06, 0.03, 0.01]),
                        sweep("config.total_steps", [20_000, 40_000])])

`product` and `zipped` take lists of points (what `sweep`, `fixed` and they themselves return),
so they nest; `chain` (or `+`) concatenates sub-sweeps that differ in shape.

Every point is validated before anything runs: its config is loaded with ml_collections'
own flag parser and its overrides applied to the locked config exactly as `train.py` applies
`--config.key=value`, so an unknown key or a value of the wrong type fails here, naming the
point, the key and the valid keys, instead of minutes into a sweep.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import itertools
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import ml_collections

Point = dict[str, Any]
ARG_KEY = "arg"
CONFIG_PREFIX = "config."
SCALARS = (bool, int, float, str)
MAX_NAME_CHARS = 120
_SAFE_CHARS = re.compile(r"[^A-Za-z0-9._+=,-]")


# ---------------------------------------------------------------------------------------------
# Helpers for get_sweep()
# ---------------------------------------------------------------------------------------------

def sweep(key: str, values: Iterable[Any]) -> list[Point]:
    """One point per value of `key`: sweep("config.total_steps", [20000, 40000])."""
    check_key(key)
    values = list(values)
    if not values:
        raise ValueError(f"sweep({key!r}, ...) got no values; give at least one")
    for value in values:
        check_value(key, value)
    return [{key: value} for value in values]


def fixed(key: str, value: Any) -> list[Point]:
    """A single point setting `key` (for use inside product/zipped)."""
    return sweep(key, [value])


def product(factors: Sequence[list[Point]]) -> list[Point]:
    """The cartesian product of sub-sweeps, merging their points; the last factor varies fastest.

    Two factors that set the same key are an error (the result would depend on the order).
    """
    factors = [_check_points(f, f"product factor {i}") for i, f in enumerate(factors)]
    if not factors:
        raise ValueError("product([]) has no factors; give at least one list of points")
    return [_merge(combo, "product") for combo in itertools.product(*factors)]


def zipped(columns: Sequence[list[Point]]) -> list[Point]:
    """Point i merges point i of every sub-sweep (they must have the same length)."""
    columns = [_check_points(c, f"zipped column {i}") for i, c in enumerate(columns)]
    if not columns:
        raise ValueError("zipped([]) has no columns; give at least one list of points")
    lengths = [len(c) for c in columns]
    if len(set(lengths)) != 1:
        raise ValueError(f"zipped() needs sub-sweeps of equal length, got lengths {lengths}")
    return [_merge(row, "zipped") for row in zip(*columns)]


def chain(parts: Sequence[list[Point]]) -> list[Point]:
    """The points of each sub-sweep one after another (e.g. different grids per resolution)."""
    return [dict(p) for i, part in enumerate(parts) for p in _check_points(part, f"chain part {i}")]


def check_key(key: Any) -> None:
    """Keys are `config.<path>`, `arg` or `arg.<name>`; anything else would be ambiguous."""
    ok = isinstance(key, str) and (
        (key.startswith(CONFIG_PREFIX) and _is_dotted(key[len(CONFIG_PREFIX):]))
        or key == ARG_KEY or (key.startswith(ARG_KEY + ".") and _is_dotted(key[len(ARG_KEY) + 1:], 1)))
    if not ok:
        raise ValueError(f"sweep key {key!r} is not valid; use 'config.<field path>' for an override "
                         f"(e.g. 'config.schedule.base_lr'), '{ARG_KEY}' for the whole config "
                         f"argument or '{ARG_KEY}.<name>' for one k=v item of it (e.g. 'arg.res')")


def check_value(key: str, value: Any) -> None:
    """Values must survive `--config.key=value` on a command line: scalars or tuples of them."""
    if isinstance(value, (tuple, list)) and not key.startswith(ARG_KEY):
        if all(isinstance(v, SCALARS) for v in value):
            return
    elif isinstance(value, SCALARS):
        if key.startswith(ARG_KEY) and isinstance(value, str) and key != ARG_KEY and "," in value:
            raise ValueError(f"{key}={value!r}: an argument item cannot contain ','")
        return
    raise ValueError(f"{key}={value!r} ({type(value).__name__}) cannot be passed on a command line; "
                     f"valid values are bool, int, float, str (and tuples of those for config "
                     f"fields). None cannot be set by --config.key=value.")


def _is_dotted(path: str, max_parts: int | None = None) -> bool:
    parts = path.split(".")
    return all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", p) for p in parts) and (
        max_parts is None or len(parts) <= max_parts)


def _check_points(points: Any, where: str) -> list[Point]:
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise TypeError(f"{where} must be a list of points (dicts), as returned by sweep(), fixed(), "
                        f"product(), zipped() or chain(); got {type(points).__name__}")
    for point in points:
        for key, value in point.items():
            check_key(key)
            check_value(key, value)
    return points


def _merge(parts: Iterable[Point], how: str) -> Point:
    merged: Point = {}
    for part in parts:
        for key, value in part.items():
            if key in merged:
                raise ValueError(f"{how}() sets {key!r} twice ({merged[key]!r} and {value!r}); "
                                 f"each key may come from one sub-sweep only")
            merged[key] = value
    return merged


# ---------------------------------------------------------------------------------------------
# Expansion of a config's sweep into runnable, validated points
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SweepPoint:
    """One validated point: where it runs and the exact config flags of its command."""
    index: int
    overrides: Point          # as get_sweep() gave it
    name: str                 # its workdir's name under the sweep root
    config_flag: str          # value of --config: path[:argument]
    override_flags: tuple[str, ...]  # --config.key=value, the point's then the global ones
    total_steps: int


def cli_value(value: Any) -> str:
    """The text ml_collections' flag parser turns back into `value`."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(cli_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)


def point_name(point: Point) -> str:
    """A stable, filesystem-safe directory name that reads like the point's overrides.

    `{"config.schedule.base_lr": 0.06, "arg.res": 384}` -> `schedule.base_lr=0.06,arg.res=384`.
    Characters outside [A-Za-z0-9._+=,-] become '_'; when that loses information or the name is
    too long, a hash of the exact point is appended so distinct points never share a workdir.
    """
    if not point:
        return "base"
    parts = [f"{key[len(CONFIG_PREFIX):] if key.startswith(CONFIG_PREFIX) else key}={cli_value(value)}"
             for key, value in point.items()]
    readable = ",".join(parts)
    safe = _SAFE_CHARS.sub("_", readable)
    if safe.startswith((".", "-")):
        safe = "_" + safe
    if safe == readable and len(safe) <= MAX_NAME_CHARS:
        return safe
    digest = hashlib.sha1(json.dumps(point, sort_keys=True, default=repr).encode()).hexdigest()[:10]
    return f"{safe[:MAX_NAME_CHARS]}-{digest}"


def split_config_spec(spec: str) -> tuple[str, str | None]:
    """`configs/X.py:arg` -> (`configs/X.py`, `arg`); no colon -> argument None."""
    path, sep, arg = spec.partition(":")
    return path, (arg if sep else None)


def merge_argument(base: str | None, point: Point) -> str | None:
    """The config argument of a point: `arg` replaces the base, `arg.k` sets one k=v item."""
    arg = point.get(ARG_KEY, base)
    items = {k[len(ARG_KEY) + 1:]: v for k, v in point.items() if k.startswith(ARG_KEY + ".")}
    if not items:
        return None if arg is None else str(arg)
    merged: dict[str, str] = {}
    for item in filter(None, str(arg or "").split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"cannot set {sorted('arg.' + k for k in items)} on the config argument "
                             f"{arg!r}: it is not of the form k=v,k=v")
        merged[key] = value
    merged.update({k: cli_value(v) for k, v in items.items()})
    return ",".join(f"{k}={v}" for k, v in merged.items())


def load_sweep(config_path: str, arg: str | None) -> list[Point]:
    """Calls the config file's `get_sweep()` (or `get_sweep(arg)`) and checks what it returns."""
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"config file {config_path!r} does not exist")
    spec = importlib.util.spec_from_file_location("_coyo_vit_sweep_config", config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    get_sweep = getattr(module, "get_sweep", None)
    if get_sweep is None:
        raise ValueError(f"{config_path} defines no get_sweep(); a sweep config returns its points "
                         f"from get_sweep() (see coyo_vit.tools.sweep_expand)")
    points = get_sweep(arg) if inspect.signature(get_sweep).parameters else get_sweep()
    points = _check_points(points, f"{config_path}:get_sweep()")
    if not points:
        raise ValueError(f"{config_path}:get_sweep() returned no points")
    seen: dict[str, int] = {}
    for i, point in enumerate(points):
        key = json.dumps(point, sort_keys=True, default=repr)
        if key in seen:
            raise ValueError(f"sweep points {seen[key]} and {i} are identical ({point}); each point "
                             f"needs its own workdir")
        seen[key] = i
    return points


def load_config(config_flag: str, override_flags: Sequence[str]) -> ml_collections.ConfigDict:
    """The config exactly as train.py would see it: loaded, locked, overrides applied."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["sweep", f"--config={config_flag}", *override_flags]
    flag_values = flags.FlagValues()
    # sys_argv: config_flags finds the --config.* override flags there (default: sys.argv).
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=flag_values,
                                    lock_config=True, sys_argv=argv)
    flag_values(argv)
    return flag_values.config


def expand(config_spec: str, global_overrides: Sequence[str] = ()) -> list[SweepPoint]:
    """All points of the config's sweep, each validated against its own config (nothing runs).

    `global_overrides` (`--config.key=value` strings) apply to every point, after its own.
    """
    path, base_arg = split_config_spec(config_spec)
    global_overrides = list(global_overrides)
    global_keys = {_flag_key(f) for f in global_overrides}
    points = load_sweep(path, base_arg)
    expanded: list[SweepPoint] = []
    names: dict[str, int] = {}
    for index, point in enumerate(points):
        name = point_name(point)
        where = f"sweep point {index} ({name})"
        clash = sorted(global_keys & {k for k in point if k.startswith(CONFIG_PREFIX)})
        if clash:
            raise ValueError(f"{where}: {clash} is set both by the sweep and on the command line")
        if name in names:
            raise ValueError(f"sweep points {names[name]} and {index} map to the same workdir {name!r}")
        names[name] = index
        try:
            arg = merge_argument(base_arg, point)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        config_flag = path if arg is None else f"{path}:{arg}"
        flags_ = [f"--{k}={cli_value(v)}" for k, v in point.items() if k.startswith(CONFIG_PREFIX)]
        flags_ += global_overrides
        config = _validated_config(config_flag, flags_, where, set(global_overrides))
        total_steps = config.get("total_steps")
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"{where}: config.total_steps must be a positive int to tell when the "
                             f"point is finished, got {total_steps!r}")
        expanded.append(SweepPoint(index, dict(point), name, config_flag, tuple(flags_), total_steps))
    return expanded


def _flag_key(flag: str) -> str:
    if not flag.startswith("--" + CONFIG_PREFIX) or "=" not in flag:
        raise ValueError(f"extra argument {flag!r} is not an override; write --config.<key>=<value>")
    return flag[2:].partition("=")[0]


def _validated_config(config_flag: str, override_flags: list[str], where: str,
                      global_overrides: set[str]) -> ml_collections.ConfigDict:
    """Loads the point's config with its overrides; errors name the key and the valid keys."""
    try:
        return load_config(config_flag, override_flags)
    except Exception as e:  # config files and the flag parser raise many types; all are fatal here
        detail = f"{type(e).__name__}: {e}"
    bad = _first_bad_override(config_flag, override_flags)
    if bad is not None:
        flag, message = bad
        origin = " (given on the command line, for every point)" if flag in global_overrides else ""
        raise ValueError(f"{where}: {message}{origin}") from None
    raise ValueError(f"{where}: config {config_flag!r} with overrides {override_flags} does not "
                     f"load: {detail}") from None


def _first_bad_override(config_flag: str, override_flags: list[str]) -> tuple[str, str] | None:
    """(flag, what is wrong) for the override that breaks the config, or None."""
    try:
        base = load_config(config_flag, [])
    except Exception as e:  # the config itself fails, whatever the overrides
        return "", f"config {config_flag!r} does not load: {type(e).__name__}: {e}"
    for flag in override_flags:
        key = _flag_key(flag)
        node: Any = base
        parts = key[len(CONFIG_PREFIX):].split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                parent = "config" + "".join("." + p for p in parts[:depth])
                valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                return flag, (f"unknown config key {key!r} in {flag!r}: {parent} has no field "
                              f"{part!r}; valid fields of {parent}: {valid}")
            node = node[part]
        try:
            load_config(config_flag, [flag])
        except Exception as e:
            return flag, f"bad value in {flag!r}: {type(e).__name__}: {e}"
    return None
