"""Optimizer updates on host memory, in place, one unit (a decoder layer, a norm, the embedding, the
lm_head) at a time, while the GPU works on other units.

The engine keeps each unit's fp32 master weights as a flat host buffer and calls, from a host
worker thread::

    state = opt.init(master)              # once per unit (master: the unit's buffer, any shape)
    opt.update(state, master, grad, upload, decay_split=k, grad_scale=s)   # every step

Two implementations satisfy the same `HostOptimizer` protocol:

- `HostAdamW`, the fast path: a fused, multi-threaded numba pass (`slidejax.fused_adamw`) that
  reads the bfloat16 or float32 gradient, updates master and both moments and writes the
  compute-dtype copy the GPU uploads next, at DRAM speed. It equals `optax.adamw` with the same
  settings (`HostAdamW.to_optax` returns that transformation). It also takes the embedding's
  row-sparse gradient and can update a unit's rows in two calls (`supports_rows`).
- `HostOptax`, the generic path: any `optax.GradientTransformation` (schedules, masks, chains)
  jitted on the CPU backend over the unit's buffers, viewed as the unit's pytree.

`make_host_optimizer` builds one from a user's choice.

The protocol (what the engine relies on)
----------------------------------------
``opt.init(unit, *, tree_of=None) -> state``
    `unit` is the unit's master array (its shape is the unit's logical shape: 2-D ``[rows, cols]``
    for a row-updatable unit such as the embedding) or just that shape. `tree_of` maps the unit's
    flat buffer to the pytree of views the parameters are (only `HostOptax` uses it: masks and
    per-leaf transformations see the real structure).
``opt.update(state, master, grad, upload=None, *, decay_split, grad_scale=1.0, rows=None,
grad_index=None) -> None``
    One optimizer step in place. `master`: float32, the unit's n elements (any shape, contiguous).
    `grad`: bfloat16 or float32, n elements, the gradient of the loss *sum*, multiplied by
    `grad_scale` first; or, with `grad_index` (int32 ``[rows]``, -1 = no gradient), the
    row-sparse gradient ``[U, cols]`` whose row ``grad_index[r]`` is row r's gradient. `upload`:
    the compute-dtype (bfloat16 or float32) copy to write (round-to-nearest-even of the new
    master), or None. Elements ``[0, decay_split)`` get weight decay, the rest not (`HostAdamW`; a
    `HostOptax` transformation carries its own masks). `rows` (only if `supports_rows`) restricts
    the call to those rows; the step completes, and ``state.count`` advances, once every row has
    been updated, so a call with the next batch's rows followed by one with ``rows=None`` (= the
    rows not yet updated in this step) is exactly one full step.
``state.count``, ``state.state_dict()``, ``state.load_state_dict(tree)``
    Completed steps, and the state as a pytree of arrays for checkpointing (orbax saves it).
``opt.to_optax(mask=None)``
    The equivalent plain optax transformation, for whole-model references and tests.
``opt.supports_rows``
    Whether `rows` is accepted.
``opt.supports_defer`` (optional, default False)
    Whether ``update(..., grad_index=index, defer=True)`` (completing a step: rows with no
    gradient defer it) and ``opt.catch_up(state, master, upload=None, *, decay_split, rows=None)``
    (apply the deferred steps of `rows`, default all) are accepted (`HostAdamW`). A state with
    deferred rows refuses `state_dict()` until caught up.
``opt.supports_into`` (optional, default False)
    Whether ``update(..., into=(master_out, state_out))`` is accepted: the step read from
    `master` and `state` and written to a second master buffer and state of the same unit, the
    inputs unchanged (the engine's speculative updates; `HostAdamW`).

For the embedding, with the rows the next batch looks up updated first::

    opt.update(state, emb, grad_rows, upload, decay_split=k, grad_scale=s, grad_index=index,
               rows=next_rows)                      # part of the step
    ...                                             # (the GPU can take those rows now)
    opt.update(state, emb, grad_rows, upload, decay_split=k, grad_scale=s, grad_index=index)
                                                    # the other rows: the step is complete
    # or, with defer=True, only those with a gradient: the others owe the step, which
    # opt.update (when they are next updated) or opt.catch_up(state, emb, ..., rows=...) applies

Numerics: `HostAdamW` performs optax.adamw's float32 operations in optax's order, so it equals
un-jitted `optax.adamw` bit for bit (tested); against jitted optax it differs by float rounding
only (XLA contracts some multiply-adds into FMAs). Rows without a gradient get the full update
with a zero gradient, as optax does with a dense zero.

Updates of different units may run concurrently from several Python threads; the kernels release
the GIL, and `threads` (default: the CPUs this process may use, minus one for the thread that
drives the GPU) bounds each call's parallelism.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import threading
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax

from slidejax import fused_adamw as fa
from slidejax.errors import SlidejaxError

PyTree = Any
BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)
_ALIGN = 64
_MIN_BLOCK = 1 << 14  # elements per block below which more blocks cost more than they save

__all__ = [
    "AdamWState",
    "HostAdamW",
    "HostOptState",
    "HostOptax",
    "HostOptaxState",
    "HostOptimizer",
    "adamw_bf16",
    "aligned_zeros",
    "decay_mask",
    "default_threads",
    "make_host_optimizer",
    "scale_by_adam_bf16",
]


# ----------------------------------------------------------------------------------------------
# The protocol
# ----------------------------------------------------------------------------------------------


@runtime_checkable
class HostOptState(Protocol):
    """Per-unit optimizer state: completed step count and a checkpointable pytree."""

    count: int

    def state_dict(self) -> PyTree: ...

    def load_state_dict(self, tree: PyTree) -> None: ...


@runtime_checkable
class HostOptimizer(Protocol):
    """What the engine calls; see the module docstring for the contract."""

    supports_rows: bool

    def init(
        self, unit: np.ndarray | int | tuple[int, ...], *, tree_of: Callable | None = None
    ) -> HostOptState: ...

    def update(
        self,
        state: HostOptState,
        master: np.ndarray,
        grad: np.ndarray,
        upload: np.ndarray | None = None,
        *,
        decay_split: int,
        grad_scale: float = 1.0,
        rows: np.ndarray | None = None,
        grad_index: np.ndarray | None = None,
    ) -> None: ...

    def to_optax(self, mask: Any = None) -> optax.GradientTransformation: ...


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def default_threads() -> int:
    """CPUs this process may run on, minus one for the thread that drives the GPU (at least 1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus - 1, fa.max_threads()))


def aligned_zeros(shape: int | tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
    """Zeros whose data starts on a 64-byte boundary (cache-line aligned; zero-copy for XLA:CPU)."""
    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.zeros(nbytes + _ALIGN, np.uint8)
    start = (-raw.ctypes.data) % _ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def decay_mask(params: PyTree) -> PyTree:
    """The usual weight-decay mask: decay matrices (ndim >= 2), not norms and biases (ndim < 2)."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def _cpu() -> jax.Device:
    return jax.local_devices(backend="cpu")[0]  # this process's: with several processes the list is global


def _unit_shape(unit: np.ndarray | int | tuple[int, ...]) -> tuple[int, ...]:
    if isinstance(unit, np.ndarray):
        return tuple(unit.shape)
    if isinstance(unit, (int, np.integer)):
        return (int(unit),)
    return tuple(int(d) for d in unit)


def _flat(a: np.ndarray, name: str, n: int, dtypes: tuple[np.dtype, ...], writable: bool) -> np.ndarray:
    """`a` as a 1-D C-contiguous view of n elements of one of `dtypes`, or a one-line ValueError."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(a).__name__}")
    if a.dtype not in dtypes:
        raise ValueError(f"{name}: dtype {a.dtype} not in {[str(d) for d in dtypes]}")
    if a.size != n:
        raise ValueError(f"{name}: {a.size} elements, expected {n}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name}: must be C-contiguous")
    if writable and not a.flags.writeable:
        raise ValueError(f"{name}: must be writable")
    return a.reshape(-1)


def _kernel_view(a: np.ndarray, readonly: bool = False) -> np.ndarray:
    """What the kernels take: bf16 as its uint16 bits; the gradient always read-only, so one
    compiled signature serves writable and read-only gradients alike."""
    out = a.view(np.uint16) if a.dtype == BF16 else a.view()
    if readonly:
        out.flags.writeable = False
    return out


def _zero_rows(state: AdamWState, block: int = 4096) -> np.ndarray:
    """Per row of a 2-D unit: whether both moments are +0 throughout (bit patterns, so -0, which
    a step would turn into +0, does not count), read `block` rows at a time."""
    nrows, cols = state.shape
    out = np.empty(nrows, bool)
    m = _kernel_view(state.mu).reshape(nrows, cols)
    v = _kernel_view(state.nu).reshape(nrows, cols)
    if m.dtype == np.float32:
        m, v = m.view(np.uint32), v.view(np.uint32)
    for a in range(0, nrows, block):
        b = min(nrows, a + block)
        out[a:b] = ~(m[a:b].any(axis=1) | v[a:b].any(axis=1))
    return out


def _no_upload(like: np.dtype) -> np.ndarray:
    """The kernels' stand-in for upload=None, typed like the run's usual upload (one signature)."""
    return np.zeros(0, np.uint16 if like == BF16 else np.float32)


def store_compute_copy(master: np.ndarray, upload: np.ndarray, threads: int | None = None) -> None:
    """upload[:] = master in upload's dtype (bf16: round to nearest even), multi-threaded: the
    engine's set-up and restore write every unit's GPU copy this way (a numpy cast runs on one
    core, minutes for a large model)."""
    n = master.size
    p = _flat(master, "master", n, (F32,), writable=True)
    up = _flat(upload, "upload", n, (BF16, F32), writable=True)
    fa.launch(fa.store_params, default_threads() if threads is None else threads, p, p, _kernel_view(up), False, True)


# ----------------------------------------------------------------------------------------------
# The fused AdamW (fast path)
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class AdamWState:
    """HostAdamW state of one unit: moments (flat, float32 or bfloat16), completed steps, and for
    a step updated row by row, which rows are done."""

    mu: np.ndarray
    nu: np.ndarray
    count: int
    shape: tuple[int, ...]
    rows_done: np.ndarray | None = None
    # Rows whose moments are known to be +0 (never had a gradient): their steps skip the moments.
    # Derived from the moments when first needed; not part of the state_dict.
    zero_rows: np.ndarray | None = None
    # Deferred steps (`HostAdamW.update(defer=True)`): per row its completed steps (None: all
    # `count`), and for the steps owed_base .. count-1 their hyperparameters (float32 [T, 11])
    # and SR keys, which the rows behind replay (`HostAdamW.catch_up`).
    row_count: np.ndarray | None = None
    owed_hp: np.ndarray | None = None
    owed_keys: np.ndarray | None = None
    owed_base: int = 0

    def behind(self) -> np.ndarray:
        """The rows that owe deferred steps (sorted)."""
        if self.row_count is None:
            return np.zeros(0, np.int64)
        return np.flatnonzero(self.row_count < self.count)

    def state_dict(self) -> dict[str, np.ndarray]:
        """{'count', 'mu', 'nu'} (the moments are the live arrays, not copies)."""
        if self.rows_done is not None:
            raise ValueError("state_dict: a row-split step is in progress; finish it first")
        if self.row_count is not None:
            raise ValueError("state_dict: some rows owe deferred steps; HostAdamW.catch_up them first")
        return {"count": np.asarray(self.count, np.int32), "mu": self.mu, "nu": self.nu}

    def load_state_dict(self, tree: dict[str, np.ndarray]) -> None:
        """Restore from `state_dict()`'s structure, into the existing moment buffers."""
        for name in ("mu", "nu"):
            src = np.asarray(tree[name])
            dst = getattr(self, name)
            if src.shape != dst.shape or src.dtype != dst.dtype:
                raise ValueError(
                    f"load_state_dict: {name} is {src.dtype}{list(src.shape)}, "
                    f"expected {dst.dtype}{list(dst.shape)}"
                )
            np.copyto(dst, src)
        self.count = int(np.asarray(tree["count"]))
        self.rows_done = self.zero_rows = self.row_count = self.owed_hp = self.owed_keys = None
        self.owed_base = 0


class HostAdamW:
    """AdamW on host memory in one fused pass; numerically `optax.adamw` with the same settings.

    Args:
      learning_rate: a float, or an optax schedule called with the 0-based number of completed
        steps (as optax does).
      b1, b2, eps, eps_root, weight_decay: as `optax.adamw` (same defaults).
      moment_dtype: float32 (12 bytes/param with the master) or bfloat16 (8 bytes/param). In
        bfloat16, m is stored rounded to nearest even (like optax's `mu_dtype`) and v is stored
        with *stochastic* rounding: rounding v to nearest stalls, since with b2 = 0.999 a step
        changes v by ~0.1%, less than half a bf16 ulp, so v would never decay (or grow).
        Stochastic rounding keeps v unbiased; its price is noise of a few % in each element's v
        (2**-8 rounding steps, remembered over ~1/(1-b2) steps), i.e. about half that in its step
        size. The noise is a hash of the element's v, weight, gradient, step and `seed`
        (`fused_adamw.sr_noise`): deterministic and layout-independent, reproduced by
        `adamw_bf16`. Both moments are updated in float32 from the stored values, and the step
        uses the unrounded float32 moments, as optax does (optax's `mu_dtype` instead rounds
        b1 * m to bf16 before adding).
      threads: threads per update call; default `default_threads()`.
    """

    supports_rows = True
    supports_defer = True  # `update(defer=True)` and `catch_up`: rows without a gradient wait
    supports_into = True  # `update(into=...)`: a step written to a second set of buffers

    def __init__(
        self,
        learning_rate: float | optax.Schedule,
        b1: float = 0.9,
        b2: float = 0.999,
        eps: float = 1e-8,
        eps_root: float = 0.0,
        weight_decay: float = 1e-4,
        *,
        moment_dtype: Any = np.float32,
        seed: int = 0,
        threads: int | None = None,
    ):
        self.moment_dtype = np.dtype(moment_dtype)
        if self.moment_dtype not in (F32, BF16):
            raise SlidejaxError(f"HostAdamW: moment_dtype {self.moment_dtype} is not float32 or bfloat16")
        if not callable(learning_rate) and not isinstance(learning_rate, numbers.Real):
            raise SlidejaxError(f"HostAdamW: learning_rate must be a float or a schedule, got {learning_rate!r}")
        self.learning_rate = learning_rate
        self.b1, self.b2, self.eps, self.eps_root = float(b1), float(b2), float(eps), float(eps_root)
        self.weight_decay = float(weight_decay)
        self.seed = int(seed)
        self.threads = default_threads() if threads is None else max(1, int(threads))
        self._hyper_cache: dict[int, tuple[np.float32, ...]] = {}
        self._hyper_lock = threading.Lock()
        self._schedule_fn = None
        b1, b2 = self.b1, self.b2
        # optax's `1 - decay**count` on an int32 count, jitted as there: XLA's float32 pow, which
        # numpy's (version-dependent) float32 pow does not always match in the last bit.
        self._bias_correction_fn = jax.jit(lambda t: (1 - b1**t, 1 - b2**t))

    def __repr__(self) -> str:
        return (
            f"HostAdamW(learning_rate={self.learning_rate!r}, b1={self.b1}, b2={self.b2}, eps={self.eps}, "
            f"eps_root={self.eps_root}, weight_decay={self.weight_decay}, "
            f"moment_dtype={self.moment_dtype.name}, threads={self.threads})"
        )

    # -- state ---------------------------------------------------------------------------------

    def init(self, unit: np.ndarray | int | tuple[int, ...], *, tree_of: Callable | None = None) -> AdamWState:
        """Zero moments for a unit of that shape (`tree_of` is not needed: decay_split suffices)."""
        del tree_of
        shape = _unit_shape(unit)
        n = int(np.prod(shape, dtype=np.int64))
        return AdamWState(
            mu=aligned_zeros(n, self.moment_dtype), nu=aligned_zeros(n, self.moment_dtype), count=0, shape=shape
        )

    def to_optax(self, mask: Any = None) -> optax.GradientTransformation:
        """The equivalent optax transformation: `optax.adamw`, or `adamw_bf16` for bf16 moments.

        `mask` is optax's weight-decay mask (`decay_mask` is the usual one); it must select the
        same parameters the engine puts below `decay_split`.
        """
        kw = dict(b1=self.b1, b2=self.b2, eps=self.eps, eps_root=self.eps_root, weight_decay=self.weight_decay)
        if self.moment_dtype == BF16:
            return adamw_bf16(self.learning_rate, **kw, mask=mask, seed=self.seed)
        return optax.adamw(self.learning_rate, **kw, mask=mask)

    # -- the update ----------------------------------------------------------------------------

    def _neg_lr(self, count: int) -> np.float32:
        """-learning_rate(count) in float32, computed as optax's scale_by_learning_rate does."""
        if not callable(self.learning_rate):
            return np.float32(-1 * self.learning_rate)
        if self._schedule_fn is None:
            schedule = self.learning_rate
            self._schedule_fn = jax.jit(lambda c: jnp.asarray(-1 * schedule(c), jnp.float32))
        count_arr = jax.device_put(np.int32(count), _cpu())  # keep the schedule off the GPU
        return np.float32(np.asarray(self._schedule_fn(count_arr)))

    def _hyper(self, count: int) -> tuple[np.float32, ...]:
        """`fused_adamw.adamw_spans`'s hyperparameter tuple but the grad scale, for step count + 1,
        cached per count (every unit of a step shares it)."""
        hp = self._hyper_cache.get(count)
        if hp is not None:
            return hp
        with self._hyper_lock:
            if count not in self._hyper_cache:
                f = np.float32
                t = jax.device_put(np.int32(count + 1), _cpu())
                bc1, bc2 = (f(np.asarray(b)) for b in self._bias_correction_fn(t))
                hp = (f(1 - self.b1), f(self.b1), f(1 - self.b2), f(self.b2), bc1, bc2,
                      f(self.eps_root), f(self.eps), f(self.weight_decay), self._neg_lr(count))
                # Replace, never mutate, the dict: readers outside the lock see old or new whole.
                keep = {k: v for k, v in self._hyper_cache.items() if abs(k - count) <= 2}
                self._hyper_cache = keep | {count: hp}
            return self._hyper_cache[count]

    def _row_spans(
        self, state: AdamWState, grad: np.ndarray, rows: np.ndarray | None, grad_index: np.ndarray | None,
        grad_scale: float,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Spans (lo, hi, gstart) of the rows this call updates, the sorted rows, the grad to read."""
        if len(state.shape) != 2:
            raise ValueError(f"rows/grad_index need a 2-D unit, this one has shape {state.shape}")
        nrows, cols = state.shape
        if rows is None:
            rows = np.arange(nrows) if state.rows_done is None else np.flatnonzero(~state.rows_done)
        else:
            rows = np.asarray(rows)
            if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
                raise ValueError(f"rows: expected a 1-D integer array, got {rows.dtype}{list(rows.shape)}")
            unique = np.unique(rows)
            if unique.size != rows.size:
                raise ValueError("rows: contains duplicates")
            rows = unique
            if rows.size and (rows[0] < 0 or rows[-1] >= nrows):
                raise ValueError(f"rows: values must lie in [0, {nrows})")
            if state.rows_done is not None and state.rows_done[rows].any():
                raise ValueError("rows: some rows were already updated in this step")
        rows = rows.astype(np.int64)
        if grad_index is None:
            flat_grad = _flat(grad, "grad", nrows * cols, (BF16, F32), writable=False)
            gstart = rows * cols
        else:
            grad_index = np.asarray(grad_index)
            if grad_index.shape != (nrows,) or not np.issubdtype(grad_index.dtype, np.integer):
                raise ValueError(f"grad_index: expected int[{nrows}], got {grad_index.dtype}{list(grad_index.shape)}")
            if grad.ndim != 2 or grad.shape[1] != cols:
                raise ValueError(f"grad: the row-sparse gradient must be [U, {cols}], got {list(grad.shape)}")
            nu = grad.shape[0]
            if grad_index.size and (grad_index.min() < -1 or grad_index.max() >= nu):
                raise ValueError(f"grad_index: values must lie in [-1, {nu})")
            flat_grad = _flat(grad, "grad", grad.size, (BF16, F32), writable=False)
            gi = grad_index[rows].astype(np.int64)
            if state.zero_rows is None:
                state.zero_rows = _zero_rows(state)
            # Zero moments stay zero under a zero gradient, unless the scale is inf or nan (0 x
            # inf is nan, as in optax's dense update): then no row takes the shortcut.
            zero = state.zero_rows[rows] & bool(np.isfinite(grad_scale))
            gstart = np.where(gi >= 0, gi * cols, np.where(zero, fa.ZERO_MOMENTS, -1))
        lo = rows * cols
        return np.stack([lo, lo + cols, gstart], axis=1), rows, flat_grad

    def _dense_spans(self, n: int) -> np.ndarray:
        """Contiguous, 64-byte aligned blocks, `fa.CHUNKS_PER_THREAD` per thread (handed out
        dynamically, see `fa.launch`)."""
        blocks = max(1, min(self.threads * fa.CHUNKS_PER_THREAD, n // _MIN_BLOCK))
        edges = [(n * t // blocks) & ~15 for t in range(blocks)] + [n]
        return np.array([[edges[t], edges[t + 1], edges[t]] for t in range(blocks)], np.int64)

    def update(
        self,
        state: AdamWState,
        master: np.ndarray,
        grad: np.ndarray,
        upload: np.ndarray | None = None,
        *,
        decay_split: int,
        grad_scale: float = 1.0,
        rows: np.ndarray | None = None,
        grad_index: np.ndarray | None = None,
        into: tuple[np.ndarray, AdamWState] | None = None,
        defer: bool = False,
    ) -> None:
        """One AdamW step (or, with `rows`, part of one) on a unit, in place; see the module doc.

        With `into=(master_out, state_out)` (a second master buffer and a state from `init` of the
        same unit) the step reads `master` and `state` without changing them and writes the new
        weights, moments and count to the outputs: bitwise what the in-place step would leave,
        for a speculative update that may be thrown away. Whole units only (no `rows`).

        With `defer=True` (a row-sparse gradient, `grad_index`, completing the step: no `rows`)
        only the rows that have a gradient are updated now; the others owe this step, with its
        zero gradient, and replay it, with any other owed steps, in one pass the next time they
        are updated, or in `catch_up`. Every row's result is the same bits as the dense update's
        (its `upload` copy is written when it catches up); the step completes (`count` advances)
        now. For an embedding, where a step's tokens touch
        a few of the rows, that leaves most of the table alone until its rows are needed. Under a
        non-finite `grad_scale` nothing is deferred (every row's step is then nan).
        """
        n = state.mu.size
        p = _flat(master, "master", n, (F32,), writable=True)
        deferred = None
        if defer:
            if grad_index is None or rows is not None or into is not None:
                raise ValueError("update: `defer` needs a row-sparse gradient (grad_index) and no rows or into")
            if np.shape(grad_index) != state.shape[:1]:
                raise ValueError(f"grad_index: expected int[{state.shape[0]}], got shape {np.shape(grad_index)}")
            if np.isfinite(grad_scale):
                todo = np.arange(state.shape[0]) if state.rows_done is None else np.flatnonzero(~state.rows_done)
                has = np.asarray(grad_index)[todo] >= 0
                rows, deferred = todo[has], todo[~has]
        if into is not None:
            if rows is not None or grad_index is not None or state.rows_done is not None:
                raise ValueError("update: `into` takes whole-unit steps only")
            if state.row_count is not None:
                raise ValueError("update: `into` needs every row current; catch_up first")
            p_out = _flat(into[0], "master_out", n, (F32,), writable=True)
            out = into[1]
            if out is state or out.mu.shape != state.mu.shape or out.mu.dtype != state.mu.dtype:
                raise ValueError("update: `into` needs another state of the same unit")
            outs = (p_out, _kernel_view(out.mu), _kernel_view(out.nu), True)
        else:
            outs = (p[:0], _kernel_view(state.mu)[:0], _kernel_view(state.nu)[:0], False)
        up = None if upload is None else _flat(upload, "upload", n, (BF16, F32), writable=True)
        if not 0 <= decay_split <= n:
            raise ValueError(f"decay_split: {decay_split} not in [0, {n}]")
        row_mode = rows is not None or grad_index is not None or state.rows_done is not None
        if row_mode:
            spans, done_rows, g = self._row_spans(state, grad, rows, grad_index, grad_scale)
            self.catch_up(state, master, None, decay_split=decay_split, rows=done_rows)
            if state.zero_rows is not None:  # the moments of these rows may change now
                state.zero_rows[done_rows[spans[:, 2] != fa.ZERO_MOMENTS]] = False
        else:
            self.catch_up(state, master, None, decay_split=decay_split)
            spans, done_rows, g = self._dense_spans(n), None, _flat(grad, "grad", n, (BF16, F32), writable=False)
            state.zero_rows = None
        if into is not None:
            into[1].zero_rows = None
        # With no decay at all, skip the term (optax does too): exact even for non-finite weights.
        split = 0 if self.weight_decay == 0.0 else int(decay_split)
        hp = self._hyper(state.count) + (np.float32(grad_scale),)
        key = fa.sr_key(state.count + 1, self.seed)
        gk = _kernel_view(g, readonly=True)
        # Rows without a gradient read zeros of the gradient's type (same compiled signature).
        zeros = _kernel_view(np.zeros(state.shape[-1], g.dtype), readonly=True) if row_mode else gk[:0]
        fa.launch(
            fa.adamw_spans, self.threads, spans, split, p, _kernel_view(state.mu), _kernel_view(state.nu),
            gk, zeros, _no_upload(g.dtype) if up is None else _kernel_view(up), up is not None, hp, key, *outs,
        )
        if into is not None:
            into[1].count = state.count + 1
            return
        if done_rows is not None:
            if state.row_count is not None:
                state.row_count[done_rows] = state.count + 1
            if deferred is not None:
                if deferred.size:
                    self._owe(state, deferred, hp, key)
            else:
                if state.rows_done is None:
                    state.rows_done = np.zeros(state.shape[0], bool)
                state.rows_done[done_rows] = True
                if not state.rows_done.all():
                    return
            state.rows_done = None
        state.count += 1
        _drop_settled(state)

    def _owe(self, state: AdamWState, rows: np.ndarray, hp: tuple, key: np.uint32) -> None:
        """The step now completing (count + 1) is deferred for `rows`: record it."""
        c = state.count
        if state.row_count is None:  # every row was at c; the rest have just been updated
            state.row_count = np.full(state.shape[0], c + 1, np.int64)
        state.row_count[rows] = np.minimum(state.row_count[rows], c)
        entry = np.array(hp, np.float32)[None]
        if state.owed_hp is None:
            state.owed_base, state.owed_hp, state.owed_keys = c, entry, np.array([key], np.uint32)
        else:
            assert state.owed_base + state.owed_hp.shape[0] == c
            state.owed_hp = np.concatenate([state.owed_hp, entry])
            state.owed_keys = np.append(state.owed_keys, np.uint32(key))

    def catch_up(
        self,
        state: AdamWState,
        master: np.ndarray,
        upload: np.ndarray | None = None,
        *,
        decay_split: int,
        rows: np.ndarray | None = None,
        max_lag: int | None = None,
    ) -> None:
        """Bring `rows` (default: every row) up to date: replay the steps they deferred
        (`update(defer=True)`), the same bits as if each had run in its step, and write their
        compute-dtype copy to `upload` (if given: a deferred row's copy is stale until then).
        Rows already current are left alone; so is a state with nothing deferred. With
        `max_lag`, only the rows that owe more than that many steps: a row's replay costs
        arithmetic per owed step, so bounding the lag bounds what a later lookup waits for."""
        if state.row_count is None:
            return
        nrows, cols = state.shape
        if rows is None:
            sel = state.behind()
        else:
            sel = np.unique(np.asarray(rows, np.int64))
            if sel.size and (sel[0] < 0 or sel[-1] >= nrows):
                raise ValueError(f"rows: values must lie in [0, {nrows})")
            sel = sel[state.row_count[sel] < state.count]
        if max_lag is not None:
            sel = sel[state.row_count[sel] < state.count - int(max_lag)]
        if sel.size == 0:
            return
        n = nrows * cols
        p = _flat(master, "master", n, (F32,), writable=True)
        up = None if upload is None else _flat(upload, "upload", n, (BF16, F32), writable=True)
        if state.zero_rows is None:
            state.zero_rows = _zero_rows(state)
        lo = sel * cols
        spans = np.stack([lo, lo + cols, state.row_count[sel] - state.owed_base,
                          state.zero_rows[sel].astype(np.int64)], axis=1)
        split = 0 if self.weight_decay == 0.0 else int(decay_split)
        fa.launch(
            fa.adamw_catch_up, self.threads, spans, split, p, _kernel_view(state.mu), _kernel_view(state.nu),
            _no_upload(BF16) if up is None else _kernel_view(up), up is not None, state.owed_hp, state.owed_keys,
        )
        state.row_count[sel] = state.count
        _drop_settled(state)


def _drop_settled(state: AdamWState) -> None:
    """Forget the deferred steps no row owes any more."""
    if state.row_count is None:
        return
    low = int(state.row_count.min())
    if low >= state.count:
        state.row_count = state.owed_hp = state.owed_keys = None
        state.owed_base = 0
    elif low > state.owed_base:
        state.owed_hp = state.owed_hp[low - state.owed_base :]
        state.owed_keys = state.owed_keys[low - state.owed_base :]
        state.owed_base = low


# ----------------------------------------------------------------------------------------------
# The optax reference of bf16 moments
# ----------------------------------------------------------------------------------------------


# optax.tree.bias_correction in newer optax, optax.tree_utils.tree_bias_correction in older ones.
_bias_correction = getattr(getattr(optax, "tree", None), "bias_correction", None) or (
    optax.tree_utils.tree_bias_correction
)


def _lowbias32_jnp(x: jax.Array) -> jax.Array:
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _sr_key_jnp(count: jax.Array, seed: int) -> jax.Array:
    """jnp twin of `fused_adamw.sr_key`."""
    return _lowbias32_jnp(count.astype(jnp.uint32) * jnp.uint32(0x9E3779B9) ^ jnp.uint32(seed & 0xFFFFFFFF))


def _to_bf16_stochastic(v: jax.Array, p: jax.Array, g: jax.Array, key: jax.Array) -> jax.Array:
    """float32 v -> bfloat16 with the fused kernel's stochastic rounding (`fused_adamw.sr_noise`;
    NaN kept as ml_dtypes does)."""
    def rotl(x, r):
        x = jax.lax.bitcast_convert_type(x, jnp.uint32)
        return (x << r) | (x >> (32 - r))

    bits = jax.lax.bitcast_convert_type(v, jnp.uint32)
    h = _lowbias32_jnp(bits ^ key ^ rotl(p, 11) ^ rotl(g, 22))
    rounded = (bits + (h & jnp.uint32(0xFFFF))) >> 16
    is_nan = (bits & jnp.uint32(0x7FFFFFFF)) > jnp.uint32(0x7F800000)
    nan = ((bits >> 16) & jnp.uint32(0x8000)) | jnp.uint32(0x7FC0)
    out = jnp.where(is_nan, nan, rounded).astype(jnp.uint16)
    return jax.lax.bitcast_convert_type(out, jnp.bfloat16)


def scale_by_adam_bf16(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0, *, seed: int = 0
) -> optax.GradientTransformation:
    """`optax.scale_by_adam` with bfloat16 moments, rounded as `HostAdamW(moment_dtype=bfloat16)`.

    Moments are updated in float32 from their stored bf16 values; m is stored rounded to nearest
    even, v stochastically (see `HostAdamW`); the step uses the unrounded float32 moments. Needs
    `params` in `update` (the rounding noise hashes each element's weight).
    """

    def init_fn(params):
        zeros = lambda p: jnp.zeros(jnp.shape(p), jnp.bfloat16)  # noqa: E731
        return optax.ScaleByAdamState(
            count=jnp.zeros([], jnp.int32), mu=jax.tree.map(zeros, params), nu=jax.tree.map(zeros, params)
        )

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_adam_bf16: the stochastic rounding of v needs params")
        f32 = jnp.float32
        grads = jax.tree.map(lambda g: g.astype(f32), updates)
        mu = jax.tree.map(lambda g, m: (1 - b1) * g + b1 * m.astype(f32), grads, state.mu)
        nu = jax.tree.map(lambda g, v: (1 - b2) * (g * g) + b2 * v.astype(f32), grads, state.nu)
        count_inc = optax.safe_increment(state.count)
        # optax's own (jitted) bias correction, so its float32 pow and division are optax's.
        mu_hat = _bias_correction(mu, b1, count_inc)
        nu_hat = _bias_correction(nu, b2, count_inc)
        new_updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v + eps_root) + eps), mu_hat, nu_hat)
        key = _sr_key_jnp(count_inc, seed)
        mu = jax.tree.map(lambda m: m.astype(jnp.bfloat16), mu)
        nu = jax.tree.map(lambda v, p, g: _to_bf16_stochastic(v, p.astype(f32), g, key), nu, params, grads)
        return new_updates, optax.ScaleByAdamState(count=count_inc, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def adamw_bf16(
    learning_rate: float | optax.Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 1e-4,
    *,
    mask: Any = None,
    seed: int = 0,
) -> optax.GradientTransformation:
    """`optax.adamw` with `scale_by_adam_bf16`: the optax twin of HostAdamW's bf16 moments."""
    return optax.chain(
        scale_by_adam_bf16(b1, b2, eps, eps_root, seed=seed),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


# ----------------------------------------------------------------------------------------------
# Any optax transformation (generic path)
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where each leaf of a unit's pytree lives in its flat buffer (hashable: the jit cache key)."""

    treedef: Any
    offsets: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...]
    size: int

    @classmethod
    def of(cls, tree_of: Callable[[np.ndarray], PyTree] | None, shape: tuple[int, ...]) -> "_Layout":
        """Trace `tree_of` on an untouched buffer; every leaf must be a contiguous view into it, and
        the leaves must tile it exactly."""
        n = int(np.prod(shape, dtype=np.int64))
        if tree_of is None:
            return cls(jax.tree.structure(0), (0,), (tuple(shape),), n)
        probe = np.empty(n, np.float32)  # never touched, so costs no memory even for huge units
        leaves, treedef = jax.tree.flatten(tree_of(probe))
        base = probe.ctypes.data
        offsets, shapes = [], []
        for leaf in leaves:
            if not isinstance(leaf, np.ndarray) or not leaf.flags.c_contiguous or not np.shares_memory(leaf, probe):
                raise ValueError("tree_of: every leaf must be a contiguous view (slice + reshape) of the buffer")
            offsets.append((leaf.ctypes.data - base) // 4)
            shapes.append(tuple(leaf.shape))
        order = np.argsort(offsets, kind="stable")
        end = 0
        for i in order:
            if offsets[i] != end:
                raise ValueError(f"tree_of: the leaves must tile the buffer exactly (gap or overlap at {end})")
            end += int(np.prod(shapes[i], dtype=np.int64))
        if end != n:
            raise ValueError(f"tree_of: the leaves cover {end} of {n} elements")
        return cls(treedef, tuple(offsets), tuple(shapes), n)

    def tree(self, flat: jax.Array) -> PyTree:
        leaves = [
            flat[o : o + int(np.prod(s, dtype=np.int64))].reshape(s) for o, s in zip(self.offsets, self.shapes)
        ]
        return self.treedef.unflatten(leaves)

    def flat(self, tree: PyTree) -> jax.Array:
        leaves = self.treedef.flatten_up_to(tree)
        order = np.argsort(self.offsets, kind="stable")
        return jnp.concatenate([leaves[i].reshape(-1) for i in order])


@dataclasses.dataclass(eq=False)
class HostOptaxState:
    """HostOptax state of one unit: the optax state (arrays of the CPU device) and completed steps."""

    opt_state: PyTree
    count: int
    layout: _Layout

    def state_dict(self) -> dict[str, Any]:
        """{'count', 'opt_state'}: the optax state pytree as it is (jax arrays on the CPU device)."""
        return {"count": np.asarray(self.count, np.int32), "opt_state": self.opt_state}

    def load_state_dict(self, tree: dict[str, Any]) -> None:
        """Restore from `state_dict()`'s structure (leaves may be numpy or jax arrays)."""
        if jax.tree.structure(tree["opt_state"]) != jax.tree.structure(self.opt_state):
            raise ValueError("load_state_dict: opt_state has a different structure")
        self.opt_state = jax.device_put(tree["opt_state"], _cpu())
        self.count = int(np.asarray(tree["count"]))


class HostOptax:
    """Any optax transformation, applied per unit on host memory by XLA's CPU backend.

    The unit's master and gradient enter the jitted update without copies (zero-copy
    `device_put` of aligned numpy memory); the optax state stays on the CPU device and is donated,
    so its buffers are reused. XLA cannot write into numpy memory, so the new weights come back
    in a fresh buffer and one threaded numba pass stores them into master and the upload copy.

    Each unit's update applies `tx` to that unit alone: transformations that couple units (a
    global-norm clip, say) see one unit at a time. Weight decay is whatever `tx` does (its own
    masks; `decay_split` is not used). Updates with `rows` are not supported (`supports_rows` is
    False); a row-sparse gradient is densified. Units with the same layout (same `tree_of`
    structure) share one compilation.
    """

    supports_rows = False

    def __init__(self, tx: optax.GradientTransformation, *, threads: int | None = None):
        if not isinstance(tx, optax.GradientTransformation):
            raise SlidejaxError(f"HostOptax: expected an optax.GradientTransformation, got {type(tx).__name__}")
        self.tx = tx
        self.threads = default_threads() if threads is None else max(1, int(threads))
        self._fns: dict[_Layout, tuple[Callable, Callable]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"HostOptax({self.tx!r}, threads={self.threads})"

    def init(self, unit: np.ndarray | int | tuple[int, ...], *, tree_of: Callable | None = None) -> HostOptaxState:
        """`tx.init` on the unit's parameters (its values if `unit` is the master array, else zeros)."""
        shape = _unit_shape(unit)
        layout = _Layout.of(tree_of, shape)
        if isinstance(unit, np.ndarray):
            flat = jax.device_put(_flat(unit, "unit", layout.size, (F32,), writable=False), _cpu())
        else:
            flat = jax.device_put(np.zeros(layout.size, np.float32), _cpu())
        opt_state = self._compiled(layout)[0](flat)
        return HostOptaxState(opt_state=opt_state, count=0, layout=layout)

    def to_optax(self, mask: Any = None) -> optax.GradientTransformation:
        """The transformation itself (`mask` is not used: `tx` carries its own masks)."""
        del mask
        return self.tx

    def _compiled(self, layout: _Layout) -> tuple[Callable, Callable]:
        """The jitted (init, step) of a layout, built once per layout."""
        with self._lock:
            fns = self._fns.get(layout)
            if fns is None:
                tx = self.tx

                def init(flat_p):
                    return tx.init(layout.tree(flat_p))

                def step(flat_p, flat_g, opt_state, scale):
                    params = layout.tree(flat_p)
                    grads = layout.tree(flat_g.astype(jnp.float32) * scale)
                    updates, opt_state = tx.update(grads, opt_state, params)
                    return layout.flat(optax.apply_updates(params, updates)), opt_state

                fns = self._fns[layout] = (jax.jit(init), jax.jit(step, donate_argnums=2))
            return fns

    def update(
        self,
        state: HostOptaxState,
        master: np.ndarray,
        grad: np.ndarray,
        upload: np.ndarray | None = None,
        *,
        decay_split: int | None = None,
        grad_scale: float = 1.0,
        rows: np.ndarray | None = None,
        grad_index: np.ndarray | None = None,
    ) -> None:
        """One step of `tx` on a unit, in place; see the module doc (`decay_split` is not used)."""
        del decay_split
        if rows is not None:
            raise ValueError("HostOptax updates whole units: rows is not supported (supports_rows is False)")
        n = state.layout.size
        p = _flat(master, "master", n, (F32,), writable=True)
        up = None if upload is None else _flat(upload, "upload", n, (BF16, F32), writable=True)
        if grad_index is not None:
            grad = _densify(grad, np.asarray(grad_index), n)
        g = _flat(grad, "grad", n, (BF16, F32), writable=False)
        cpu = _cpu()
        new_flat, state.opt_state = self._compiled(state.layout)[1](
            jax.device_put(p, cpu), jax.device_put(g, cpu), state.opt_state,
            jax.device_put(np.float32(grad_scale), cpu),
        )
        fa.launch(
            fa.store_params, self.threads, np.asarray(new_flat), p,
            _no_upload(BF16) if up is None else _kernel_view(up), True, up is not None,
        )
        state.count += 1


def _densify(grad_rows: np.ndarray, grad_index: np.ndarray, n: int) -> np.ndarray:
    """The dense [V, H] gradient of a row-sparse one (rows with index -1 are zero)."""
    if grad_rows.ndim != 2 or grad_index.ndim != 1 or grad_index.size * grad_rows.shape[1] != n:
        raise ValueError(
            f"grad/grad_index: shapes {list(grad_rows.shape)} / {list(grad_index.shape)} do not make {n} elements"
        )
    dense = aligned_zeros((grad_index.size, grad_rows.shape[1]), grad_rows.dtype)
    have = grad_index >= 0
    dense[have] = grad_rows[grad_index[have]]
    return dense


# ----------------------------------------------------------------------------------------------
# From a user's choice
# ----------------------------------------------------------------------------------------------


def make_host_optimizer(choice: Any, *, threads: int | None = None) -> HostOptimizer:
    """A host optimizer from a user's choice: a `HostAdamW` or `HostOptax` as is (fast path), or
    any `optax.GradientTransformation` (generic path: `HostOptax`). For plain AdamW prefer
    `HostAdamW`: the same numbers as `optax.adamw`, several times faster."""
    if isinstance(choice, (HostAdamW, HostOptax)):
        return choice
    if isinstance(choice, optax.GradientTransformation):
        return HostOptax(choice, threads=threads)
    raise SlidejaxError(
        f"optimizer: expected an optax.GradientTransformation or a HostAdamW, got {type(choice).__name__}"
    )
