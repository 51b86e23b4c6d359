"""Worker for tests/training/test_multiprocess.py: the real sharded train step on fixed global batches.

Run once per process (under coyo_vit.tools.launch_local) or alone; every process feeds only its slice
of each global batch, as on a pod. Writes the full final parameters, gathered to every process,
to OUT_DIR/params_<process>.npz so the test can compare processes and runs.
"""
import sys

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import multihost_utils

from coyo_vit.models import Model
from coyo_vit.training import optimizer, runtime, sharding
from coyo_vit.training.sharding import to_global
from coyo_vit.training.step import init_state, make_train_step, sigmoid_xent, state_shardings

GLOBAL_BATCH, STEPS, CLASSES, SIZE = 8, 3, 50, 16


def global_batch(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    return {"image": rng.uniform(-1, 1, (GLOBAL_BATCH, SIZE, SIZE, 3)).astype(np.float32),
            "labels": (rng.uniform(size=(GLOBAL_BATCH, CLASSES)) > 0.9).astype(np.float32)}


def main(out_dir: str, mesh_spec: str) -> None:
    runtime.initialize()
    axes = dict(zip(sharding.MESH_AXES, (int(v) for v in mesh_spec.split(","))))
    mesh = sharding.make_mesh(axes)
    rules = sharding.DEFAULT_RULES
    model = Model(num_classes=CLASSES, patch_size=8, width=32, depth=2, mlp_dim=64, num_heads=4,
                  rep_size=16, head_bias_init=-10.0)
    schedule = optimizer.make_schedule(dict(base_lr=1e-3, warmup_steps=1, decay="linear"), 10)
    tx = optimizer.make_optimizer(dict(name="adamw", weight_decay=0.1, grad_clip_norm=1.0), schedule)
    with nn.logical_axis_rules(rules):
        _, shardings = state_shardings(model, tx, (SIZE, SIZE, 3), mesh, rules)
    state = init_state(model, tx, (SIZE, SIZE, 3), 0, shardings)
    step = make_train_step(model, tx, sigmoid_xent, shardings, sharding.batch_sharding(mesh), schedule)
    local = GLOBAL_BATCH // jax.process_count()
    lo = jax.process_index() * local
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        for i in range(STEPS):
            batch = {k: v[lo:lo + local] for k, v in global_batch(i).items()}
            state, _ = step(state, to_global(batch, sharding.batch_sharding(mesh)))
    params = multihost_utils.process_allgather(state.params, tiled=True)
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    np.savez(f"{out_dir}/params_{jax.process_index()}.npz", **flat)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
