"""Fused linear + cross-entropy (pure-JAX twin and chunk primitives) against the naive reference.

The reference (`slidejax.kernels.reference`) materialises fp32 logits and is differentiated by
`jax.grad`; everything here is checked against it on fresh random inputs each run (the seed is in
every failure message). Two dev tests also check the Triton path without a GPU, each in a
subprocess and skipped where triton / jax-triton are not installed: the kernels under
`TRITON_INTERPRET=1` inside the full pipeline, and the jax-triton lowering for CUDA.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slidejax.kernels import (
    combine_stats,
    init_stats,
    lce_chunk_grads,
    lce_chunk_stats,
    lce_fused_accumulate,
    linear_cross_entropy,
    loss_from_stats,
    lse_from_stats,
    resolve_impl,
)
from slidejax.kernels import linear_cross_entropy_jax as lce_jax
from slidejax.kernels.reference import naive_linear_cross_entropy, naive_logits

FP32_TOL = 1e-5


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def make_inputs(n, hidden, vocab, *, mask_frac=0.25, dtype=jnp.float32, ignore_index=-100,
                seed=None):
    """Fresh random h [n, hidden], w [vocab, hidden], labels [n] (some ignored); logits O(3)."""
    seed = secrets.randbits(32) if seed is None else seed
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((n, hidden)).astype(np.float32)
    w = (rng.standard_normal((vocab, hidden)) * 3 / np.sqrt(hidden)).astype(np.float32)
    labels = rng.integers(0, vocab, n).astype(np.int32)
    labels[rng.random(n) < mask_frac] = ignore_index
    return jnp.asarray(h, dtype), jnp.asarray(w, dtype), jnp.asarray(labels), seed


def naive_token_losses(h, w, labels, *, ignore_index=-100, softcap=None, z_loss=0.0):
    """Per-token losses [N] of the reference (0 for ignored tokens): the reference's sum with all
    but one token ignored, once per token, so weighted sums have an independent reference too."""
    rows = jnp.eye(h.shape[0], dtype=bool)
    one = lambda mask: naive_linear_cross_entropy(  # noqa: E731
        h, w, jnp.where(mask, labels, ignore_index), ignore_index=ignore_index, softcap=softcap,
        z_loss=z_loss)[0]
    return jax.vmap(one)(rows)


def grads_of(loss_fn, h, w):
    """Gradients of ``loss_fn(h, w)[0]`` (jitted: op-by-op dispatch is slow on small CI boxes)."""
    return jax.jit(jax.grad(lambda h, w: loss_fn(h, w)[0], argnums=(0, 1)))(h, w)


def value_and_grads(lce, h, w):
    """``((loss_sum, n_valid), (dh, dw))`` of ``lce(h, w) -> (loss_sum, n_valid)``, one jit."""
    return jax.jit(jax.value_and_grad(lce, argnums=(0, 1), has_aux=True))(h, w)


def assert_matches_naive(fused, naive, h, w, seed, tol=FP32_TOL, loss_tol=FP32_TOL):
    """Loss (without and with differentiation: different custom_vjp paths), count and both
    gradients of ``fused`` against ``naive``; returns the fused gradients."""
    (ref_loss, ref_count), ref_grads = value_and_grads(naive, h, w)
    loss, count = jax.jit(fused)(h, w)
    (loss_fwd, count_fwd), grads = value_and_grads(fused, h, w)
    assert int(count) == int(count_fwd) == int(ref_count), seed
    assert rel_err(loss, ref_loss) < loss_tol and rel_err(loss_fwd, ref_loss) < loss_tol, seed
    for got, want, x in zip(grads, ref_grads, (h, w)):
        assert got.dtype == x.dtype and not np.any(np.isnan(np.asarray(got, np.float32))), seed
        assert rel_err(got, want) < tol, (seed, rel_err(got, want))
    return grads


# --------------------------------------------------------------------------- whole-head API

CASES = [
    # name, n, hidden, vocab, chunk, mask_frac, softcap, z_loss
    ("odd_vocab_uneven_chunks", 37, 24, 1009, 8, 0.3, None, 0.0),
    ("one_token_auto_chunk", 1, 16, 257, None, 0.0, None, 0.0),
    ("softcap", 29, 16, 513, 7, 0.2, 5.0, 0.0),
    ("softcap_z_loss", 33, 8, 129, 16, 0.2, 3.0, 0.1),
]


@pytest.mark.parametrize("name,n,hidden,vocab,chunk,mask_frac,softcap,z_loss", CASES,
                         ids=[c[0] for c in CASES])
def test_loss_and_grads_match_naive(name, n, hidden, vocab, chunk, mask_frac, softcap, z_loss):
    h, w, labels, seed = make_inputs(n, hidden, vocab, mask_frac=mask_frac)
    kw = dict(softcap=softcap, z_loss=z_loss)
    assert_matches_naive(
        lambda h, w: linear_cross_entropy(h, w, labels, impl="jax", chunk_size=chunk, **kw),
        lambda h, w: naive_linear_cross_entropy(h, w, labels, **kw), h, w, seed)


def test_fully_masked_chunk_and_custom_ignore_index():
    ignore = 5  # a real vocabulary id: tokens labelled 5 carry no loss
    h, w, labels, seed = make_inputs(24, 16, 200, mask_frac=0.1, ignore_index=ignore)
    labels = labels.at[8:16].set(ignore)  # the whole second chunk of 8
    dh, _ = assert_matches_naive(
        lambda h, w: linear_cross_entropy(h, w, labels, ignore_index=ignore, impl="jax",
                                          chunk_size=8),
        lambda h, w: naive_linear_cross_entropy(h, w, labels, ignore_index=ignore), h, w, seed)
    assert not np.any(np.asarray(dh[8:16])), "ignored tokens must get exactly zero gradient"


def test_all_tokens_ignored_gives_zero_loss_and_grads():
    h, w, labels, seed = make_inputs(10, 8, 50)
    labels = jnp.full_like(labels, -100)
    fused = lambda h, w: linear_cross_entropy(h, w, labels, impl="jax", chunk_size=4)  # noqa: E731
    (loss, count), (dh, dw) = value_and_grads(fused, h, w)
    assert float(loss) == 0.0 and int(count) == 0, seed
    assert not np.any(np.asarray(dh)) and not np.any(np.asarray(dw)), seed


def test_cotangent_scales_gradients():
    """Backward only scales the forward-made gradients: check with a mean over micro-batches."""
    h, w, labels, seed = make_inputs(40, 16, 333)
    split = 17

    def mean_loss(h, w, lce):
        a = lce(h[:split], w, labels[:split])
        b = lce(h[split:], w, labels[split:])
        return 0.37 * (a[0] + b[0]) / (a[1] + b[1])

    fused = lambda h, w, y: linear_cross_entropy(h, w, y, impl="jax", chunk_size=6)  # noqa: E731
    got = grads_of(lambda h, w: (mean_loss(h, w, fused),), h, w)
    want = grads_of(lambda h, w: (mean_loss(h, w, naive_linear_cross_entropy),), h, w)
    for g, r in zip(got, want):
        assert rel_err(g, r) < FP32_TOL, seed


def test_tied_weights_gradients_add():
    """w is both the embedding (makes h) and the head: both uses contribute to its gradient."""
    h0, w, labels, seed = make_inputs(21, 16, 97)
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, 97, 21))
    proj = h0[:16]  # any fixed [H, H] matrix

    def loss(w, lce):
        h = jnp.tanh(jnp.take(w, tokens, axis=0) @ proj)
        total, count = lce(h, w, labels)
        return total / count + 1e-3 * jnp.sum(w * w)

    fused = lambda h, w, y: linear_cross_entropy(h, w, y, impl="jax", chunk_size=5)  # noqa: E731
    got = jax.jit(jax.grad(lambda w: loss(w, fused)))(w)
    want = jax.jit(jax.grad(lambda w: loss(w, naive_linear_cross_entropy)))(w)
    assert rel_err(got, want) < FP32_TOL, seed


def test_bf16_inputs():
    h, w, labels, seed = make_inputs(45, 32, 700, dtype=jnp.bfloat16)
    kw = dict(softcap=4.0, z_loss=1e-3)
    # The reference sees the same bf16 values, upcast: what is left is the rounding of the
    # logits gradient and of dh, dw to bf16 (the loss itself comes from fp32 logits).
    assert_matches_naive(
        lambda h, w: linear_cross_entropy(h, w, labels, impl="jax", chunk_size=16, **kw),
        lambda h, w: naive_linear_cross_entropy(h.astype(jnp.float32), w.astype(jnp.float32),
                                                labels, **kw), h, w, seed, tol=2e-2, loss_tol=1e-4)


def test_peak_memory_is_one_block_not_the_logits():
    """XLA's buffer assignment for fwd+bwd: the fused loss needs about one [chunk, V] block and
    the fp32 dw accumulator; the naive loss needs (at least) the whole N x V logits."""
    n, hidden, vocab, chunk = 2048, 64, 8192, 128
    h, w, labels, _ = make_inputs(n, hidden, vocab)

    def temp_bytes(lce):
        fn = jax.jit(lambda h, w: grads_of(lce, h, w))
        return fn.lower(h, w).compile().memory_analysis().temp_size_in_bytes

    fused = temp_bytes(lambda h, w: linear_cross_entropy(h, w, labels, impl="jax",
                                                         chunk_size=chunk))
    naive = temp_bytes(lambda h, w: naive_linear_cross_entropy(h, w, labels))
    logits_bytes = n * vocab * 4
    block_and_acc = chunk * vocab * 4 * 2 + vocab * hidden * 4
    assert naive >= logits_bytes
    assert fused <= 1.5 * block_and_acc < logits_bytes / 4, (fused, block_and_acc)


def test_choose_chunk():
    assert lce_jax.choose_chunk(100_000, 128_256) == 1024  # 512 MiB of fp32 logits
    assert lce_jax.choose_chunk(100_000, 151_936) == 1024  # at least MIN_CHUNK
    assert lce_jax.choose_chunk(100_000, 32_000) == 4096
    assert lce_jax.choose_chunk(10, 128_256) == 10
    assert lce_jax.choose_chunk(10, 128_256, chunk_size=4) == 4
    with pytest.raises(ValueError):
        lce_jax.choose_chunk(10, 100, chunk_size=0)


def test_bad_input_is_rejected():
    h, w, labels, _ = make_inputs(8, 16, 50)
    with pytest.raises(ValueError, match="h \\[N, H\\]"):
        linear_cross_entropy(h, w[:, :8], labels)
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(h, w, labels[:4])
    with pytest.raises(ValueError, match="integers"):
        linear_cross_entropy(h, w, labels.astype(jnp.float32))
    with pytest.raises(ValueError, match="softcap"):
        linear_cross_entropy(h, w, labels, softcap=0.0)
    with pytest.raises(ValueError, match="impl"):
        linear_cross_entropy(h, w, labels, impl="cuda")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU fallback")
def test_auto_is_the_twin_without_a_gpu():
    assert resolve_impl("auto") == "jax"
    assert resolve_impl("jax") == "jax"


# --------------------------------------------------------------------------- accumulate API

def naive_grads(h, w, labels, **kw):
    """``((loss_sum, n_valid), (dh, dw))`` of the naive reference, fp32."""
    return value_and_grads(lambda h, w: naive_linear_cross_entropy(h, w, labels, **kw), h, w)


def random_acc(shape, scale, seed):
    """A fresh fp32 accumulator of about the gradient's magnitude (so errors are not hidden)."""
    return jnp.asarray(np.random.default_rng(seed + 1).standard_normal(shape) * scale, jnp.float32)


@pytest.mark.parametrize("name,n,hidden,vocab,chunk,mask_frac,softcap,z_loss", CASES,
                         ids=[c[0] for c in CASES])
def test_accumulate_matches_naive(name, n, hidden, vocab, chunk, mask_frac, softcap, z_loss):
    h, w, labels, seed = make_inputs(n, hidden, vocab, mask_frac=mask_frac)
    kw = dict(softcap=softcap, z_loss=z_loss)
    (ref_loss, ref_count), (ref_dh, ref_dw) = naive_grads(h, w, labels, **kw)
    acc0 = random_acc((vocab * hidden,), float(jnp.max(jnp.abs(ref_dw))), seed)
    run = jax.jit(lambda h, w, acc: lce_fused_accumulate(h, w, labels, acc, impl="jax",
                                                          chunk_size=chunk, **kw))
    for acc in (None, acc0):
        loss, count, dh, dw = run(h, w, acc)
        assert int(count) == int(ref_count) and rel_err(loss, ref_loss) < FP32_TOL, seed
        assert dh.dtype == jnp.float32 and dh.shape == h.shape, seed
        assert rel_err(dh, ref_dh) < FP32_TOL, seed
        assert dw.dtype == jnp.float32, seed
        if acc is None:
            assert dw.shape == w.shape and rel_err(dw, ref_dw) < FP32_TOL, seed
        else:  # the accumulator's (flat) shape is kept
            assert dw.shape == acc0.shape, seed
            assert rel_err(dw, acc0 + ref_dw.reshape(-1)) < FP32_TOL, seed


def test_accumulate_over_calls_equals_one_call():
    """Micro-batches of 11, 7 and 19 tokens (chunk 4: uneven tails), each call passing the last
    one's dw on: the same loss sum, count, dh rows and dw as one call on all 37 tokens."""
    h, w, labels, seed = make_inputs(37, 16, 301, mask_frac=0.3)
    kw = dict(softcap=6.0, z_loss=1e-2)
    run = jax.jit(lambda h, w, y, acc: lce_fused_accumulate(h, w, y, acc, impl="jax",
                                                             chunk_size=4, **kw))
    whole = run(h, w, labels, None)
    acc, total, count, dhs = jnp.zeros((301, 16), jnp.float32), 0.0, 0, []
    for a, b in ((0, 11), (11, 18), (18, 37)):
        loss, n_valid, dh, acc = run(h[a:b], w, labels[a:b], acc)
        total, count = total + float(loss), count + int(n_valid)
        dhs.append(dh)
    assert count == int(whole[1]), seed
    assert rel_err(total, whole[0]) < 1e-6, seed
    assert rel_err(jnp.concatenate(dhs), whole[2]) < 1e-6, seed
    assert rel_err(acc, whole[3]) < 1e-6, seed
    (ref_loss, _), (_, ref_dw) = naive_grads(h, w, labels, **kw)
    assert rel_err(total, ref_loss) < FP32_TOL and rel_err(acc, ref_dw) < FP32_TOL, seed


def test_accumulate_bf16_is_the_vjp_without_rounding_dw():
    """bf16 inputs: dh in bf16, identical to the linear_cross_entropy VJP's; dw kept in fp32, so
    it is at least as close to the fp32 reference as the VJP's bf16 dw."""
    h, w, labels, seed = make_inputs(45, 32, 700, dtype=jnp.bfloat16)
    kw = dict(softcap=4.0, z_loss=1e-3, chunk_size=16, impl="jax")
    loss, count, dh, dw = jax.jit(lambda h, w: lce_fused_accumulate(h, w, labels, **kw))(h, w)
    (vjp_loss, _), (vjp_dh, vjp_dw) = value_and_grads(
        lambda h, w: linear_cross_entropy(h, w, labels, **kw), h, w)
    assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.float32, seed
    np.testing.assert_array_equal(np.asarray(dh, np.float32), np.asarray(vjp_dh, np.float32))
    assert rel_err(loss, vjp_loss) < 1e-6, seed
    hf, wf = h.astype(jnp.float32), w.astype(jnp.float32)
    (ref_loss, _), (ref_dh, ref_dw) = naive_grads(hf, wf, labels, softcap=4.0, z_loss=1e-3)
    assert rel_err(loss, ref_loss) < 1e-4 and rel_err(dh, ref_dh) < 2e-2, seed
    assert rel_err(dw, ref_dw) <= rel_err(vjp_dw, ref_dw) + 1e-6 and rel_err(dw, ref_dw) < 2e-2


def test_accumulate_rejects_a_bad_accumulator():
    h, w, labels, _ = make_inputs(8, 16, 50)
    for bad in (jnp.zeros((50, 16), jnp.bfloat16), jnp.zeros((16, 50), jnp.float32),
                jnp.zeros((50 * 16 + 1,), jnp.float32)):
        with pytest.raises(ValueError, match="dw_acc"):
            lce_fused_accumulate(h, w, labels, bad, impl="jax")
    with pytest.raises(ValueError, match="labels"):
        lce_fused_accumulate(h, w, labels[:3], impl="jax")


def test_accumulator_is_donated_and_updated_in_place():
    """A real call: the donated accumulator's buffer is consumed (its contents live on in the
    returned dw), on this backend too."""
    h, w, labels, seed = make_inputs(20, 8, 64)
    acc = random_acc((64 * 8,), 1.0, seed)
    expect = np.asarray(acc) + np.asarray(naive_grads(h, w, labels)[1][1]).reshape(-1)
    run = jax.jit(lambda h, w, acc: lce_fused_accumulate(h, w, labels, acc, impl="jax",
                                                          chunk_size=8), donate_argnums=(2,))
    dw = run(h, w, acc)[3]
    assert acc.is_deleted(), "dw_acc was not donated"
    assert rel_err(dw, expect) < FP32_TOL, seed


def test_accumulate_memory_is_half_a_block_and_the_gradient():
    """XLA's buffer assignment (compile only; fp32, so that XLA:CPU makes no upcast copies): the
    donated accumulator is the output (aliased, no copy), the only other output is dh, and the
    scratch is one chunk's [chunk, V] gradient plus ONE half-chunk fp32 logits block (the two
    halves are never alive together) and [chunk, H] bits. No [N, V] buffer, no second [V, H]
    accumulator. (XLA:CPU's dw GEMM result before the add, [V, H], fits in the half block's slot
    here; XLA:GPU adds inside the GEMM.)"""
    n, hidden, vocab, chunk = 4096, 32, 16384, 128
    h, w = (jax.ShapeDtypeStruct(s, jnp.float32) for s in ((n, hidden), (vocab, hidden)))
    y = jax.ShapeDtypeStruct((n,), jnp.int32)
    acc = jax.ShapeDtypeStruct((vocab * hidden,), jnp.float32)
    vh, g, half, nh = vocab * hidden * 4, chunk * vocab * 4, chunk * vocab * 2, n * hidden * 4
    assert vh <= half  # so that a second [V, H] or a second half block would both show

    fused = jax.jit(lambda h, w, y, acc: lce_fused_accumulate(h, w, y, acc, impl="jax",
                                                               chunk_size=chunk),
                    donate_argnums=(3,))
    ma = fused.lower(h, w, y, acc).compile().memory_analysis()
    assert ma.alias_size_in_bytes == vh
    assert ma.output_size_in_bytes - ma.alias_size_in_bytes <= nh + 64  # dh and two scalars
    assert ma.temp_size_in_bytes <= g + half + 2**18, ma.temp_size_in_bytes

    # The vocabulary-chunk gradients with both accumulators donated: aliased, one block (and
    # its gradient) of scratch.
    lse = jax.ShapeDtypeStruct((n,), jnp.float32)
    grads = jax.jit(lambda h, w, y, lse, dh, dw: lce_chunk_grads(
        h, w, y, 0, lse, lse, impl="jax", chunk_size=chunk, dh_acc=dh, dw_acc=dw),
        donate_argnums=(4, 5))
    ma = grads.lower(h, w, y, lse, h, acc).compile().memory_analysis()
    assert ma.alias_size_in_bytes == vh + nh
    assert ma.output_size_in_bytes <= ma.alias_size_in_bytes + 64  # + the result tuple
    assert ma.temp_size_in_bytes <= 2 * g + 2**18, ma.temp_size_in_bytes


def test_chunk_grads_accumulate_into_given_buffers():
    h, w, labels, seed = make_inputs(23, 16, 120)
    lse = jax.nn.logsumexp(naive_logits(h, w), axis=-1)
    scale = (labels != -100).astype(jnp.float32) * 0.3
    a, b = 40, 97  # a vocabulary chunk of 57 rows
    dh0 = random_acc((23, 16), 0.1, seed)
    dw0 = random_acc(((b - a) * 16,), 0.1, seed + 7)
    run = jax.jit(lambda dh_acc, dw_acc: lce_chunk_grads(
        h, w[a:b], labels, a, lse, scale, impl="jax", chunk_size=5, dh_acc=dh_acc,
        dw_acc=dw_acc))
    dh, dw = run(None, None)
    dh_sum, dw_sum = run(dh0, dw0)
    assert dh_sum.shape == dh0.shape and dw_sum.shape == dw0.shape, seed
    assert rel_err(dh_sum, dh0 + dh) < 1e-6 and rel_err(dw_sum, dw0 + dw.reshape(-1)) < 1e-6


# --------------------------------------------------------------------------- vocab-chunk API

def _vocab_splits(vocab, rng):
    """Uneven vocabulary chunks, including a one-column chunk."""
    cuts = [0, 1, int(rng.integers(2, vocab - 1)), vocab]
    return list(zip(cuts[:-1], cuts[1:]))


@pytest.mark.parametrize("softcap,z_loss", [(None, 0.0), (2.5, 0.2)])
def test_chunk_primitives_match_naive(softcap, z_loss):
    h, w, labels, seed = make_inputs(26, 16, 401)
    rng = np.random.default_rng(seed)
    splits = _vocab_splits(401, rng)
    order = rng.permutation(len(splits))  # combine_stats is order-free

    row_scale = jnp.asarray(rng.random(26), jnp.float32) * (labels != -100)  # any weights

    @jax.jit
    def two_passes(h, w):
        stats = init_stats(26)
        for i in order:
            a, b = splits[i]
            part = lce_chunk_stats(h, w[a:b], labels, a, softcap=softcap, impl="jax", chunk_size=8)
            stats = combine_stats(stats, part)
        lse = lse_from_stats(stats[0], stats[1])
        grads = [lce_chunk_grads(h, w[a:b], labels, a, lse, row_scale, softcap=softcap,
                                 z_loss=z_loss, impl="jax", chunk_size=8) for a, b in splits]
        return stats, lse, grads

    stats, lse, grads = two_passes(h, w)
    logits = naive_logits(h, w, softcap)
    assert rel_err(lse, jax.nn.logsumexp(logits, axis=-1)) < FP32_TOL, seed
    loss, count = loss_from_stats(lse, stats[2], labels, z_loss=z_loss)
    ref_loss, ref_count = naive_linear_cross_entropy(h, w, labels, softcap=softcap, z_loss=z_loss)
    assert int(count) == int(ref_count) and rel_err(loss, ref_loss) < FP32_TOL, seed

    for (a, b), (dh_c, dw_c) in zip(splits, grads):
        assert dh_c.dtype == dw_c.dtype == jnp.float32 and dw_c.shape == (b - a, 16)
    dh, dw = sum(g[0] for g in grads), jnp.concatenate([g[1] for g in grads])
    weighted = lambda h, w: (jnp.sum(row_scale * naive_token_losses(  # noqa: E731
        h, w, labels, softcap=softcap, z_loss=z_loss)),)
    ref_dh, ref_dw = grads_of(weighted, h, w)
    assert rel_err(dh, ref_dh) < FP32_TOL, seed
    assert rel_err(dw, ref_dw) < FP32_TOL, seed


def test_chunk_primitives_with_traced_vocab_start():
    """An engine scanning equal vocab chunks passes vocab_start as a traced integer."""
    n, hidden, vocab, vc = 19, 8, 240, 48
    h, w, labels, seed = make_inputs(n, hidden, vocab)
    row_scale = (labels != -100).astype(jnp.float32) / jnp.maximum(jnp.sum(labels != -100), 1)

    @jax.jit
    def two_passes(h, w):
        chunks = w.reshape(vocab // vc, vc, hidden)
        starts = jnp.arange(0, vocab, vc)

        def stats_step(acc, x):
            w_c, start = x
            return combine_stats(acc, lce_chunk_stats(h, w_c, labels, start, impl="jax")), None

        (m, s, t), _ = jax.lax.scan(stats_step, init_stats(n), (chunks, starts))
        lse = lse_from_stats(m, s)

        def grad_step(dh, x):
            w_c, start = x
            dh_c, dw_c = lce_chunk_grads(h, w_c, labels, start, lse, row_scale, impl="jax",
                                         chunk_size=5)
            return dh + dh_c, dw_c

        dh, dw = jax.lax.scan(grad_step, jnp.zeros_like(h), (chunks, starts))
        return loss_from_stats(lse, t, labels), dh, dw.reshape(vocab, hidden)

    (loss, count), dh, dw = two_passes(h, w)
    mean = lambda h, w: (naive_linear_cross_entropy(h, w, labels)[0]  # noqa: E731
                         / jnp.maximum(jnp.sum(labels != -100), 1),)
    assert rel_err(loss, naive_linear_cross_entropy(h, w, labels)[0]) < FP32_TOL, seed
    ref_dh, ref_dw = grads_of(mean, h, w)
    assert rel_err(dh, ref_dh) < FP32_TOL and rel_err(dw, ref_dw) < FP32_TOL, seed


def test_chunk_grads_bf16():
    h, w, labels, seed = make_inputs(30, 32, 300, dtype=jnp.bfloat16)
    hf, wf = h.astype(jnp.float32), w.astype(jnp.float32)
    lse = jax.nn.logsumexp(naive_logits(hf, wf), axis=-1)
    scale = (labels != -100).astype(jnp.float32)
    m, s, t = lce_chunk_stats(h, w, labels, 0, impl="jax", chunk_size=8)
    assert rel_err(lse_from_stats(m, s), lse) < 1e-5, seed
    dh, dw = lce_chunk_grads(h, w, labels, 0, lse, scale, impl="jax", chunk_size=8)
    ref_dh, ref_dw = grads_of(lambda h, w: naive_linear_cross_entropy(h, w, labels), hf, wf)
    assert rel_err(dh, ref_dh) < 2e-2 and rel_err(dw, ref_dw) < 2e-2, seed


def test_combine_stats_identity_and_empty_ranges():
    rng = np.random.default_rng(secrets.randbits(32))
    a = tuple(jnp.asarray(x, jnp.float32) for x in (rng.normal(size=5), rng.random(5) + 0.5,
                                                   rng.normal(size=5)))
    e = init_stats(5)
    for got in (combine_stats(e, a), combine_stats(a, e)):
        for x, y in zip(got, a):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)
    m, s, t = combine_stats(e, e)
    assert np.all(np.isneginf(np.asarray(m))) and not np.any(np.asarray(s)) and \
        not np.any(np.isnan(np.asarray(s)))


# --------------------------------------------------------------------------- Triton, no GPU

_HAS_TRITON = importlib.util.find_spec("triton") is not None and \
    importlib.util.find_spec("torch") is not None
_HAS_JAX_TRITON = _HAS_TRITON and importlib.util.find_spec("jax_triton") is not None


def _run_here(func: str, env: dict) -> None:
    """Run ``func`` of this module in a fresh interpreter (Triton modes are per process)."""
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
            f"import test_linear_cross_entropy as t; t.{func}()")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _interpreted_ops(block: int):
    """BlockOps running the real Triton kernels in the Triton interpreter (torch CPU tensors)
    through pure_callback, tiles of ``block`` columns so rows span several partial tiles."""
    import threading

    import ml_dtypes
    import torch

    from slidejax.kernels import cross_entropy_triton as ct

    # The interpreter patches triton.language globally while a kernel runs, and XLA:CPU may run
    # independent callbacks (e.g. a tail chunk's stats beside the loop) on two threads at once.
    lock = threading.Lock()

    def stats(logits, labels, softcap):
        rows, cols = logits.shape

        def host(z, y):
            z, y = torch.tensor(np.asarray(z)), torch.tensor(np.asarray(y))
            m, s, t = (torch.empty(rows) for _ in range(3))
            with lock:
                ct._stats_kernel[(rows,)](z, y, m, s, t, N_COLS=cols,
                                          SOFTCAP=float(softcap or 0.0), BLOCK=block)
            return m.numpy(), s.numpy(), t.numpy()

        out = (jax.ShapeDtypeStruct((rows,), jnp.float32),) * 3
        return jax.pure_callback(host, out, logits, labels)

    def grads(logits, labels, lse, scale, softcap, z_loss, out_dtype):
        rows, cols = logits.shape
        out_dtype = jnp.dtype(out_dtype)

        def host(z, y, lse, scale):
            z = torch.tensor(np.asarray(z))
            args = [torch.tensor(np.asarray(a)) for a in (y, lse, scale)]
            # fp32: overwrite the logits in place, exactly as the aliased GPU call does.
            g = z if out_dtype == jnp.float32 else torch.empty(rows, cols, dtype=torch.bfloat16)
            with lock:
                ct._grad_kernel[(rows,)](z, *args, g, N_COLS=cols,
                                         SOFTCAP=float(softcap or 0.0), Z_LOSS=float(z_loss),
                                         BLOCK=block)
            g = g.float().numpy()
            return g if out_dtype == jnp.float32 else g.astype(ml_dtypes.bfloat16)

        out = jax.ShapeDtypeStruct((rows, cols), out_dtype)
        return jax.pure_callback(host, out, logits, labels, lse, scale)

    def grads_into(buf, row0, logits, labels, lse, scale, softcap, z_loss):
        rows, cols = logits.shape
        bf16 = buf.dtype == jnp.bfloat16

        def host(b, z, y, lse, scale):
            b = np.asarray(b)
            # torch has no numpy bfloat16: move the bits.
            tb = torch.from_numpy(b.view(np.int16).copy()).view(torch.bfloat16) if bf16 \
                else torch.tensor(b)
            args = [torch.tensor(np.asarray(a)) for a in (z, y, lse, scale)]
            with lock:  # the same tensor twice, as the aliased GPU call passes it
                ct._grad_into_kernel[(rows,)](*args, tb, tb, N_COLS=cols,
                                              SOFTCAP=float(softcap or 0.0),
                                              Z_LOSS=float(z_loss), BLOCK=block, ROW0=row0)
            return tb.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if bf16 else tb.numpy()

        out = jax.ShapeDtypeStruct(buf.shape, buf.dtype)
        return jax.pure_callback(host, out, buf, logits, labels, lse, scale)

    return lce_jax.BlockOps(stats=stats, grads=grads, grads_into=grads_into)


def interpreted_pipeline_check() -> None:
    """Both APIs with the interpreted Triton kernels against the naive reference."""
    ops = _interpreted_ops(block=64)
    for dtype, tol, softcap, z_loss in ((jnp.float32, FP32_TOL, 4.0, 1e-2),
                                        (jnp.bfloat16, 2e-2, None, 0.0)):
        h, w, labels, seed = make_inputs(21, 16, 203, dtype=dtype)
        hf, wf = h.astype(jnp.float32), w.astype(jnp.float32)
        kw = dict(softcap=softcap, z_loss=z_loss)
        info = (seed, dtype.__name__, kw)
        parts = [(0, 77), (77, 203)]  # the vocab-chunk primitives, two uneven chunks
        scale = (labels != -100).astype(jnp.float32)

        acc0 = random_acc((203, 16), 0.1, seed)

        @jax.jit
        def everything(h, w):
            fused = lce_jax.fused_forward(h, w, labels, chunk_size=8, ops=ops, **kw)
            accumulated = lce_jax.fused_accumulate(h, w, labels, acc0, chunk_size=8, ops=ops, **kw)
            only_loss = lce_jax.fused_loss(h, w, labels, chunk_size=8, ops=ops, **kw)
            stats = init_stats(21)
            for a, b in parts:
                stats = combine_stats(stats, lce_jax.chunk_stats(
                    h, w[a:b], labels, a, softcap=softcap, chunk_size=8, ops=ops))
            lse = lse_from_stats(stats[0], stats[1])
            chunk_loss = loss_from_stats(lse, stats[2], labels, z_loss=z_loss)[0]
            grads = [lce_jax.chunk_grads(h, w[a:b], labels, a, lse, scale, chunk_size=8,
                                         ops=ops, **kw) for a, b in parts]
            return fused, only_loss, chunk_loss, grads, accumulated

        (loss, count, dh, dw), only_loss, chunk_loss, grads, accumulated = everything(h, w)
        ref_loss, ref_count = naive_linear_cross_entropy(hf, wf, labels, **kw)
        ref_dh, ref_dw = grads_of(lambda h, w: naive_linear_cross_entropy(h, w, labels, **kw),
                                  hf, wf)
        assert int(count) == int(ref_count), info
        for got in (loss, only_loss[0], chunk_loss, accumulated[0]):  # exp-form tanh: ~1e-7
            assert rel_err(got, ref_loss) < 1e-4, info
        assert int(accumulated[1]) == int(ref_count), info
        assert accumulated[2].dtype == dtype and accumulated[3].dtype == jnp.float32, info
        assert rel_err(accumulated[2], ref_dh) < tol, info
        assert rel_err(accumulated[3], acc0 + ref_dw) < tol, info
        assert dh.dtype == dtype and dw.dtype == dtype, info
        assert rel_err(dh, ref_dh) < tol and rel_err(dw, ref_dw) < tol, info
        assert rel_err(sum(g[0] for g in grads), ref_dh) < tol, info
        assert rel_err(jnp.concatenate([g[1] for g in grads]), ref_dw) < tol, info
    print("ok")


@pytest.mark.skipif(not _HAS_TRITON, reason="needs triton and torch (dev check)")
def test_triton_kernels_interpreted():
    _run_here("interpreted_pipeline_check", {"TRITON_INTERPRET": "1", "JAX_PLATFORMS": "cpu"})


def cuda_lowering_check() -> None:
    """Lower both APIs' Triton path for CUDA on this CPU box: Triton really compiles the kernels
    to PTX (sm_90) inside jax-triton's lowering; only jaxlib's GPU kernel-call objects, absent
    from a CPU jaxlib, are stood in for."""
    import jaxlib.gpu_triton as gpu_triton

    launches = []

    class Kernel:
        def __init__(self, name, num_warps, *rest):
            self.name, self.num_warps = name, num_warps

    class Call:
        def __init__(self, kernel, gx, gy, gz, params):
            launches.append((kernel.name, (gx, gy, gz), len(params)))

        def to_proto(self, name, metadata):
            return b""

    fake = dict(get_compute_capability=lambda device: 90, get_serialized_metadata=lambda *a: b"",
                TritonKernel=Kernel, TritonKernelCall=Call, TritonAutotunedKernelCall=None,
                create_array_parameter=lambda *a: a, create_scalar_parameter=lambda *a: a)
    for k, v in fake.items():
        setattr(gpu_triton, k, v)

    n, hidden, vocab = 512, 64, 3000
    for dtype in (jnp.bfloat16, jnp.float32):
        h, w = (jax.ShapeDtypeStruct(s, dtype) for s in ((n, hidden), (vocab, hidden)))
        y = jax.ShapeDtypeStruct((n,), jnp.int32)
        for kw in ({}, {"softcap": 30.0, "z_loss": 1e-4}):
            def train(h, w, y):
                return jax.grad(lambda h, w: linear_cross_entropy(
                    h, w, y, impl="triton", chunk_size=128, **kw)[0], argnums=(0, 1))(h, w)

            def engine(h, w, y):
                m, s, t = lce_chunk_stats(h, w[:1000], y, 7, softcap=kw.get("softcap"),
                                          impl="triton")
                return lce_chunk_grads(h, w[:1000], y, 7, lse_from_stats(m, s), jnp.ones(n),
                                       impl="triton", **kw)

            def accumulate(h, w, y):
                acc = jnp.zeros((vocab * hidden,), jnp.float32)
                return lce_fused_accumulate(h, w, y, acc, impl="triton", chunk_size=128, **kw)

            # The vocab-chunk primitives: one block per token chunk, the fp32 gradient written
            # over its logits block (XLA must be told). The fused paths: two half-chunk blocks
            # whose gradients go into one chunk buffer, in place (aliased) in any dtype.
            for fn, kernels, aliased in (
                    (engine, ("_grad_kernel", "_stats_kernel"), dtype == jnp.float32),
                    (train, ("_grad_into_kernel", "_grad_into_kernel", "_stats_kernel",
                             "_stats_kernel"), True),
                    (accumulate, ("_grad_into_kernel", "_grad_into_kernel", "_stats_kernel",
                                  "_stats_kernel"), True)):
                launches.clear()
                text = jax.jit(fn).trace(h, w, y).lower(lowering_platforms=("cuda",)).as_text()
                assert text.count("triton_kernel_call") == len(kernels), text[:2000]
                assert ("output_operand_alias" in text) == aliased
                # (identical calls are lowered once)
                assert {name for name, _, _ in launches} == set(kernels), launches
                # Pointers only, constants compiled in: stats 2 inputs + 3 outputs; grad 4 + 1;
                # grad_into 5 inputs (the buffer too) + 1 output.
                params = {"_stats_kernel": 5, "_grad_kernel": 5, "_grad_into_kernel": 6}
                assert all(p == params[name] for name, _, p in launches), launches
    print("ok")


@pytest.mark.skipif(not _HAS_JAX_TRITON, reason="needs triton and jax-triton (dev check)")
@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the GPU tests run the real thing")
def test_triton_path_lowers_for_cuda():
    _run_here("cuda_lowering_check", {"JAX_PLATFORMS": "cpu"})
