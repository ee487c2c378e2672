"""Several processes (hosts): one data-parallel mesh over every device, ZeRO-style host state.

Launch one process per host (or, for tests, several on one machine) and call `initialize` before
anything else touches jax; then build the engine with every process's devices::

    slidejax.distributed.initialize("host0:1234", num_processes=P, process_id=r)
    engine = SlidingEngine(host, opt, devices=jax.devices())      # all devices of all processes

What is shared and how:

- Data. Each process calls `engine.step(batch)` with its OWN rows: the global micro-batch is the
  concatenation, in process order, of every process's rows (each process passes the same
  [micro_batches, rows, seq_len] shape). Loss, gradient norm and token counts in the returned
  metrics are global and identical on every process. The devices form one mesh, process-major,
  so process r's local devices hold exactly its rows.
- Ownership. Every decoder layer, the final norm and the lm_head's vocabulary blocks are OWNED by
  one process (`assign_owners`: greedy in forward order to the least-loaded process, which
  balances parameter counts and interleaves the layers, so each process's host optimizer has work
  all through backward). Only the owner keeps the unit's fp32 master, its optimizer state and
  its compute-dtype upload copy; on other processes the unit's `HostModel` master is released
  (a lazily-allocated zero buffer) and nothing else exists for it.
- Weights. At upload time the owner copies the unit from its pinned buffer to its first local
  device, every other device contributes a zero buffer made on the device, and one jitted sum over
  the mesh (an all-reduce: x + 0 is exact) leaves the weights on every device. So a unit crosses
  PCIe once per upload however many processes there are, and non-owners need no host copy.
  (An all-reduce moves about twice the bytes of an ideal broadcast; jax has no broadcast
  collective, and this keeps the weight exchange one small jitted function.)
- Gradients are all-reduced on the devices, as on one host; only the owner downloads a unit's
  gradient and runs its update. The squared norms for clipping are computed on the devices from
  the reduced gradients, so every process reads the same global norm.
- The embedding is replicated: every process keeps the full table (master, optimizer state, the
  bf16 lookup copy). Its lookup stays on the host (each process gathers its own rows); its
  row-sparse gradient is summed on each process from its own tokens, then the processes'
  distinct rows and sums are all-gathered and added in process order, so every process applies
  the identical update. (Owning embedding blocks would need an exchange of looked-up rows every
  micro-batch; the embedding is a small share of a large model's state.) With tied embeddings
  the lm_head is those same replicated units. Resident units (`resident_layers`) live on every
  device, as on one host, and have no owner.
- Errors. Before a step's first collective the processes exchange their batch shapes and whether
  their batch is valid: a bad batch on one process raises a SlidejaxError on every process
  instead of leaving the others waiting in a collective.
- Checkpoints. `engine.state_dict()` returns this process's shard (its owned units plus the
  replicated ones) marked with `"shard": {"process_index", "process_count"}`; `state_dict(
  gather=True)` (collective) gives every process the full single-process state, and
  `engine.gather_masters()` (collective) fills every unit's current master on every process (for
  export). `load_state_dict` takes a shard of this process or a full state.

Every collective is issued by each process's driver thread in the same order (the engine's
schedule is the same everywhere), so nothing can interleave differently across processes. The
`Trainer` (and so `slidejax train --coordinator ...`) runs on several processes the same way:
every process reads the same data and steps on its rows of each global batch; checkpoints are
gathered and written by process 0, and every process reads them to resume.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from slidejax.errors import SlidejaxError
from slidejax.host_memory import host_view

__all__ = ["Cluster", "assign_owners", "initialize", "spans_processes"]


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Join a multi-process run (`jax.distributed.initialize`); call before any other jax use.

    Unset arguments come from the environment: JAX_COORDINATOR_ADDRESS (host:port of process 0),
    JAX_NUM_PROCESSES, JAX_PROCESS_ID; on clusters jax detects (SLURM, Open MPI, ...) they may
    all be left unset. On the CPU backend cross-process collectives use gloo.
    """
    env = os.environ
    coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    try:  # gloo is the default in recent jax; older ones need it asked for
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):
        pass
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)


def spans_processes(devices: Sequence[jax.Device]) -> bool:
    """Whether `devices` belong to more than one process."""
    return len({d.process_index for d in devices}) > 1


def assign_owners(sizes: dict[str, int], n_processes: int) -> dict[str, int]:
    """unit name -> owning process: in the given (forward) order, each unit to the process with
    the fewest parameters so far (lowest index on ties). Deterministic, so every process computes
    the same map; interleaves equal layers over the processes."""
    load = [0] * n_processes
    owners = {}
    for name, n in sizes.items():
        p = min(range(n_processes), key=lambda i: (load[i], i))
        owners[name] = p
        load[p] += int(n)
    return owners


@functools.lru_cache(maxsize=None)
def _combine(mesh: Mesh) -> Callable[[jax.Array], jax.Array]:
    """Sum of one device's piece and zeros on the others: the weights on every device (one
    compilation per mesh and unit size, shared by every engine on the mesh)."""
    n_dev = mesh.devices.size
    return jax.jit(lambda x: x.reshape(n_dev, -1).sum(axis=0, dtype=x.dtype),
                   out_shardings=NamedSharding(mesh, P(), memory_kind="device"), donate_argnums=0)


class Cluster:
    """The devices of all processes as one process-major data-parallel mesh, and the collectives
    the engine needs (each called by every process, in the same order)."""

    def __init__(self, devices: Sequence[jax.Device]):
        self.devices = sorted(devices, key=lambda d: (d.process_index, d.id))
        self.index = jax.process_index()
        processes = sorted({d.process_index for d in self.devices})
        self.count = len(processes)
        if processes != list(range(jax.process_count())):
            # The host-side exchanges (multihost_utils) involve every process.
            raise SlidejaxError(f"the devices must come from all {jax.process_count()} processes, "
                                f"got processes {processes}")
        per = {p: sum(d.process_index == p for d in self.devices) for p in processes}
        if len(set(per.values())) != 1:
            raise SlidejaxError(f"every process needs the same number of devices, got {per}")
        self.local = [d for d in self.devices if d.process_index == self.index]
        self._on = [jax.sharding.SingleDeviceSharding(d, memory_kind="device") for d in self.local]
        self.mesh = Mesh(np.array(self.devices), ("data",))
        self.replicated = NamedSharding(self.mesh, P(), memory_kind="device")
        self.rows = NamedSharding(self.mesh, P("data"), memory_kind="device")
        self._combine = _combine(self.mesh)

    # ----- rows of the global batch

    def global_rows(self, local_rows: int) -> int:
        return local_rows * self.count

    def put_rows(self, local: np.ndarray, sharding: NamedSharding | None = None) -> jax.Array:
        """A global array, split by rows (axis 0) over the mesh, from this process's rows."""
        local = np.ascontiguousarray(local)
        shape = (self.global_rows(local.shape[0]),) + local.shape[1:]
        return jax.make_array_from_process_local_data(sharding or self.rows, local, shape)

    def local_rows(self, x: jax.Array) -> np.ndarray:
        """This process's rows of a row-split global array (any memory kind), in row order; with
        one local device a view of its host buffer (valid while `x` lives)."""
        shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
        parts = [host_view(s.data) for s in shards]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def gather_rows(self, local: np.ndarray, axis: int = 0) -> np.ndarray:
        """The global array on every process: every process's `local`, concatenated along `axis`
        in process order."""
        every = multihost_utils.process_allgather(np.ascontiguousarray(local))  # [P, ...]
        return np.concatenate(list(every), axis=axis)

    # ----- weights

    def upload(self, host: jax.Array | None, n: int, dtype: Any, owner: int | None) -> jax.Array:
        """A unit's weights (n elements) replicated on every device of the mesh.

        owner None: every process has the same copy in `host` (a replicated unit) and uploads it
        to its own devices. Otherwise only the owner passes `host`: it goes to the owner's first
        device, zeros on every other device, and the jitted sum spreads it."""
        if owner is None:
            pieces = [jax.device_put(host, on) for on in self._on]
            return jax.make_array_from_single_device_arrays((n,), self.replicated, pieces)
        pieces = []
        for i, d in enumerate(self.local):
            if i == 0 and owner == self.index:
                pieces.append(jax.device_put(host, self._on[0]))
            else:
                pieces.append(jnp.zeros((n,), dtype, device=d))
        flat = jax.make_array_from_single_device_arrays((n * len(self.devices),), self.rows, pieces)
        return self._combine(flat)

    # ----- host-side agreement and exchange (small, or only at checkpoints)

    def allgather(self, value: np.ndarray) -> np.ndarray:
        """[processes, ...]: every process's `value` (same shape and dtype everywhere)."""
        return np.asarray(multihost_utils.process_allgather(np.asarray(value)))

    def broadcast(self, tree: Any, owner: int) -> Any:
        """`tree` (numpy leaves) as process `owner` has it, on every process; the others pass a
        tree of the same structure, shapes and dtypes (its values are not used)."""
        return multihost_utils.broadcast_one_to_all(tree, is_source=self.index == owner)

    def agree(self, ok: bool, shape: tuple[int, ...], tokens: int, masked: bool) -> tuple[int, bool]:
        """Before a step's first collective: every process's batch is valid and of the same
        shape. Returns (global supervised tokens, whether any process needs segment masks); on a
        mismatch every process raises (no process is left waiting in a collective)."""
        head = np.array([int(ok), *shape, tokens, int(masked)], np.int32)
        every = self.allgather(head)
        bad = [int(p) for p in np.nonzero(every[:, 0] == 0)[0]]
        if bad:
            raise SlidejaxError(f"process(es) {bad} rejected their batch (see their error); no step taken")
        if (every[:, 1:4] != every[0, 1:4]).any():
            shapes = {p: tuple(int(v) for v in every[p, 1:4]) for p in range(len(every))}
            raise SlidejaxError(f"processes passed batches of different shapes {shapes}: each process "
                                f"must pass [micro_batches, rows, seq_len] of the same shape")
        return int(every[:, 4].sum()), bool(every[:, 5].any())

    def reduce_rows(self, rows: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sum row-sparse gradients over processes: (sorted distinct rows of all processes, their
        fp32 sums). The sums are added on the host in process order, so every process gets the
        same bits."""
        counts = self.allgather(np.array(rows.shape[0], np.int32))
        # Padded to a power of two: a few shapes, so a few compilations, however counts vary.
        width = 1 << max(6, int(counts.max() - 1).bit_length())
        pad_rows = np.full(width, -1, np.int32)
        pad_rows[: rows.shape[0]] = rows
        pad_vals = np.zeros((width, values.shape[1]), np.float32)
        pad_vals[: rows.shape[0]] = values
        all_rows, all_vals = self.allgather(pad_rows), self.allgather(pad_vals)
        union = np.unique(all_rows[all_rows >= 0])
        out = np.zeros((union.shape[0], values.shape[1]), np.float32)
        for p, c in enumerate(counts):
            c = int(c)
            out[np.searchsorted(union, all_rows[p, :c])] += all_vals[p, :c]
        return union, out
