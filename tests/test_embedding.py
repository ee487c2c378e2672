"""Host-side embedding lookup and gradient against plain numpy indexing."""

import ml_dtypes
import numpy as np
import pytest

from slidejax.embedding import RowGradient, gather_rows


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_gather_rows_over_row_blocks(dtype):
    rng = np.random.default_rng()
    vocab, hidden = 257, 24
    table = rng.standard_normal((vocab, hidden)).astype(dtype)
    cuts = [0, 100, 101, vocab]  # uneven blocks, one of a single row
    blocks = [(a, table[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    ids = rng.integers(0, vocab, (3, 11))
    out = np.full((3, 11, hidden), np.nan, dtype)
    gather_rows(blocks, ids, out.reshape(-1))
    np.testing.assert_array_equal(out.astype(np.float32), table[ids].astype(np.float32))


def test_gather_rows_rounds_an_fp32_table_into_bf16_like_ml_dtypes():
    """An untied embedding is gathered from its fp32 master: the rows must hold the bits a bf16
    copy of the table would (round to nearest even, ties, infinities and NaN included)."""
    rng = np.random.default_rng()
    vocab, hidden = 131, 40
    table = rng.standard_normal((vocab, hidden)).astype(np.float32)
    bits = table.view(np.uint32)
    bits[0, :8] = (bits[0, :8] & 0xFFFF0000) | 0x8000  # exact ties: to even
    bits[1, :8] = (bits[1, :8] & 0xFFFF0000) | 0x7FFF
    table[2, :4] = [np.inf, -np.inf, np.nan, -np.nan]
    table[3, :2] = [3.4e38, -3.4e38]  # round up to infinity
    cuts = [0, 2, 64, vocab]
    blocks = [(a, table[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    ids = np.concatenate([np.arange(4), rng.integers(0, vocab, 29)])
    out = np.zeros((ids.size, hidden), ml_dtypes.bfloat16)
    gather_rows(blocks, ids, out.reshape(-1))
    np.testing.assert_array_equal(out.view(np.uint16), table[ids].astype(ml_dtypes.bfloat16).view(np.uint16))


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_row_gradient_sums_per_token(dtype):
    rng = np.random.default_rng()
    vocab, hidden = 97, 16
    ids = rng.integers(0, vocab, (2, 3, 9))
    grads = [rng.standard_normal((3, 9, hidden)).astype(dtype) for _ in range(2)]
    rg = RowGradient(ids)
    values = rg.accumulate(grads)
    want = np.zeros((vocab, hidden), np.float64)
    np.add.at(want, ids.reshape(-1), np.concatenate([g.reshape(-1, hidden) for g in grads]).astype(np.float64))
    np.testing.assert_array_equal(rg.rows, np.unique(ids))
    np.testing.assert_allclose(values, want[rg.rows], rtol=1e-5, atol=1e-5)
    assert rg.sq_norm() == pytest.approx(float(np.sum(want ** 2)), rel=1e-5)
    idx = rg.index_for(40, 80)
    for r in range(40, 80):
        k = idx[r - 40]
        assert (k == -1) == (r not in set(ids.reshape(-1).tolist()))
        if k >= 0:
            assert rg.rows[k] == r


def test_row_gradient_added_as_micro_batches_land():
    """Micro-batches added in any order (as their downloads land) give the same row sums."""
    rng = np.random.default_rng()
    vocab, hidden, M = 53, 8, 4
    ids = rng.integers(0, vocab, (M, 2, 7))
    grads = [rng.standard_normal((2, 7, hidden)).astype(np.float32) for _ in range(M)]
    in_order = RowGradient(ids).accumulate(grads)
    rg = RowGradient(ids)
    for mb in rng.permutation(M):
        rg.add(int(mb), grads[mb])
    np.testing.assert_allclose(rg.values, in_order, rtol=1e-6, atol=1e-6)
    want = np.zeros((vocab, hidden))
    np.add.at(want, ids.reshape(-1), np.concatenate([g.reshape(-1, hidden) for g in grads]))
    np.testing.assert_allclose(rg.values, want[rg.rows], rtol=1e-5, atol=1e-5)


def test_other_dtypes_are_refused_not_misread():
    """float16 (or float64) gradients and a float16 gather target are refused: they were read as
    bf16 bit patterns."""
    rng = np.random.default_rng()
    ids = rng.integers(0, 10, (2, 6))
    rg = RowGradient(ids)
    for dtype in (np.float16, np.float64):
        with pytest.raises(TypeError, match="bfloat16 or float32"):
            rg.add(0, rng.standard_normal((6, 4)).astype(dtype))
    table = rng.standard_normal((10, 4)).astype(np.float32)
    with pytest.raises(TypeError, match="bfloat16 or float32"):
        gather_rows([(0, table)], ids[0], np.empty((6, 4), np.float16))
