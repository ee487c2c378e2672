"""Numba kernels of the fused host AdamW: one multi-threaded pass at DRAM speed.

One call updates a set of *spans* of a unit's flat fp32 master buffer in place: for every element
it reads the gradient (bfloat16 or float32), scales it, updates the two Adam moments, applies the
decoupled weight decay and the learning rate, and writes the new master weight together with its
compute-dtype copy (the buffer the GPU uploads from), so no separate conversion pass exists. The
arithmetic is optax's, operation for operation, in float32 (see `HostAdamW` in
`slidejax.host_optimizer` for the public API and the optax equivalence).

bfloat16 data is handled as uint16 bit patterns (numba has no bfloat16 type): bf16 -> f32 is a
16-bit shift, f32 -> bf16 is round-to-nearest-even on the bits, with NaN kept NaN exactly as
`ml_dtypes` casts it. The second moment in bfloat16 uses *stochastic rounding* (see
`sr_key`), because round-to-nearest of `b2 * v + (1 - b2) * g**2` stalls: with b2 = 0.999 an
increment is ~1e-3 of v, below bf16's half-ulp (2**-9).

Threading: the work is split into one large contiguous block of spans per thread (`prange` over the
thread count), so each thread streams its own memory range and the inner loop vectorises. Kernels
are compiled lazily per dtype combination (master f32; moments f32 or bf16-bits; gradient f32 or
bf16-bits; upload f32 or bf16-bits: at most 8) and cached on disk. Numba's `workqueue` threading
layer is not safe for concurrent launches from several Python threads, so when it is the active
layer every launch is serialised with a lock (`tbb` and `omp`, which numba prefers when present,
are thread-safe and run concurrent launches side by side).
"""

from __future__ import annotations

import threading

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import types
from numba.extending import intrinsic

# error_model='numpy' drops the zero-division checks that would block vectorisation. No fastmath:
# reassociation or FMA contraction would make results differ from optax's by more than rounding
# order, and the pass is DRAM-bound, so it would buy nothing.
_OPTS = dict(nogil=True, cache=True, error_model="numpy", boundscheck=False)


_i16 = ir.IntType(16)
_i32 = ir.IntType(32)
_f32 = ir.FloatType()


def _c32(v: int) -> ir.Constant:
    return ir.Constant(_i32, v)


def _nan_to_bf16(builder, bits):
    """bf16 bits of a float32 NaN as ml_dtypes makes them: the sign kept, the canonical quiet NaN."""
    sign = builder.and_(builder.lshr(bits, _c32(16)), _c32(0x8000))
    return builder.or_(sign, _c32(0x7FC0))


def _finish_bf16(builder, bits, rounded):
    """Select the NaN encoding where the input is NaN, else the rounded value; truncate to i16."""
    is_nan = builder.icmp_unsigned(">", builder.and_(bits, _c32(0x7FFFFFFF)), _c32(0x7F800000))
    out = builder.select(is_nan, _nan_to_bf16(builder, bits), builder.lshr(rounded, _c32(16)))
    return builder.trunc(out, _i16)


def _lowbias32(builder, x):
    """Chris Wellons' lowbias32 integer hash (wrapping 32-bit arithmetic)."""
    x = builder.xor(x, builder.lshr(x, _c32(16)))
    x = builder.mul(x, _c32(0x7FEB352D))
    x = builder.xor(x, builder.lshr(x, _c32(15)))
    x = builder.mul(x, _c32(0x846CA68B))
    return builder.xor(x, builder.lshr(x, _c32(16)))


def _is_bf16(ty) -> bool:
    return ty == types.uint16


@intrinsic
def _to_f32(typingctx, x):
    """float32 value of a float32, or of bf16 bits (uint16)."""
    if _is_bf16(x):

        def codegen(context, builder, signature, args):
            return builder.bitcast(builder.shl(builder.zext(args[0], _i32), _c32(16)), _f32)

    elif x == types.float32:

        def codegen(context, builder, signature, args):
            return args[0]

    else:
        return None
    return types.float32(x), codegen


@intrinsic
def _rne_like(typingctx, x, like):
    """float32 x as an element of array `like`: itself, or bf16 bits rounded to nearest even."""
    if x != types.float32 or not isinstance(like, types.Array):
        return None
    if _is_bf16(like.dtype):

        def codegen(context, builder, signature, args):
            bits = builder.bitcast(args[0], _i32)
            lsb = builder.and_(builder.lshr(bits, _c32(16)), _c32(1))
            return _finish_bf16(builder, bits, builder.add(builder.add(bits, _c32(0x7FFF)), lsb))

    else:

        def codegen(context, builder, signature, args):
            return args[0]

    return like.dtype(x, like), codegen


@intrinsic
def _sr_like(typingctx, x, key, like):
    """float32 x as an element of array `like`: itself, or bf16 bits rounded stochastically with
    16 noise bits hash(bits(x) ^ key)."""
    if x != types.float32 or key != types.uint32 or not isinstance(like, types.Array):
        return None
    if _is_bf16(like.dtype):

        def codegen(context, builder, signature, args):
            bits = builder.bitcast(args[0], _i32)
            noise = builder.and_(_lowbias32(builder, builder.xor(bits, args[1])), _c32(0xFFFF))
            return _finish_bf16(builder, bits, builder.add(bits, noise))

    else:

        def codegen(context, builder, signature, args):
            return args[0]

    return like.dtype(x, key, like), codegen


def lowbias32(x: np.ndarray | int) -> np.ndarray:
    """numpy twin of the kernels' 32-bit hash (uint32 in, uint32 out)."""
    x = np.asarray(x, dtype=np.uint32)
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(0x7FEB352D)
        x = x ^ (x >> np.uint32(15))
        x = x * np.uint32(0x846CA68B)
        return x ^ (x >> np.uint32(16))


def sr_key(count: int, seed: int) -> np.uint32:
    """Per-step key of the bf16 second moment's stochastic rounding.

    The rounding noise of an element is hash(bits(v_fp32) ^ key(step, seed)): it depends on the
    value and the step, not on where the element sits, so any layout of the same parameters (a
    unit's flat buffer, a whole-model pytree, a row-split update) rounds identically and a plain
    optax transformation can reproduce it (`slidejax.host_optimizer.scale_by_adam_bf16`). Over
    steps the noise is uniform, so the stored v is unbiased: E[bf16(v)] = v.
    """
    mixed = lowbias32(np.uint32((count * 0x9E3779B9) & 0xFFFFFFFF) ^ np.uint32(seed & 0xFFFFFFFF))
    return np.uint32(mixed)


# Everything a call runs is written out in these two functions, with the dtype handling in
# intrinsics: each numba function compiled per signature costs seconds, most of it numba's own
# passes, so fewer functions mean faster compiles (CI compiles from scratch).


@njit(parallel=True, **_OPTS)
def adamw_spans(spans, nthreads, decay_split, master, m, v, grad, zeros, upload, write_upload, hp, key):
    """Fused AdamW over `spans` (int64 [S, 3]: lo, hi, gstart) of a unit's flat buffers, in place.

    Span elements lo + j read the gradient grad[gstart + j], or `zeros[j]` where gstart < 0 (a row
    with no gradient gets the full update with g = 0, exactly as optax with a dense zero). Thread t
    takes spans [S t / T, S (t+1) / T): one contiguous block each. Elements below `decay_split` get
    weight decay. `hp` is the float32 tuple (1-b1, b1, 1-b2, b2, rbc1, rbc2, eps_root, eps, wd, -lr,
    grad_scale) (a tuple is a value: no aliasing doubt keeps its loads in the loop), `key` the
    stochastic-rounding key of bf16 v.

    Per element, in optax.adamw's order of operations (XLA turns optax's division by the scalar
    bias correction 1 - b**count into a product with its float32 reciprocal rbc):
    mu = (1-b1) g + b1 m; nu = (1-b2) g^2 + b2 v; u = (mu rbc1) / (sqrt(nu rbc2 + eps_root) + eps);
    u += wd p (decayed elements only); p = p + (-lr) u.
    """
    c1, b1, c2, b2, rbc1, rbc2, eps_root, eps, wd, neg_lr, scale = hp
    ns = spans.shape[0]
    for t in prange(nthreads):
        for s in range(ns * t // nthreads, ns * (t + 1) // nthreads):
            lo = spans[s, 0]
            hi = spans[s, 1]
            gstart = spans[s, 2]
            k = hi - lo
            jd = min(max(decay_split - lo, 0), k)
            # Slices, so the loop index is a plain 0..k-1 counter: numba's negative-index
            # wraparound then folds away and the loop vectorises (with a computed index it does not).
            p_ = master[lo:hi]
            m_ = m[lo:hi]
            v_ = v[lo:hi]
            g_ = grad[gstart : gstart + k] if gstart >= 0 else zeros[:k]
            u_ = upload[lo:hi] if write_upload else upload[:0]
            for j in range(k):
                g = _to_f32(g_[j]) * scale
                p = p_[j]
                mu = c1 * g + b1 * _to_f32(m_[j])
                nu = c2 * (g * g) + b2 * _to_f32(v_[j])
                u = (mu * rbc1) / (np.sqrt(nu * rbc2 + eps_root) + eps)
                u = u + wd * p if j < jd else u
                p = p + neg_lr * u
                p_[j] = p
                m_[j] = _rne_like(mu, m_)
                v_[j] = _sr_like(nu, key, v_)
                if write_upload:
                    u_[j] = _rne_like(p, u_)


@njit(parallel=True, **_OPTS)
def store_params(src, nthreads, master, upload, write_upload):
    """master[:] = src and upload[:] = compute-dtype copy of src (round-to-nearest-even for bf16),
    in one pass split into one contiguous block per thread (the generic optax path's write-back)."""
    n = src.shape[0]
    for t in prange(nthreads):
        lo = n * t // nthreads
        hi = n * (t + 1) // nthreads
        s_ = src[lo:hi]
        p_ = master[lo:hi]
        u_ = upload[lo:hi] if write_upload else upload[:0]
        for j in range(hi - lo):
            x = s_[j]
            p_[j] = x
            if write_upload:
                u_[j] = _rne_like(x, u_)


_launch_lock = threading.Lock()
_needs_lock: bool | None = None


def max_threads() -> int:
    """The most threads a kernel can use (numba's pool size, NUMBA_NUM_THREADS)."""
    return numba.config.NUMBA_NUM_THREADS


def _serialised() -> bool:
    """Whether launches must be serialised: only under numba's non-thread-safe 'workqueue' layer."""
    global _needs_lock
    if _needs_lock is None:
        numba.get_num_threads()  # starts numba's threading layer, so the layer is known
        _needs_lock = numba.threading_layer() == "workqueue"
    return _needs_lock


def launch(kernel, nthreads: int, *args) -> None:
    """Run a parallel kernel (`adamw_spans` or `store_params`) on `nthreads` threads.

    `kernel(first, nthreads, *rest)` is called with the calling thread's numba thread count set to
    `nthreads` (numba's setting is per calling thread, so concurrent callers do not disturb each
    other), under a lock when the threading layer is 'workqueue'.
    """
    nthreads = max(1, min(int(nthreads), max_threads()))
    first, rest = args[0], args[1:]
    lock = _launch_lock if _serialised() else None
    if lock is not None:
        lock.acquire()
    previous = numba.get_num_threads()
    try:
        numba.set_num_threads(nthreads)
        kernel(first, nthreads, *rest)
    finally:
        numba.set_num_threads(previous)
        if lock is not None:
            lock.release()
