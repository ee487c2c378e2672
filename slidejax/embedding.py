"""The embedding stage on the host: lookup and gradient without moving the vocabulary matrix.

A lookup needs only the rows of the step's tokens, and its gradient touches only those rows. So
the embedding table never crosses PCIe: the host gathers `tokens x hidden` rows into a pinned
staging buffer (uploaded like any activation), and turns the downloaded gradient of the layer-0
input into a row-sparse gradient (one summed row per distinct token) for the host optimizer.
"""

from __future__ import annotations

import contextlib
import os

import ml_dtypes
import numba
import numpy as np

from slidejax.fused_adamw import _rne_like

_BF16 = np.dtype(ml_dtypes.bfloat16)

# The driver thread gathers and sums embedding rows while the host optimizer's threads update
# other units; a few threads are enough for these memcpy-like passes and leave it the cores.
_THREADS = max(1, min(4, (os.cpu_count() or 1) // 4))


@contextlib.contextmanager
def _few_threads(threads: int | None = None):
    previous = numba.get_num_threads()
    numba.set_num_threads(max(1, min(threads or _THREADS, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(previous)


@numba.njit(parallel=True, nogil=True, cache=True)
def _gather(table_u16: np.ndarray, rows: np.ndarray, out_u16: np.ndarray) -> None:
    for t in numba.prange(rows.shape[0]):
        r = rows[t]
        if r >= 0:
            out_u16[t, :] = table_u16[r, :]


@numba.njit(parallel=True, nogil=True, cache=True)
def _gather_rne(table: np.ndarray, rows: np.ndarray, out_u16: np.ndarray) -> None:
    for t in numba.prange(rows.shape[0]):
        r = rows[t]
        if r >= 0:
            src = table[r]
            dst = out_u16[t]
            for j in range(src.shape[0]):
                dst[j] = _rne_like(src[j], out_u16)


def gather_rows(tables: list[tuple[int, np.ndarray]], ids: np.ndarray, out: np.ndarray,
                threads: int | None = None) -> None:
    """out[t] = table row ids[t], where `tables` holds (first row, [rows, H] block) pieces.

    Tables in out's dtype are copied as raw bits (uint16/uint32); fp32 tables into a bf16 `out`
    are rounded to nearest even, the bits a bf16 copy of the table would hold (so an untied
    embedding needs no bf16 copy of the whole table in host memory). `threads`: default a few
    (the driver thread gathers while the host optimizer runs).
    """
    if out.dtype not in (_BF16, np.dtype(np.float32)):
        raise TypeError(f"gather_rows: out must be bfloat16 or float32, not {out.dtype}")
    ids = ids.reshape(-1)
    view = np.uint16 if out.dtype == _BF16 else np.uint32
    out2 = out.reshape(ids.shape[0], -1).view(view)
    with _few_threads(threads):
        for first, block in tables:
            local = ids.astype(np.int64) - first
            local = np.where((local >= 0) & (local < block.shape[0]), local, -1)
            if block.dtype == out.dtype:
                _gather(block.view(view), local, out2)
            elif block.dtype == np.float32 and view is np.uint16:
                _gather_rne(block, local, out2)
            else:
                raise TypeError(f"cannot gather {block.dtype} rows into {out.dtype}")


@numba.njit(parallel=True, nogil=True, cache=True)
def _segment_add(src: np.ndarray, targets: np.ndarray, order: np.ndarray, starts: np.ndarray,
                 out: np.ndarray) -> None:
    """out[targets[u]] += the src rows order[starts[u]:starts[u+1]], in that order (fp32)."""
    for u in numba.prange(targets.shape[0]):
        acc = out[targets[u]]
        for k in range(starts[u], starts[u + 1]):
            acc += src[order[k], :]


@numba.njit(parallel=True, nogil=True, cache=True)
def _segment_add_bf16(src_u16: np.ndarray, targets: np.ndarray, order: np.ndarray, starts: np.ndarray,
                      out: np.ndarray) -> None:
    hidden = out.shape[1]
    for u in numba.prange(targets.shape[0]):
        acc = out[targets[u]]
        bits = np.empty(hidden, np.uint32)
        for k in range(starts[u], starts[u + 1]):
            row = src_u16[order[k]]
            for j in range(hidden):
                bits[j] = np.uint32(row[j]) << np.uint32(16)
            acc += bits.view(np.float32)


# fastmath for the row sums only (vectorised, reordered fp32 sums of 1 row; rows summed in fp64):
# a norm for clipping, not an update.
@numba.njit(parallel=True, nogil=True, cache=True, fastmath=True)
def _sq_norm(values: np.ndarray) -> float:
    total = 0.0
    for u in numba.prange(values.shape[0]):
        row = np.float32(0.0)
        for j in range(values.shape[1]):
            row += values[u, j] * values[u, j]
        total += np.float64(row)
    return total


@numba.njit(parallel=True, nogil=True, cache=True)
def _zero(values: np.ndarray) -> None:
    for u in numba.prange(values.shape[0]):
        values[u, :] = 0.0


class RowGradient:
    """The embedding gradient of one step as distinct rows: `rows[k]` gets `values[k]`.

    Built from the step's token ids [M, ...] (M micro-batches); each micro-batch's per-token
    gradients are added with `add` as soon as they reach host memory (in any order; each row sums
    its tokens in token order within a micro-batch, in fp32), so the work overlaps the rest of the
    backward pass instead of following it.
    """

    def __init__(self, ids: np.ndarray, buffer: np.ndarray | None = None):
        """`buffer`: optional fp32 memory to hold `values` (reused across steps, it saves the page
        faults of a fresh allocation, tens of ms at 16K tokens); grown here when too small."""
        ids = np.asarray(ids)
        per_mb = ids.reshape(ids.shape[0] if ids.ndim > 1 else 1, -1).astype(np.int64)
        self.rows, inverse = np.unique(per_mb, return_inverse=True)
        inverse = inverse.reshape(per_mb.shape)
        self.n_tokens = per_mb.size
        self._groups = []  # per micro-batch: (target rows, token order, segment starts)
        for inv in inverse:
            targets, local = np.unique(inv, return_inverse=True)
            order = np.argsort(local, kind="stable")
            starts = np.concatenate([[0], np.cumsum(np.bincount(local, minlength=targets.shape[0]))])
            self._groups.append((targets.astype(np.int64), order.astype(np.int64), starts.astype(np.int64)))
        self.values: np.ndarray | None = None
        self.buffer = buffer
        self._added: set[int] = set()

    @property
    def complete(self) -> bool:
        """Whether every micro-batch's gradients have been added (not so after a failed add)."""
        return len(self._added) == len(self._groups)

    def add(self, mb: int, grad: np.ndarray) -> None:
        """Add micro-batch `mb`'s per-token gradients ([tokens of mb, H], fp32 or bf16)."""
        hidden = grad.shape[-1]
        src = np.ascontiguousarray(grad.reshape(-1, hidden))
        if self.values is None:
            n = self.rows.shape[0] * hidden
            if self.buffer is None or self.buffer.size < n:
                self.buffer = np.empty(n, np.float32)
            self.values = self.buffer[:n].reshape(-1, hidden)
            _zero(self.values)
        targets, order, starts = self._groups[mb]
        if src.dtype == np.float32:
            _segment_add(src, targets, order, starts, self.values)
        elif src.dtype == _BF16:  # summed in fp32 from its bits
            _segment_add_bf16(src.view(np.uint16), targets, order, starts, self.values)
        else:
            raise TypeError(f"RowGradient.add: gradients must be bfloat16 or float32, not {src.dtype}")
        self._added.add(mb)

    def accumulate(self, grads: list[np.ndarray]) -> np.ndarray:
        """Sum every micro-batch's per-token gradients (in token order, bf16 or fp32) into fp32
        rows, with a few threads (the caller's thread shares the cores with the host optimizer)."""
        with _few_threads():
            for mb, g in enumerate(grads):
                self.add(mb, g)
        return self.values

    def index_for(self, first: int, end: int) -> np.ndarray:
        """int32[end - first]: position in `values` of each row of a table block, or -1."""
        idx = np.full(end - first, -1, np.int32)
        sel = (self.rows >= first) & (self.rows < end)
        idx[self.rows[sel] - first] = np.nonzero(sel)[0].astype(np.int32)
        return idx

    def sq_norm(self) -> float:
        """Squared Frobenius norm of the row gradient (accumulated in float64)."""
        return float(_sq_norm(self.values))
