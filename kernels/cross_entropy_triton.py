"""Triton row kernels for the fused linear + cross-entropy, called through jax-triton.

The logits block ``[rows, cols]`` (fp32, contiguous) is made by XLA; one Triton program per row
then sweeps it in ``BLOCK``-wide tiles:

* ``_stats_kernel``: online max and sum-exp in a single read, plus the target logit;
* ``_grad_kernel``: given the row's full log-sum-exp, writes the logits gradient (bf16 for bf16
  training, or fp32 over the logits block itself: that in-place write is declared to XLA through
  ``input_output_aliases``);
* ``_grad_into_kernel``: the same rows written into rows ``ROW0 + row`` of a larger gradient
  buffer, in place (aliased), so that half-chunk logits blocks fill one chunk's gradient.

Kernel arguments follow jax-triton's convention: input pointers, then output pointers, then the
compile-time constants as keywords. Importing this module needs ``triton``; launching the kernels
from JAX needs ``jax_triton`` too, imported on first launch so that the kernels can also be run
(e.g. under ``TRITON_INTERPRET=1`` with torch tensors) where jax-triton is absent.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from slidejax.kernels.linear_cross_entropy_jax import BlockOps, Stats

MAX_BLOCK = 8192  # columns per tile: 16 warps x 32 lanes x 16 fp32 values


@triton.jit
def _tanh(x):
    # exp form rather than libdevice.tanh, which the Triton interpreter lacks; saturates cleanly.
    e = tl.exp(-2.0 * tl.abs(x))
    r = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, r, -r)


@triton.jit
def _stats_kernel(logits_ptr, labels_ptr, m_ptr, s_ptr, t_ptr,
                  N_COLS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * N_COLS
    m = float("-inf")
    s = 0.0
    for start in range(0, N_COLS, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < N_COLS
        z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if SOFTCAP > 0:
            z = SOFTCAP * _tanh(z / SOFTCAP)
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    label = tl.load(labels_ptr + row)
    inside = (label >= 0) & (label < N_COLS)
    t = tl.load(row_ptr + tl.where(inside, label, 0), mask=inside, other=0.0).to(tl.float32)
    if SOFTCAP > 0:
        t = SOFTCAP * _tanh(t / SOFTCAP)  # tanh(0) = 0 keeps "not in this chunk" at 0
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    tl.store(t_ptr + row, t)


@triton.jit
def _grad_row(logits_ptr, labels_ptr, lse_ptr, scale_ptr, grad_ptr, row, out_row,
              N_COLS: tl.constexpr, SOFTCAP: tl.constexpr, Z_LOSS: tl.constexpr,
              BLOCK: tl.constexpr):
    # Logits row ``row`` -> gradient row ``out_row`` of grad_ptr.
    label = tl.load(labels_ptr + row)
    lse = tl.load(lse_ptr + row)
    scale = tl.load(scale_ptr + row)
    coef = scale * (1.0 + 2.0 * Z_LOSS * lse)
    for start in range(0, N_COLS, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < N_COLS
        # Each element is read before it is written, by the same program: safe when grad_ptr
        # aliases logits_ptr.
        z = tl.load(logits_ptr + row * N_COLS + cols, mask=mask, other=0.0).to(tl.float32)
        if SOFTCAP > 0:
            z = SOFTCAP * _tanh(z / SOFTCAP)
        g = tl.exp(z - lse) * coef
        g = tl.where(cols == label, g - scale, g)
        if SOFTCAP > 0:
            g = g * (1.0 - (z / SOFTCAP) * (z / SOFTCAP))
        tl.store(grad_ptr + out_row * N_COLS + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_kernel(logits_ptr, labels_ptr, lse_ptr, scale_ptr, grad_ptr,
                 N_COLS: tl.constexpr, SOFTCAP: tl.constexpr, Z_LOSS: tl.constexpr,
                 BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    _grad_row(logits_ptr, labels_ptr, lse_ptr, scale_ptr, grad_ptr, row, row,
              N_COLS, SOFTCAP, Z_LOSS, BLOCK)


@triton.jit
def _grad_into_kernel(logits_ptr, labels_ptr, lse_ptr, scale_ptr, buf_ptr, grad_ptr,
                      N_COLS: tl.constexpr, SOFTCAP: tl.constexpr, Z_LOSS: tl.constexpr,
                      BLOCK: tl.constexpr, ROW0: tl.constexpr):
    # grad_ptr is buf_ptr (input/output aliased): rows ROW0 + row are written, the others kept.
    row = tl.program_id(0).to(tl.int64)
    _grad_row(logits_ptr, labels_ptr, lse_ptr, scale_ptr, grad_ptr, row, row + ROW0,
              N_COLS, SOFTCAP, Z_LOSS, BLOCK)


def launch_config(n_cols: int) -> dict:
    """Tile width and warps for rows of ``n_cols`` columns."""
    block = min(MAX_BLOCK, triton.next_power_of_2(n_cols))
    return {"BLOCK": block, "num_warps": 16 if block >= 4096 else (8 if block >= 1024 else 4)}


def _triton_call(*args, out_shape, **kwargs):
    import jax_triton as jt

    # jax-triton 0.4 renamed out_shape to out_type.
    key = "out_shape" if "out_shape" in inspect.signature(jt.triton_call).parameters else "out_type"
    return jt.triton_call(*args, **{key: out_shape}, **kwargs)


def block_stats(logits: jax.Array, labels: jax.Array, softcap: float | None) -> Stats:
    """Triton version of the twin's ``stats`` BlockOp (see :class:`BlockOps`)."""
    rows, cols = logits.shape
    row_f32 = jax.ShapeDtypeStruct((rows,), jnp.float32)
    m, s, t = _triton_call(
        logits.astype(jnp.float32), labels.astype(jnp.int32),
        kernel=_stats_kernel, out_shape=[row_f32, row_f32, row_f32], grid=(rows,),
        N_COLS=cols, SOFTCAP=float(softcap or 0.0), **launch_config(cols))
    return m, s, t


def block_grads(logits: jax.Array, labels: jax.Array, lse: jax.Array, scale: jax.Array,
                softcap: float | None, z_loss: float, out_dtype) -> jax.Array:
    """Triton version of the twin's ``grads`` BlockOp (see :class:`BlockOps`)."""
    rows, cols = logits.shape
    logits = logits.astype(jnp.float32)
    out_dtype = jnp.dtype(out_dtype)
    # An fp32 gradient overwrites the logits block (dead afterwards): no second block.
    aliases = {0: 0} if out_dtype == logits.dtype else {}
    return _triton_call(
        logits, labels.astype(jnp.int32), lse.astype(jnp.float32), scale.astype(jnp.float32),
        kernel=_grad_kernel, out_shape=jax.ShapeDtypeStruct((rows, cols), out_dtype),
        grid=(rows,), input_output_aliases=aliases,
        N_COLS=cols, SOFTCAP=float(softcap or 0.0), Z_LOSS=float(z_loss), **launch_config(cols))


def block_grads_into(buf: jax.Array, row0: int, logits: jax.Array, labels: jax.Array,
                     lse: jax.Array, scale: jax.Array, softcap: float | None,
                     z_loss: float) -> jax.Array:
    """Triton version of the twin's ``grads_into`` BlockOp: the kernel writes straight into
    ``buf`` (declared to XLA as an input/output alias), so no separate gradient block exists."""
    rows, cols = logits.shape
    return _triton_call(
        logits.astype(jnp.float32), labels.astype(jnp.int32), lse.astype(jnp.float32),
        scale.astype(jnp.float32), buf,
        kernel=_grad_into_kernel, out_shape=jax.ShapeDtypeStruct(buf.shape, buf.dtype),
        grid=(rows,), input_output_aliases={4: 0},
        N_COLS=cols, SOFTCAP=float(softcap or 0.0), Z_LOSS=float(z_loss), ROW0=int(row0),
        **launch_config(cols))


TRITON_OPS = BlockOps(stats=block_stats, grads=block_grads, grads_into=block_grads_into)
