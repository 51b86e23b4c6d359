"""The XLA options the train and eval steps are compiled with, per platform, and why.

Passed to `jax.jit(compiler_options=...)`, so they apply to these steps alone and need no
environment set before JAX starts. A flag the user sets in `XLA_FLAGS` wins: ours is then left
out, so `XLA_FLAGS=--xla_gpu_enable_triton_gemm=true` restores XLA's own choice.
"""
from __future__ import annotations

import os
import shlex
from collections.abc import Mapping

from jax.sharding import Mesh

# CPU: XLA:CPU's compile time is mostly LLVM building one kernel per fusion (~400 for L/16 with
# scan). LLVM backend level 1 instead of 2 cut the L/16 compile by 5-9% (0.3-0.45 CPU-s) and gave
# bitwise-identical params, optimizer state and metrics with an unchanged step time (the matmuls
# run in YNNPACK, not in LLVM code); tests/test_train_step.py checks the bits.
_CPU = {"xla_backend_optimization_level": 1}

# GPU: with Triton's GEMM fusion off, XLA's cuBLAS rewriter sees the matrix products first and
# folds the MLP's bias + GELU (and 26 other bias adds) into cuBLASLt epilogues ("BIAS_GELU_AUX",
# "BIAS" in the compiled HLO) instead of leaving them to separate memory-bound fusions. On an
# H100 (jax 0.11.2), ViT-B/16 bf16 batch 256 with Model.gelu_recompute: 76.5 -> 73.4 ms per step
# (35.7% -> 37.2% MFU); without gelu_recompute the GELU is not matched and it gains 1.1 ms.
# docs/performance.md, section 3, has the runs.
_GPU = {"xla_gpu_enable_triton_gemm": False}

# jax names CUDA and ROCm devices "gpu" alike; measured on CUDA (H100) only.
_BY_PLATFORM: Mapping[str, Mapping[str, object]] = {"cpu": _CPU, "gpu": _GPU}


def flags_set_in(xla_flags: str) -> set[str] | None:
    """Names of the flags an XLA_FLAGS value sets, read as XLA reads it: `--name[=value]` tokens
    up to the first token without a leading dash. A value that does not start with a dash names a
    file of flags, whose text is read the same way; None when that file cannot be read."""
    text = xla_flags.strip()
    if text and not text.startswith("-"):
        try:
            with open(text, encoding="utf-8") as file:
                text = file.read()
        except OSError:
            return None
    try:
        tokens = shlex.split(text)
    except ValueError:  # an unbalanced quote: split on spaces, as a best effort
        tokens = text.split()
    names = set()
    for token in tokens:
        if not token.startswith("-"):
            break
        names.add(token.lstrip("-").split("=", 1)[0])
    return names


def for_platform(platform: str, xla_flags: str | None = None) -> dict[str, object] | None:
    """The step's compiler options on `platform` (a jax Device.platform), without those that
    `xla_flags` (default: the XLA_FLAGS environment variable) sets itself; None when none remain,
    and when XLA_FLAGS names a file that cannot be read (then XLA's flags decide alone)."""
    set_by_user = flags_set_in(os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags)
    if set_by_user is None:
        return None
    options = {name: value for name, value in _BY_PLATFORM.get(platform, {}).items()
               if name not in set_by_user}
    return options or None


def for_mesh(mesh: Mesh) -> dict[str, object] | None:
    """`for_platform` of the devices a step runs on (a mesh holds devices of one platform)."""
    return for_platform(mesh.devices.flat[0].platform)
