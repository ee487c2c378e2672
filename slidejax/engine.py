"""The sliding-window engine: the GPU as a window over the model's layers.

All training state lives in host memory (`HostModel` masters, host optimizer state). A step:

forward   the embedding is looked up on the host (only the step's rows; gathered by the host
          worker right after their update when the last step was told these ids) and uploaded;
          then layer by layer, with the upload of layer i+k issued *before* layer i's compute is
          dispatched (so copies overlap compute; unless layer i+k's host update still runs: layer
          i never waits for it), every micro-batch passes through layer i while its weights
          are on the GPU. Each layer's input is its checkpoint: it goes to pinned host memory
          asynchronously and nothing else of the layer's activations stays on the GPU.
head      the lm_head streams in vocabulary blocks no larger than a layer: pass 1 merges each
          block's log-sum-exp statistics, pass 2 (blocks in reverse, so the last one is still on
          the GPU) produces each block's weight gradient and the hidden-state gradient. With one
          block, the fused linear cross-entropy does both in one pass.
backward  layer by layer in reverse: recompute + vjp per micro-batch, weight gradients summed in
          fp32 on the GPU, one download per layer (a separate `device_put`, overlapping the next
          compute) into pinned memory that replaces the layer's (by then unneeded) upload copy:
          the host optimizer updates layer i on a worker thread while the GPU works on layer
          i-1, writing the next copy over the gradient as it reads it. The embedding gradient
          comes back as the layer-0 input gradient and is summed per distinct token on the host;
          the table's rows without a gradient defer their step (`HostAdamW.update(defer=True)`)
          until they are next looked up or the weights are read (`sync`).
clipping  exact: with a max norm, updates wait for the global norm (per-unit squared norms are
          computed where the gradients are, and summed), then run in forward order, so the next
          step's layer i waits only for layer i's update.

Micro-batches alternate direction from layer to layer (0..M-1, then M-1..0): the last one a layer
computes is the first the next layer needs, so it never leaves the GPU. Loss and gradients are of
the loss *sum*; the host optimizer scales by 1 / (supervised tokens of the step), so the update is
that of the token-weighted mean loss over the whole step.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import functools
import itertools
import json
import os
import queue
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from slidejax import kernels
from slidejax.config import ModelConfig
from slidejax.distributed import Cluster, assign_owners, spans_processes
from slidejax.embedding import RowGradient, gather_rows
from slidejax.errors import SlidejaxError
from slidejax.host_memory import (PINNED_POOL_ENV, FlatLayout, HostModel, PinnedBuffer, Unit, aligned_empty,
                                  host_memory_kind, host_view, is_released, memory_sharding, numpy_dtype,
                                  pinned_pool_bytes, pinned_pool_gb, plan_host_memory, pull_to_host,
                                  released_master)
from slidejax.host_optimizer import aligned_zeros, store_compute_copy
from slidejax.model import LayerFn, rms_norm

IGNORE = -100


# --------------------------------------------------------------------------- small pieces

@dataclasses.dataclass
class StepMetrics:
    """What one optimizer step reports (loss is the token-weighted mean over the step)."""

    loss: float
    grad_norm: float
    tokens: int  # supervised tokens
    positions: int  # all token positions processed (padding included)
    clip_scale: float
    seconds: float


class Trace:
    """Chrome/Perfetto trace events of the engine's lanes (driver, GPU, copies, host optimizer).

    GPU-side spans end when a watcher thread sees their output become ready; they start at the
    later of their dispatch and the previous span's end on the same lane, so they are a close
    approximation, not hardware timestamps.
    """

    LANES = {"driver": 0, "compute": 1, "upload": 2, "download": 3, "host-optimizer": 4}

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.t0 = time.perf_counter()
        self._lane_end: dict[str, float] = {}
        self._pending: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def now(self) -> float:
        return (time.perf_counter() - self.t0) * 1e6

    def span(self, lane: str, name: str, start: float, end: float, **args: Any) -> None:
        with self._lock:
            self.events.append({"name": name, "ph": "X", "ts": start, "dur": max(end - start, 0.0),
                                "pid": 0, "tid": self.LANES[lane], "args": args})

    def device(self, lane: str, name: str, value: Any) -> None:
        """Record a span that ends when `value` (a jax array or pytree) is ready."""
        self._pending.put((lane, name, self.now(), value))

    def _watch(self) -> None:
        while True:
            lane, name, issued, value = self._pending.get()
            try:
                jax.block_until_ready(value)
            except Exception:  # noqa: BLE001 - donated to a later computation: ended before it
                pass
            end = self.now()
            start = max(issued, self._lane_end.get(lane, 0.0))
            self._lane_end[lane] = end
            self.span(lane, name, start, end)
            self._pending.task_done()

    def save(self, path: str | Path) -> None:
        self._pending.join()
        meta = [{"name": "thread_name", "ph": "M", "pid": 0, "tid": t, "args": {"name": n}}
                for n, t in self.LANES.items()]
        Path(path).write_text(json.dumps({"traceEvents": meta + self.events}))


class _AllSet:
    """A host task's `waits_for` when it reads what earlier host tasks write: landed once their
    `done` events are set (the worker runs those first: they are older, and never wait on it)."""

    def __init__(self, events: Sequence[threading.Event]):
        self.events = list(events)

    def is_ready(self) -> bool:
        return all(e.is_set() for e in self.events)


class HostWorker:
    """One host thread running optimizer updates, most urgent *ready* task first.

    Priorities are (step, rank): every update of a step runs before any of the next step's (a
    unit's updates must stay in step order), and within a step ranks follow the order in which
    the next forward pass needs the units, so a backlog never delays the unit the GPU will wait
    for first. A task may name the array it reads (`waits_for`, a download): among the tasks of
    the earliest step, the most urgent one whose input has landed runs first, and only when none
    has does the worker wait, for the one submitted first (downloads land in issue order). So the
    host never idles on a gradient still in flight while another is ready. Exceptions are
    re-raised in the driver.
    """

    def __init__(self, trace: Trace | None):
        self._tasks: list[tuple] = []  # (priority, seq, name, fn, done, waits_for)
        self._cond = threading.Condition()
        self._busy = 0
        self._seq = itertools.count()
        self._error: BaseException | None = None
        self._trace = trace
        self._thread = threading.Thread(target=self._run, daemon=True, name="slidejax-host-optimizer")
        self._thread.start()

    def submit(self, priority: tuple[int, int], name: str, fn: Callable[[], None], done: threading.Event,
               waits_for: Any = None, check: bool = True) -> None:
        """Queue `fn`; `done` is set when it has run, or been skipped after an earlier task's
        error. `check`: first raise such an error here (else the next `check` raises it)."""
        if check:
            self.check()
        done.clear()
        with self._cond:
            self._tasks.append((priority, next(self._seq), name, fn, done, waits_for))
            self._cond.notify_all()

    def stop(self) -> None:
        """End the thread (after the queued work), so no thread is cut off inside native code at
        interpreter exit."""
        if self._thread.is_alive():
            self.submit((float("inf"), 0), "stop", None, threading.Event())
            self._thread.join()

    @staticmethod
    def _landed(task: tuple) -> bool:
        waits_for = task[5]
        try:
            return waits_for is None or waits_for.is_ready()
        except Exception:  # noqa: BLE001 - a failed transfer: let the task run and raise it
            return True

    def _next(self) -> tuple:
        """The task to run now (called with the lock held and tasks queued)."""
        first_step = min(t[0][0] for t in self._tasks)
        current = [t for t in self._tasks if t[0][0] == first_step]
        ready = [t for t in current if self._landed(t)]
        task = min(ready, key=lambda t: t[:2]) if ready else min(current, key=lambda t: t[1])
        self._tasks.remove(task)
        return task

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._tasks:
                    self._cond.wait()
                _, _, name, fn, done, _ = self._next()
                self._busy += 1
            if fn is None:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()
                return
            try:
                start = self._trace.now() if self._trace else 0.0
                if self._error is None:
                    fn()
                if self._trace:
                    self._trace.span("host-optimizer", name, start, self._trace.now())
            except BaseException as e:  # noqa: BLE001 - re-raised in the driver
                self._error = e
            finally:
                done.set()
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()

    def join(self) -> None:
        with self._cond:
            while self._tasks or self._busy:
                self._cond.wait()
        self.check()

    def check(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err


def _resident_layer_names(count: int) -> set[str]:
    """The resident decoder layers: the first `count`. Their updates run on the device; with them
    at the front, the backward's last layers and the next forward's first need no host update, so
    the host updates of the streamed layers (whose gradients came earlier in the backward) have
    the end of the backward and the start of the forward to finish in."""
    return {f"layers.{i}" for i in range(count)}


def _spread(count: int, streamed: int) -> list[int]:
    """`count` of layers 0..streamed-1 spread evenly (GPU-updated layers): in forward order the
    host's updates and the device's then alternate."""
    count = max(0, min(count, streamed))
    return [(2 * k + 1) * streamed // (2 * count) for k in range(count)]


@dataclasses.dataclass
class _PendingUpdate:
    """A GPU-updated layer's state on the device, its update not yet dispatched."""

    name: str
    master: jax.Array
    opt: Any
    grad: jax.Array


@dataclasses.dataclass(eq=False)
class _Speculation:
    """A unit's second set of host buffers for its speculative update (`speculative_units`)."""

    master: np.ndarray
    state: Any
    upload: PinnedBuffer | None
    retired: PinnedBuffer | None = None  # the step's copy in use: the spare after a commit
    scale: float | None = None  # the gradient scale the speculation assumed
    written: bool = False  # whether this step's speculative update ran


class _Acts:
    """One stage boundary's per-micro-batch activations: on the device while in use, otherwise in
    pinned host memory (so the boundary costs no GPU memory however many micro-batches a step has).
    """

    def __init__(self, engine: "SlidingEngine", n: int):
        self.e, self.dev, self.host = engine, [None] * n, [None] * n

    def put(self, mb: int, value: jax.Array, *, keep: bool, offload: bool = True) -> None:
        if self.e.all_resident:  # the all-on-device reference keeps activations on the device
            keep, offload = True, False
        self.dev[mb] = value if keep else None
        if offload:
            self.host[mb] = self.e._download(value, "activation")
            if not keep:
                self.e._throttle(self.host[mb])
        elif not keep:
            raise AssertionError("an activation must be kept or offloaded")

    def get(self, mb: int) -> jax.Array:
        if self.dev[mb] is None:
            self.dev[mb] = self.e._upload_array(self.host[mb], "activation")
        return self.dev[mb]

    def prefetch(self, mb: int) -> None:
        if 0 <= mb < len(self.dev) and self.dev[mb] is None and self.host[mb] is not None:
            self.dev[mb] = self.e._upload_array(self.host[mb], "activation")

    def release(self, mb: int) -> None:
        if self.host[mb] is not None:
            self.dev[mb] = None


# --------------------------------------------------------------------------- compiled stage functions

def _one_count(opt_state: Any) -> bool:
    """Whether an optax state has exactly one field named count (else take the step count)."""
    try:
        optax.tree_utils.tree_get(opt_state, "count")
        return True
    except KeyError:
        return False


def _batch_field(batch: Any, name: str) -> np.ndarray | None:
    value = batch.get(name) if isinstance(batch, dict) else getattr(batch, name, None)
    return None if value is None else np.asarray(value)


def _needs_segment_mask(seg: np.ndarray) -> bool:
    """False when plain causal attention is exact: each row is one document then padding."""
    if seg is None:
        return False
    body = seg > 0
    return bool(np.any(seg[body] != 1) or np.any(body[:, 1:] & ~body[:, :-1]))


@functools.lru_cache(maxsize=8)
def stage_fns(cfg: ModelConfig, compute_dtype: Any, loss_impl: str, attention_impl: str | None) -> "_StageFns":
    """The compiled stage functions of an architecture, shared by every engine built for it."""
    from slidejax.host_memory import FlatLayout
    from slidejax.model import layer_template

    _, shapes = layer_template(cfg)
    layout = FlatLayout.build({n: s for n, (s, _) in shapes.items()}, [n for n, (_, d) in shapes.items() if d])
    return _StageFns(cfg, layout, compute_dtype, loss_impl, attention_impl)


class _StageFns:
    """The jitted per-stage functions. Shapes decide compilation; every layer shares them."""

    def __init__(self, cfg: ModelConfig, layer_layout, compute_dtype, loss_impl: str, attention_impl):
        self.cfg = cfg
        self.layout = layer_layout
        self.layer_fn = LayerFn(cfg, attention_impl)
        self.dtype = compute_dtype
        self.impl = loss_impl
        eps = cfg.rms_norm_eps
        layout = layer_layout

        def fwd(w, x, pos, seg):
            return self.layer_fn(layout.views(w), x, pos, seg)

        def bwd(w, x, pos, seg, dy, acc):
            tree = layout.views(w)
            _, vjp = jax.vjp(lambda t, xx: self.layer_fn(t, xx, pos, seg), tree, x)
            dtree, dx = vjp(dy)
            dw = layout.flatten({k: v.astype(jnp.float32) for k, v in dtree.items()})
            return dx, dw if acc is None else acc + dw

        def finish(acc):
            return acc.astype(compute_dtype), jnp.sum(jnp.square(acc))

        def norm_fwd(w, x):
            return rms_norm(x, w, eps)

        def norm_bwd(w, x, dh, acc):
            _, vjp = jax.vjp(lambda ww, xx: rms_norm(xx, ww, eps), w, x)
            dw, dx = vjp(dh.astype(x.dtype))
            dw = dw.astype(jnp.float32)
            return dx, dw if acc is None else acc + dw

        H = cfg.hidden_size

        def stats(h, w, labels, v0, prev):
            w = w.reshape(-1, H)
            b = kernels.lce_chunk_stats(h.reshape(-1, h.shape[-1]), w, labels, v0, impl=self.impl)
            return b if prev is None else kernels.combine_stats(prev, b)

        def loss(stats_, labels):
            lse = kernels.lse_from_stats(stats_[0], stats_[1])
            total, _ = kernels.loss_from_stats(lse, stats_[2], labels)
            return lse, total

        def grads(h, w, labels, v0, lse, dh_acc, dw_acc):
            # The block's share is added into the (donated) accumulators inside the kernel's token
            # loop: no second [T, H] or [Vc, H] fp32 buffer.
            w = w.reshape(-1, H)
            hf = h.reshape(-1, h.shape[-1])
            scale = (labels != IGNORE).astype(jnp.float32)
            dh, dw = kernels.lce_chunk_grads(hf, w, labels, v0, lse, scale, impl=self.impl,
                                             dh_acc=None if dh_acc is None else dh_acc.reshape(hf.shape),
                                             dw_acc=dw_acc)
            return dh.reshape(h.shape), dw.reshape(-1)

        def fused(h, w, labels, dw_acc):
            # Loss, dh and the head gradient added in fp32 into the engine's (donated) accumulator.
            hf = h.reshape(-1, h.shape[-1])
            total, _, dh, dw = kernels.lce_fused_accumulate(hf, w.reshape(-1, H), labels, dw_acc, impl=self.impl)
            return total, dh.reshape(h.shape), dw.reshape(-1)

        def logits(h, w):
            return jnp.einsum("bsh,vh->bsv", h, w.reshape(-1, H), preferred_element_type=jnp.float32)

        self.fwd = jax.jit(fwd)
        self.bwd = jax.jit(bwd, donate_argnums=(5,))
        self.finish = jax.jit(finish)
        self.norm_fwd = jax.jit(norm_fwd)
        self.norm_bwd = jax.jit(norm_bwd, donate_argnums=(3,))
        self.stats = jax.jit(stats)
        self.loss = jax.jit(loss)
        self.grads = jax.jit(grads, donate_argnums=(5, 6))
        self.fused = jax.jit(fused, donate_argnums=(3,))
        self.logits = jax.jit(logits)
        self.cast = jax.jit(lambda a: a.astype(compute_dtype))
        self.sq = jax.jit(lambda a: jnp.sum(jnp.square(a.astype(jnp.float32))))

        def embed_lookup(ws, firsts, ids):
            out = jnp.zeros(ids.shape + (cfg.hidden_size,), compute_dtype)
            for w, a in zip(ws, firsts):
                w = w.reshape(-1, H)
                local = ids - a
                inside = (local >= 0) & (local < w.shape[0])
                out = out + jnp.where(inside[..., None], jnp.take(w, jnp.clip(local, 0, w.shape[0] - 1), axis=0), 0)
            return out

        def embed_grads(ids, dxs, sizes_firsts):
            flat_ids = ids.reshape(-1)
            dx = dxs.reshape(-1, dxs.shape[-1]).astype(jnp.float32)
            out = []
            for size, a in sizes_firsts:
                local = flat_ids - a
                inside = (local >= 0) & (local < size)
                g = jnp.zeros((size, dx.shape[-1]), jnp.float32).at[jnp.where(inside, local, size)].add(dx, mode="drop")
                out.append(g.reshape(-1))
            return out

        self.embed_lookup = jax.jit(embed_lookup, static_argnums=(1,))
        self.embed_grads = jax.jit(embed_grads, static_argnums=(2,))


# --------------------------------------------------------------------------- the engine

def parse_bytes(value: int | str | None) -> int | None:
    """'24GB' / '512MiB' / 123 -> bytes; None, 0 or 'unlimited' -> None."""
    if value is None or value == 0 or (isinstance(value, str) and value.strip().lower() in ("", "unlimited", "none")):
        return None
    if isinstance(value, (int, float)):
        return int(value)
    text = value.strip().upper().replace(" ", "")
    units = {"TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "TB": 10**12, "GB": 10**9,
             "MB": 10**6, "KB": 10**3, "B": 1}
    for unit, mult in units.items():
        if text.endswith(unit):
            try:
                return int(float(text[: -len(unit)]) * mult)
            except ValueError:
                break
    try:
        return int(text)
    except ValueError:
        raise SlidejaxError(f"cannot read memory size {value!r} (use e.g. 24GB or 512MiB)") from None


def gpu_total_bytes() -> int | None:
    """GPU 0's memory size from `nvidia-smi`, without starting jax's backend (None: none found)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits",
                              "-i", "0"], capture_output=True, text=True, timeout=30, check=True).stdout
        return int(out.split()[0]) * 2**20  # MiB
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def limit_device_memory(budget: int | str | None, total: int | None = None) -> dict[str, str]:
    """Make XLA's GPU allocator keep to a device memory budget. Call before jax's backend starts
    (`slidejax train` does); variables already in the environment are kept.

    By default XLA reserves 75% of each GPU when it starts, whatever the engine plans, so a budget
    would bound the engine's working set but not the process. With a budget this turns
    preallocation off (`XLA_PYTHON_CLIENT_PREALLOCATE=false`: memory is taken as the plan needs it)
    and, when the GPU's size is known (`total`, default `gpu_total_bytes()`), caps the allocator
    at the budget (`XLA_PYTHON_CLIENT_MEM_FRACTION`), as `bench/bench_engine.py` runs. The CUDA
    runtime's own memory (context, cuBLAS and cuDNN workspaces) comes on top: ~3 GB on the H200
    (NVML 26.9 GB with a 24 GB cap). Returns the variables it set.
    """
    limit = parse_bytes(budget)
    if limit is None:
        return {}
    want = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    total = gpu_total_bytes() if total is None else total
    if total:
        want["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{min(0.95, limit / total):.4f}"
    done = {k: v for k, v in want.items() if k not in os.environ}
    os.environ.update(done)
    return done


def _has_pinned_pool(device: jax.Device) -> bool:
    """Whether pinned host memory comes from XLA's capped pool (GPU), not plain host memory."""
    return device.platform == "gpu"


class SlidingEngine:
    """Trains a `HostModel` with a host optimizer, streaming layers through one device.

    Args:
      host: the model's fp32 master weights in host memory (updated in place, but for committed
        speculative updates: see `speculative_units`).
      optimizer: a host optimizer (`slidejax.host_optimizer.HostAdamW`, `HostOptax`, ...).
      compute_dtype: dtype of the weights and activations on the device ("bfloat16"; "float32"
        for exactness tests).
      prefetch: k, how many layers ahead uploads are issued (>= 1; 2 measured to be needed for
        full overlap). At most k+1 streamed layers' weights are on the device at once.
      resident_layers: keep the first this-many decoder layers' weights and optimizer state on the
        device (updated there by the equivalent optax transformation) instead of streaming them.
        With every layer resident, the embedding, norm and head are resident too: the all-on-GPU
        reference with the same kernels. "auto": as many as the plan (`plan_memory`) fits in
        `gpu_memory` (default: the device's capacity) with micro-batches of `micro_batch`; each
        resident layer is host optimizer work the step no longer waits for.
      gpu_update_layers: this many of the streamed decoder layers (spread over them) keep their
        fp32 master and optimizer state in pinned host memory and are updated on the device: the
        state crosses PCIe both ways (12 B/param each way for AdamW) while the host updates the
        other layers, so with clipping the updates between two backwards take less time. Their
        update runs where the next forward first needs the layer (or at `sync`).
      speculative_units: with clipping, this many host-updated units, those whose gradients
        complete first in the backward (the head's vocabulary chunks when untied, then the last
        streamed layers), are also updated while the backward runs, as if the step's clipping
        changed nothing, into a second set of host buffers. When the global norm turns out within
        `max_grad_norm` the step commits them by swapping buffers (their updates leave the
        critical path between two backwards); otherwise they are discarded and updated as usual.
        Exact either way (the same bits). A speculative update not started when the backward
        ends is skipped (the plain update follows). Costs, per parameter of those units, a
        second fp32 master and moments in host memory and two compute-dtype copies in pinned
        memory; and a speculative pass moves ~42 B/param through host memory against 26 in place
        (its outputs are written to memory it did not read), while the host is otherwise idle.
        Needs an optimizer with `update(into=)` (`HostAdamW`) and one process. A commit replaces
        the unit's master array (`host.units[name].master`) with the other buffer instead of
        copying into it (a copy would move more memory than the update), so arrays taken from
        `host` before (`host.tree()`, `Model.params()`) stop following those units' weights:
        take them again after `sync()`.
      micro_batch: (rows, seq_len) of the micro-batches, when known up front: needed for
        resident_layers="auto", and with it an infeasible `gpu_memory` is refused here, before
        anything is allocated (otherwise at the first step).
      max_grad_norm: clip the global gradient norm to this (0 = off), exactly.
      loss_impl: fused linear cross-entropy implementation ("auto", "triton", "jax").
      attention_impl: `jax.nn.dot_product_attention` implementation; default cuDNN flash
        attention on GPUs in bf16, XLA elsewhere.
      trace: record a Chrome/Perfetto timeline (see `save_trace`).
      devices: several local devices for data parallelism (default: `device` alone). Every
        micro-batch is split by rows across them; each layer's weights are uploaded to every
        device from the one host copy, weight gradients are all-reduced on the devices and
        downloaded once, so host state and host updates exist once, not per device. Devices of
        several processes (after `slidejax.distributed.initialize`; e.g. `jax.devices()`): each
        process steps on its own rows and owns a share of the host state
        (`slidejax.distributed` says how).
      gpu_memory: a device memory budget (per device) ("24GB", bytes, or None/"unlimited"). Checked against
        the plan (`plan_memory`) before the first step; an infeasible budget raises a
        SlidejaxError naming what does not fit.
    """

    def __init__(self, host: HostModel, optimizer: Any, *, compute_dtype: Any = "bfloat16",
                 prefetch: int = 2, resident_layers: int = 0, max_grad_norm: float = 0.0,
                 device: jax.Device | None = None, loss_impl: str = "auto",
                 attention_impl: str | None = None, trace: bool = False,
                 gpu_memory: int | str | None = None, devices: Any = None,
                 micro_batch: tuple[int, int] | None = None, gpu_update_layers: int = 0,
                 speculative_units: int = 0):
        if prefetch < 1:
            raise SlidejaxError(f"prefetch must be >= 1, got {prefetch}")
        cfg = host.cfg
        self.host, self.cfg, self.opt = host, cfg, optimizer
        self.np_dtype = numpy_dtype(compute_dtype)
        if self.np_dtype not in (np.dtype(np.float32), numpy_dtype("bfloat16")):
            raise SlidejaxError(f"compute_dtype must be bfloat16 or float32, not {self.np_dtype}")
        self.dtype = jnp.dtype(self.np_dtype)
        self.prefetch = prefetch
        self.max_grad_norm = float(max_grad_norm)
        self.devices = list(devices) if devices else [device or jax.devices()[0]]
        self.dist = Cluster(self.devices) if spans_processes(self.devices) else None
        if self.dist is not None:
            self.devices = self.dist.devices
        self.local_devices = self.dist.local if self.dist else self.devices
        self.device = self.local_devices[0]
        self.host_sharding = memory_sharding(self.device, host_memory_kind(self.device))
        if len(self.devices) == 1:
            self.dev_sharding = memory_sharding(self.device, "device")
            self.act_sharding, self.act_host_sharding = self.dev_sharding, self.host_sharding
        else:
            from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

            mesh = self.dist.mesh if self.dist else Mesh(np.array(self.devices), ("data",))
            self.mesh = mesh
            self.dev_sharding = NamedSharding(mesh, P(), memory_kind="device")  # replicated weights
            self.act_sharding = NamedSharding(mesh, P("data"), memory_kind="device")  # rows split
            self.act_host_sharding = NamedSharding(mesh, P("data"), memory_kind=host_memory_kind(self.device))
        self.L = cfg.num_layers
        self.trace = Trace() if trace else None
        self.worker = HostWorker(self.trace)
        atexit.register(self.worker.stop)
        if attention_impl is None and self.device.platform == "gpu" and self.dtype.itemsize == 2:
            attention_impl = "cudnn"  # jax's default is the XLA path, which materialises S x S scores
        self.fns = stage_fns(cfg, self.dtype, loss_impl, attention_impl)
        self.step_count = 0
        self._step_open = False  # a step began and has not returned (it raised, if one begins now)
        self.gpu_memory = parse_bytes(gpu_memory)
        self._planned: set[tuple] = set()
        self._pinned_checked = 0  # the most micro-batches per step checked against the pinned pool
        self._gpu_update_count = max(0, int(gpu_update_layers))
        if resident_layers == "auto":
            resident_layers = self._auto_resident(micro_batch)
        elif not isinstance(resident_layers, (int, np.integer)):
            raise SlidejaxError(f"resident_layers must be a number or 'auto', got {resident_layers!r}")
        self.resident_layers = max(0, min(int(resident_layers), self.L))
        self.all_resident = self.resident_layers == self.L
        self.resident: set[str] = _resident_layer_names(self.resident_layers)
        if self.all_resident:
            self.resident |= set(host.units)
        self.gpu_updated = self._gpu_updated_layers(self._gpu_update_count)
        # Allocated before the budget check, whose pinned-memory plan counts their copies.
        self._spec = {name: self._new_speculation(name) for name in self._speculated_units(speculative_units)}
        self._speculated: set[str] = set()  # this step's speculative updates
        # Unit updates over the engine's life: speculation committed, redone (clipped), skipped
        # (not started before the backward ended).
        self.speculation = {"committed": 0, "redone": 0, "skipped": 0}
        if micro_batch is not None:
            self._check_budget((1, *micro_batch), segments=False)
        head_names = {u.name for u in host.head_units}
        # Several processes: each streamed unit but the (replicated) embedding has one owner.
        self.owner: dict[str, int] = {} if self.dist is None else assign_owners(
            {n: u.master.size for n, u in host.units.items()
             if n not in self.resident and not n.startswith("embed.")}, self.dist.count)
        self.ready: dict[str, threading.Event] = {}
        self.upload_buf: dict[str, PinnedBuffer] = {}  # streamed units' compute-dtype copies
        self.opt_state: dict[str, Any] = {}
        self.dev_state: dict[str, dict[str, Any]] = {}  # resident units: master, opt state, weights
        self._resident_cache: dict[FlatLayout, tuple[Callable, Callable]] = {}
        self.rows_ready: dict[str, threading.Event] = {}
        for name, unit in host.units.items():
            self.ready[name], self.rows_ready[name] = threading.Event(), threading.Event()
            self.ready[name].set()
            self.rows_ready[name].set()
            if name in self.resident or name in self.gpu_updated:
                if optimizer is None:
                    raise SlidejaxError("resident and GPU-updated units need an optimizer")
                self._init_resident(unit, parked=name in self.gpu_updated)
                continue
            if not self._owns(name):  # its owner alone keeps master, state and upload copy
                unit.master = np.zeros(unit.master.size, np.float32)  # lazily allocated: no memory
                continue
            if not name.startswith("embed.") or name in head_names:  # the untied embedding is
                self._upload_copy(name)  # never uploaded: its rows are gathered from the master
            if optimizer is not None:  # None: an inference-only engine
                self.opt_state[name] = optimizer.init(unit.master.reshape(self._shape(unit)), tree_of=self._tree_of(unit))
        self._copied = frozenset(self.upload_buf)  # the units that have an upload copy
        self._inflight: collections.deque = collections.deque()
        self._staging: list[list[PinnedBuffer]] = []  # [micro-batch][device]
        self._staging_guard: Any = None  # the last computation that read the staging buffers
        # The next step's rows, gathered by the host worker right after their update: {"ids",
        # "done" (the task ran or was skipped), "staged" (it gathered them)}.
        self._staged_ahead: dict[str, Any] | None = None
        self.staged_ahead_steps = 0  # forwards (steps, or an eval of those ids) that used them
        # The most steps an embedding row without a gradient defers before the rest-of-table
        # update (off the critical path) replays them.
        self.max_deferred_steps = 32
        self._pending_embed: tuple | None = None
        self._rows_first: np.ndarray | None = None  # the token ids whose rows the last update did first
        self._embed_job: tuple | None = None
        self._embed_queued = False  # this step's embedding update is with the host worker
        self._row_grads: list[RowGradient | None] = [None, None]

    # ----- device memory plan

    def plan_memory(self, micro_batch: tuple[int, int], segments: bool = False,
                    resident_layers: int | None = None, compiled: bool = True) -> dict[str, int]:
        """Estimated peak device bytes for micro-batches of `micro_batch` = (rows, seq_len), with
        this engine's resident layers or `resident_layers` of them.

        Independent of the number of streamed layers and of the tokens per step: the window, one
        unit's fp32 gradient, the compiled backward's working set (from XLA's memory analysis),
        the head's, a few boundary activations, and the resident units' weights and state.
        `compiled=False` leaves out the two working sets (0): a floor that compiles nothing.
        """
        cfg, fns = self.cfg, self.fns
        r = self.resident_layers if resident_layers is None else resident_layers
        b, s = micro_batch
        H, cd = cfg.hidden_size, self.dtype.itemsize
        units = self.host.units
        resident = _resident_layer_names(r) | (set(units) if r == self.L else set())
        chunk_params = max((u.master.size for u in self.host.head_units), default=0)
        unit_params = max(cfg.layer_params, chunk_params)
        head_names = {u.name for u in self.host.head_units}
        streamed = [n for n in units if n not in resident and (not n.startswith("embed.") or n in head_names)]
        window = (self.prefetch + 1) * unit_params * cd if streamed else 0
        moments = 2 * getattr(self.opt, "moment_dtype", np.dtype(np.float32)).itemsize
        # master fp32, optimizer moments, compute copy, and the update's temporaries (the fp32
        # update and the new master before the old one is freed: 12 B/param measured, with room).
        resident_bytes = sum(units[n].master.size for n in resident) * (4 + moments + cd)
        resident_bytes += max((units[n].master.size for n in resident), default=0) * 12
        grads = unit_params * (4 + 4 + cd)  # fp32 accumulator, its update, the download copy
        # GPU-updated layers: the state of the one being updated and of the next layer if it is
        # one too (uploaded one layer ahead), with the gradient and the new weights.
        chosen = [r + i for i in _spread(self._gpu_update_count, self.L - r)] if r < self.L else []
        in_window = max((sum(i <= j <= i + 1 for j in chosen) for i in range(self.L)), default=0)
        gpu_updated = in_window * cfg.layer_params * (4 + moments + 2 * cd)

        plan = {"window": window, "resident": resident_bytes, "gradients": grads, "layer_backward": 0,
                "head": 0, "boundaries": 6 * b * s * H * cd + 2 * b * s * H * 4, "gpu_updates": gpu_updated}
        if compiled:

            def working(fn, *args) -> int:
                m = fn.lower(*args).compile().memory_analysis()
                return int(getattr(m, "temp_size_in_bytes", 0)) if m is not None else 0

            sd = jax.ShapeDtypeStruct
            x = sd((b, s, H), self.dtype)
            pos = sd((b, s), jnp.int32)
            seg = sd((b, s), jnp.int32) if segments else None
            w = sd((cfg.layer_params,), self.dtype)
            acc = sd((cfg.layer_params,), jnp.float32)
            plan["layer_backward"] = working(fns.bwd, w, x, pos, seg, x, acc)
            wc = sd((chunk_params,), self.dtype)
            labels = sd((b * s,), jnp.int32)
            plan["head"] = working(fns.grads, x, wc, labels, sd((), jnp.int32), sd((b * s,), jnp.float32),
                                   sd((b, s, H), jnp.float32), sd((chunk_params,), jnp.float32))
        # The layer backward and the head never run at once: the larger of the two counts.
        plan["total"] = sum(v for k, v in plan.items() if k not in ("layer_backward", "head"))
        plan["total"] += max(plan["layer_backward"], plan["head"])
        return plan

    def plan_host_memory(self, micro_batch: tuple[int, int], micro_batches: int = 1) -> dict[str, int]:
        """Host bytes for steps of `micro_batches` micro-batches of `micro_batch` = (rows,
        seq_len) with this engine's resident layers (see `host_memory.plan_host_memory`)."""
        return plan_host_memory(self.cfg, micro_batch, micro_batches, compute_dtype=self.dtype,
                                moment_dtype=getattr(self.opt, "moment_dtype", np.float32),
                                resident_layers=self.resident_layers, prefetch=self.prefetch,
                                gpu_update_layers=len(self.gpu_updated),
                                speculated_params=sum(self.host.units[n].master.size for n in self._spec))

    def _check_pinned_pool(self, shape: tuple[int, ...]) -> None:
        """On a GPU, refuse a step whose pinned host memory would overflow XLA's pinned pool
        (it would fail mid-step, after hours of set-up on a large model)."""
        if not _has_pinned_pool(self.device) or self.dist is not None:
            return
        need = self.plan_host_memory((shape[1], shape[2]), shape[0])["pinned"]
        if need > pinned_pool_bytes():
            raise SlidejaxError(
                f"steps of {shape[0]}x{shape[1]}x{shape[2]} tokens need up to {need / 2**30:.1f} GiB of pinned "
                f"host memory, more than XLA's pinned pool of {pinned_pool_bytes() >> 30} GiB: set "
                f"{PINNED_POOL_ENV}={pinned_pool_gb(need)} before jax starts (or use fewer tokens "
                f"per step or more resident layers)")

    AUTO_MARGIN = 0.8  # of the budget: allocator fragmentation and what the plan does not see

    def _auto_resident(self, micro_batch: tuple[int, int] | None) -> int:
        """The most resident layers whose plan fits the budget (or the device's capacity)."""
        budget = self.gpu_memory
        if budget is None:
            stats = self.device.memory_stats() or {}
            budget = stats.get("bytes_limit") if self.device.platform != "cpu" else None
        if budget is None:
            return 0  # CPU without a budget: nothing to plan against
        if micro_batch is None:
            raise SlidejaxError("resident_layers='auto' needs micro_batch=(rows, seq_len)")
        rows, seq = micro_batch
        rows = max(1, rows // len(self.local_devices))
        # Layer counts are monotone in memory: bisect the largest that fits.
        lo, hi = 0, self.L
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.plan_memory((rows, seq), resident_layers=mid)["total"] <= self.AUTO_MARGIN * budget:
                lo = mid
            else:
                hi = mid - 1
        if self.dist is not None:  # every process must choose the same units: the fewest any fits
            lo = int(self.dist.allgather(np.array(lo, np.int32)).min())
        return lo

    def _check_budget(self, shape: tuple[int, ...], segments: bool) -> None:
        key = (shape[1], shape[2], segments)
        if shape[0] > self._pinned_checked:
            self._check_pinned_pool(shape)
            self._pinned_checked = shape[0]
        if self.gpu_memory is None or key in self._planned:
            return
        # The floor first: compiling for XLA's memory analysis autotunes on the device, which a
        # budget far too small makes fail inside XLA instead of here.
        plan = self.plan_memory((shape[1], shape[2]), segments, compiled=False)
        floor, failure = True, ""
        if plan["total"] <= self.gpu_memory:
            try:
                plan, floor = self.plan_memory((shape[1], shape[2]), segments), False
            except jax.errors.JaxRuntimeError as exc:
                if "RESOURCE_EXHAUSTED" not in str(exc):
                    raise
                failure = "; XLA ran out of it compiling the layer's backward"
        if plan["total"] > self.gpu_memory or failure:
            parts = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in plan.items() if k != "total" and (v or not floor))
            raise SlidejaxError(
                f"GPU memory budget {self.gpu_memory / 1e9:.2f} GB is too small for micro-batches of "
                f"{shape[1]}x{shape[2]} tokens: needs {'more than' if floor else 'about'} "
                f"{plan['total'] / 1e9:.2f} GB ({parts} GB{', and the compiled working sets' if floor else ''})"
                f"{failure}; "
                f"lower the micro-batch size or resident layers")
        self._planned.add(key)

    # ----- placement helpers

    def _owns(self, name: str) -> bool:
        """Whether this process keeps unit `name`'s host state (always, on one process)."""
        return self.dist is None or self.owner.get(name, self.dist.index) == self.dist.index

    def _put_rows(self, local: np.ndarray) -> jax.Array:
        """This process's rows of a batch array, split over the devices by rows."""
        if self.dist is not None:
            return self.dist.put_rows(local, self.act_sharding)
        return jax.device_put(np.ascontiguousarray(local), self.act_sharding)

    def _local(self, value: jax.Array) -> np.ndarray:
        """This process's rows of a row-split array, as numpy."""
        return np.asarray(value) if self.dist is None else self.dist.local_rows(value)

    def _tree_of(self, unit: Unit) -> Callable[[np.ndarray], Any]:
        return lambda flat: unit.layout.views(flat.reshape(-1))

    def _init_resident(self, unit: Unit, parked: bool = False) -> None:
        """Device state of a resident unit; `parked`: of a GPU-updated layer, whose master and
        optimizer state then live in pinned host memory between updates (with its upload copy,
        and its downloaded gradient while an update is pending)."""
        init, update = self._resident_fns(unit.layout)
        master = self._put_master(unit)
        st = {"master": master, "opt": init(master), "weights": master.astype(self.dtype), "update": update}
        if parked:
            st = {**self._park(st), "update": update, "grad": None, "scale": None}
            jax.block_until_ready(st["opt"])
        self.dev_state[unit.name] = st

    def _park(self, st: dict[str, Any]) -> dict[str, Any]:
        """Master, optimizer state and weights of a GPU-updated layer, downloaded to pinned memory."""
        def park(x: jax.Array) -> jax.Array:  # one device's copy of a replicated array
            return jax.device_put(x.addressable_shards[0].data if len(self.devices) > 1 else x, self.host_sharding)

        return {"master": park(st["master"]), "opt": jax.tree.map(park, st["opt"]), "weights": park(st["weights"])}

    def _gpu_updated_layers(self, count: int) -> frozenset[str]:
        if count and self.dist is not None:
            raise SlidejaxError("gpu_update_layers is not supported with several processes")
        r = self.resident_layers
        return frozenset(f"layers.{r + i}" for i in _spread(count, self.L - r))

    def _resident_fns(self, layout: FlatLayout) -> tuple[Callable, Callable]:
        """Jitted optimizer init and update for resident units of one layout: one compile serves
        every resident layer (and every vocabulary block of one size)."""
        fns = self._resident_cache.get(layout)
        if fns is not None:
            return fns
        mask = {n: layout.offsets[i] < layout.decay_split for i, n in enumerate(layout.names)}
        tx = self.opt.to_optax(mask=mask)
        dtype = self.dtype

        def update(master, opt_state, grad, scale):
            g = layout.views(grad.astype(jnp.float32) * scale)
            p = layout.views(master)
            updates, opt_state = tx.update(g, opt_state, p)
            new = layout.flatten(optax.apply_updates(p, updates))
            return new, opt_state, new.astype(dtype)

        # Placed like the master: scalars such as the step count would otherwise land on one device.
        fns = (jax.jit(lambda m: tx.init(layout.views(m)), out_shardings=self.dev_sharding),
               jax.jit(update, donate_argnums=(0, 1)))
        self._resident_cache[layout] = fns
        return fns

    def _put_master(self, unit: Unit) -> jax.Array:
        """A resident unit's fp32 master on the device, one unit at a time: XLA stages an upload
        from pageable memory through its pinned pool, which keeps (page-locked) the most it ever
        held at once; all units in flight together would leave it the size of the model."""
        master = jax.device_put(unit.master, self.dev_sharding)
        master.block_until_ready()
        return master

    # ----- transfers (each a separate device_put issued by the driver thread)

    def _upload_array(self, host_array: Any, what: str, sharding: Any = None) -> jax.Array:
        out = jax.device_put(host_array, sharding or self.act_sharding)
        if self.trace:
            self.trace.device("upload", what, out)
        return out

    def _download(self, value: jax.Array, what: str) -> jax.Array:
        """Activations keep their row split; gradients (replicated) come from the first device."""
        if len(self.devices) > 1 and value.sharding.is_fully_replicated:
            value = value.addressable_shards[0].data
            out = jax.device_put(value, self.host_sharding)
        else:
            out = jax.device_put(value, self.act_host_sharding if len(self.devices) > 1 else self.host_sharding)
        if self.trace:
            self.trace.device("download", what, out)
        return out

    def _throttle(self, landing: jax.Array) -> None:
        """Bound the activations in flight: the driver may run at most two micro-batches ahead of
        their copies landing in host memory, so device memory does not grow with the number of
        micro-batches per step."""
        self._inflight.append(landing)
        while len(self._inflight) > 2:
            jax.block_until_ready(self._inflight.popleft())

    def _weights(self, name: str) -> jax.Array:
        """Issue (or return) unit `name`'s weights on the device."""
        if name in self.resident:
            return self.dev_state[name]["weights"]
        if name in self.gpu_updated:
            return self._parked_weights(name)
        self.ready[name].wait()
        self.worker.check()
        if self.dist is not None:
            # Only the owner has a copy (every process, for a replicated unit).
            buf = self._upload_copy(name) if name in self._copied else None
            out = self.dist.upload(None if buf is None else buf.array, self.host.units[name].master.size,
                                   self.dtype, self.owner.get(name))
            if self.trace:
                self.trace.device("upload", name, out)
            return out
        return self._upload_array(self._upload_copy(name).array, name, self.dev_sharding)

    def _issue_window(self, window: dict[int, Any], names: list[str], i: int,
                      held: Callable[[int], bool] = lambda j: False) -> bool:
        """Issue the uploads of units `names[i .. i+prefetch]` that `window` lacks, except those
        `held` back and later ones whose host update still runs (unit i never waits for those;
        they are tried again at the next unit). Returns whether `names[i+1]` was so left out: the
        caller issues it once unit i's compute is queued."""
        next_late = False
        for j in range(i, min(len(names), i + self.prefetch + 1)):
            if j in window or held(j):
                continue
            if j > i and not self._uploadable(names[j]):
                next_late = next_late or j == i + 1
                continue
            window[j] = self._weights(names[j])
        return next_late

    def _uploadable(self, name: str) -> bool:
        """Whether `_weights(name)` would not wait for a host update (always, with several
        processes: their uploads are collective, issued in one order everywhere)."""
        return self.dist is not None or name in self.resident or name in self.gpu_updated or self.ready[name].is_set()

    def _update_pending(self, name: str) -> bool:
        return name in self.gpu_updated and self.dev_state[name]["grad"] is not None

    def _parked_weights(self, name: str) -> Any:
        """A GPU-updated layer's weights; with its update pending, the state is uploaded now and
        the update dispatched where the weights are first used (`_resolve`), after the work
        queued before it, so the update does not hold up the device's earlier layers."""
        st = self.dev_state[name]
        if st["grad"] is None:
            return self._upload_array(st["weights"], name, self.dev_sharding)
        up = functools.partial(jax.device_put, device=self.dev_sharding)
        master = self._upload_array(st["master"], f"state {name}", self.dev_sharding)
        return _PendingUpdate(name, master, jax.tree.map(up, st["opt"]), up(st["grad"]))

    def _resolve(self, weights: Any) -> jax.Array:
        """Weights from `_weights`, running a pending device update of a GPU-updated layer; its
        new state goes back to pinned memory."""
        if not isinstance(weights, _PendingUpdate):
            return weights
        st = self.dev_state[weights.name]
        master, opt, new = st["update"](weights.master, weights.opt, weights.grad, jnp.float32(st["scale"]))
        self._compute(f"update {weights.name}", new)
        st.update(self._park({"master": master, "opt": opt, "weights": new}), grad=None, scale=None)
        if self.trace:
            self.trace.device("download", f"state {weights.name}", st["master"])
        return new

    def _compute(self, what: str, value: Any) -> Any:
        if self.trace:
            self.trace.device("compute", what, value)
        return value

    # ----- the step

    def step(self, batch: Any, next_input_ids: np.ndarray | None = None) -> StepMetrics:
        """One optimizer step on `batch` ([M, B, S] arrays: input_ids, labels, positions,
        segment_ids). `next_input_ids`, when given, lets the embedding rows the next step looks
        up be updated first (the rest of the table is updated while the next step runs)."""
        if self.opt is None:
            raise SlidejaxError("this engine was built for inference (no optimizer)")
        t0 = time.perf_counter()
        if next_input_ids is not None:  # checked before any state changes: a bad one fails cleanly
            next_input_ids = np.asarray(next_input_ids)
            if not np.issubdtype(next_input_ids.dtype, np.integer) or not self._in_vocab(next_input_ids):
                raise SlidejaxError(f"next_input_ids must be token ids in [0, {self.cfg.vocab_size})")
        ids, labels, pos, seg, n_tokens, masked = self._batch(batch)
        if n_tokens == 0:
            raise SlidejaxError("a training step has no supervised tokens (all labels are -100)")
        self._check_budget(ids.shape, masked)
        if self._step_open:
            # The last step raised part-way: the host tasks it queued (speculative updates,
            # embedding rows) write into buffers this step reuses; let them finish first.
            self._step_open = False
            self.worker.join()
        self._step_open = True
        self._embed_queued = False
        self._release_resident_masters()
        self._flush_embed_update(ids)
        self.worker.check()
        self._sq_norms: dict[str, Any] = {}
        self._pending: list[tuple[int, str, Any]] = []
        self._tied_head_grad: dict[str, Any] = {}
        self._resident_updates: list[tuple[str, Any]] = []
        # Without clipping the update scale is known now and updates start as gradients arrive.
        self._scale = None if self.max_grad_norm > 0 else 1.0 / n_tokens
        self._unclipped = 1.0 / n_tokens  # the scale when clipping changes nothing
        self._speculated = set()
        self._outcome: dict[str, float | None] = {"scale": None}  # set at the end of the backward

        dev = self._step_inputs(ids, labels, pos, seg, masked)
        x_last, ckpt = self._forward(ids, dev, train=True)
        loss_sum, dh, head_state = self._head(x_last, dev, train=True)
        self._backward(ids, dev, ckpt, x_last, dh, head_state)
        if self._scale is not None and next_input_ids is not None and self.dist is None and not self.all_resident:
            # Without clipping the scale is known: queue the embedding's update now, behind the
            # host tasks that sum its rows, so the next forward's rows go before the layers'
            # updates still pending (else the host starts one while this thread waits for the
            # rows to be summed, and the next forward waits for it).
            self._queue_embedding(next_input_ids, after=_AllSet(self._rows_added))
        loss = float(loss_sum) / n_tokens
        total = self._embedding_gradient() + sum(float(v) for v in self._sq_norms.values())
        norm = float(np.sqrt(total)) / n_tokens
        clip = 1.0
        if self.max_grad_norm > 0:
            clip = self.max_grad_norm / max(norm, self.max_grad_norm)
            self._scale = clip / n_tokens
        self._release_updates(next_input_ids)
        self.step_count += 1
        self._step_open = False
        return StepMetrics(loss=loss, grad_norm=norm, tokens=n_tokens, positions=int(ids.size),
                           clip_scale=clip, seconds=time.perf_counter() - t0)

    def _arrays(self, batch: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        ids = _batch_field(batch, "input_ids")
        if ids is None or ids.ndim != 3:
            raise SlidejaxError("a batch needs input_ids of shape [micro_batches, batch, seq_len]")
        ids = ids.astype(np.int32)
        labels = _batch_field(batch, "labels")
        labels = np.full(ids.shape, IGNORE, np.int32) if labels is None else labels.astype(np.int32)
        pos = _batch_field(batch, "positions")
        pos = (np.broadcast_to(np.arange(ids.shape[-1], dtype=np.int32), ids.shape) if pos is None
               else pos.astype(np.int32))
        seg = _batch_field(batch, "segment_ids")
        if ids.shape[1] % len(self.local_devices):
            raise SlidejaxError(f"micro-batch rows ({ids.shape[1]}) must be a multiple of the "
                                f"{len(self.local_devices)} devices")
        if not self._in_vocab(ids):
            raise SlidejaxError(f"token id out of range [0, {self.cfg.vocab_size}) in input_ids")
        return ids, labels, pos, seg

    def _in_vocab(self, ids: np.ndarray) -> bool:
        return ids.size == 0 or (ids.min() >= 0 and ids.max() < self.cfg.vocab_size)

    def _batch(self, batch: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, int, bool]:
        """(ids, labels, positions, segments, supervised tokens, any segment mask needed). With
        several processes the counts are global, and every process first agrees that all batches
        are valid and shaped alike (else all raise, rather than some wait in a collective)."""
        try:
            ids, labels, pos, seg = self._arrays(batch)
        except SlidejaxError as e:
            if self.dist is None:
                raise
            try:
                self.dist.agree(False, (0, 0, 0), 0, False)
            except SlidejaxError:
                pass
            raise e from None
        tokens = int(np.sum(labels != IGNORE))
        masked = seg is not None and any(_needs_segment_mask(x) for x in seg)
        if self.dist is not None:
            tokens, masked = self.dist.agree(True, ids.shape, tokens, masked)
            if masked and seg is None:  # another process's rows need masks: one document per row
                seg = np.ones_like(ids)
        return ids, labels, pos, seg, tokens, masked

    def _step_inputs(self, ids, labels, pos, seg, masked: bool = False) -> list[dict[str, Any]]:
        out = []
        # Several processes must all pass segments or none (one compiled program for all).
        force = masked and self.dist is not None
        for mb in range(ids.shape[0]):
            need = seg is not None and (force or _needs_segment_mask(seg[mb]))
            s = seg[mb].astype(np.int32) if need else None
            out.append({
                "pos": self._put_rows(pos[mb]),
                "seg": None if s is None else self._put_rows(s),
                "labels": self._put_rows(labels[mb].reshape(-1)),
            })
        return out

    @staticmethod
    def _order(stage: int, M: int) -> list[int]:
        return list(range(M)) if stage % 2 == 0 else list(range(M - 1, -1, -1))

    # ----- forward

    def _embed(self, ids: np.ndarray) -> _Acts:
        """Layer-0 inputs for every micro-batch: gathered on the host, uploaded like activations."""
        M = ids.shape[0]
        acts = _Acts(self, M)
        units = self.host.embed_units
        if self.all_resident:
            ws = [self.dev_state[u.name]["weights"] for u in units]
            firsts = tuple(u.rows[0] for u in units)
            for mb in range(M):
                x = self.fns.embed_lookup(ws, firsts, self._put_rows(ids[mb]))
                acts.dev[mb] = x
            return acts
        # The rows updated first are those of the ids the last step was told come next; ids that
        # bring others wait for the whole table's update.
        staged, self._staged_ahead = self._staged_ahead, None
        if staged is not None:
            staged["done"].wait()  # a staging task queued last step has run, or was skipped
            self.worker.check()
        if (staged is not None and staged["staged"] and staged["ids"].shape == ids.shape
                and np.array_equal(staged["ids"], ids)):
            self.staged_ahead_steps += 1
        else:
            first = self._rows_first
            whole = first is not None and not np.isin(ids, first).all()
            for u in units:
                (self.ready if whole else self.rows_ready)[u.name].wait()
            self.worker.check()
            if first is None or whole:
                self._catch_up_embedding(ids)  # rows the update did not do first may have deferred it
            self._staging_for(ids)
            self._stage_rows(ids)
        shape = ids.shape[1:] + (self.cfg.hidden_size,)
        if self.dist is not None:
            shape = (self.dist.global_rows(shape[0]),) + shape[1:]
        for mb in range(M):
            stages = self._staging[mb]
            # The staged rows are also layer 0's checkpoint: no download needed.
            acts.host[mb] = stages[0].array if len(self.devices) == 1 else jax.make_array_from_single_device_arrays(
                shape, self.act_host_sharding, [st.array for st in stages])
        return acts

    def _staging_for(self, ids: np.ndarray) -> None:
        """Pinned staging buffers for the layer-0 inputs of `ids` [M, rows, seq] (allocated on the
        driver thread; buffers of another shape are dropped, in-flight reads keep theirs)."""
        n_dev = len(self.local_devices)
        part = (ids.shape[1] // n_dev, ids.shape[2], self.cfg.hidden_size)
        if self._staging and self._staging[0][0].array.shape != part:
            self._staging = []
        while len(self._staging) < ids.shape[0]:
            # One pinned buffer per device: each device's rows go straight to it.
            self._staging.append([PinnedBuffer(part, self.np_dtype, d) for d in self.local_devices])

    def _stage_rows(self, ids: np.ndarray, threads: int | None = None) -> None:
        """Gather the embedding rows of `ids` into the staging buffers (`_staging_for(ids)`'s), once
        every read of the last step's rows there (layer 0's forward, and its backward: they are
        its checkpoint) is done."""
        tables = []
        for u in self.host.embed_units:
            table = self._upload_view(u.name)
            tables.append((u.rows[0], (u.master if table is None else table).reshape(u.rows[1] - u.rows[0], -1)))
        jax.block_until_ready(self._staging_guard)
        n_dev = len(self.local_devices)
        for mb in range(ids.shape[0]):
            for stage, r in zip(self._staging[mb], np.split(ids[mb], n_dev, axis=0)):
                gather_rows(tables, r, stage.host, threads=threads)

    def _forward(self, ids: np.ndarray, dev: list[dict[str, Any]], train: bool) -> tuple[_Acts, list[_Acts]]:
        M = ids.shape[0]
        cur = self._embed(ids)
        ckpt: list[_Acts] = []
        window: dict[int, jax.Array] = {}
        names = [f"layers.{j}" for j in range(self.L)]
        last_out = None
        for i in range(self.L):
            if train:
                ckpt.append(cur)
            # At most k+1 streamed layers on the device: the previous layer's compute must be
            # done before the next upload is issued, and that upload issued before this compute.
            if last_out is not None and f"layers.{i - 1}" not in self.resident:
                jax.block_until_ready(last_out)
            window.pop(i - 1, None)
            # A pending GPU update's state goes up one layer ahead, not k: PCIe carries one state
            # at a time anyway, and the device holds one less.
            next_late = self._issue_window(window, names, i, held=lambda j, i=i: j > i + 1 and self._update_pending(names[j]))
            w = window[i] = self._resolve(window[i])
            nxt = _Acts(self, M)
            order = self._order(i, M)
            for n, mb in enumerate(order):
                if n + 1 < M:
                    cur.prefetch(order[n + 1])
                y = self.fns.fwd(w, cur.get(mb), dev[mb]["pos"], dev[mb]["seg"])
                self._compute(f"fwd {i}.{mb}", y)
                cur.release(mb)
                last = n == M - 1
                # Layer i's output is layer i+1's checkpoint; the last micro-batch stays on the
                # device because the next layer starts with it.
                nxt.put(mb, y, keep=last, offload=train or not last)
                last_out = y
            if i == 0:
                self._staging_guard = last_out
            if next_late:
                # With layer i queued on the device, wait for layer i+1's update and upload it
                # during that compute; layers further ahead are tried again next iteration.
                window[i + 1] = self._weights(names[i + 1])
            cur = nxt
        self._window = window  # the last layers stay on the device for the start of backward
        return cur, ckpt

    # ----- head

    def _head(self, x_last: _Acts, dev: list[dict[str, Any]], train: bool, want_logits: bool = False):
        """Final norm and loss (or logits). Returns (loss sum, dh as _Acts, head state)."""
        M = len(dev)
        fns = self.fns
        norm_w = self._weights("norm")
        units = self.host.head_units
        C = len(units)
        h = _Acts(self, M)
        order = self._order(self.L, M)
        for n, mb in enumerate(order):
            if n + 1 < M:
                x_last.prefetch(order[n + 1])
            hv = fns.norm_fwd(norm_w, x_last.get(mb))
            if n < M - 1:
                x_last.release(mb)
            h.put(mb, hv, keep=n == M - 1 or M == 1, offload=M > 1)
        state = (norm_w, order)

        if want_logits:
            parts = [[None] * C for _ in range(M)]
            for c, u in enumerate(units):
                w = self._weights(u.name)
                for mb in range(M):
                    parts[mb][c] = self._local(fns.logits(h.get(mb), w))
            return [np.concatenate(p, axis=-1) for p in parts], None, state

        if C == 1 and train:
            # One vocabulary block: the fused linear cross-entropy gives loss and both gradients.
            w = self._weights(units[0].name)
            total, dw_acc = 0.0, None
            dh = _Acts(self, M)
            for n, mb in enumerate(order[::-1]):
                loss_mb, d, dw_acc = fns.fused(h.get(mb), w, dev[mb]["labels"], dw_acc)
                total = total + loss_mb
                dh.put(mb, self._compute(f"head {mb}", d), keep=n == M - 1 or M == 1, offload=M > 1)
                h.release(mb)
            self._finish_unit(units[0].name, dw_acc)
            return total, dh, state

        # Pass 1: statistics, vocabulary blocks in order.
        stats: list[Any] = [None] * M
        blocks: dict[int, jax.Array] = {}
        names = [u.name for u in units]
        for c, u in enumerate(units):
            blocks.pop(c - 1, None)
            next_late = self._issue_window(blocks, names, c)
            corder = order if c % 2 == 0 else order[::-1]
            for n, mb in enumerate(corder):
                if n + 1 < M:
                    h.prefetch(corder[n + 1])
                stats[mb] = fns.stats(h.get(mb), blocks[c], dev[mb]["labels"], jnp.int32(u.rows[0]), stats[mb])
                self._compute(f"head stats {c}.{mb}", stats[mb])
                if n < M - 1:
                    h.release(mb)
            if next_late:  # as in the forward
                blocks[c + 1] = self._weights(names[c + 1])
        total, lse = 0.0, [None] * M
        for mb in range(M):
            lse[mb], t = fns.loss(stats[mb], dev[mb]["labels"])
            total = total + t
        if not train:
            return total, None, state

        # Pass 2: gradients, blocks in reverse (the last block is still on the device).
        dh = _Acts(self, M)
        porder = (order if (C - 1) % 2 == 0 else order[::-1])[::-1]
        for c in range(C - 1, -1, -1):
            blocks.pop(c + 1, None)
            for j in range(c, max(-1, c - self.prefetch - 1), -1):
                if j not in blocks:
                    blocks[j] = self._weights(units[j].name)
            dw_acc = None
            for n, mb in enumerate(porder):
                if n + 1 < M:
                    h.prefetch(porder[n + 1])
                    dh.prefetch(porder[n + 1])
                prev = dh.get(mb) if c < C - 1 else None
                d, dw_acc = fns.grads(h.get(mb), blocks[c], dev[mb]["labels"], jnp.int32(units[c].rows[0]),
                                      lse[mb], prev, dw_acc)
                keep = n == M - 1 or M == 1
                dh.put(mb, self._compute(f"head grads {c}.{mb}", d), keep=keep, offload=M > 1)
                if not keep:
                    h.release(mb)
            self._finish_unit(units[c].name, dw_acc)
            porder = porder[::-1]
        blocks.clear()
        return total, dh, state

    # ----- backward

    def _backward(self, ids: np.ndarray, dev: list[dict[str, Any]], ckpt: list[_Acts], x_last: _Acts,
                  dh: _Acts, head_state: Any) -> None:
        M = ids.shape[0]
        fns = self.fns
        norm_w, _ = head_state
        dy = _Acts(self, M)
        acc = None
        border = [mb for mb in range(M) if dh.dev[mb] is not None] + [mb for mb in range(M) if dh.dev[mb] is None]
        for n, mb in enumerate(border):
            dx, acc = fns.norm_bwd(norm_w, x_last.get(mb), dh.get(mb), acc)
            x_last.release(mb)
            dh.release(mb)
            dy.put(mb, dx, keep=n == M - 1 or M == 1, offload=M > 1)
        self._finish_unit("norm", acc)

        window = self._window
        last_out = None
        rowgrad = None
        if not self.all_resident:
            # Two row-gradient buffers, alternating: step n's is read by its embedding update
            # until step n+1's forward; step n+2 reuses it after that update is done.
            previous = self._row_grads[self.step_count % 2]
            rowgrad = RowGradient(ids, None if previous is None else previous.buffer)
            self._row_grads[self.step_count % 2] = rowgrad
        self._rows_added = [threading.Event() for _ in range(M)]
        for i in range(self.L - 1, -1, -1):
            if last_out is not None and f"layers.{i + 1}" not in self.resident:
                jax.block_until_ready(last_out)
            window.pop(i + 1, None)
            for j in range(i, max(-1, i - self.prefetch - 1), -1):
                if j not in window:
                    window[j] = self._weights(f"layers.{j}")
            w = window[i] = self._resolve(window[i])
            xs = ckpt[i]
            nxt = _Acts(self, M)
            # Start with the micro-batch whose dy is still on the device.
            border = [mb for mb in range(M) if dy.dev[mb] is not None] + \
                     [mb for mb in range(M) if dy.dev[mb] is None]
            acc = None
            for n, mb in enumerate(border):
                if n + 1 < M:
                    xs.prefetch(border[n + 1])
                    dy.prefetch(border[n + 1])
                dx, acc = fns.bwd(w, xs.get(mb), dev[mb]["pos"], dev[mb]["seg"], dy.get(mb), acc)
                self._compute(f"bwd {i}.{mb}", dx)
                xs.release(mb)
                dy.release(mb)
                keep = n == M - 1 or M == 1
                # The layer-0 input gradient is the embedding's: always to the host, where its rows
                # are summed per token as soon as it lands (the global norm waits for them).
                nxt.put(mb, dx, keep=keep and i > 0, offload=i == 0 or not keep)
                if keep and i > 0:
                    # Layer i-1 starts with this micro-batch: its checkpoint goes up during this
                    # compute, ahead of the window's weights (else the next layer waits for it).
                    ckpt[i - 1].prefetch(mb)
                if i == 0 and rowgrad is not None:
                    self.worker.submit((self.step_count, -1), f"embedding rows {mb}",
                                       functools.partial(self._add_rows, rowgrad, mb, nxt.host[mb]),
                                       self._rows_added[mb], waits_for=nxt.host[mb])
                last_out = dx
            if i == 0:
                self._staging_guard = last_out
            self._finish_unit(f"layers.{i}", acc)
            dy = nxt
        window.clear()

        units = self.host.embed_units
        if self.all_resident:
            dxs = jnp.stack([dy.dev[mb] if dy.dev[mb] is not None else dy.get(mb) for mb in range(M)])
            every = ids if self.dist is None else self.dist.gather_rows(ids, axis=1)  # all processes' rows
            ids_dev = jax.device_put(every, self.dev_sharding)
            grads = fns.embed_grads(ids_dev, dxs,
                                    tuple((u.rows[1] - u.rows[0], u.rows[0]) for u in units))
            for u, g in zip(units, grads):
                if self.cfg.tie_word_embeddings:
                    g = g + self._tied_head_grad.pop(u.name)
                self._finish_unit(u.name, g, tied_done=True)
        else:
            self._embed_job = (rowgrad, [dy.host[mb] for mb in range(M)])

    # ----- gradients to the optimizer

    def _finish_unit(self, name: str, acc: jax.Array, tied_done: bool = False) -> None:
        """A unit's gradient (fp32, summed over micro-batches) is complete on the device."""
        tied = self.cfg.tie_word_embeddings and name.startswith("embed.") and not tied_done
        if name in self.resident:
            if tied:
                self._tied_head_grad[name] = acc  # the embedding's share arrives at the end
                return
            self._sq_norms[name] = self.fns.sq(acc)
            if self._scale is not None:
                self._update_resident(name, acc, self._scale)
            else:
                self._resident_updates.append((name, acc))
            return
        if len(self.devices) > 1 and not acc.sharding.is_fully_replicated:
            acc = jax.device_put(acc, self.dev_sharding)  # the all-reduce, on the devices
        grad, sq = self.fns.finish(acc)
        self._compute(f"grad {name}", grad)
        if name in self.gpu_updated:  # updated on the device when next needed (`_parked_weights`)
            self._sq_norms[name] = sq
            st = self.dev_state[name]
            st["grad"], st["scale"] = self._download(grad, f"grad {name}"), self._scale
            return
        if not self._owns(name):  # another process downloads and updates it
            self._sq_norms[name] = sq
            return
        host_grad = self._download(grad, f"grad {name}")
        self._sq_norms[name] = sq
        if tied:
            # Completed on the host with the embedding's rows (see `_embedding_gradient`).
            self._tied_head_grad[name] = host_grad
            return
        # The unit's upload copy is dead until its update: released now, and the update writes
        # the next copy into the gradient's buffer (see `_submit`), so the host never holds both
        # a copy and a gradient of every unit (2 bytes per parameter less at the step's end). A
        # speculated unit keeps it until the step commits (it becomes the spare) or redoes.
        retired = self.upload_buf.pop(name, None)
        if self._scale is not None:
            self._submit(name, host_grad, self._scale)
        else:
            if name in self._spec:
                self._speculate(name, host_grad, retired)
            self._pending.append((name, host_grad))

    def _update_resident(self, name: str, grad: jax.Array, scale: float) -> None:
        st = self.dev_state[name]
        st["master"], st["opt"], st["weights"] = st["update"](st["master"], st["opt"], grad, jnp.float32(scale))

    def _priority(self, name: str) -> int:
        """Forward order: the order in which the next step needs the units."""
        if name.startswith("layers."):
            return 1 + int(name.split(".")[1])
        if name == "norm":
            return self.L + 1
        # The head's vocabulary blocks in the order its first pass reads them (0, 1, ...), though
        # their gradients arrive in reverse; the embedding's other rows after them all.
        heads = [u.name for u in self.host.head_units]
        return self.L + 2 + (heads.index(name) if name in heads else len(heads))

    def _submit(self, name: str, grad: Any, scale: float) -> None:
        unit = self.host.units[name]
        shape = self._shape(unit)
        sp = self._spec[name] if name in self._speculated else None

        def run() -> None:
            if sp is not None:
                if sp.written and scale == sp.scale:  # clipping changed nothing: it is the step
                    self._commit(name, sp)
                    return
                sp.retired = None
                self.speculation["redone" if sp.written else "skipped"] += 1
            state = self.opt_state[name]  # read here: a commit swaps it (on this thread)
            buf = PinnedBuffer.adopt(grad)  # waits for the download to land
            g = buf.host.reshape(shape)
            # The new weights overwrite the gradient in place (each element is read before it is
            # written): the download becomes the unit's next upload copy.
            self.opt.update(state, unit.master.reshape(shape), g, g,
                            decay_split=unit.layout.decay_split, grad_scale=scale)
            self.upload_buf[name] = buf
        # After the unit's speculative task (same priority, submitted later, same download).
        self.worker.submit((self.step_count, self._priority(name)), f"update {name}", run, self.ready[name],
                           waits_for=grad)

    # ----- speculative updates

    def _speculated_units(self, count: int) -> list[str]:
        """The `count` host-updated units whose gradients complete first in the backward."""
        count = max(0, int(count))
        if count == 0 or self.max_grad_norm <= 0:  # without clipping every update is final at once
            return []
        if self.dist is not None:
            raise SlidejaxError("speculative_units: one process only")
        if not getattr(self.opt, "supports_into", False):
            raise SlidejaxError(f"speculative_units needs an optimizer with update(into=) (HostAdamW), "
                                f"not {type(self.opt).__name__}")
        order = [] if self.cfg.tie_word_embeddings else [u.name for u in reversed(self.host.head_units)]
        order += [f"layers.{i}" for i in range(self.L - 1, -1, -1)]
        return [n for n in order if n not in self.resident and n not in self.gpu_updated][:count]

    def _new_speculation(self, name: str) -> "_Speculation":
        unit = self.host.units[name]
        shape = self._shape(unit)
        return _Speculation(master=aligned_zeros(unit.master.size), state=self.opt.init(shape),
                            upload=PinnedBuffer(unit.master.size, self.np_dtype, self.device))

    def _speculate(self, name: str, grad: Any, retired: PinnedBuffer | None) -> None:
        """Update unit `name` as if clipping changed nothing, into its second buffers, as soon as
        its gradient lands (the backward goes on meanwhile; the host is otherwise idle)."""
        sp = self._spec[name]
        unit = self.host.units[name]
        sp.scale, sp.retired, sp.written = self._unclipped, retired, False  # the copy in use: the spare after a commit
        if sp.upload is None:  # its last commit had no copy to retire (a failed step released it)
            sp.upload = PinnedBuffer(unit.master.size, self.np_dtype, self.device)
        outcome = self._outcome
        self._speculated.add(name)

        def run() -> None:
            if outcome["scale"] is not None:
                return  # reached after the backward: the plain update (in place, cheaper) follows
            g = PinnedBuffer.adopt(grad).host  # read only: a redo may still need it
            self.opt.update(self.opt_state[name], unit.master, g, sp.upload.host,
                            decay_split=unit.layout.decay_split, grad_scale=sp.scale,
                            into=(sp.master, sp.state))
            sp.written = True
        self.worker.submit((self.step_count, self._priority(name)), f"speculate {name}", run,
                           threading.Event(), waits_for=grad)

    def _commit(self, name: str, sp: "_Speculation") -> None:
        """Make the speculative update the unit's state (on the host worker)."""
        unit = self.host.units[name]
        unit.master, sp.master = sp.master, unit.master
        self.opt_state[name], sp.state = sp.state, self.opt_state[name]
        self.upload_buf[name], sp.upload, sp.retired = sp.upload, sp.retired, None
        self.speculation["committed"] += 1

    def _shape(self, unit: Unit) -> tuple[int, ...]:
        return (unit.rows[1] - unit.rows[0], self.cfg.hidden_size) if unit.rows else unit.master.shape

    def _upload_copy(self, name: str) -> PinnedBuffer:
        """Unit `name`'s compute-dtype copy, made from its master at set-up, and again if a step
        that failed between a unit's backward and its update left it released (`_finish_unit`)."""
        buf = self.upload_buf.get(name)
        if buf is None:
            unit = self.host.units[name]
            buf = PinnedBuffer(unit.master.size, self.np_dtype, self.device)
            store_compute_copy(unit.master, buf.host)
            self.upload_buf[name] = buf
        return buf

    def _upload_view(self, name: str) -> np.ndarray | None:
        """The compute-dtype copy the optimizer writes: None for a host-only embedding unit."""
        return self._upload_copy(name).host if name in self._copied else None

    def _add_rows(self, rowgrad: RowGradient, mb: int, dx_host: jax.Array) -> None:
        # Waits for the download to land; with several processes, this process's rows.
        rowgrad.add(mb, host_view(dx_host) if self.dist is None else self.dist.local_rows(dx_host))

    def _embedding_gradient(self) -> float:
        """Sum the layer-0 input gradients per distinct token (host, as soon as they land) and
        return what the embedding adds to the squared global norm."""
        if self._embed_job is None:
            return 0.0
        rowgrad, _ = self._embed_job
        for added in self._rows_added:
            added.wait()
        self.worker.check()
        values = rowgrad.values
        if self.dist is not None:  # every process's rows: the replicated embedding's gradient
            rowgrad.rows, rowgrad.values = self.dist.reduce_rows(rowgrad.rows, values)
            values = rowgrad.values
        if not self.cfg.tie_word_embeddings:
            return rowgrad.sq_norm()
        # Tied: |head + rows|^2 = |head|^2 (already counted) + sum over rows of 2 head.r + r.r
        extra = 0.0
        for u in self.host.embed_units:
            a, b = u.rows
            sel = (rowgrad.rows >= a) & (rowgrad.rows < b)
            r = values[sel]
            hg = host_view(self._tied_head_grad[u.name]).reshape(b - a, -1)[rowgrad.rows[sel] - a].astype(np.float32)
            extra += float(2.0 * np.vdot(hg, r) + np.vdot(r, r))
        return extra

    def _release_updates(self, next_ids: np.ndarray | None) -> None:
        """End of backward: the scale is final; start every update not started yet."""
        if self._scale is not None and self._speculated:
            self._outcome["scale"] = self._scale  # speculative updates not started yet are moot
        for name, grad in self._resident_updates:
            self._update_resident(name, grad, self._scale)
        self._resident_updates = []
        for name in self.gpu_updated:
            st = self.dev_state[name]
            if st["grad"] is not None and st["scale"] is None:
                st["scale"] = self._scale
        if not self.all_resident:
            if not self._embed_queued:
                self._queue_embedding(next_ids)
            self._embed_job, self._embed_queued = None, False
        pending, self._pending = self._pending, []
        for name, grad in sorted(pending, key=lambda p: self._priority(p[0])):
            self._submit(name, grad, self._scale)

    def _queue_embedding(self, next_ids: np.ndarray | None, after: Any = None) -> None:
        """Hand the step's embedding update to the host worker: its next rows now, before the
        layers' updates, when the next step's ids are known (`_flush_embed_update`), else at the
        next step. `after`: the `waits_for` of its tasks (what must be summed first)."""
        self.worker.check()  # a failed host task: raise before this step's update is handed over
        rowgrad, dxs = self._embed_job
        self._pending_embed = (rowgrad, dxs, dict(self._tied_head_grad), self._scale, self.step_count)
        for u in self.host.embed_units:
            self.rows_ready[u.name].clear()
            self.ready[u.name].clear()
        if next_ids is not None:
            self._flush_embed_update(next_ids, after)
        self._embed_queued = True

    def _flush_embed_update(self, next_ids: np.ndarray | None, after: Any = None) -> None:
        """Start the deferred embedding (and tied head) update: with the next step's token ids
        known, their rows first (the next forward waits only for those), the rest after every
        layer's update."""
        if self._pending_embed is None:
            return
        # A host task's error is raised before the update is taken from `_pending_embed`: once
        # it is, every submit below must go through, or the events the forward waits on would
        # never be set (a task queued after an error is skipped, and sets them).
        self.worker.check()
        rowgrad, dxs, head_grads, scale, step = self._pending_embed
        self._pending_embed = None
        tied = self.cfg.tie_word_embeddings
        rows_first = next_ids is not None and getattr(self.opt, "supports_rows", False)
        # The untied table's rows without a gradient defer their step (the same bits, applied
        # when the row is next looked up or at `sync`): a step's tokens touch few of its rows.
        defer = not tied and getattr(self.opt, "supports_defer", False)
        need = np.unique(next_ids.reshape(-1)) if rows_first else None
        self._rows_first = need

        for u in self.host.embed_units:
            a, b = u.rows
            shape = self._shape(u)
            upload = self._upload_view(u.name)
            upload = None if upload is None else upload.reshape(shape)
            master = u.master.reshape(shape)
            state = self.opt_state[u.name]
            args: dict[str, Any] = {}

            def grad_of(u=u, a=a, b=b, args=args) -> tuple[np.ndarray, dict[str, Any]]:
                if "grad" not in args:
                    if tied:
                        g = host_view(head_grads[u.name]).astype(np.float32).reshape(b - a, -1)
                        sel = (rowgrad.rows >= a) & (rowgrad.rows < b)
                        g[rowgrad.rows[sel] - a] += rowgrad.values[sel]
                        args["grad"], args["kw"] = g, {}
                    else:
                        args["grad"], args["kw"] = rowgrad.values, {"grad_index": rowgrad.index_for(a, b)}
                return args["grad"], args["kw"]

            def update(rows, u=u, state=state, master=master, upload=upload, grad_of=grad_of):
                if not rowgrad.complete:  # queued early, then a row-summing task failed: the step failed
                    return
                g, kw = grad_of()
                deferring = rows is None and defer
                if deferring:
                    kw["defer"] = True  # rows without a gradient: when next looked up (`_embed`)
                self.opt.update(state, master, g, upload, decay_split=u.layout.decay_split,
                                grad_scale=scale, rows=rows, **kw)
                if deferring:
                    # Off the next forward's path: rows that have owed many steps catch up now,
                    # so no lookup waits for a long replay (and the owed table stays short).
                    self.opt.catch_up(state, master, upload, decay_split=u.layout.decay_split,
                                      max_lag=self.max_deferred_steps)

            if need is not None:
                local = need[(need >= a) & (need < b)] - a
                self.worker.submit((step, 0), f"update {u.name} (next rows)", lambda update=update, r=local: update(r),
                                   self.rows_ready[u.name], waits_for=after, check=False)
                self.worker.submit((step, self._priority(u.name)), f"update {u.name}",
                                   lambda update=update: update(None),
                                   self.ready[u.name], waits_for=after, check=False)
            else:
                self.worker.submit((step, 0), f"update {u.name}", lambda update=update: update(None),
                                   self.ready[u.name], waits_for=after, check=False)
                self.worker.submit((step, 0), f"{u.name} ready", lambda: None, self.rows_ready[u.name],
                                   waits_for=after, check=False)
        if (need is not None and next_ids.ndim == 3 and self.dist is None
                and next_ids.shape[1] % len(self.local_devices) == 0):
            # The next forward's first input, gathered now by the host worker, after those rows'
            # update and before any layer's: with all the host's threads and no AdamW beside it
            # competing for memory bandwidth (on the driver thread, beside the updates, a 64K-token
            # step's gather took ~0.29 s, in which the GPU waited).
            box = {"ids": np.array(next_ids, copy=True), "done": threading.Event(), "staged": False}
            self._staging_for(box["ids"])

            def stage(box=box) -> None:
                if not rowgrad.complete:  # see update(): the rows were not updated
                    return
                self._stage_rows(box["ids"], getattr(self.opt, "threads", None))
                box["staged"] = True  # a task skipped after an error leaves the buffers as they were

            self.worker.submit((step, 0), "stage next rows", stage, box["done"], waits_for=after, check=False)
            self._staged_ahead = box

    def sync(self) -> None:
        """Finish every pending update and copy device-held masters to the host (before reading
        or saving the weights)."""
        self.wait_updates()
        for name in self.dev_state:
            self._pull_resident(name)

    def _catch_up_embedding(self, ids: np.ndarray | None) -> None:
        """Apply the deferred steps of the embedding rows of `ids` (None: every row); the unit's
        updates must be done."""
        if not getattr(self.opt, "supports_defer", False):
            return
        flat = None if ids is None else np.unique(ids.reshape(-1))
        for u in self.host.embed_units:
            state = self.opt_state.get(u.name)
            if getattr(state, "row_count", None) is None:
                continue
            a, b = u.rows
            rows = None if flat is None else flat[(flat >= a) & (flat < b)] - a
            upload = self._upload_view(u.name)
            self.opt.catch_up(state, u.master.reshape(self._shape(u)),
                              None if upload is None else upload.reshape(self._shape(u)),
                              decay_split=u.layout.decay_split, rows=rows)

    def wait_updates(self) -> None:
        """Run every pending update to completion: the host's (the embedding rows' deferred steps
        too), the resident units' and the GPU-updated layers' (which otherwise run when the next
        forward needs them)."""
        self._flush_embed_update(None)
        self.worker.join()
        self._catch_up_embedding(None)
        for name in self.gpu_updated:
            if self.dev_state[name]["grad"] is not None:
                self._resolve(self._parked_weights(name))
        jax.block_until_ready([(st["master"], st["opt"]) for st in self.dev_state.values()])

    def _pull_resident(self, name: str) -> None:
        unit, master = self.host.units[name], self.dev_state[name]["master"]
        if name in self.gpu_updated:  # parked in pinned host memory, where no jax op runs
            unit.master[...] = np.asarray(master)
            return
        pull_to_host(master, self._host_master(unit))

    @staticmethod
    def _host_master(unit: Unit) -> np.ndarray:
        """`unit`'s host master, allocated again if it was released (to be written in full)."""
        if is_released(unit.master):
            unit.master = aligned_empty(unit.master.size, np.float32)
        return unit.master

    def _release_resident_masters(self) -> None:
        """Drop the host copies of the resident units' masters while steps run: the device holds
        the truth, and 4 bytes per resident parameter of host memory are freed. `sync` (which
        every reader of the host weights calls: checkpoints, export, `params()`) brings them back."""
        for name in self.resident:
            unit = self.host.units[name]
            if not is_released(unit.master):
                unit.master = released_master(unit.master.size)

    # ----- forward-only uses

    def eval_loss(self, batch: Any) -> tuple[float, int]:
        """(summed loss, supervised tokens) of `batch` with the current weights; no update."""
        self.wait_updates()  # the device path: no host copy of the resident masters needed
        ids, labels, pos, seg, tokens, masked = self._batch(batch)
        dev = self._step_inputs(ids, labels, pos, seg, masked)
        x_last, _ = self._forward(ids, dev, train=False)
        total, _, _ = self._head(x_last, dev, train=False)
        self._window.clear()
        return float(total), tokens

    def logits(self, input_ids: np.ndarray, positions: np.ndarray | None = None,
               segment_ids: np.ndarray | None = None) -> np.ndarray:
        """fp32 logits [B, S, V] through the same layer-by-layer path as training."""
        self.wait_updates()
        ids = np.asarray(input_ids)[None]
        batch = {"input_ids": ids,
                 "positions": None if positions is None else np.asarray(positions)[None],
                 "segment_ids": None if segment_ids is None else np.asarray(segment_ids)[None]}
        ids, labels, pos, seg, _, masked = self._batch(batch)
        dev = self._step_inputs(ids, labels, pos, seg, masked)
        x_last, _ = self._forward(ids, dev, train=False)
        out, _, _ = self._head(x_last, dev, train=False, want_logits=True)
        self._window.clear()
        return out[0]

    def close(self) -> None:
        """Finish pending updates and stop the engine's host thread (also done at exit)."""
        try:
            self.sync()
        finally:
            self.worker.stop()

    def save_trace(self, path: str | Path) -> None:
        """Write the recorded timeline (engine built with trace=True) as Chrome trace JSON."""
        if self.trace is None:
            raise SlidejaxError("the engine was built without trace=True")
        self.trace.save(path)

    # ----- training state (what a checkpoint holds)

    def state_dict(self, gather: bool = False) -> dict[str, Any]:
        """The full training state as a tree of numpy arrays: per unit its fp32 master weights
        and optimizer state, plus the step count. Finishes pending updates first.

        With several processes, this process's shard: the units it owns and the replicated ones,
        marked `"shard": {"process_index", "process_count"}` (`load_state_dict` of the same
        process takes it back). `gather=True` (every process must call it) gives every process
        the full state instead, as one process would have it."""
        self.sync()
        units = {}
        for name, unit in self.host.units.items():
            if not self._owns(name):
                continue
            if name in self.dev_state:
                opt = self._resident_opt_state(name)
            else:
                opt = self.opt_state[name].state_dict() if name in self.opt_state else {}
            units[name] = {"master": unit.master, "opt": opt}
        state = {"step": np.int64(self.step_count), "units": units}
        if self.dist is not None and gather:
            for name in self.owner:  # the same order on every process
                got = self._gather_unit(name)
                if name not in units:
                    units[name] = got
            state["units"] = {name: units[name] for name in self.host.units}
        elif self.dist is not None:
            state["shard"] = {"process_index": np.int64(self.dist.index),
                              "process_count": np.int64(self.dist.count)}
        return state

    def _gather_unit(self, name: str) -> dict[str, Any]:
        """Unit `name`'s master and optimizer state, sent by its owner to every process
        (collective: every process calls it for every owned unit, in the same order)."""
        unit = self.host.units[name]
        if self._owns(name):
            tree = {"master": unit.master, "opt": self.opt_state[name].state_dict() if self.opt else {}}
        else:
            template = self.opt.init(self._shape(unit), tree_of=self._tree_of(unit)) if self.opt else None
            tree = {"master": np.zeros(unit.master.size, np.float32),
                    "opt": template.state_dict() if template else {}}
        return self.dist.broadcast(jax.tree.map(np.asarray, tree), self.owner[name])

    def gather_masters(self) -> None:
        """Copy every unit's current fp32 master into this process's `HostModel` (collective:
        every process calls it; with one process, just `sync`). Units other processes own get a
        snapshot (they keep training there): for export or evaluation at the end of a run."""
        self.sync()
        if self.dist is None:
            return
        for name, owner in self.owner.items():
            unit = self.host.units[name]
            mine = unit.master if self._owns(name) else np.zeros(unit.master.size, np.float32)
            got = self.dist.broadcast({"master": mine}, owner)["master"]
            if not self._owns(name):
                unit.master = np.array(got, np.float32)

    # A resident unit's optimizer state is saved in the host optimizer's format, so a checkpoint
    # does not depend on which units were resident (the planner may choose differently next time).

    def _resident_opt_state(self, name: str) -> dict[str, Any]:
        opt = jax.tree.map(np.asarray, jax.device_get(self.dev_state[name]["opt"]))
        count = np.asarray(self.step_count, np.int32)
        if not getattr(self.opt, "supports_rows", False):  # HostOptax: the optax state over the same tree
            return {"count": count, "opt_state": opt}
        layout = self.host.units[name].layout
        flat = lambda tree: np.concatenate([np.asarray(tree[n]).reshape(-1) for n in layout.names])  # noqa: E731
        return {"count": np.asarray(optax.tree_utils.tree_get(opt, "count"), np.int32) if _one_count(opt) else count,
                "mu": flat(optax.tree_utils.tree_get(opt, "mu")), "nu": flat(optax.tree_utils.tree_get(opt, "nu"))}

    def _resident_opt_from(self, name: str, saved: dict[str, Any]) -> Any:
        ref = self.dev_state[name]["opt"]
        put = lambda r, v: jax.device_put(np.asarray(v, r.dtype).reshape(r.shape), r.sharding)  # noqa: E731
        if not getattr(self.opt, "supports_rows", False):
            return jax.tree.map(put, ref, saved["opt_state"])
        layout = self.host.units[name].layout
        tree = lambda flat: layout.views(np.asarray(flat).reshape(-1))  # noqa: E731
        new = optax.tree_utils.tree_set(ref, mu=tree(saved["mu"]), nu=tree(saved["nu"]),
                                        count=np.asarray(saved["count"], np.int32))
        return jax.tree.map(put, ref, new)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()` (same model and optimizer); device copies are refreshed."""
        # Not sync(): it would copy the device's masters over the host's, which may be the very
        # arrays `state` holds (a trainer resuming loads the checkpoint into the host model first).
        self.wait_updates()
        self._staged_ahead = None  # rows gathered from the weights being replaced
        shard = state.get("shard")
        if shard is not None and (self.dist is None or int(shard["process_count"]) != self.dist.count
                                  or int(shard["process_index"]) != self.dist.index):
            here = "one process" if self.dist is None else f"process {self.dist.index} of {self.dist.count}"
            raise SlidejaxError(f"checkpoint is the shard of process {int(shard['process_index'])} of "
                                f"{int(shard['process_count'])}, not of {here}: load the full state")
        missing = {n for n in self.host.units if self._owns(n)} - set(state["units"])
        if missing:
            raise SlidejaxError(f"checkpoint lacks units {sorted(missing)[:3]}: not this model")
        for name, unit in self.host.units.items():
            if not self._owns(name):  # held by its owner (a full state has it too)
                continue
            src = state["units"][name]
            master = np.asarray(src["master"], np.float32).reshape(-1)
            if master.shape != unit.master.shape:
                raise SlidejaxError(f"checkpoint unit {name!r} has {master.size} weights, the model {unit.master.size}")
            self._host_master(unit)[...] = master
            if name in self.dev_state:
                st = self.dev_state[name]
                st["master"] = self._put_master(unit)
                st["opt"] = jax.block_until_ready(self._resident_opt_from(name, src["opt"]))  # see _put_master
                st["weights"] = st["master"].astype(self.dtype)
                if name in self.gpu_updated:
                    st.update(self._park(st), grad=None, scale=None)
            else:
                if name in self.opt_state:
                    self.opt_state[name].load_state_dict(src["opt"])
                if name in self._copied:
                    store_compute_copy(unit.master, self._upload_view(name))
        self.step_count = int(state["step"])
