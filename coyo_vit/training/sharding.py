"""Device mesh, logical-axis rules, the shardings of parameters, optimizer state and batches, and
the prefetcher that puts each process's batches onto the mesh.

The model names every parameter and activation dimension with a logical axis ("embed", "mlp",
"heads", ...). A config maps logical axes to the mesh's named axes ("data", "fsdp", "model"), so
the same code is data-parallel on one host and FSDP / tensor-parallel on a pod by config alone.
"""
from __future__ import annotations

import math
import queue
import re
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from coyo_vit.config_keys import ConfigError

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both: FSDP is data parallel too

# Pure data parallelism with optional FSDP of the large weight dimensions and tensor parallelism of
# heads / MLP hidden units. Axes of size 1 make a rule a no-op, so this default is safe on 1 CPU.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("length", None),
    ("classes", None),
    ("rep", None),
    ("layers", None),
    ("patch_h", None),
    ("patch_w", None),
    ("channels", None),
)


def make_mesh(axis_sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a mesh with axes ("data", "fsdp", "model"); one size may be -1 (= the rest)."""
    unknown = set(axis_sizes) - set(MESH_AXES)
    if unknown:
        raise ConfigError(f"Unknown mesh axes {sorted(unknown)}; valid axes are {list(MESH_AXES)}.")
    devices = list(devices if devices is not None else jax.devices())
    sizes = [int(axis_sizes.get(name, 1)) for name in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ConfigError(f"At most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ConfigError(f"Mesh {dict(zip(MESH_AXES, sizes))}: {len(devices)} devices are not "
                             f"divisible by the fixed axes' product {known}.")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ConfigError(f"Mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"but {len(devices)} are available.")
    # mesh_utils orders devices so that neighbouring mesh positions are close on the interconnect.
    try:
        grid = mesh_utils.create_device_mesh(sizes, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, MESH_AXES)


def rules_from_config(rules: Sequence[Sequence[Any]] | None) -> tuple[tuple[str, Any], ...]:
    """Config rules are [logical, mesh_axis | [mesh_axes] | None] pairs; None means the defaults."""
    if rules is None:
        return DEFAULT_RULES
    out = []
    for rule in rules:
        if len(rule) != 2:
            raise ConfigError(f"A sharding rule must be [logical_axis, mesh_axes], got {rule!r}.")
        logical, target = rule
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        bad = [t for t in targets if t not in MESH_AXES]
        if bad:
            raise ConfigError(f"Rule {rule!r} names mesh axes {bad}; valid axes are {list(MESH_AXES)}.")
        out.append((logical, target if isinstance(target, str) or target is None else tuple(target)))
    return tuple(out)


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the data-parallel axes, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch_size(global_batch: int, mesh: Mesh, process_count: int) -> int:
    """Returns the per-process batch; errors name both numbers when the split is uneven."""
    dp = data_parallel_size(mesh)
    if global_batch % dp:
        raise ConfigError(f"Batch size {global_batch} is not divisible by the {dp} data-parallel "
                         f"devices (mesh {dict(mesh.shape)}).")
    if global_batch % process_count:
        raise ConfigError(f"Batch size {global_batch} is not divisible by the {process_count} processes.")
    local = global_batch // process_count
    # Each process feeds `local` rows of its own data. That is only right if its devices hold
    # exactly that many distinct rows of the batch: a non-batch axis (e.g. `model`) spanning
    # processes would make partners that should share rows each feed their own, and JAX would
    # silently assemble a smaller, inconsistent batch.
    held = _rows_held(batch_sharding(mesh).addressable_devices_indices_map((global_batch,)).values(),
                      global_batch)
    if held != local:
        raise ConfigError(
            f"The mesh {dict(mesh.shape)} gives this process's devices {held} of the {global_batch} "
            f"batch rows, but each of the {process_count} processes feeds {local}: the data-parallel "
            f"axes ({', '.join(BATCH_AXES)}) must split the batch evenly over the processes; keep "
            f"the other axes (model) within each process's devices.")
    return local


def _rows_held(indices: Any, global_batch: int) -> int:
    """Distinct batch rows covered by `addressable_devices_indices_map` values."""
    rows = {tuple(index[0].indices(global_batch)) for index in indices}
    return sum(len(range(*r)) for r in rows)


def param_shardings(boxed_abstract_params: Any, mesh: Mesh, rules,
                    param_rules: Sequence[Sequence[Any]] = ()) -> Any:
    """Mesh shardings of the (unboxed) params: logical-axis rules, then regex `param_rules`.

    `param_rules` are [regex, placement] pairs matched against the '/'-joined parameter path
    (first match wins; unmatched parameters keep their logical placement). A placement is
    "logical", "replicated", "fsdp_auto" or "fsdp_auto:MIN_SIZE" (additionally shard the largest
    dimension that is still unsharded and divisible by the fsdp axis, for parameters of at least
    MIN_SIZE elements, default 2**14), or a list with one mesh axis (or None) per dimension.
    """
    logical = nn.logical_to_mesh(nn.get_partition_spec(boxed_abstract_params), rules)
    abstract = nn.meta.unbox(boxed_abstract_params)
    compiled = [(re.compile(pattern), placement) for pattern, placement in param_rules]

    def place(path, leaf, spec):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        placement = next((p for regex, p in compiled if regex.fullmatch(name)), "logical")
        return NamedSharding(mesh, _placement_spec(placement, spec, leaf.shape, mesh, name))

    return jax.tree_util.tree_map_with_path(place, abstract, logical)


def _placement_spec(placement: Any, logical: PartitionSpec, shape: tuple[int, ...], mesh: Mesh,
                    name: str) -> PartitionSpec:
    if placement == "logical":
        return logical
    if placement == "replicated":
        return PartitionSpec()
    if isinstance(placement, str) and placement.split(":")[0] == "fsdp_auto":
        min_size = int(placement.split(":")[1]) if ":" in placement else 2**14
        return fsdp_auto_spec(logical, shape, mesh.shape["fsdp"], min_size)
    if isinstance(placement, (list, tuple)) and len(placement) == len(shape):
        bad = [a for a in placement if a is not None and a not in MESH_AXES]
        if not bad:
            return PartitionSpec(*placement)
    raise ConfigError(f"Bad placement {placement!r} for parameter {name} of shape {shape}: use "
                     f"'logical', 'replicated', 'fsdp_auto[:MIN_SIZE]' or one of {list(MESH_AXES)} "
                     f"or None per dimension.")


def fsdp_auto_spec(spec: PartitionSpec, shape: tuple[int, ...], fsdp_size: int, min_size: int) -> PartitionSpec:
    """Adds 'fsdp' on the largest still-unsharded dimension divisible by `fsdp_size`."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    used = {a for e in entries if e for a in ((e,) if isinstance(e, str) else e)}
    if fsdp_size == 1 or "fsdp" in used or math.prod(shape) < min_size:
        return PartitionSpec(*entries)
    candidates = [d for d in range(len(shape)) if entries[d] is None and shape[d] % fsdp_size == 0]
    if candidates:
        entries[max(candidates, key=lambda d: shape[d])] = "fsdp"
    return PartitionSpec(*entries)


def opt_state_shardings(tx: optax.GradientTransformation, abstract_opt_state: Any,
                        params_shardings: Any, mesh: Mesh) -> Any:
    """Optimizer moments follow their parameter's sharding; counters and scalars are replicated."""
    return optax.tree_map_params(
        tx, lambda _, sharding: sharding, abstract_opt_state, params_shardings,
        transform_non_params=lambda _: replicated(mesh), is_leaf=lambda x: isinstance(x, NamedSharding))


def bytes_per_device(tree: Any) -> int:
    """Bytes one device holds of a tree of (possibly sharded) arrays or ShapeDtypeStructs."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


# --- Batches onto the mesh ----------------------------------------------------------------
# Turns each process's numpy batches into global, sharded jax.Arrays, a few steps ahead.
#
# A background thread builds the next batches (host-to-device copies included) while the current
# step runs, so the accelerator never waits on the host. Host-side bookkeeping (the raw-record
# position `_index`) is split off and returned next to the device batch, never sent to devices.

_DONE = object()


def to_global(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assembles the global batch from this process's slice (same call on every process)."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}


def split_host_fields(batch: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Fields starting with '_' stay on the host, except the eval mask which the step needs."""
    host = {k: v for k, v in batch.items() if k.startswith("_") and k != "_mask"}
    device = {k: v for k, v in batch.items() if k not in host}
    return device, host


class DevicePrefetcher:
    """Iterator of (global device batch, host fields) with `depth` batches built ahead."""

    def __init__(self, local_batches: Iterable[dict[str, np.ndarray]], sharding: NamedSharding,
                 depth: int = 2):
        self._source = iter(local_batches)
        self._sharding = sharding
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, daemon=True, name="device-prefetch")
        self._thread.start()

    def _fill(self) -> None:
        try:
            for local in self._source:
                device, host = split_host_fields(local)
                item = (to_global(device, self._sharding), host)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put(_DONE)
        except BaseException as e:  # surfaced in the consumer's thread, with its traceback
            self._queue.put(e)

    def __iter__(self) -> Iterator[tuple[dict[str, jax.Array], dict[str, np.ndarray]]]:
        return self

    def __next__(self) -> tuple[dict[str, jax.Array], dict[str, Any]]:
        item = self._queue.get()
        if item is _DONE:
            self._queue.put(_DONE)
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
