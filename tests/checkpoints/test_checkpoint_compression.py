"""Train checkpoints are written without zstd by default, and both kinds restore exactly."""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from checkpoints.orbax_io import TrainCheckpointer


def _state() -> dict:
    rng = np.random.default_rng(0)
    return {"params": {"w": jnp.asarray(rng.normal(0, 0.02, (256, 512)).astype(np.float32))},
            "step": jnp.asarray(7, jnp.int32)}


def _bytes_on_disk(workdir: Path) -> int:
    return sum(p.stat().st_size for p in (workdir / "checkpoints").rglob("*") if p.is_file())


def test_uncompressed_by_default_and_both_restore(tmp_path):
    state = _state()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    sizes = {}
    for compress in (False, True):
        workdir = tmp_path / f"compress_{compress}"
        writer = TrainCheckpointer(str(workdir), compress=compress) if compress else \
            TrainCheckpointer(str(workdir))
        writer.save(7, state, {"note": "x"})
        writer.close()
        sizes[compress] = _bytes_on_disk(workdir)
        reader = TrainCheckpointer(str(workdir), compress=not compress)  # the other setting reads it
        restored, meta = reader.restore(7, abstract)
        reader.close()
        assert meta == {"note": "x"}
        np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
        assert int(restored["step"]) == 7
    # zstd shrinks trained-like float32 weights only a little: the reason it is off by default
    assert sizes[True] < 0.97 * sizes[False]
    assert sizes[False] > state["params"]["w"].nbytes
