"""Pure-JAX chunked linear + cross-entropy: the twin of the Triton path, and its shared drivers.

Everything here is chunked over tokens so that at most one ``[chunk, V]`` fp32 logits block (and
its gradient) is alive at a time; the fused pass (:func:`fused_accumulate`) even halves the
block, keeping one chunk's gradient and one ``[chunk / 2, V]`` fp32 block. The logits are always
produced by XLA (``h_rows @ w.T``, fp32 accumulation); what is done to them row by row is a
:class:`BlockOps`: the row statistics (online max / sum-exp / target logit) and the row gradient
(as a new block, or written into rows of a given buffer). This module holds the pure-JAX
``BlockOps`` (:data:`JAX_OPS`); ``cross_entropy_triton`` holds the Triton ones. The drivers
below take either, so the twin and the Triton path differ only in those functions.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

# Rows per chunk: the largest power of two whose fp32 [chunk, V] logits block fits BLOCK_BYTES
# (a few percent of the full N x V logits at 64K tokens), but at least MIN_CHUNK: the dw GEMM
# has K = chunk and reads and writes the fp32 [V, H] accumulator once per chunk, i.e. chunk / 4
# FLOP per byte, which must stay near an H200's ~180 FLOP/byte balance for the GEMM to run at
# full speed. (So at 16K tokens the chunk cannot shrink for free: the fused pass halves the
# logits block instead, see fused_accumulate.)
BLOCK_BYTES = 512 * 2**20
MIN_CHUNK = 1024

Stats = tuple[jax.Array, jax.Array, jax.Array]


class BlockOps(NamedTuple):
    """Row-wise work on one fp32 logits block ``[rows, cols]``.

    ``labels`` are local to the block's columns (``label - vocab_start``); a label outside
    ``[0, cols)`` contributes no target logit and no one-hot term.

    stats(logits, labels, softcap) -> (m, s, t), each f32 [rows]: the row max of the (capped)
        logits, the sum of ``exp(logit - m)``, and the (capped) target logit or 0.
    grads(logits, labels, lse, scale, softcap, z_loss, out_dtype) -> g [rows, cols]: the gradient
        of ``sum_i scale[i] * loss_i`` w.r.t. the raw logits, given each row's full-vocabulary
        log-sum-exp ``lse``.
    grads_into(buf, row0, logits, labels, lse, scale, softcap, z_loss) -> buf: the same gradient
        written into rows ``row0 : row0 + rows`` of ``buf`` [>= row0 + rows, cols] (static
        ``row0``), in ``buf``'s dtype and in place when ``buf`` is dead afterwards.
    """

    stats: Callable[..., Stats]
    grads: Callable[..., jax.Array]
    grads_into: Callable[..., jax.Array]


# --------------------------------------------------------------------------- pure-JAX block ops

def _softcap(z: jax.Array, softcap: float | None) -> jax.Array:
    return z if softcap is None else softcap * jnp.tanh(z / softcap)


def _jax_block_stats(logits: jax.Array, labels: jax.Array, softcap: float | None) -> Stats:
    z = _softcap(logits.astype(jnp.float32), softcap)
    cols = z.shape[1]
    m = jnp.max(z, axis=1)
    s = jnp.sum(jnp.exp(z - m[:, None]), axis=1)
    inside = (labels >= 0) & (labels < cols)
    picked = jnp.take_along_axis(z, jnp.clip(labels, 0, cols - 1)[:, None], axis=1)[:, 0]
    return m, s, jnp.where(inside, picked, 0.0)


def _jax_block_grads(logits, labels, lse, scale, softcap, z_loss, out_dtype) -> jax.Array:
    z = _softcap(logits.astype(jnp.float32), softcap)
    # d(lse + z_loss * lse^2)/dz = softmax * (1 + 2 z_loss lse); d(-z[label])/dz = -onehot.
    coef = scale * (1.0 + 2.0 * z_loss * lse)
    g = jnp.exp(z - lse[:, None]) * coef[:, None]
    onehot = labels[:, None] == jnp.arange(z.shape[1], dtype=labels.dtype)[None, :]
    g = g - jnp.where(onehot, scale[:, None], 0.0)
    if softcap is not None:
        g = g * (1.0 - jnp.square(z / softcap))  # d(cap * tanh(x / cap))/dx
    return g.astype(out_dtype)


def _jax_block_grads_into(buf, row0, logits, labels, lse, scale, softcap, z_loss) -> jax.Array:
    g = _jax_block_grads(logits, labels, lse, scale, softcap, z_loss, buf.dtype)
    return lax.dynamic_update_slice_in_dim(buf, g, row0, 0)


JAX_OPS = BlockOps(stats=_jax_block_stats, grads=_jax_block_grads,
                   grads_into=_jax_block_grads_into)


# --------------------------------------------------------------------------- statistics algebra

def init_stats(n_tokens: int) -> Stats:
    """The identity of :func:`combine_stats`: ``m = -inf, s = 0, t = 0`` for every token."""
    return (jnp.full((n_tokens,), -jnp.inf, jnp.float32), jnp.zeros((n_tokens,), jnp.float32),
            jnp.zeros((n_tokens,), jnp.float32))


def combine_stats(a: Stats, b: Stats) -> Stats:
    """Merge the statistics of two disjoint vocabulary ranges (online log-sum-exp).

    ``lse_from_stats(*combine_stats(a, b)[:2])`` is the log-sum-exp over both ranges; the target
    logits add because exactly one range holds each token's label (the other contributes 0).
    """
    (ma, sa, ta), (mb, sb, tb) = a, b
    m = jnp.maximum(ma, mb)
    # Both -inf (two empty ranges) would give exp(nan); any finite reference works there.
    ref = jnp.where(jnp.isfinite(m), m, 0.0)
    return m, sa * jnp.exp(ma - ref) + sb * jnp.exp(mb - ref), ta + tb


def lse_from_stats(m: jax.Array, s: jax.Array) -> jax.Array:
    """Per-token log-sum-exp ``m + log(s)`` from (combined) statistics."""
    return m + jnp.log(s)


def loss_from_stats(
    lse: jax.Array,
    t: jax.Array,
    labels: jax.Array,
    *,
    ignore_index: int = -100,
    z_loss: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """Summed loss and valid-token count from the full-vocabulary ``lse`` and target logit ``t``.

    Per valid token the loss is ``lse - t + z_loss * lse**2``; ``t`` and ``lse`` are of the
    soft-capped logits when the statistics were taken with a softcap, so no softcap is needed here.
    """
    valid = labels != ignore_index
    per_token = lse - t + z_loss * jnp.square(lse)
    return jnp.sum(jnp.where(valid, per_token, 0.0)), jnp.sum(valid, dtype=jnp.int32)


# --------------------------------------------------------------------------- chunking

def choose_chunk(n_rows: int, n_cols: int, chunk_size: int | None = None) -> int:
    """Rows per block: ``chunk_size`` if given, else the largest power of two whose fp32
    ``[chunk, n_cols]`` logits block fits :data:`BLOCK_BYTES`, at least :data:`MIN_CHUNK`;
    never more than ``n_rows``."""
    if chunk_size is None:
        fit = max(1, BLOCK_BYTES // (4 * max(n_cols, 1)))
        chunk_size = max(MIN_CHUNK, 1 << (fit.bit_length() - 1))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return max(1, min(chunk_size, n_rows))


def _over_chunks(n: int, chunk: int, step: Callable, carry):
    """``carry = step(carry, start, size)`` for consecutive row ranges covering ``[0, n)``.

    A ``fori_loop`` over the ``n // chunk`` full chunks (traced ``start``, static ``size``), then
    one more call for the remainder, if any. Inputs are sliced and outputs written in place with
    dynamic slices, so an ``n`` that ``chunk`` does not divide costs no padded copy of ``h`` and no
    sliced copy of ``dh``.
    """
    n_full, tail = divmod(n, chunk)
    if n_full:
        carry = lax.fori_loop(0, n_full, lambda i, c: step(c, i * chunk, chunk), carry)
    if tail:
        carry = step(carry, n_full * chunk, tail)
    return carry


def _rows(x: jax.Array, start, size: int) -> jax.Array:
    return lax.dynamic_slice_in_dim(x, start, size)


def _put_rows(buf: jax.Array, x: jax.Array, start) -> jax.Array:
    return lax.dynamic_update_slice_in_dim(buf, x.astype(buf.dtype), start, 0)


def _precision(*arrays: jax.Array):
    # fp32 inputs mean exactness mode: forbid TF32 on GPU. bf16 inputs need no override.
    if any(a.dtype == jnp.float32 for a in arrays):
        return lax.Precision.HIGHEST
    return None


def _matmul(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    """``a`` x ``b`` contracting ``a``'s axis ``contract[0]`` with ``b``'s ``contract[1]``, fp32
    out (so no transposed copy is ever made)."""
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return lax.dot_general(a, b, dims, precision=_precision(a, b),
                           preferred_element_type=jnp.float32)


def _block_logits(h_chunk: jax.Array, w: jax.Array) -> jax.Array:
    return _matmul(h_chunk, w, (1, 1))  # [chunk, H] x [V, H] -> [chunk, V] f32


# --------------------------------------------------------------------------- drivers

def _accumulator(acc: jax.Array | None, shape: tuple[int, int], name: str) -> jax.Array:
    """``acc`` viewed as fp32 ``shape`` (it may also be flat), or fresh zeros when None."""
    if acc is None:
        return jnp.zeros(shape, jnp.float32)
    size = shape[0] * shape[1]
    if acc.dtype != jnp.float32 or acc.shape not in (shape, (size,)):
        raise ValueError(f"{name} must be float32 of shape {shape} or ({size},), got "
                         f"{acc.dtype} {acc.shape}")
    return acc.reshape(shape)


def chunk_stats(
    h: jax.Array,
    w_chunk: jax.Array,
    labels: jax.Array,
    vocab_start,
    *,
    softcap: float | None = None,
    chunk_size: int | None = None,
    ops: BlockOps = JAX_OPS,
) -> Stats:
    """Statistics of ``softcap(h @ w_chunk.T)`` per token, chunked over tokens (see
    :func:`slidejax.kernels.lce_chunk_stats`)."""
    n, vc = h.shape[0], w_chunk.shape[0]
    local = (labels - vocab_start).astype(jnp.int32)

    def step(acc, start, size):
        block = ops.stats(_block_logits(_rows(h, start, size), w_chunk), _rows(local, start, size),
                          softcap)
        return tuple(_put_rows(buf, x, start) for buf, x in zip(acc, block))

    acc = tuple(jnp.zeros((n,), jnp.float32) for _ in range(3))
    return _over_chunks(n, choose_chunk(n, vc, chunk_size), step, acc)


def chunk_grads(
    h: jax.Array,
    w_chunk: jax.Array,
    labels: jax.Array,
    vocab_start,
    lse: jax.Array,
    row_scale: jax.Array,
    *,
    softcap: float | None = None,
    z_loss: float = 0.0,
    chunk_size: int | None = None,
    ops: BlockOps = JAX_OPS,
    dh_acc: jax.Array | None = None,
    dw_acc: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """This vocabulary chunk's share of the gradient of ``sum_i row_scale[i] * loss_i``, added to
    ``dh_acc`` f32 [N, H] and ``dw_acc`` f32 [Vc, H] (or [Vc * H]; zeros when None), returned in
    their shapes (see :func:`slidejax.kernels.lce_chunk_grads`)."""
    n, vc = h.shape[0], w_chunk.shape[0]
    g_dtype = jnp.promote_types(h.dtype, w_chunk.dtype)
    local = (labels - vocab_start).astype(jnp.int32)
    lse, row_scale = lse.astype(jnp.float32), row_scale.astype(jnp.float32)
    dh0 = _accumulator(dh_acc, h.shape, "dh_acc")
    dw0 = _accumulator(dw_acc, (vc, h.shape[1]), "dw_acc")

    def step(acc, start, size):
        dh, dw = acc
        h_c = _rows(h, start, size)
        g = ops.grads(_block_logits(h_c, w_chunk), _rows(local, start, size),
                      _rows(lse, start, size), _rows(row_scale, start, size), softcap, z_loss,
                      g_dtype)
        dw = dw + _matmul(g, h_c, (0, 0))  # [chunk, Vc] x [chunk, H] -> [Vc, H]
        dh_c = _matmul(g, w_chunk, (1, 0))  # [chunk, Vc] x [Vc, H] -> [chunk, H]
        if dh_acc is not None:
            dh_c = _rows(dh, start, size) + dh_c
        return _put_rows(dh, dh_c, start), dw

    dh, dw = _over_chunks(n, choose_chunk(n, vc, chunk_size), step, (dh0, dw0))
    return (dh if dh_acc is None else dh.reshape(dh_acc.shape),
            dw if dw_acc is None else dw.reshape(dw_acc.shape))


def fused_loss(
    h: jax.Array,
    w: jax.Array,
    labels: jax.Array,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    z_loss: float = 0.0,
    chunk_size: int | None = None,
    ops: BlockOps = JAX_OPS,
) -> tuple[jax.Array, jax.Array]:
    """Forward only: ``(loss_sum, n_valid)`` from the statistics, no gradient blocks."""
    m, s, t = chunk_stats(h, w, labels, 0, softcap=softcap, chunk_size=chunk_size, ops=ops)
    return loss_from_stats(lse_from_stats(m, s), t, labels, ignore_index=ignore_index,
                           z_loss=z_loss)


def _after(x: jax.Array, *deps: jax.Array) -> jax.Array:
    """``x`` unchanged, but computed after every one of ``deps``: ``x + 0 * dep.flat[0]`` each
    (XLA does not fold a float times zero, which is NaN for an infinite or NaN operand)."""
    for dep in deps:
        x = x + (dep.reshape(-1)[0].astype(jnp.float32) * 0.0).astype(x.dtype)
    return x


def _halves(rows: int) -> list[tuple[int, int]]:
    """``(start, size)`` of the (at most two) logits blocks that make up a chunk of ``rows``."""
    first = (rows + 1) // 2
    return [(0, first)] + ([(first, rows - first)] if rows > first else [])


def fused_accumulate(
    h: jax.Array,
    w: jax.Array,
    labels: jax.Array,
    dw_acc: jax.Array | None = None,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    z_loss: float = 0.0,
    chunk_size: int | None = None,
    ops: BlockOps = JAX_OPS,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Loss and gradients in one pass over token chunks (Liger's design), ``dw`` accumulated in
    fp32 straight into ``dw_acc``.

    Per chunk of ``c`` tokens: the logits gradient ``g`` [c, V] (in the inputs' dtype, so the two
    gradient GEMMs run at bf16 speed in training) is filled half a chunk at a time, each half from
    its own fp32 logits block [c/2, V] (XLA GEMM, row statistics, gradient written into its rows
    of ``g``); then ``dh_chunk = g @ w`` goes into its rows of ``dh`` and ``dw += g.T @ h_chunk``
    into the fp32 accumulator, which is the loop's carry: with ``dw_acc`` donated by the caller's
    jit, XLA updates it in place. Halving the logits block keeps the dw GEMM's depth at ``c``
    (its fp32 read-modify-write of [V, H] needs a deep K to stay compute-bound) while the chunk's
    working set drops from ``c * V * (4 + 2)`` to ``c * V * (2 + 2)`` bytes (bf16).

    Returns ``(loss_sum, n_valid, dh in h.dtype [N, H], dw_acc + dw in dw_acc's shape, or f32
    [V, H] when dw_acc is None)``, the gradients being those of ``loss_sum``.
    """
    n, v = h.shape[0], w.shape[0]
    g_dtype = jnp.promote_types(h.dtype, w.dtype)
    labels = labels.astype(jnp.int32)
    dw0 = _accumulator(dw_acc, w.shape, "dw_acc")
    chunk = choose_chunk(n, v, chunk_size)

    def step(acc, start, size):
        loss, dh, dw, g = acc
        if g.shape[0] != size:  # the tail chunk: a buffer of its own size
            g = jnp.zeros((size, v), g_dtype)
        for r0, rows in _halves(size):
            h_r, y_r = _rows(h, start + r0, rows), _rows(labels, start + r0, rows)
            if r0:
                # The second logits block waits for everything read from the first (its gradient
                # rows and its label logits, through the loss), so the two fp32 blocks are never
                # alive together: XLA drops optimization barriers before it schedules, a data
                # dependence it must keep. Measured on the H200: with the gradient alone, XLA
                # gathered the first block's label logits late and kept both blocks.
                h_r = _after(h_r, g, loss)
            # Ignored rows get scale 0, which zeroes their gradient row (one-hot term included).
            scale = (y_r != ignore_index).astype(jnp.float32)
            logits = _block_logits(h_r, w)
            m, s, t = ops.stats(logits, y_r, softcap)
            lse = lse_from_stats(m, s)
            g = ops.grads_into(g, r0, logits, y_r, lse, scale, softcap, z_loss)
            part, _ = loss_from_stats(lse, t, y_r, ignore_index=ignore_index, z_loss=z_loss)
            loss = loss + part
        h_c = _rows(h, start, size)
        dw = dw + _matmul(g, h_c, (0, 0))  # [c, V] x [c, H] -> [V, H], added in the GEMM
        # [c, V] x [V, H]: fp32 out, then rounded: a split-K GEMM (K = V) must not sum
        # partial products in bf16.
        dh = _put_rows(dh, _matmul(g, w, (1, 0)), start)
        return loss, dh, dw, g

    acc = (jnp.zeros((), jnp.float32), jnp.zeros_like(h), dw0, jnp.zeros((chunk, v), g_dtype))
    loss_sum, dh, dw, _ = _over_chunks(n, chunk, step, acc)
    n_valid = jnp.sum(labels != ignore_index, dtype=jnp.int32)
    return loss_sum, n_valid, dh, dw if dw_acc is None else dw.reshape(dw_acc.shape)


def fused_forward(
    h: jax.Array,
    w: jax.Array,
    labels: jax.Array,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    z_loss: float = 0.0,
    chunk_size: int | None = None,
    ops: BlockOps = JAX_OPS,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """:func:`fused_accumulate` from zero, ``dw`` rounded to ``w.dtype``: ``(loss_sum, n_valid,
    dh, dw)`` for the custom VJP of ``linear_cross_entropy``."""
    loss_sum, n_valid, dh, dw = fused_accumulate(
        h, w, labels, None, ignore_index=ignore_index, softcap=softcap, z_loss=z_loss,
        chunk_size=chunk_size, ops=ops)
    return loss_sum, n_valid, dh, dw.astype(w.dtype)
