"""The embedding stage on the host: lookup and gradient without moving the vocabulary matrix.

A lookup needs only the rows of the step's tokens, and its gradient touches only those rows. So
the embedding table never crosses PCIe: the host gathers `tokens x hidden` rows into a pinned
staging buffer (uploaded like any activation), and turns the downloaded gradient of the layer-0
input into a row-sparse gradient (one summed row per distinct token) for the host optimizer.
"""

from __future__ import annotations

import contextlib
import os

import numba
import numpy as np

# The driver thread gathers and sums embedding rows while the host optimizer's threads update
# other units; a few threads are enough for these memcpy-like passes and leave it the cores.
_THREADS = max(1, min(4, (os.cpu_count() or 1) // 4))


@contextlib.contextmanager
def _few_threads():
    previous = numba.get_num_threads()
    numba.set_num_threads(min(_THREADS, numba.config.NUMBA_NUM_THREADS))
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


def gather_rows(tables: list[tuple[int, np.ndarray]], ids: np.ndarray, out: np.ndarray) -> None:
    """out[t] = table row ids[t], where `tables` holds (first row, [rows, H] block) pieces.

    All arrays share one dtype; copied as raw bits (uint16/uint32), so bf16 needs no conversion.
    """
    ids = ids.reshape(-1)
    view = np.uint16 if out.dtype.itemsize == 2 else np.uint32
    out2 = out.reshape(ids.shape[0], -1).view(view)
    with _few_threads():
        for first, block in tables:
            local = ids.astype(np.int64) - first
            local = np.where((local >= 0) & (local < block.shape[0]), local, -1)
            _gather(block.view(view), local, out2)


@numba.njit(parallel=True, nogil=True, cache=True)
def _segment_sum(src: np.ndarray, order: np.ndarray, starts: np.ndarray, out: np.ndarray) -> None:
    for u in numba.prange(starts.shape[0] - 1):
        out[u, :] = 0.0
        for k in range(starts[u], starts[u + 1]):
            out[u, :] += src[order[k], :]


@numba.njit(parallel=True, nogil=True, cache=True)
def _segment_sum_bf16(src_u16: np.ndarray, order: np.ndarray, starts: np.ndarray, out: np.ndarray) -> None:
    hidden = out.shape[1]
    for u in numba.prange(starts.shape[0] - 1):
        acc = np.zeros(hidden, np.float32)
        bits = np.empty(hidden, np.uint32)
        for k in range(starts[u], starts[u + 1]):
            row = src_u16[order[k]]
            for j in range(hidden):
                bits[j] = np.uint32(row[j]) << np.uint32(16)
            acc += bits.view(np.float32)
        out[u, :] = acc


class RowGradient:
    """The embedding gradient of one step as distinct rows: `rows[k]` gets `values[k]`."""

    def __init__(self, ids: np.ndarray):
        flat = ids.reshape(-1).astype(np.int64)
        self.rows, inverse = np.unique(flat, return_inverse=True)
        self.order = np.argsort(inverse, kind="stable")
        counts = np.bincount(inverse, minlength=self.rows.shape[0])
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.n_tokens = flat.shape[0]
        self.values: np.ndarray | None = None

    def accumulate(self, grads: list[np.ndarray]) -> np.ndarray:
        """Sum the per-token gradients (in token order, any float dtype) into fp32 rows."""
        hidden = grads[0].shape[-1]
        src = np.concatenate([g.reshape(-1, hidden) for g in grads]) if len(grads) > 1 else grads[0].reshape(-1, hidden)
        self.values = np.empty((self.rows.shape[0], hidden), np.float32)
        with _few_threads():
            if src.dtype == np.float32:
                _segment_sum(np.ascontiguousarray(src), self.order, self.starts, self.values)
            else:  # bfloat16, summed in fp32 from its bits
                _segment_sum_bf16(np.ascontiguousarray(src).view(np.uint16), self.order, self.starts, self.values)
        return self.values

    def index_for(self, first: int, end: int) -> np.ndarray:
        """int32[end - first]: position in `values` of each row of a table block, or -1."""
        idx = np.full(end - first, -1, np.int32)
        sel = (self.rows >= first) & (self.rows < end)
        idx[self.rows[sel] - first] = np.nonzero(sel)[0].astype(np.int32)
        return idx

    def sq_norm(self) -> float:
        return float(np.dot(self.values.reshape(-1), self.values.reshape(-1)))
