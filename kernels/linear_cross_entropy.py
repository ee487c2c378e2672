"""Fused linear + cross-entropy: public API, implementation dispatch and the custom VJP.

Three ways in:

* :func:`linear_cross_entropy` takes the whole ``[V, H]`` head matrix and is differentiable. Like
  Liger-Kernel it produces the logits gradient in forward, chunk by chunk over tokens, so ``dh``
  and ``dw`` are ready when forward ends and backward only scales them by the cotangent.
* :func:`lce_fused_accumulate` is the same computation for an engine that keeps an fp32 weight
  gradient across micro-batches: it returns ``dh`` and adds ``dw`` into the caller's (donated)
  fp32 accumulator, so no second ``[V, H]`` buffer and no rounding of ``dw`` ever exist.
* :func:`lce_chunk_stats` / :func:`lce_chunk_grads` work on one vocabulary chunk ``w[v0:v0+Vc]``
  at a time, for an engine that streams the head matrix: pass 1 merges each chunk's statistics
  with :func:`combine_stats`, pass 2 asks each chunk for its share of the gradient given the full
  log-sum-exp; :func:`loss_from_stats` gives the loss.

Neither ever holds more than one ``[chunk, V]`` (or ``[chunk, Vc]``) fp32 logits block. ``impl``
selects the row-wise kernels: ``"triton"`` (jax-triton, GPU), ``"jax"`` (the pure-JAX twin) or
``"auto"`` (Triton on a GPU backend when jax_triton imports, else the twin).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from slidejax.kernels import linear_cross_entropy_jax as lce_jax
from slidejax.kernels.linear_cross_entropy_jax import (
    BlockOps,
    Stats,
    combine_stats,
    init_stats,
    loss_from_stats,
    lse_from_stats,
)

__all__ = [
    "combine_stats",
    "init_stats",
    "lce_chunk_grads",
    "lce_chunk_stats",
    "lce_fused_accumulate",
    "linear_cross_entropy",
    "loss_from_stats",
    "lse_from_stats",
    "resolve_impl",
]

IMPLS = ("auto", "triton", "jax")


@functools.cache
def _triton_importable() -> bool:
    try:
        import jax_triton  # noqa: F401
        import triton  # noqa: F401
    except Exception:  # jax_triton raises ImportError, but also RuntimeError on odd installs
        return False
    return True


def resolve_impl(impl: str = "auto") -> str:
    """The concrete implementation ``"triton"`` or ``"jax"`` that ``impl`` stands for here."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if jax.default_backend() == "gpu" and _triton_importable() else "jax"
    if impl == "triton" and not _triton_importable():
        raise ImportError("impl='triton' needs triton and jax_triton (pip install jax-triton) on a "
                          "CUDA backend; use impl='jax' or 'auto' elsewhere")
    return impl


def _ops(impl: str) -> BlockOps:
    if resolve_impl(impl) == "jax":
        return lce_jax.JAX_OPS
    from slidejax.kernels import cross_entropy_triton  # lazy: CI has no triton

    return cross_entropy_triton.TRITON_OPS


def _check(h: jax.Array, w: jax.Array, labels: jax.Array, softcap: float | None) -> None:
    if h.ndim != 2 or w.ndim != 2 or h.shape[1] != w.shape[1]:
        raise ValueError(f"expected h [N, H] and w [V, H], got h {h.shape} and w {w.shape}")
    if labels.shape != (h.shape[0],):
        raise ValueError(f"expected labels [{h.shape[0]}], got {labels.shape}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive or None, got {softcap}")


# --------------------------------------------------------------------------- whole-head API

@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _lce(h, w, labels, ignore_index, softcap, z_loss, impl, chunk_size):
    # Not differentiated: statistics only, no gradient blocks and no [V, H] accumulator.
    return lce_jax.fused_loss(h, w, labels, ignore_index=ignore_index, softcap=softcap,
                              z_loss=z_loss, chunk_size=chunk_size, ops=_ops(impl))


def _lce_fwd(h, w, labels, ignore_index, softcap, z_loss, impl, chunk_size):
    loss_sum, n_valid, dh, dw = lce_jax.fused_forward(
        h, w, labels, ignore_index=ignore_index, softcap=softcap, z_loss=z_loss,
        chunk_size=chunk_size, ops=_ops(impl))
    return (loss_sum, n_valid), (dh, dw)


def _lce_bwd(ignore_index, softcap, z_loss, impl, chunk_size, residuals, cotangents):
    dh, dw = residuals
    g = cotangents[0]  # n_valid is an integer output: its cotangent is float0
    scale = lambda d: (g * d.astype(jnp.float32)).astype(d.dtype)  # noqa: E731
    return scale(dh), scale(dw), None


_lce.defvjp(_lce_fwd, _lce_bwd)


def linear_cross_entropy(
    h: jax.Array,
    w: jax.Array,
    labels: jax.Array,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    z_loss: float = 0.0,
    impl: str = "auto",
    chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Summed cross-entropy of ``softcap(h @ w.T)`` against ``labels``, never materialising logits.

    Args:
      h: hidden states [N, H] (bf16 in training, fp32 in exactness mode).
      w: head weight [V, H] (the lm_head rows, or the embedding matrix when tied).
      labels: int [N] next-token targets in ``[0, V)``; ``ignore_index`` marks tokens without loss.
      softcap: if set, logits become ``softcap * tanh(logits / softcap)`` (Gemma-style).
      z_loss: weight of the ``z_loss * lse**2`` term added to each valid token's loss.
      impl: "auto", "triton" or "jax" (see module docstring).
      chunk_size: tokens per logits block; default from ``N`` and ``V`` (see ``choose_chunk``).

    Returns:
      ``(loss_sum f32[], n_valid int32[])``, differentiable w.r.t. ``h`` and ``w`` (the gradient of
      ``loss_sum``; divide by the total ``n_valid`` of a step outside for a token-weighted mean).
      All accumulation is fp32; under differentiation the logits gradient is rounded to the inputs'
      dtype before the two gradient GEMMs (as in Liger-Kernel).

    Extra device memory: forward only, one fp32 ``[chunk, V]`` logits block; under
    differentiation one chunk's logits gradient ``[chunk, V]`` (inputs' dtype) and one fp32
    ``[chunk / 2, V]`` logits block, plus the fp32 ``[V, H]`` dw accumulator, which at few tokens
    (``N`` below ~10 ``H``) outweighs them. An engine keeping its own fp32 accumulator uses
    :func:`lce_fused_accumulate` (no second one); one that cannot afford ``[V, H]`` at all streams
    ``w`` through :func:`lce_chunk_stats` / :func:`lce_chunk_grads` (one extra logits GEMM).
    """
    _check(h, w, labels, softcap)
    return _lce(h, w, labels, int(ignore_index), None if softcap is None else float(softcap),
                float(z_loss), resolve_impl(impl), chunk_size)


def lce_fused_accumulate(
    h: jax.Array,
    w: jax.Array,
    labels: jax.Array,
    dw_acc: jax.Array | None = None,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    z_loss: float = 0.0,
    impl: str = "auto",
    chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Loss, ``dh`` and ``dw_acc + dw`` of one micro-batch, for an engine accumulating the head
    gradient in fp32 over micro-batches.

    Same loss and chunked computation as :func:`linear_cross_entropy` (arguments alike), but the
    gradients are plain outputs rather than a VJP, and the weight gradient is added in fp32 to
    ``dw_acc`` inside the token loop: no separate fp32 accumulator, no rounding to ``w.dtype``.
    Donate ``dw_acc`` in the caller's jit (``donate_argnums``) so XLA updates it in place.

    Args:
      dw_acc: f32 [V, H] or [V * H], the weight gradient so far; None starts from zero.

    Returns:
      ``(loss_sum f32[], n_valid int32[], dh, dw)``: ``dh`` [N, H] in ``h.dtype`` is the gradient
      of ``loss_sum`` w.r.t. ``h`` (each row rounded once from fp32, exactly as the
      ``linear_cross_entropy`` VJP gives it); ``dw`` is ``dw_acc`` plus the gradient of ``loss_sum``
      w.r.t. ``w``, f32, in ``dw_acc``'s shape ([V, H] when None). Calls on consecutive
      micro-batches, each passing the previous ``dw``, give the ``dw`` of one call on all of them.

    Not itself differentiable (it returns gradients). Extra device memory beyond its inputs and
    outputs: one chunk's logits gradient ``[chunk, V]`` in the inputs' dtype and one fp32
    ``[chunk / 2, V]`` logits block (``4 * chunk * V`` bytes in bf16, 1024 * V * 4 by default:
    6.25% of the fp32 ``N x V`` logits at N = 16K), plus ``[chunk, H]`` GEMM pieces.
    """
    _check(h, w, labels, softcap)
    return lce_jax.fused_accumulate(
        h, w, labels, dw_acc, ignore_index=int(ignore_index),
        softcap=None if softcap is None else float(softcap), z_loss=float(z_loss),
        chunk_size=chunk_size, ops=_ops(impl))


# --------------------------------------------------------------------------- vocab-chunk API

def lce_chunk_stats(
    h: jax.Array,
    w_chunk: jax.Array,
    labels: jax.Array,
    vocab_start,
    *,
    softcap: float | None = None,
    impl: str = "auto",
    chunk_size: int | None = None,
) -> Stats:
    """Per-token statistics of one vocabulary chunk ``w_chunk = w[vocab_start:vocab_start+Vc]``.

    Returns ``(m, s, t)``, each f32 [N]: the max over the chunk's (soft-capped) logits, the sum of
    ``exp(logit - m)`` over them, and the (soft-capped) target logit when ``labels`` falls in the
    chunk, else 0. Merge chunks with :func:`combine_stats`; then ``lse = lse_from_stats(m, s)``.
    ``vocab_start`` may be a Python int or a traced integer scalar.
    """
    _check(h, w_chunk, labels, softcap)
    return lce_jax.chunk_stats(h, w_chunk, labels, vocab_start,
                               softcap=None if softcap is None else float(softcap),
                               chunk_size=chunk_size, ops=_ops(impl))


def lce_chunk_grads(
    h: jax.Array,
    w_chunk: jax.Array,
    labels: jax.Array,
    vocab_start,
    lse: jax.Array,
    row_scale: jax.Array,
    *,
    softcap: float | None = None,
    z_loss: float = 0.0,
    impl: str = "auto",
    chunk_size: int | None = None,
    dh_acc: jax.Array | None = None,
    dw_acc: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One vocabulary chunk's share of the gradient of ``sum_i row_scale[i] * loss_i``.

    ``lse`` is the full-vocabulary log-sum-exp per token (from the combined statistics of all
    chunks) and ``row_scale`` f32 [N] weights each token (0 for ignored tokens, e.g.
    ``valid / n_valid_total`` for a mean). Returns ``(dh f32 [N, H], dw_chunk f32 [Vc, H])``:
    summing ``dh`` over chunks and concatenating the ``dw_chunk`` gives the full gradient.

    ``dh_acc`` (f32 [N, H]) and ``dw_acc`` (f32 [Vc, H] or [Vc * H]), when given, are what the
    share is added to, in the token loop itself, and the results keep their shapes: donate them
    in the caller's jit and XLA updates them in place (no second buffer, no separate add).
    """
    _check(h, w_chunk, labels, softcap)
    return lce_jax.chunk_grads(h, w_chunk, labels, vocab_start, lse, row_scale,
                               softcap=None if softcap is None else float(softcap),
                               z_loss=float(z_loss), chunk_size=chunk_size, ops=_ops(impl),
                               dh_acc=dh_acc, dw_acc=dw_acc)
