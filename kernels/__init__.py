"""Fused kernels of slidejax (installed as ``slidejax.kernels``).

The fused linear + cross-entropy: Triton kernels through jax-triton on GPU, a pure-JAX twin
everywhere, and a naive full-logits reference (``slidejax.kernels.reference``) for tests.
"""

from slidejax.kernels.linear_cross_entropy import (
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
