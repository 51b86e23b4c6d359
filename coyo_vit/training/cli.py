"""The scripts' entry: `cli.run(main)` is absl's `app.run(main)` with usage errors on one line.

absl parses the flags inside `app.run`, and `--config` is parsed there too (ml_collections loads
the config file, calls `get_config(arg)` and applies each `--config.key=value`). A misspelled key
or a bad config argument then ends in chained tracebacks. Here any such error is one line on
stderr, `error: <what is wrong, and what would be valid>`, and exit status 2, before `main` runs;
an unknown key names the nearest valid ones (coyo_vit.config_keys.check_keys). A ConfigError
that `main` raises (run_config.parse's checks of the config) is reported the same way.

It also sets how much the libraries below print (`quiet_libraries`): at absl's default
`--verbosity=0` only what a user needs; `--verbosity=1` everything.
"""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
from absl import app, flags

from coyo_vit.config_keys import ConfigError, check_keys

CONFIG_FLAG = "config"
# What a config file or an override raises for a bad value (ValueError, also absl's flag
# errors), an unknown key (KeyError / AttributeError from ml_collections), a missing file
# (OSError). Anything else during parsing is a bug and keeps its traceback.
_USAGE_ERRORS = (flags.Error, ValueError, KeyError, AttributeError, OSError)
_CONFIG_FILE_ERROR = "Error whilst parsing config file"
VERBOSE = 1  # --verbosity from which the libraries' own chatter is shown too
# TF_CPP_MIN_LOG_LEVEL at default verbosity. 3 hides TensorFlow's and XLA's C++ logs up to ERROR:
# those a run prints are per record (libjpeg's `Premature end of JPEG data` for each truncated
# image, which the skip counts already report) or start-up notes (oneDNN, CPU features), and an
# error that stops a run is raised in Python with its message. It is set whatever the environment
# says: importing jax already set it to 1 (jax/__init__.py), so a user's value cannot be told apart.
_QUIET_NATIVE_LEVEL = "3"


def run(main: Callable[[list[str]], Any]) -> None:
    """`app.run(main)`; flag errors, and a ConfigError raised by `main`, print one line."""
    def main_reporting_config_errors(argv: list[str]) -> Any:
        quiet_libraries(flags.FLAGS["verbosity"].value)
        try:
            return main(argv)
        except ConfigError as err:
            sys.stderr.write(f"error: {' '.join(str(err).split())}\n")
            sys.exit(2)

    app.run(main_reporting_config_errors, flags_parser=parse_flags)


def quiet_libraries(verbosity: int) -> None:
    """Below `VERBOSE`, hides the libraries' notes a user need not read; from it, shows all.

    Runs after the flags are parsed and before TensorFlow or a JAX backend starts (the scripts
    import neither before `main`): both read TF_CPP_MIN_LOG_LEVEL when they start. JAX logs its
    search for a TPU (`Unable to initialize backend 'tpu'`) at INFO on every CPU or GPU host.
    """
    verbose = verbosity >= VERBOSE
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0" if verbose else _QUIET_NATIVE_LEVEL
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.NOTSET if verbose else logging.WARNING)


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's flag parsing; a usage error exits with status 2 after one line on stderr."""
    try:
        return flags.FLAGS(list(argv))
    except _USAGE_ERRORS as err:
        message = describe(err, argv)
        if message is None:
            raise
    sys.stderr.write(f"error: {message}\n")
    sys.exit(2)


def describe(err: BaseException, argv: Sequence[str]) -> str | None:
    """The one line for a flag-parsing error, or None where it is not a usage error."""
    chain = [err]
    while (chain[-1].__cause__ or chain[-1].__context__) is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    for outer, inner in zip(chain, chain[1:]):
        # ml_collections re-raises a config file's error as one holding its whole traceback.
        if str(outer).startswith(_CONFIG_FILE_ERROR):
            if not isinstance(inner, ValueError):
                return None  # a bug in the config file, not a usage error: keep the traceback
            return _one_line(f"--{CONFIG_FLAG}={_config_argument(argv)}: {inner}")
    if isinstance(chain[-1], (KeyError, AttributeError)):
        overrides = [arg.split("=", 1)[0][len(CONFIG_FLAG) + 3:] for arg in argv[1:]
                     if arg.startswith(f"--{CONFIG_FLAG}.")]
        unknown = _unknown_key(argv, overrides)
        if unknown:
            return unknown
        return _one_line(chain[-1].args[0] if chain[-1].args else repr(chain[-1]))
    return _one_line(str(err))


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


def _config_argument(argv: Sequence[str]) -> str | None:
    """The value of --config in `argv` (`--config=X` or `--config X`), the last one given."""
    value = None
    for i, arg in enumerate(argv[1:], 1):
        if arg.startswith(f"--{CONFIG_FLAG}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{CONFIG_FLAG}" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def _unknown_key(argv: Sequence[str], overrides: Sequence[str]) -> str | None:
    """`--config.a.b=...` naming a key the config lacks: which one, and the valid ones there."""
    path = _config_argument(argv)
    if path is None:
        return None
    try:  # the config again (it failed inside absl's parsing, which keeps no handle on it)
        config = flags.FLAGS[CONFIG_FLAG].parser.parse(path)
    except Exception:  # noqa: BLE001 - then the original error is reported instead
        return None
    for override in overrides:
        section, where = config, CONFIG_FLAG
        for key in override.split("."):
            if not isinstance(section, ml_collections.ConfigDict):
                return (f"--{CONFIG_FLAG}.{override}: {where} is a value, not a section "
                        f"(set --{where}=... instead)")
            try:
                check_keys({key: None}, section.keys(), where)
            except ValueError as unknown:
                return f"--{CONFIG_FLAG}.{override}: {unknown}"
            section, where = section[key], f"{where}.{key}"
    return None
