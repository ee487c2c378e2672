"""Naive full-logits linear + cross-entropy: the independent reference for the fused kernels.

It materialises the whole [N, V] logits matrix in fp32 and lets JAX differentiate it, so it is
only for tests and for the benchmark's "naive" baseline, never for training at scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def softcap_logits(logits: jax.Array, softcap: float | None) -> jax.Array:
    """Gemma-style soft-capping ``cap * tanh(logits / cap)``; identity when ``softcap`` is None."""
    if softcap is None:
        return logits
    return softcap * jnp.tanh(logits / softcap)


def naive_logits(h: jax.Array, w: jax.Array, softcap: float | None = None) -> jax.Array:
    """fp32 logits ``h @ w.T`` (fp32 accumulation, full precision for fp32 inputs), soft-capped."""
    logits = jnp.dot(h, w.T, preferred_element_type=jnp.float32,
                     precision=jax.lax.Precision.HIGHEST)
    return softcap_logits(logits, softcap)


def naive_linear_cross_entropy(
    h: jax.Array,
    w: jax.Array,
    labels: jax.Array,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    z_loss: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """Summed cross-entropy of ``softcap(h @ w.T)`` against ``labels``, plus the valid-token count.

    Per valid token (``label != ignore_index``) the loss is ``lse - logit[label] + z_loss * lse**2``.
    Returns ``(loss_sum f32[], n_valid int32[])``.
    """
    logits = naive_logits(h, w, softcap)
    lse = jax.nn.logsumexp(logits, axis=-1)
    valid = labels != ignore_index
    safe = jnp.where(valid, labels, 0)
    target = jnp.take_along_axis(logits, safe[:, None], axis=-1)[:, 0]
    per_token = lse - target + z_loss * jnp.square(lse)
    loss_sum = jnp.sum(jnp.where(valid, per_token, 0.0))
    return loss_sum, jnp.sum(valid, dtype=jnp.int32)
