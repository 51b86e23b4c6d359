"""Timing one function's forward + backward pass on the device, with its error against a reference.

Shared by the kernel-level benchmarks (attention.py, block_parts.py): each row compiles
`fn(*primals)` with its VJP applied to a fixed cotangent, times it, and compares the output and
every input gradient with a float32 run of the reference implementation.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from benchmarks import report


def forward_backward(fn: Callable[..., jax.Array]) -> Callable:
    """jit(*primals, cotangent) -> (output, gradients of every primal): what a training step asks."""
    def run(*args):
        *primals, cotangent = args
        out, pullback = jax.vjp(fn, *primals)
        return out, pullback(cotangent)
    return jax.jit(run)


def relative_error(got: Any, ref: Any) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


def bench(name: str, fn: Callable[..., jax.Array], inputs: tuple[Any, ...],
          reference: tuple[Any, Any], iters: int) -> dict[str, Any]:
    """One row: compile s, median fwd+bwd ms over `iters` calls, relative errors of the output and
    the worst input gradient; or `error` when the implementation refuses (shape, no GPU)."""
    step = forward_backward(fn)
    row: dict[str, Any] = {"implementation": name}
    try:
        started = time.perf_counter()
        out = jax.block_until_ready(step(*inputs))
        row["compile_s"] = time.perf_counter() - started
    except Exception as err:  # cuDNN refusing a shape, or no GPU: a row that says why
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        return row
    times = []
    for _ in range(iters):
        started = time.perf_counter()
        jax.block_until_ready(step(*inputs))
        times.append(time.perf_counter() - started)
    row["ms"] = 1e3 * report.median(times)
    got_out, got_grads = out
    ref_out, ref_grads = reference
    row["err_out"] = relative_error(got_out, ref_out)
    row["err_grad"] = max(relative_error(g, r) for g, r in zip(got_grads, ref_grads))
    return row


# Table columns after a benchmark's own leading ones (implementation, ...).
RESULT_COLUMNS = [("err_out", "rel. err out"), ("err_grad", "rel. err grads (max)"),
                  ("compile_s", "compile s"), ("error", "error")]


def write_rows(path: str | None, benchmark: str, rows: list[dict[str, Any]], **fields: Any) -> None:
    """The rows as JSON with the device they ran on and whether TensorFlow was loaded."""
    report.write_json(path, {"benchmark": benchmark, **fields,
                             "device_kind": jax.devices()[0].device_kind, "rows": rows,
                             "tensorflow_imported": "tensorflow" in sys.modules})
