"""Fused linear + cross-entropy on the GPU: the Triton path (and the twin) against the naive one.

bf16 tolerances (the logits gradient and dh, dw are rounded to bf16), fresh random inputs each
run (the seed is in every failure message), never a NaN, both APIs. Skipped without a CUDA GPU.
"""

from __future__ import annotations

import secrets

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
from slidejax.kernels.reference import naive_linear_cross_entropy, naive_logits

pytestmark = pytest.mark.gpu

BF16_GRAD_TOL = 2e-2  # max-abs error relative to the largest entry
LOSS_TOL = 1e-4  # the loss comes from fp32 logits (exact bf16 products, fp32 sums)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def make_inputs(n, hidden, vocab, *, dtype=jnp.bfloat16, logit_scale=3.0, mask_frac=0.2):
    seed = secrets.randbits(32)
    kh, kw, ky, km = jax.random.split(jax.random.key(seed), 4)
    h = jax.random.normal(kh, (n, hidden), jnp.float32)
    w = jax.random.normal(kw, (vocab, hidden), jnp.float32) * (logit_scale / np.sqrt(hidden))
    labels = jax.random.randint(ky, (n,), 0, vocab, jnp.int32)
    labels = jnp.where(jax.random.uniform(km, (n,)) < mask_frac, -100, labels)
    return h.astype(dtype), w.astype(dtype), labels, seed


def reference(h, w, labels, **kw):
    """fp32 naive loss and gradients on the same (upcast) values."""
    hf, wf = h.astype(jnp.float32), w.astype(jnp.float32)
    fn = jax.value_and_grad(lambda h, w: naive_linear_cross_entropy(h, w, labels, **kw),
                            argnums=(0, 1), has_aux=True)
    return jax.jit(fn)(hf, wf)


def check(got, want, tol, seed, what):
    got = np.asarray(jnp.asarray(got, jnp.float32))
    assert np.all(np.isfinite(got)), f"{what}: non-finite values (seed {seed})"
    err = rel_err(got, want)
    assert err < tol, f"{what}: relative error {err:.2e} >= {tol} (seed {seed})"


def test_auto_picks_triton_on_gpu():
    assert resolve_impl("auto") == "triton"


# The twin runs on the GPU too (impl="jax"): checked once, the Triton path in every variant.
@pytest.mark.parametrize("impl,softcap,z_loss,logit_scale", [
    ("triton", None, 0.0, 3.0), ("triton", 30.0, 1e-4, 3.0), ("triton", None, 0.0, 40.0),
    ("jax", 30.0, 1e-4, 3.0)], ids=["plain", "softcap_z_loss", "large_logits", "twin"])
def test_whole_head_bf16(impl, softcap, z_loss, logit_scale):
    # Vocab not a multiple of any tile; 2000 tokens = 3 x 512 + a partial chunk of 464.
    h, w, labels, seed = make_inputs(2000, 512, 50_021, logit_scale=logit_scale)
    kw = dict(softcap=softcap, z_loss=z_loss)
    fused = lambda h, w: linear_cross_entropy(h, w, labels, impl=impl, chunk_size=512, **kw)  # noqa: E731
    (ref_loss, ref_count), (ref_dh, ref_dw) = reference(h, w, labels, **kw)

    loss, count = jax.jit(fused)(h, w)
    (loss_fwd, _), (dh, dw) = jax.jit(jax.value_and_grad(fused, argnums=(0, 1), has_aux=True))(h, w)
    assert int(count) == int(ref_count), seed
    check(loss, ref_loss, LOSS_TOL, seed, "loss (forward only)")
    check(loss_fwd, ref_loss, LOSS_TOL, seed, "loss (with gradients)")
    assert dh.dtype == dw.dtype == jnp.bfloat16
    check(dh, ref_dh, BF16_GRAD_TOL, seed, "dh")
    check(dw, ref_dw, BF16_GRAD_TOL, seed, "dw")


@pytest.mark.parametrize("impl", ["triton", "jax"])
def test_whole_head_fp32_exactness_mode(impl):
    """fp32 inputs: fp32 logits gradient written in place over the logits block (aliased)."""
    h, w, labels, seed = make_inputs(700, 256, 20_011, dtype=jnp.float32)
    fused = lambda h, w: linear_cross_entropy(h, w, labels, impl=impl, chunk_size=256,  # noqa: E731
                                              softcap=20.0, z_loss=1e-3)
    (ref_loss, _), (ref_dh, ref_dw) = reference(h, w, labels, softcap=20.0, z_loss=1e-3)
    (loss, _), (dh, dw) = jax.jit(jax.value_and_grad(fused, argnums=(0, 1), has_aux=True))(h, w)
    check(loss, ref_loss, 1e-5, seed, "loss")
    check(dh, ref_dh, 1e-4, seed, "dh")
    check(dw, ref_dw, 1e-4, seed, "dw")


@pytest.mark.parametrize("impl,softcap,z_loss", [
    ("triton", None, 0.0), ("triton", 30.0, 1e-4), ("jax", 30.0, 1e-4)],
    ids=["plain", "softcap_z_loss", "twin"])
def test_vocab_chunk_primitives_bf16(impl, softcap, z_loss):
    n, hidden, vocab = 1500, 512, 40_009
    h, w, labels, seed = make_inputs(n, hidden, vocab)
    splits = [(0, 13_000), (13_000, 13_001), (13_001, vocab)]  # uneven, one single column
    row_scale = (labels != -100).astype(jnp.float32) / jnp.maximum(jnp.sum(labels != -100), 1)

    @jax.jit
    def two_passes(h, w):
        stats = init_stats(n)
        for a, b in splits:
            stats = combine_stats(stats, lce_chunk_stats(h, w[a:b], labels, a, softcap=softcap,
                                                         impl=impl, chunk_size=512))
        lse = lse_from_stats(stats[0], stats[1])
        grads = [lce_chunk_grads(h, w[a:b], labels, a, lse, row_scale, softcap=softcap,
                                 z_loss=z_loss, impl=impl, chunk_size=512) for a, b in splits]
        dh = sum(g[0] for g in grads)
        return loss_from_stats(lse, stats[2], labels, z_loss=z_loss), lse, dh, \
            jnp.concatenate([g[1] for g in grads])

    (loss, count), lse, dh, dw = two_passes(h, w)
    hf, wf = h.astype(jnp.float32), w.astype(jnp.float32)
    ref_lse = jax.jit(lambda h, w: jax.nn.logsumexp(naive_logits(h, w, softcap), axis=-1))(hf, wf)
    (ref_loss, ref_count), (ref_dh, ref_dw) = reference(h, w, labels, softcap=softcap,
                                                        z_loss=z_loss)
    assert int(count) == int(ref_count), seed
    check(lse, ref_lse, 1e-5, seed, "lse")
    check(loss, ref_loss, LOSS_TOL, seed, "loss")
    mean = float(ref_count)
    assert dh.dtype == dw.dtype == jnp.float32
    check(dh, np.asarray(ref_dh) / mean, BF16_GRAD_TOL, seed, "dh")
    check(dw, np.asarray(ref_dw) / mean, BF16_GRAD_TOL, seed, "dw")


def test_triton_and_twin_agree_closely():
    """Same blocks, same XLA GEMMs: only the row kernels differ, so the two paths agree far
    tighter than either agrees with an fp32 reference."""
    h, w, labels, seed = make_inputs(1024, 256, 32_003)
    out = {}
    for impl in ("triton", "jax"):
        fn = lambda h, w, impl=impl: linear_cross_entropy(h, w, labels, impl=impl)  # noqa: E731
        out[impl] = jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))(h, w)
    (lt, _), (dht, dwt) = out["triton"]
    (lj, _), (dhj, dwj) = out["jax"]
    check(lt, lj, 1e-5, seed, "loss")
    check(dht, dhj, 1e-2, seed, "dh")  # at most a bf16 ulp here and there
    check(dwt, dwj, 1e-2, seed, "dw")


# --------------------------------------------------------------------------- accumulate API

@pytest.mark.parametrize("impl,softcap,z_loss", [
    ("triton", None, 0.0), ("triton", 30.0, 1e-4), ("jax", 30.0, 1e-4)],
    ids=["plain", "softcap_z_loss", "twin"])
def test_accumulate_bf16_over_two_calls(impl, softcap, z_loss):
    """Two micro-batches (1100 + 900 tokens, chunk 512: full chunks and tails) into one donated
    fp32 accumulator that starts non-zero: loss, dh and accumulated dw against the naive fp32."""
    h, w, labels, seed = make_inputs(2000, 512, 50_021)
    kw = dict(softcap=softcap, z_loss=z_loss)
    (ref_loss, ref_count), (ref_dh, ref_dw) = reference(h, w, labels, **kw)
    ref_dw = np.asarray(ref_dw)
    acc0 = np.random.default_rng(seed).standard_normal(ref_dw.size).astype(np.float32)
    acc0 *= np.abs(ref_dw).max()
    run = jax.jit(lambda h, w, y, acc: lce_fused_accumulate(h, w, y, acc, impl=impl,
                                                             chunk_size=512, **kw),
                  donate_argnums=(3,))
    acc = jnp.asarray(acc0)
    first = acc
    loss_a, count_a, dh_a, acc = run(h[:1100], w, labels[:1100], acc)
    loss_b, count_b, dh_b, acc = run(h[1100:], w, labels[1100:], acc)
    assert first.is_deleted(), "dw_acc was not donated"
    assert int(count_a) + int(count_b) == int(ref_count), seed
    check(float(loss_a) + float(loss_b), ref_loss, LOSS_TOL, seed, "loss")
    assert dh_a.dtype == jnp.bfloat16 and acc.dtype == jnp.float32 and acc.shape == acc0.shape
    check(jnp.concatenate([dh_a, dh_b]), ref_dh, BF16_GRAD_TOL, seed, "dh")
    check(np.asarray(acc) - acc0, ref_dw.reshape(-1), BF16_GRAD_TOL, seed, "dw")


@pytest.mark.parametrize("impl", ["triton", "jax"])
def test_accumulate_fp32_exactness_mode(impl):
    h, w, labels, seed = make_inputs(700, 256, 20_011, dtype=jnp.float32)
    kw = dict(softcap=20.0, z_loss=1e-3)
    loss, _, dh, dw = jax.jit(lambda h, w: lce_fused_accumulate(
        h, w, labels, impl=impl, chunk_size=256, **kw))(h, w)
    (ref_loss, _), (ref_dh, ref_dw) = reference(h, w, labels, **kw)
    check(loss, ref_loss, 1e-5, seed, "loss")
    check(dh, ref_dh, 1e-4, seed, "dh")
    check(dw, ref_dw, 1e-4, seed, "dw")


@pytest.mark.parametrize("impl", ["triton", "jax"])
def test_accumulate_gpu_buffers(impl):
    """XLA:GPU's buffer assignment (compile only): the donated accumulator is updated in place
    (the dw GEMM adds into it, cuBLAS beta = 1: no [V, H] scratch), and the scratch is one
    chunk's bf16 logits gradient, ONE fp32 half-chunk logits block, and small change (GEMM
    workspace, [chunk, H] pieces)."""
    n, hidden, vocab, chunk = 4096, 1024, 128_256, 1024
    h, w = (jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((n, hidden), (vocab, hidden)))
    y = jax.ShapeDtypeStruct((n,), jnp.int32)
    acc = jax.ShapeDtypeStruct((vocab * hidden,), jnp.float32)
    run = jax.jit(lambda h, w, y, acc: lce_fused_accumulate(h, w, y, acc, impl=impl,
                                                             chunk_size=chunk),
                  donate_argnums=(3,))
    ma = run.lower(h, w, y, acc).compile().memory_analysis()
    need = chunk * vocab * 2 + chunk // 2 * vocab * 4  # g bf16 + one fp32 half block
    slack = 96 * 2**20
    assert ma.alias_size_in_bytes == vocab * hidden * 4
    assert ma.output_size_in_bytes - ma.alias_size_in_bytes <= n * hidden * 2 + 2**10  # dh
    assert ma.temp_size_in_bytes <= need + slack, (
        f"XLA temp {ma.temp_size_in_bytes / 2**20:.0f} MiB > {need / 2**20:.0f} MiB + "
        f"{slack / 2**20:.0f} MiB (a half block is {need / 2**21:.0f} MiB, a [V, H] fp32 "
        f"{vocab * hidden * 4 / 2**20:.0f} MiB)")
