"""Host optimizer: the fused numba AdamW and the generic optax path against optax itself."""

import copy
import threading

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from slidejax import fused_adamw as fa
from slidejax.errors import SlidejaxError
from slidejax.host_optimizer import (
    HostAdamW,
    HostOptax,
    HostOptimizer,
    HostOptState,
    aligned_zeros,
    decay_mask,
    default_threads,
    make_host_optimizer,
)

BF16 = ml_dtypes.bfloat16
CPU = jax.devices("cpu")[0]


def _rand(rng, shape, dtype=np.float32, scale=1.0):
    """Fresh random data (never zeros) in a 64-byte aligned buffer."""
    out = aligned_zeros(shape, dtype)
    out[...] = (rng.standard_normal(shape) * scale).astype(dtype)
    return out


def _bits(a):
    a = np.asarray(a)
    return a.view(np.uint16) if a.dtype == BF16 else a.view(np.uint32)


def _assert_bitwise(actual, expected, what):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype, what
    diff = np.flatnonzero(_bits(actual).ravel() != _bits(expected).ravel())
    assert diff.size == 0, f"{what}: {diff.size} elements differ, first at {diff[:5]}"


def _split_tree(flat, split):
    return {"decayed": jnp.asarray(flat[:split]), "plain": jnp.asarray(flat[split:])}


MASK = {"decayed": True, "plain": False}


def _run_optax(tx, master0, grads, scales, split, jit):
    """Reference: optax on a two-leaf pytree ([0, split) decayed, the rest not)."""
    params = _split_tree(master0, split)
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    for g, s in zip(grads, scales):
        gf = g.astype(np.float32) * np.float32(s)
        updates, state = update(_split_tree(gf, split), state, params)
        params = optax.apply_updates(params, updates)
    flat = np.concatenate([np.asarray(params["decayed"]), np.asarray(params["plain"])])
    adam = state[0]
    flat_m = np.concatenate([np.asarray(adam.mu["decayed"]), np.asarray(adam.mu["plain"])])
    flat_v = np.concatenate([np.asarray(adam.nu["decayed"]), np.asarray(adam.nu["plain"])])
    return flat, flat_m, flat_v


def _run_host(opt, master0, grads, scales, split, upload_dtype):
    master = aligned_zeros(master0.shape)
    master[:] = master0
    upload = None if upload_dtype is None else aligned_zeros(master0.shape, upload_dtype)
    state = opt.init(master.shape)
    for g, s in zip(grads, scales):
        opt.update(state, master, g, upload, decay_split=split, grad_scale=s)
    return master, state, upload


def _row_sparse_grad(rng, rows, vocab, hidden):
    """A random bf16 gradient of `rows` of a [vocab, hidden] table: (row values, grad_index, the
    same gradient dense)."""
    values = _rand(rng, (len(rows), hidden), BF16)
    index = np.full(vocab, -1, np.int32)
    index[rows] = rng.permutation(len(rows))
    dense = aligned_zeros((vocab, hidden), BF16)
    dense[index >= 0] = values[index[index >= 0]]
    return values, index, dense


# Odd length, not a multiple of any block or vector width; 3 threads give unequal, aligned blocks.
N, SPLIT, STEPS = 70001, 41003, 12


@pytest.mark.parametrize("grad_dtype,upload_dtype", [(BF16, BF16), (np.float32, np.float32), (BF16, None)])
def test_fused_equals_optax_adamw_bitwise(grad_dtype, upload_dtype):
    """Constant learning rate, un-jitted optax on a multi-leaf pytree: the same float32
    operations, so the same bits. (On a one-leaf pytree XLA turns optax's division by the bias
    correction into a product with its reciprocal, which rounds differently.)"""
    rng = np.random.default_rng(0)
    master0 = _rand(rng, N)
    grads = [_rand(rng, N, grad_dtype) for _ in range(STEPS)]
    scales = list(rng.uniform(0.1, 2.0, STEPS))
    opt = HostAdamW(3e-2, b1=0.85, b2=0.99, eps=1e-7, weight_decay=0.1, threads=3)
    master, state, upload = _run_host(opt, master0, grads, scales, SPLIT, upload_dtype)
    ref, ref_m, ref_v = _run_optax(opt.to_optax(mask=MASK), master0, grads, scales, SPLIT, jit=False)
    assert np.abs(ref - master0).max() > 0.1  # the steps moved the weights far beyond rounding
    _assert_bitwise(master, ref, "master")
    _assert_bitwise(state.mu, ref_m, "mu")
    _assert_bitwise(state.nu, ref_v, "nu")
    assert state.count == STEPS
    if upload is not None:
        _assert_bitwise(upload, master.astype(upload_dtype), "upload")


@pytest.mark.parametrize("dtype,moment_dtype", [(BF16, np.float32), (np.float32, np.float32), (BF16, BF16)])
def test_upload_written_over_its_own_gradient_equals_separate_buffers(dtype, moment_dtype):
    """The engine writes each unit's upload copy over the gradient it reads (one pinned buffer):
    every element's gradient must be read before its copy overwrites it, across the kernel's
    staging blocks and the decay split, giving the bits of separate buffers (themselves checked
    against optax above)."""
    rng = np.random.default_rng(1)
    master0 = _rand(rng, N)
    opt = HostAdamW(3e-2, b1=0.85, b2=0.99, weight_decay=0.1, moment_dtype=moment_dtype, threads=3)
    split = fa._BLOCK + 123  # inside the second staging block of the first span
    sep_master, sep_upload, sep_state = master0.copy(), aligned_zeros(N, dtype), opt.init(N)
    one_master, one_state = master0.copy(), opt.init(N)
    for step in range(3):
        grad = _rand(rng, N, dtype, scale=0.5)
        opt.update(sep_state, sep_master, grad.copy(), sep_upload, decay_split=split, grad_scale=0.7)
        shared = grad.copy()
        opt.update(one_state, one_master, shared, shared, decay_split=split, grad_scale=0.7)
        _assert_bitwise(one_master, sep_master, f"master, step {step}")
        _assert_bitwise(one_state.mu, sep_state.mu, f"mu, step {step}")
        _assert_bitwise(one_state.nu, sep_state.nu, f"nu, step {step}")
        _assert_bitwise(shared, sep_upload, f"upload, step {step}")
    assert not np.array_equal(_bits(shared), _bits(grad))  # the copy did replace the gradient


@pytest.mark.parametrize("moment_dtype", [np.float32, BF16])
def test_update_into_other_buffers_equals_in_place_and_leaves_inputs(moment_dtype):
    """`into=`: a speculative step reads master and state and writes the step to other buffers,
    bitwise what the in-place step leaves (weights, moments, count, upload), inputs untouched;
    alternating the two buffer sets (the engine's double buffering) stays on the in-place path."""
    rng = np.random.default_rng(2)
    master0 = _rand(rng, N)
    opt = HostAdamW(3e-2, b1=0.85, b2=0.99, weight_decay=0.1, moment_dtype=moment_dtype, threads=3)
    split = fa._BLOCK + 123
    ref_master, ref_state, ref_up = master0.copy(), opt.init(N), aligned_zeros(N, BF16)
    cur = (master0.copy(), opt.init(N))
    spare = (aligned_zeros(N), opt.init(N))
    up = aligned_zeros(N, BF16)
    for step in range(4):
        grad = _rand(rng, N, BF16, scale=0.5)
        opt.update(ref_state, ref_master, grad, ref_up, decay_split=split, grad_scale=0.7)
        before = [a.copy() for a in (cur[0], cur[1].mu, cur[1].nu)]
        opt.update(cur[1], cur[0], grad, up, decay_split=split, grad_scale=0.7, into=spare)
        for a, b, what in zip((cur[0], cur[1].mu, cur[1].nu), before, ("master", "mu", "nu")):
            _assert_bitwise(a, b, f"input {what} unchanged, step {step}")
        assert cur[1].count == step and spare[1].count == step + 1
        cur, spare = spare, cur
        _assert_bitwise(cur[0], ref_master, f"master, step {step}")
        _assert_bitwise(cur[1].mu, ref_state.mu, f"mu, step {step}")
        _assert_bitwise(cur[1].nu, ref_state.nu, f"nu, step {step}")
        _assert_bitwise(up, ref_up, f"upload, step {step}")
    with pytest.raises(ValueError, match="another state"):
        opt.update(cur[1], cur[0], grad, up, decay_split=split, into=(spare[0], cur[1]))
    with pytest.raises(ValueError, match="whole-unit"):
        opt.update(cur[1], cur[0], grad[:7], up, decay_split=split, rows=np.arange(1), into=spare)


def test_fused_equals_jitted_optax_with_schedule_and_eps_root():
    """Schedule and jitted optax (XLA fuses into FMAs): equal to float32 rounding over 12 steps."""
    rng = np.random.default_rng(1)
    master0 = _rand(rng, N)
    grads = [_rand(rng, N, BF16) for _ in range(STEPS)]
    scales = [0.5] * STEPS
    schedule = optax.warmup_cosine_decay_schedule(0.0, 2e-2, 4, 30)
    opt = HostAdamW(schedule, eps_root=1e-9, weight_decay=0.05, threads=2)
    master, state, upload = _run_host(opt, master0, grads, scales, SPLIT, BF16)
    ref, ref_m, ref_v = _run_optax(opt.to_optax(mask=MASK), master0, grads, scales, SPLIT, jit=True)
    assert np.abs(ref - master0).max() > 0.05
    np.testing.assert_allclose(master, ref, rtol=2e-6, atol=2e-7)
    np.testing.assert_allclose(state.mu, ref_m, rtol=1e-5, atol=1e-7)  # mu ~ 0.1, cancels
    np.testing.assert_allclose(state.nu, ref_v, rtol=1e-5, atol=1e-10)
    _assert_bitwise(upload, master.astype(BF16), "upload")


def test_bias_correction_and_learning_rate_match_xla():
    schedule = optax.linear_schedule(1e-2, 1e-4, 5000)
    opt = HostAdamW(schedule, b1=0.9, b2=0.999)
    bias_correction = jax.jit(lambda b, c: 1 - b**c, static_argnums=0)  # optax's, jitted as there
    for c in list(range(40)) + [999, 4321]:
        hp = opt._hyper(c)
        assert hp[4] == np.asarray(bias_correction(0.9, jnp.int32(c + 1))), c
        assert hp[5] == np.asarray(bias_correction(0.999, jnp.int32(c + 1))), c
        assert hp[9] == np.asarray(jax.jit(lambda k: jnp.asarray(-1 * schedule(k), jnp.float32))(jnp.int32(c)))


def _special_f32():
    """Rounding ties (even/odd), NaNs with payloads in either half, +-inf, overflow, denormals, -0."""
    bits = np.array(
        [
            0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0xBF818000,  # ties and near-ties
            0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FBFFFFF, 0x7FFFFFFF,  # NaNs
            0x7F800000, 0xFF800000, 0x7F7FFFFF, 0x7F7F8000, 0xFF7FFFFF,  # inf, overflow to inf
            0x00000001, 0x00008000, 0x00018000, 0x807FFFFF, 0x80000000, 0x00000000,  # tiny, -0
        ],
        np.uint32,
    )
    rng = np.random.default_rng(2)
    random = rng.integers(0, 2**32, 4096, dtype=np.uint64).astype(np.uint32)
    return np.concatenate([bits, random]).view(np.float32)


def test_bf16_copy_is_round_to_nearest_even_like_ml_dtypes():
    src = _special_f32()
    src.flags.writeable = False
    master = aligned_zeros(src.size)
    upload = aligned_zeros(src.size, BF16)
    fa.launch(fa.store_params, 3, src, master, upload.view(np.uint16), True, True)
    _assert_bitwise(master, src, "master")
    with np.errstate(invalid="ignore"):  # numpy warns when casting NaN
        expected = src.astype(BF16)
    _assert_bitwise(upload, expected, "upload")


def test_fused_upload_of_non_finite_weights():
    """A NaN/inf gradient poisons its weights; the bf16 copy still equals ml_dtypes' cast."""
    rng = np.random.default_rng(3)
    n = 1000
    master = _rand(rng, n)
    grad = _rand(rng, n, BF16)
    grad[::7] = np.nan
    grad[3::11] = np.inf
    upload = aligned_zeros(n, BF16)
    opt = HostAdamW(1e-2, threads=2)
    opt.update(opt.init(n), master, grad, upload, decay_split=n // 2)
    assert np.isnan(master[::7]).all() and np.isfinite(master[1::7]).any()
    _assert_bitwise(upload, master.astype(BF16), "upload")


def test_bf16_moments_equal_their_optax_reference_bitwise():
    rng = np.random.default_rng(4)
    master0 = _rand(rng, N)
    grads = [_rand(rng, N, BF16, scale=1e-2) for _ in range(STEPS)]
    scales = list(rng.uniform(0.5, 2.0, STEPS))
    opt = HostAdamW(1e-2, weight_decay=0.1, moment_dtype=BF16, seed=7, threads=3)
    master, state, upload = _run_host(opt, master0, grads, scales, SPLIT, BF16)
    ref, ref_m, ref_v = _run_optax(opt.to_optax(mask=MASK), master0, grads, scales, SPLIT, jit=False)
    assert state.mu.dtype == BF16 and state.nu.dtype == BF16
    assert np.abs(ref - master0).max() > 0.05
    _assert_bitwise(master, ref, "master")
    _assert_bitwise(state.mu, ref_m, "mu")
    _assert_bitwise(state.nu, ref_v, "nu")
    _assert_bitwise(upload, master.astype(BF16), "upload")
    # ...and close to optax's own float32 AdamW: bf16 moments are a storage choice, not a new method.
    ref32, _, _ = _run_optax(HostAdamW(1e-2, weight_decay=0.1).to_optax(mask=MASK), master0, grads, scales, SPLIT, False)
    np.testing.assert_allclose(master - master0, ref32 - master0, atol=2e-3)


def test_bf16_second_moment_does_not_stall():
    """g^2 << v: float32 v decays as b2^t. Round-to-nearest bf16 would keep v where it started
    (each step moves it by ~1e-3, under half a bf16 ulp); stochastic rounding keeps it unbiased."""
    rng = np.random.default_rng(5)
    n, steps, b2 = 8192, 300, 0.999
    nu0 = rng.uniform(0.5, 2.0, n).astype(BF16)
    grads = [_rand(rng, n, scale=3e-2) for _ in range(steps)]
    runs = {}
    for dtype in (np.float32, BF16):
        opt = HostAdamW(0.0, b2=b2, weight_decay=0.0, moment_dtype=dtype, threads=1)
        state = opt.init(n)
        state.nu[:] = nu0
        master = _rand(rng, n)
        for g in grads:
            opt.update(state, master, g, None, decay_split=0)
        runs[dtype] = state.nu.astype(np.float32)
    ratio = runs[BF16] / runs[np.float32]
    assert np.unique(runs[np.float32]).size > n // 2  # distinct elements, so independent noise
    # The same recurrence rounded to nearest: stuck at the start, 1/b2^300 = 1.35x too large.
    rne = nu0.copy()
    for g in grads:
        rne = ((1 - b2) * g * g + b2 * rne.astype(np.float32)).astype(BF16)
    assert np.mean(rne.astype(np.float32) / runs[np.float32]) > 1.3
    # Stochastic rounding: unbiased on average; per element a few % of noise (2**-8 rounding
    # steps, remembered over ~1/(1-b2) steps), far from the stall.
    assert abs(ratio.mean() - 1) < 5e-3
    assert 0.01 < ratio.std() < 0.1


def test_bf16_second_moment_rounding_matches_its_numpy_spec():
    """One step of the kernel's bf16 v against `sr_noise` and the rounding written in numpy."""
    rng = np.random.default_rng(12)
    n, b2, scale = 5000, 0.95, 0.8
    opt = HostAdamW(1e-2, b2=b2, moment_dtype=BF16, seed=3, threads=2)
    state = opt.init(n)
    state.nu[:] = rng.uniform(0, 1, n).astype(BF16)
    state.count = 41
    nu0, master = state.nu.copy(), _rand(rng, n)
    p0, grad = master.copy(), _rand(rng, n, BF16)
    opt.update(state, master, grad, None, decay_split=n, grad_scale=scale)
    g = grad.astype(np.float32) * np.float32(scale)
    v = np.float32(1 - b2) * (g * g) + np.float32(b2) * nu0.astype(np.float32)
    noise = fa.sr_noise(v.view(np.uint32), p0.view(np.uint32), g.view(np.uint32), fa.sr_key(42, 3))
    expected = ((v.view(np.uint32) + (noise & 0xFFFF)) >> 16).astype(np.uint16)
    _assert_bitwise(state.nu, expected.view(BF16), "nu")
    rounded_up = expected != v.astype(BF16).view(np.uint16)
    assert 0.2 < rounded_up.mean() < 0.3  # E = E[min(frac, 1 - frac)] = 1/4: not round-to-nearest


@pytest.mark.parametrize("moment_dtype", [np.float32, BF16])
def test_row_sparse_and_row_split_updates_equal_the_dense_update(moment_dtype):
    rng = np.random.default_rng(6)
    vocab, hidden, used, steps = 53, 37, 11, 3
    split = 20 * hidden + 5  # weight decay ends inside a row
    master0 = _rand(rng, (vocab, hidden))
    batches = []
    for _ in range(steps):
        grad_rows, index, dense = _row_sparse_grad(rng, rng.choice(vocab, used, replace=False), vocab, hidden)
        first = rng.choice(vocab, 17, replace=False).astype(np.int32)  # some with gradient, some not
        batches.append((grad_rows, index, dense, first))

    opt = HostAdamW(2e-2, weight_decay=0.1, moment_dtype=moment_dtype, threads=3)

    def run(mode):
        master = master0.copy()
        upload = aligned_zeros((vocab, hidden), BF16)
        state = opt.init(master.shape)
        for grad_rows, index, dense, first in batches:
            kw = dict(decay_split=split, grad_scale=0.7)
            if mode == "dense":
                opt.update(state, master, dense, upload, **kw)
            elif mode == "sparse":
                opt.update(state, master, grad_rows, upload, grad_index=index, **kw)
            elif mode == "split":
                count = state.count
                opt.update(state, master, grad_rows, upload, rows=first, grad_index=index, **kw)
                assert state.count == count and state.rows_done.sum() == first.size  # mid-step
                opt.update(state, master, grad_rows, upload, grad_index=index, **kw)  # the rest
            elif mode == "split_explicit":
                rest = np.setdiff1d(np.arange(vocab), first).astype(np.int32)
                opt.update(state, master, grad_rows, upload, rows=first, grad_index=index, **kw)
                opt.update(state, master, grad_rows, upload, rows=rest[::-1].copy(), grad_index=index, **kw)
            elif mode == "dense_split":
                opt.update(state, master, dense, upload, rows=first, **kw)
                opt.update(state, master, dense, upload, **kw)
        return master, state, upload

    m_dense, s_dense, u_dense = run("dense")
    assert s_dense.count == steps
    for mode in ("sparse", "split", "split_explicit", "dense_split"):
        master, state, upload = run(mode)
        assert state.count == steps and state.rows_done is None, mode
        _assert_bitwise(master, m_dense, mode)
        _assert_bitwise(state.mu, s_dense.mu, mode)
        _assert_bitwise(state.nu, s_dense.nu, mode)
        _assert_bitwise(upload, u_dense, mode)
    # The dense update is optax's (rows without gradient still decay their moments and weights).
    mask = {"decayed": True, "plain": False}
    grads = [b[2].reshape(-1) for b in batches]
    ref, _, _ = _run_optax(opt.to_optax(mask=mask), master0.reshape(-1), grads, [0.7] * steps, split, jit=False)
    if moment_dtype == np.float32:
        _assert_bitwise(m_dense.reshape(-1), ref, "dense vs optax")
    untouched = np.all(np.stack([b[1] for b in batches]) < 0, axis=0)
    assert untouched.any() and not np.array_equal(m_dense[untouched], master0[untouched])


@pytest.mark.parametrize("moment_dtype", [np.float32, BF16])
@pytest.mark.parametrize("eps,eps_root", [(1e-8, 0.0), (0.0, 0.0), (0.0, 1e-12)])
def test_rows_that_never_had_a_gradient_skip_their_moments_exactly(moment_dtype, eps, eps_root):
    """Rows whose moments are still +0 take the kernel's moment-free path: the same bits as the
    dense update (eps = 0 too, where that step is 0/0 = NaN), moments left at +0; the set of such
    rows shrinks as rows get gradients, and is re-derived after a checkpoint load, where a -0
    moment does not count as zero (a step would turn it into +0)."""
    rng = np.random.default_rng()
    vocab, hidden = 41, 19
    opt = HostAdamW(2e-2, eps=eps, eps_root=eps_root, weight_decay=0.1, moment_dtype=moment_dtype, threads=2)
    master0 = _rand(rng, (vocab, hidden))
    sparse_m, dense_m = master0.copy(), master0.copy()
    sparse_s, dense_s = opt.init(master0.shape), opt.init(master0.shape)
    sparse_u, dense_u = aligned_zeros((vocab, hidden), BF16), aligned_zeros((vocab, hidden), BF16)
    split = 7 * hidden + 3
    ever = np.zeros(vocab, bool)
    for step in range(4):
        if step == 2:  # a checkpoint round trip, one moment of a never-touched row set to -0
            row = int(np.flatnonzero(~ever)[0])
            for s_ in (sparse_s, dense_s):
                s_.mu.reshape(vocab, hidden)[row, 3] = -0.0
            sparse_s.load_state_dict(copy.deepcopy(sparse_s.state_dict()))
            assert sparse_s.zero_rows is None
        used = rng.choice(vocab, 5, replace=False)
        ever[used] = True
        grad_rows = _rand(rng, (5, hidden), BF16)
        index = np.full(vocab, -1, np.int32)
        index[used] = np.arange(5)
        dense = aligned_zeros((vocab, hidden), BF16)
        dense[used] = grad_rows
        opt.update(sparse_s, sparse_m, grad_rows, sparse_u, grad_index=index, decay_split=split, grad_scale=0.5)
        opt.update(dense_s, dense_m, dense, dense_u, decay_split=split, grad_scale=0.5)
        _assert_bitwise(sparse_m, dense_m, f"master, step {step}")
        _assert_bitwise(sparse_s.mu, dense_s.mu, f"mu, step {step}")
        _assert_bitwise(sparse_s.nu, dense_s.nu, f"nu, step {step}")
        _assert_bitwise(sparse_u, dense_u, f"upload, step {step}")
        expect = ~ever
        if step >= 2:
            expect[row] = False
        np.testing.assert_array_equal(sparse_s.zero_rows, expect)
    assert expect.any() and (np.isnan(sparse_m[expect]).all() if eps == eps_root == 0.0
                             else np.isfinite(sparse_m).all())
    assert not _bits(sparse_s.mu.reshape(vocab, hidden)[expect]).any()


@pytest.mark.parametrize("scale", [float("nan"), float("inf")])
def test_rows_without_a_gradient_under_a_non_finite_scale_equal_the_dense_update(scale):
    """A nan or inf gradient scale (clipping after a non-finite global norm) turns the zero
    gradient of rows that never had one into nan, as the dense update does: their moments become
    nan too, not kept at zero by the zero-moment shortcut; and a later finite step stays equal."""
    rng = np.random.default_rng()
    rows, cols = 8, 16
    opt = HostAdamW(1e-2, weight_decay=0.1, threads=1)
    start = rng.standard_normal((rows, cols)).astype(np.float32)
    sparse, dense = start.copy(), start.copy()
    s_state, d_state = opt.init(sparse), opt.init(dense)
    for step_scale in (0.5, scale, 0.25):
        touched = rng.choice(rows, 2, replace=False)
        values = rng.standard_normal((2, cols)).astype(np.float32)
        index = np.full(rows, -1, np.int32)
        index[touched] = [0, 1]
        full = np.zeros((rows, cols), np.float32)
        full[touched] = values
        opt.update(s_state, sparse, values, None, decay_split=rows * cols, grad_scale=step_scale, grad_index=index)
        opt.update(d_state, dense, full, None, decay_split=rows * cols, grad_scale=step_scale)
        for a, b in ((sparse, dense), (s_state.mu, d_state.mu), (s_state.nu, d_state.nu)):
            assert a.tobytes() == b.tobytes()
    assert not np.isfinite(s_state.mu).any()  # every row went through the non-finite step


@pytest.mark.parametrize("moment_dtype,weight_decay", [(np.float32, 0.1), (BF16, 0.1), (np.float32, 0.0)])
def test_deferred_rows_equal_the_dense_update_bitwise(moment_dtype, weight_decay):
    """`update(defer=True)` updates only the rows with a gradient; the others replay their owed
    zero-gradient steps when next updated (rows first, the rest, a dense step) or in `catch_up`:
    after every step the caught-up table, its moments and its bf16 copy equal the dense update's
    bit for bit, under a learning-rate schedule (every owed step has its own hyperparameters),
    with a non-finite scale (nothing deferred: every row becomes nan at once, as densely) in
    another run. Rows behind keep their old weights until caught up; a checkpoint needs them
    current."""
    rng = np.random.default_rng()
    vocab, hidden, used, steps = 61, 45, 6, 9
    split = 30 * hidden + 7  # weight decay ends inside a row
    sched = optax.warmup_cosine_decay_schedule(0.0, 3e-2, 3, steps)
    opt = HostAdamW(sched, weight_decay=weight_decay, moment_dtype=moment_dtype, threads=3)
    master0 = _rand(rng, (vocab, hidden))
    dense_m, lazy_m = master0.copy(), master0.copy()
    dense_s, lazy_s = opt.init(master0.shape), opt.init(master0.shape)
    dense_u, lazy_u = aligned_zeros((vocab, hidden), BF16), aligned_zeros((vocab, hidden), BF16)
    hot = rng.choice(vocab, vocab // 2, replace=False)  # half the rows never get a gradient
    for step in range(steps):
        grad_rows, index, dense = _row_sparse_grad(rng, rng.choice(hot, used, replace=False), vocab, hidden)
        kw = dict(decay_split=split, grad_scale=float(rng.uniform(0.2, 1.0)))
        opt.update(dense_s, dense_m, dense, dense_u, **kw)
        before = lazy_m.copy()
        if step % 3 == 1:  # the next batch's rows first (with and without gradients), then the rest
            first = rng.choice(vocab, 9, replace=False)
            opt.update(lazy_s, lazy_m, grad_rows, lazy_u, rows=first, grad_index=index, **kw)
            opt.update(lazy_s, lazy_m, grad_rows, lazy_u, grad_index=index, defer=True, **kw)
        elif step == 5:  # an ordinary sparse step catches every row up on its way
            opt.update(lazy_s, lazy_m, grad_rows, lazy_u, grad_index=index, **kw)
            assert lazy_s.row_count is None and lazy_s.owed_hp is None
        else:
            opt.update(lazy_s, lazy_m, grad_rows, lazy_u, grad_index=index, defer=True, **kw)
        assert lazy_s.count == dense_s.count == step + 1 and lazy_s.rows_done is None
        behind = lazy_s.behind()
        if step != 5:
            assert behind.size and not (index[behind] >= 0).any()
            np.testing.assert_array_equal(lazy_m[behind], before[behind])  # not touched yet
            assert lazy_s.owed_hp.shape[0] == lazy_s.count - lazy_s.owed_base
            with pytest.raises(ValueError, match="deferred"):
                lazy_s.state_dict()
        current = np.setdiff1d(np.arange(vocab), behind)
        _assert_bitwise(lazy_m[current], dense_m[current], f"rows with their steps, step {step}")
        # Catch up a few rows (duplicates and current rows too), then every row on a copy.
        some = rng.choice(vocab, 12)
        opt.catch_up(lazy_s, lazy_m, lazy_u, decay_split=split, rows=some)
        _assert_bitwise(lazy_m[some], dense_m[some], f"caught-up rows, step {step}")
        m, st, u = lazy_m.copy(), copy.deepcopy(lazy_s), lazy_u.copy()
        st.mu, st.nu = st.mu.copy(), st.nu.copy()
        opt.catch_up(st, m, u, decay_split=split)
        assert st.row_count is None and st.owed_hp is None and st.count == step + 1
        for a, b, what in ((m, dense_m, "master"), (st.mu, dense_s.mu, "mu"), (st.nu, dense_s.nu, "nu"),
                           (u, dense_u, "upload")):
            _assert_bitwise(a, b, f"{what} after catch_up, step {step}")
        tree = st.state_dict()
        assert int(tree["count"]) == step + 1
    never = np.setdiff1d(np.arange(vocab), hot)
    assert not np.array_equal(dense_m[never], master0[never]) or weight_decay == 0.0

    # A non-finite scale defers nothing: the dense and the deferred run agree (all nan) after it.
    for scale in (float("nan"), 0.5):
        grad_rows, index, dense = _row_sparse_grad(rng, np.arange(used), vocab, hidden)
        opt.update(dense_s, dense_m, dense, dense_u, decay_split=split, grad_scale=scale)
        opt.update(lazy_s, lazy_m, grad_rows, lazy_u, grad_index=index, defer=True, decay_split=split,
                   grad_scale=scale)
        if scale != scale:
            assert lazy_s.row_count is None and np.isnan(lazy_m).all()
    opt.catch_up(lazy_s, lazy_m, lazy_u, decay_split=split)
    _assert_bitwise(lazy_m, dense_m, "after the non-finite step")
    _assert_bitwise(lazy_u, dense_u, "upload after the non-finite step")


def test_deferred_rows_reject_misuse():
    rng = np.random.default_rng()
    opt = HostAdamW(1e-2, threads=2)
    master = _rand(rng, (8, 16))
    grad = _rand(rng, (8, 16), BF16)
    state = opt.init(master)
    with pytest.raises(ValueError, match="defer"):
        opt.update(state, master, grad, None, decay_split=0, defer=True)  # a dense gradient
    with pytest.raises(ValueError, match="defer"):
        opt.update(state, master, grad[:2], None, decay_split=0, grad_index=np.full(8, -1, np.int32),
                   rows=np.array([1]), defer=True)
    with pytest.raises(ValueError, match="grad_index"):
        opt.update(state, master, grad[:2], None, decay_split=0, grad_index=np.zeros(7, np.int32), defer=True)
    index = np.full(8, -1, np.int32)
    index[2] = 0
    opt.update(state, master, grad[:1], None, decay_split=0, grad_index=index, defer=True)
    assert list(state.behind()) == [0, 1, 3, 4, 5, 6, 7]
    with pytest.raises(ValueError, match="current"):
        opt.update(state, master, grad, None, decay_split=0, into=(master.copy(), opt.init(master)))
    with pytest.raises(ValueError, match="rows"):
        opt.catch_up(state, master, None, decay_split=0, rows=np.array([-1]))
    for _ in range(3):  # row 2 keeps its gradient; the others owe 4 steps
        opt.update(state, master, grad[:1], None, decay_split=0, grad_index=index, defer=True)
    opt.catch_up(state, master, None, decay_split=0, rows=np.array([0]), max_lag=4)
    assert state.row_count[0] == 0  # owes 4 steps: not more than 4
    opt.catch_up(state, master, None, decay_split=0, rows=np.array([0, 1]), max_lag=3)
    assert list(state.row_count[:3]) == [4, 4, 4] and list(state.behind()) == [3, 4, 5, 6, 7]
    # A dense step catches every row up first, and leaves nothing owed.
    before = master.copy()
    opt.update(state, master, grad, None, decay_split=0)
    assert state.row_count is None and state.count == 5 and not np.array_equal(master, before)


def test_row_split_counts_one_step_and_rejects_misuse():
    rng = np.random.default_rng(7)
    vocab, hidden = 20, 16
    opt = HostAdamW(1e-2, threads=2)
    master = _rand(rng, (vocab, hidden))
    grad = _rand(rng, (vocab, hidden), BF16)
    state = opt.init(master)
    opt.update(state, master, grad, None, decay_split=0, rows=np.array([3, 1], np.int32))
    assert state.count == 0
    with pytest.raises(ValueError, match="already updated"):
        opt.update(state, master, grad, None, decay_split=0, rows=np.array([1], np.int32))
    with pytest.raises(ValueError, match="in progress"):
        state.state_dict()
    opt.update(state, master, grad, None, decay_split=0, rows=np.setdiff1d(np.arange(vocab), [1, 3]))
    assert state.count == 1 and state.rows_done is None
    with pytest.raises(ValueError, match="duplicates"):
        opt.update(state, master, grad, None, decay_split=0, rows=np.array([2, 2], np.int32))
    with pytest.raises(ValueError, match="grad_index"):
        opt.update(state, master, grad[:4], None, decay_split=0, grad_index=np.full(vocab, 4, np.int32))
    flat = opt.init(10)
    with pytest.raises(ValueError, match="2-D"):
        opt.update(flat, _rand(rng, 10), _rand(rng, 10), None, decay_split=0, rows=np.array([0]))
    with pytest.raises(ValueError, match="dtype"):
        opt.update(flat, _rand(rng, 10), _rand(rng, 10, np.float16), None, decay_split=0)
    with pytest.raises(ValueError, match="elements"):
        opt.update(flat, _rand(rng, 10), _rand(rng, 11), None, decay_split=0)


@pytest.mark.parametrize("moment_dtype", [np.float32, BF16])
def test_fused_checkpoint_roundtrip_resumes_bitwise(moment_dtype):
    rng = np.random.default_rng(8)
    n = 3001
    opt = HostAdamW(optax.linear_schedule(1e-2, 1e-3, 10), moment_dtype=moment_dtype, threads=2)
    master = _rand(rng, n)
    grads = [_rand(rng, n, BF16) for _ in range(6)]
    state = opt.init(n)
    for g in grads[:3]:
        opt.update(state, master, g, None, decay_split=n)
    saved = copy.deepcopy(state.state_dict())
    saved_master = master.copy()
    for g in grads[3:]:
        opt.update(state, master, g, None, decay_split=n)
    resumed = opt.init(n)
    resumed.load_state_dict(saved)
    assert resumed.count == 3
    for g in grads[3:]:
        opt.update(resumed, saved_master, g, None, decay_split=n)
    _assert_bitwise(saved_master, master, "master")
    _assert_bitwise(resumed.mu, state.mu, "mu")
    _assert_bitwise(resumed.nu, state.nu, "nu")


# ---------------------------------------------------------------------------------------------
# Generic optax path
# ---------------------------------------------------------------------------------------------

# A unit whose flat order (norm, w, b) differs from its pytree's leaf order (b, norm, w).
UNIT = {"norm": (0, (3,)), "w": (3, (7, 5)), "b": (38, (5,))}
UNIT_N = 43


def _tree_of(flat):
    return {k: flat[o : o + int(np.prod(s))].reshape(s) for k, (o, s) in UNIT.items()}


def _generic_tx():
    schedule = optax.cosine_decay_schedule(1e-2, 20)
    return optax.chain(
        optax.scale_by_adam(b1=0.8),
        optax.masked(optax.add_decayed_weights(0.05), decay_mask),
        optax.masked(optax.scale(0.5), lambda p: {"norm": True, "w": False, "b": False}),
        optax.scale_by_learning_rate(schedule),
    )


@pytest.mark.parametrize("upload_dtype", [BF16, np.float32])
def test_host_optax_equals_optax_on_the_pytree(upload_dtype):
    rng = np.random.default_rng(9)
    tx = _generic_tx()
    opt = HostOptax(tx, threads=2)
    master = _rand(rng, UNIT_N)
    params = jax.tree.map(jnp.array, _tree_of(master.copy()))
    ref_state = tx.init(params)
    state = opt.init(master, tree_of=_tree_of)
    upload = aligned_zeros(UNIT_N, upload_dtype)
    for _ in range(10):
        g = _rand(rng, UNIT_N, BF16)
        opt.update(state, master, g, upload, decay_split=0, grad_scale=0.3)
        gt = jax.tree.map(lambda x: jnp.asarray(x.astype(np.float32) * np.float32(0.3)), _tree_of(g))
        updates, ref_state = jax.jit(tx.update)(gt, ref_state, params)
        params = optax.apply_updates(params, updates)
    assert state.count == 10
    for k, leaf in _tree_of(master).items():
        np.testing.assert_allclose(leaf, params[k], rtol=2e-6, atol=2e-7, err_msg=k)
    assert np.abs(master - _rand(np.random.default_rng(9), UNIT_N)).max() > 0.01
    _assert_bitwise(upload, master.astype(upload_dtype), "upload")
    assert jax.tree.structure(state.state_dict()["opt_state"]) == jax.tree.structure(ref_state)


def test_host_optax_checkpoint_and_row_sparse_densify():
    rng = np.random.default_rng(10)
    vocab, hidden, used = 12, 8, 5
    opt = HostOptax(optax.adamw(1e-2, weight_decay=0.1), threads=2)
    master = _rand(rng, (vocab, hidden))
    dense_master = master.copy()
    state, dense_state = opt.init(master), opt.init(dense_master)
    for _ in range(3):
        rows = _rand(rng, (used, hidden), BF16)
        index = np.full(vocab, -1, np.int32)
        index[rng.choice(vocab, used, replace=False)] = np.arange(used)
        dense = np.zeros((vocab, hidden), BF16)
        dense[index >= 0] = rows[index[index >= 0]]
        opt.update(state, master, rows, None, decay_split=0, grad_index=index)
        opt.update(dense_state, dense_master, dense, None, decay_split=0)
    _assert_bitwise(master, dense_master, "densified")
    with pytest.raises(ValueError, match="rows"):
        opt.update(state, master, dense, None, decay_split=0, rows=np.array([0]))
    # Checkpoint: save, continue, restore into a fresh state, redo: same bits.
    saved = jax.tree.map(np.array, state.state_dict())
    saved_master = master.copy()
    g = _rand(rng, (vocab, hidden), BF16)
    opt.update(state, master, g, None, decay_split=0)
    resumed = opt.init(saved_master.shape)
    resumed.load_state_dict(saved)
    opt.update(resumed, saved_master, g, None, decay_split=0)
    assert resumed.count == state.count == 4
    _assert_bitwise(saved_master, master, "resumed")


def test_host_optax_rejects_a_tree_of_that_does_not_tile_the_buffer():
    opt = HostOptax(optax.sgd(0.1))
    with pytest.raises(ValueError, match="cover"):
        opt.init(10, tree_of=lambda f: {"a": f[:4], "b": f[4:8]})
    with pytest.raises(ValueError, match="gap or overlap"):
        opt.init(10, tree_of=lambda f: {"a": f[:6], "b": f[4:8]})
    with pytest.raises(ValueError, match="contiguous view"):
        opt.init(10, tree_of=lambda f: {"a": f[::2], "b": f[1::2]})


# ---------------------------------------------------------------------------------------------
# Concurrency, construction
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("serialised", [False, True])
def test_concurrent_updates_from_several_threads(serialised, monkeypatch):
    """Different units updated at once from several Python threads give the sequential results
    (numba's omp/tbb layers run them side by side; under 'workqueue' a lock serialises them)."""
    monkeypatch.setattr(fa, "_needs_lock", serialised)
    rng = np.random.default_rng(11)
    sizes = [50001, 33333, 70001, 20000, 65536, 12345]
    fused = HostAdamW(1e-2, weight_decay=0.1, threads=2)
    generic = HostOptax(optax.adamw(1e-2), threads=2)
    units = []
    for i, n in enumerate(sizes):
        opt = generic if i % 3 == 2 else fused
        units.append((opt, _rand(rng, n), [_rand(rng, n, BF16) for _ in range(4)]))

    def run(unit, results, barrier=None):
        opt, master0, grads = unit
        master, upload = master0.copy(), aligned_zeros(master0.size, BF16)
        state = opt.init(master)
        if barrier is not None:
            barrier.wait()
        for g in grads:
            opt.update(state, master, g, upload, decay_split=master.size // 2)
        results.append((master, upload))

    sequential = []
    for unit in units:
        run(unit, sequential)
    concurrent = [[] for _ in units]
    barrier = threading.Barrier(len(units))
    threads = [threading.Thread(target=run, args=(u, r, barrier)) for u, r in zip(units, concurrent)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, ((master, upload), result) in enumerate(zip(sequential, concurrent)):
        assert len(result) == 1, f"unit {i} failed"
        _assert_bitwise(result[0][0], master, f"unit {i} master")
        _assert_bitwise(result[0][1], upload, f"unit {i} upload")


def test_make_host_optimizer_and_protocol():
    fused = HostAdamW(1e-3)
    assert make_host_optimizer(fused) is fused
    generic = make_host_optimizer(optax.adamw(1e-3), threads=3)
    assert isinstance(generic, HostOptax) and generic.threads == 3
    for opt in (fused, generic):
        assert isinstance(opt, HostOptimizer)
        assert isinstance(opt.init(8), HostOptState)
    assert fused.supports_rows and not generic.supports_rows
    with pytest.raises(SlidejaxError, match="optimizer"):
        make_host_optimizer("adamw")
    with pytest.raises(SlidejaxError, match="moment_dtype"):
        HostAdamW(1e-3, moment_dtype=np.float16)
    assert 1 <= default_threads() <= fa.max_threads()
    a = aligned_zeros((3, 5), BF16)
    assert a.ctypes.data % 64 == 0 and a.shape == (3, 5) and not a.any()


_WIDTH_SCRIPT = """
import sys, numba, numpy as np, ml_dtypes
from slidejax import fused_adamw
from slidejax.host_optimizer import HostAdamW, aligned_zeros
bf16, seed = ml_dtypes.bfloat16, int(sys.argv[2])
out = {"features": numba.config.CPU_FEATURES or ""}
for md in (np.float32, bf16):
    rng = np.random.default_rng(seed)
    n = 3 * 4096 + 77
    opt = HostAdamW(1e-3, weight_decay=0.1, moment_dtype=md, threads=2)
    master = aligned_zeros(n); master[:] = rng.standard_normal(n, dtype=np.float32)
    upload = aligned_zeros(n, bf16)
    state = opt.init(n)
    for _ in range(3):
        grad = (rng.standard_normal(n, dtype=np.float32) * rng.uniform(1e-4, 1e-1)).astype(bf16)
        opt.update(state, master, grad, upload, decay_split=n // 2, grad_scale=0.7)
    for k, a in (("master", master), ("upload", upload), ("mu", state.mu), ("nu", state.nu)):
        out[f"{np.dtype(md).name}_{k}"] = np.asarray(a).view(np.uint8).copy()
np.savez(sys.argv[1], **out)
"""


def test_vector_width_choice_and_same_bits_at_either_width(tmp_path):
    """`fused_adamw` asks numba for 512-bit vectors exactly on AVX-512 hosts (NUMBA_CPU_FEATURES
    left unset), leaves a user's NUMBA_CPU_FEATURES alone, and the AdamW passes (fp32 and bf16
    moments) give the same bits at the default width and at the host's plain feature set."""
    import os
    import subprocess
    import sys

    from llvmlite import binding

    host = binding.get_host_cpu_features()
    seed = int(np.random.default_rng().integers(1 << 30))
    runs = {}
    for name, features in (("default", None), ("plain", host.flatten())):
        env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CPU_FEATURES", "NUMBA_CPU_NAME")}
        env["NUMBA_CACHE_DIR"] = str(tmp_path / f"cache_{name}")  # each width compiles its own kernels
        if features is not None:
            env["NUMBA_CPU_FEATURES"] = features
        out = tmp_path / f"{name}.npz"
        proc = subprocess.run([sys.executable, "-c", _WIDTH_SCRIPT, str(out), str(seed)], env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = dict(np.load(out))
    wide = bool(host.get("avx512f") and host.get("avx512bw"))
    assert str(runs["default"]["features"]).endswith(",-prefer-256-bit") == wide
    assert str(runs["plain"]["features"]) == host.flatten()  # the user's setting, untouched
    keys = [k for k in runs["default"] if k != "features"]
    assert len(keys) == 8
    for k in keys:
        np.testing.assert_array_equal(runs["default"][k], runs["plain"][k], err_msg=k)
    assert np.any(runs["default"]["float32_mu"] != 0)
