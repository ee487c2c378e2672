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
`sr_noise`), because round-to-nearest of `b2 * v + (1 - b2) * g**2` stalls: with b2 = 0.999 an
increment is ~1e-3 of v, below bf16's half-ulp (2**-9).

Threading: `prange` over spans (contiguous ranges of a few MB, so each streams memory and the
inner loop vectorises), handed out to threads *dynamically* in chunks (`launch` sets numba's
parallel chunk size): a thread that the OS deschedules, which happens whenever the GPU driver's
threads or the embedding passes want a core, then costs its share of the chunks, not a whole
static block that every other thread waits for. Kernels
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


def _wide_vectors() -> None:
    """On AVX-512 CPUs, let LLVM vectorise numba's loops with 512-bit registers.

    LLVM tunes Intel server cores to prefer 256-bit vectors; on an Ice Lake core the bf16-moment
    pass then runs 1.3-1.4x slower (its rounding and hashing are integer work, twice as much per
    instruction at 512 bits) and the fp32 pass 0-10% slower (bench/RESULTS.md). Every operation
    here is per element, so the results are the same bits at either width. Numba reads the
    setting when it first compiles: it applies if slidejax is imported before any numba function
    of the process was compiled. Setting NUMBA_CPU_FEATURES (or NUMBA_CPU_NAME) takes the choice back."""
    if numba.config.CPU_FEATURES is not None or numba.config.CPU_NAME is not None:
        return
    from llvmlite import binding

    features = binding.get_host_cpu_features()
    if features.get("avx512f") and features.get("avx512bw"):
        numba.config.CPU_FEATURES = features.flatten() + ",-prefer-256-bit"


_wide_vectors()
_BLOCK = 4096  # elements of gradient staged per block in `adamw_spans` (16 KiB of float32: L1-resident)
ZERO_MOMENTS = -2  # a span's gstart: no gradient and moments known to be zero (see `adamw_spans`)


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


def _rotl(builder, x, r: int):
    return builder.or_(builder.shl(x, _c32(r)), builder.lshr(x, _c32(32 - r)))


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
def _sr_like(typingctx, x, key, p, g, like):
    """float32 x as an element of array `like`: itself, or bf16 bits rounded stochastically with
    16 noise bits of `sr_noise(bits(x), bits(p), bits(g), key)`."""
    if x != types.float32 or key != types.uint32 or not isinstance(like, types.Array):
        return None
    if p != types.float32 or g != types.float32:
        return None
    if _is_bf16(like.dtype):

        def codegen(context, builder, signature, args):
            x_, key_, p_, g_, _ = args
            bits = builder.bitcast(x_, _i32)
            mixed = builder.xor(builder.xor(bits, key_), _rotl(builder, builder.bitcast(p_, _i32), 11))
            mixed = builder.xor(mixed, _rotl(builder, builder.bitcast(g_, _i32), 22))
            noise = builder.and_(_lowbias32(builder, mixed), _c32(0xFFFF))
            return _finish_bf16(builder, bits, builder.add(bits, noise))

    else:

        def codegen(context, builder, signature, args):
            return args[0]

    return like.dtype(x, key, p, g, like), codegen


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
    """Per-step key of the bf16 second moment's stochastic rounding (count: the 1-based step):
    lowbias32((count * 0x9E3779B9 mod 2**32) ^ seed)."""
    x = ((count * 0x9E3779B9) ^ seed) & 0xFFFFFFFF
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & 0xFFFFFFFF  # lowbias32 on a python int: no numpy overhead
    x = ((x ^ (x >> 15)) * 0x846CA68B) & 0xFFFFFFFF
    return np.uint32(x ^ (x >> 16))


def sr_noise(v_bits: np.ndarray, p_bits: np.ndarray, g_bits: np.ndarray, key: np.uint32) -> np.ndarray:
    """The stochastic rounding's 32 random bits of one element (its low 16 are added to v's bits):
    lowbias32(bits(v) ^ key ^ rotl(bits(p), 11) ^ rotl(bits(g), 22)).

    They hash the element's own inputs: the unrounded float32 v, the weight p before the step and
    the scaled gradient g, with the step's key. So the rounding depends on no layout (a unit's flat
    buffer, a whole-model pytree and a row-split update round alike, and a plain optax
    transformation reproduces it: `slidejax.host_optimizer.scale_by_adam_bf16`), elements that
    differ in anything get independent noise, and identical elements stay identical. Over steps
    the noise is uniform, so the stored v is unbiased: E[bf16(v)] = v. (One hash round, the
    rotations keeping the three floats' sign and exponent fields apart: the bf16-moment pass
    must stay DRAM-bound on many cores, and 32-bit multiplies are its costliest operations.)
    """

    def rotl(x, r):
        x = np.asarray(x, np.uint32)
        return (x << np.uint32(r)) | (x >> np.uint32(32 - r))

    return lowbias32(np.asarray(v_bits, np.uint32) ^ np.uint32(key) ^ rotl(p_bits, 11) ^ rotl(g_bits, 22))


# Everything a call runs is written out in these two kernels (the helpers below are inlined),
# with the dtype handling in intrinsics: each numba function compiled per signature costs
# seconds, most of it numba's own passes, so fewer functions mean faster compiles (CI compiles
# from scratch).


@njit(inline="always", **_OPTS)
def _adamw_direction(g, m0, v0, hp):
    """Adam's step direction and the unrounded moments of one element, in float32, in
    optax.adamw's order of operations (see `adamw_spans`)."""
    c1, b1, c2, b2, bc1, bc2, eps_root, eps = hp[0], hp[1], hp[2], hp[3], hp[4], hp[5], hp[6], hp[7]
    mu = c1 * g + b1 * m0
    nu = c2 * (g * g) + b2 * v0
    return (mu / bc1) / (np.sqrt(nu / bc2 + eps_root) + eps), mu, nu


@njit(inline="always", **_OPTS)
def _adamw_weight(u, p0, hp, decay):
    """The new weight from Adam's direction `u`: decoupled weight decay, then the step."""
    u = u + hp[8] * p0 if decay else u
    return p0 + hp[9] * u


@njit(inline="always", **_OPTS)
def _adamw_element(g, p0, m0, v0, hp, decay):
    """One element's AdamW step: the new weight and the unrounded moments."""
    u, mu, nu = _adamw_direction(g, m0, v0, hp)
    return _adamw_weight(u, p0, hp, decay), mu, nu


@njit(inline="always", **_OPTS)
def _adamw_block(gl, pb, mb, vb, pob, mob, vob, ub, kb, jdb, hp, key, write_upload):
    """AdamW over one staged block: reads weights and moments from pb, mb, vb and writes them to
    pob, mob, vob (the same arrays in place), the copy to ub."""
    for j in range(kb):
        g = gl[j]
        p0 = pb[j]
        p, mu, nu = _adamw_element(g, p0, _to_f32(mb[j]), _to_f32(vb[j]), hp, j < jdb)
        pob[j] = p
        mob[j] = _rne_like(mu, mob)
        vob[j] = _sr_like(nu, key, p0, g, vob)
        if write_upload:
            ub[j] = _rne_like(p, ub)


@njit(parallel=True, **_OPTS)
def adamw_spans(spans, nthreads, decay_split, master, m, v, grad, zeros, upload, write_upload, hp, key,
                master_out, m_out, v_out, out_of_place):
    """Fused AdamW over `spans` (int64 [S, 3]: lo, hi, gstart) of a unit's flat buffers, in place,
    or with `out_of_place` into `master_out`, `m_out` and `v_out` (same shapes; the inputs are
    then only read: a speculative update that may be thrown away). In place, pass empty arrays
    for the outputs: the loop then writes to the very arrays it reads, which LLVM sees as one
    pointer, whereas outputs that merely may alias the inputs would make its run-time overlap
    check send the loop to its scalar version.

    Span elements lo + j read the gradient grad[gstart + j], or `zeros[j]` where gstart < 0 (a row
    with no gradient gets the full update with g = 0, exactly as optax with a dense zero). With
    gstart == ZERO_MOMENTS the span's moments are also known to be zero (a row that never had a
    gradient): the update is then the same for every element but its weight decay, computed
    once, and m and v, which it leaves at zero, are neither read nor written (8 of 24 B/param;
    in place only). Elements below `decay_split` get weight decay. `hp` is the float32 tuple
    (1-b1, b1, 1-b2, b2, bc1, bc2, eps_root, eps, wd, -lr, grad_scale) (a tuple is a value: no aliasing doubt keeps its loads in the loop), `key` the
    stochastic-rounding key of bf16 v. `nthreads` is unused here (`launch` sets the thread count).

    Per element, in optax.adamw's order of operations, with bc = 1 - b**count in float32:
    mu = (1-b1) g + b1 m; nu = (1-b2) g^2 + b2 v; u = (mu / bc1) / (sqrt(nu / bc2 + eps_root) + eps);
    u += wd p (decayed elements only); p = p + (-lr) u. (XLA sometimes rewrites optax's division
    by the scalar bc into a product with 1/bc: it does for a one-leaf pytree, not for several.)
    """
    scale = hp[10]
    for s in prange(spans.shape[0]):
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
        if gstart == ZERO_MOMENTS and not out_of_place:
            # optax's step with g = 0 and m = v = 0: mu = nu = +0 and the same direction for every
            # element (the same float32 operations, once); the moments stay +0, which is what
            # rounding +0 stores (bf16 v's stochastic noise stays below its 16 kept bits).
            zero = np.float32(0.0)
            u0 = _adamw_direction(_to_f32(zeros[0]) * scale, zero, zero, hp)[0]
            for j in range(k):
                p = _adamw_weight(u0, p_[j], hp, j < jd)
                p_[j] = p
                if write_upload:
                    u_[j] = _rne_like(p, u_)
            continue
        # The engine writes the upload copy over the gradient it reads (one buffer). LLVM's
        # vectorised loop guards against overlapping arrays at run time and falls back to the
        # scalar loop, 5x slower; so each block's gradient is first copied to a small local
        # buffer (L1-resident) and the update loop never reads an array it writes.
        gl = np.empty(_BLOCK, np.float32)
        for b0 in range(0, k, _BLOCK):
            kb = min(_BLOCK, k - b0)
            gb = g_[b0 : b0 + kb]
            for j in range(kb):
                gl[j] = _to_f32(gb[j]) * scale
            pb = p_[b0 : b0 + kb]
            mb = m_[b0 : b0 + kb]
            vb = v_[b0 : b0 + kb]
            ub = u_[b0 : b0 + kb] if write_upload else u_[:0]
            jdb = min(max(jd - b0, 0), kb)
            if out_of_place:
                pob = master_out[lo + b0 : lo + b0 + kb]
                mob = m_out[lo + b0 : lo + b0 + kb]
                vob = v_out[lo + b0 : lo + b0 + kb]
                _adamw_block(gl, pb, mb, vb, pob, mob, vob, ub, kb, jdb, hp, key, write_upload)
            else:  # the same arrays in and out: LLVM sees one pointer, no overlap check
                _adamw_block(gl, pb, mb, vb, pb, mb, vb, ub, kb, jdb, hp, key, write_upload)


@njit(parallel=True, **_OPTS)
def adamw_catch_up(spans, nthreads, decay_split, master, m, v, upload, write_upload, hps, keys):
    """Apply to rows the zero-gradient steps they skipped (a deferred step, see
    `HostAdamW.update(defer=True)`), exactly as `adamw_spans` would have run them one step at a
    time on a row without gradient: span (lo, hi, first, zero) runs the steps of `hps[first:]`
    (float32 [T, 11], `adamw_spans`'s `hp` of each step, the grad scale included) with the SR
    keys `keys[first:]`; with `zero` set its moments are known to be +0 and stay so (the
    moment-free path). One pass over the row's memory whatever the number of steps: each block
    stays in L1 while its steps run. The copy (`write_upload`) is written once, at the end.
    `nthreads` is unused here (`launch` sets the thread count)."""
    nsteps = hps.shape[0]
    zero32 = np.float32(0.0)
    for s in prange(spans.shape[0]):
        lo = spans[s, 0]
        hi = spans[s, 1]
        first = spans[s, 2]
        zero = spans[s, 3] != 0
        k = hi - lo
        jd = min(max(decay_split - lo, 0), k)
        p_ = master[lo:hi]
        m_ = m[lo:hi]
        v_ = v[lo:hi]
        u_ = upload[lo:hi] if write_upload else upload[:0]
        gl = np.empty(_BLOCK, np.float32)
        for b0 in range(0, k, _BLOCK):
            kb = min(_BLOCK, k - b0)
            pb = p_[b0 : b0 + kb]
            mb = m_[b0 : b0 + kb]
            vb = v_[b0 : b0 + kb]
            jdb = min(max(jd - b0, 0), kb)
            for t in range(first, nsteps):
                hp = (hps[t, 0], hps[t, 1], hps[t, 2], hps[t, 3], hps[t, 4], hps[t, 5], hps[t, 6],
                      hps[t, 7], hps[t, 8], hps[t, 9], hps[t, 10])
                g = zero32 * hp[10]  # the zero gradient, scaled as adamw_spans scales it
                if zero:
                    u0 = _adamw_direction(g, zero32, zero32, hp)[0]
                    for j in range(kb):
                        pb[j] = _adamw_weight(u0, pb[j], hp, j < jdb)
                else:
                    gl[:kb] = g
                    _adamw_block(gl, pb, mb, vb, pb, mb, vb, u_[:0], kb, jdb, hp, keys[t], False)
            if write_upload:
                ub = u_[b0 : b0 + kb]
                for j in range(kb):
                    ub[j] = _rne_like(pb[j], ub)


@njit(parallel=True, **_OPTS)
def store_params(src, nchunks, master, upload, write_master, write_upload):
    """master[:] = src and upload[:] = compute-dtype copy of src (round-to-nearest-even for bf16),
    in one pass over `nchunks` contiguous chunks (the generic optax path's write-back); without
    `write_master` only the copy is written (src is the master: a self-copy would make the loop's
    run-time overlap check fail, and the loop run scalar)."""
    n = src.shape[0]
    for t in prange(nchunks):
        lo = n * t // nchunks
        hi = n * (t + 1) // nchunks
        s_ = src[lo:hi]
        p_ = master[lo:hi] if write_master else master[:0]
        u_ = upload[lo:hi] if write_upload else upload[:0]
        for j in range(hi - lo):
            x = s_[j]
            if write_master:
                p_[j] = x
            if write_upload:
                u_[j] = _rne_like(x, u_)


_launch_lock = threading.Lock()
_needs_lock: bool | None = None
_thread_count = threading.local()


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


CHUNKS_PER_THREAD = 8  # dynamic scheduling granularity: enough to absorb a descheduled thread


def launch(kernel, nthreads: int, *args) -> None:
    """Run a parallel kernel (`adamw_spans`, `adamw_catch_up` or `store_params`) on `nthreads` threads.

    Sets the calling thread's numba thread count to `nthreads` (numba's setting is per calling
    thread, so concurrent callers do not disturb each other; it is left set, and only changed when
    it differs: setting it costs tens of microseconds) and the parallel chunk size so that threads
    take about `CHUNKS_PER_THREAD` chunks each, dynamically; runs under a lock when the threading
    layer is 'workqueue'. `kernel` is called as kernel(args[0], n, *args[1:]) where n is the thread
    count for the AdamW kernels and the chunk count for `store_params`.
    """
    nthreads = max(1, min(int(nthreads), max_threads()))
    serialised = _serialised()
    if getattr(_thread_count, "n", None) != nthreads:
        numba.set_num_threads(nthreads)
        _thread_count.n = nthreads
    if kernel is store_params:
        n = max(1, min(nthreads * CHUNKS_PER_THREAD, args[0].shape[0] >> 14))
        chunk = 1
    else:
        n = nthreads
        chunk = max(1, args[0].shape[0] // (nthreads * CHUNKS_PER_THREAD))
    previous = numba.set_parallel_chunksize(chunk)  # per calling thread; restored for other kernels
    try:
        if serialised:
            with _launch_lock:
                kernel(args[0], n, *args[1:])
        else:
            kernel(args[0], n, *args[1:])
    finally:
        numba.set_parallel_chunksize(previous)
