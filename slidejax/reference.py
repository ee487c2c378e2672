"""The plain whole-model path: every weight on one device, `jax.grad` of the mean loss, optax.

It is the engine's numerical reference (same layer function, whole-model autodiff instead of the
engine's per-layer recompute, micro-batching and streaming) and the all-resident baseline.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from slidejax.config import ModelConfig
from slidejax.model import LayerFn, rms_norm


def hidden_states(params: dict[str, Any], cfg: ModelConfig, input_ids: jax.Array, positions: jax.Array,
                  segment_ids: jax.Array | None, layer_fn: LayerFn, dtype: Any = jnp.float32,
                  remat: bool = False) -> jax.Array:
    """Final-normed hidden states [B, S, H] for a params tree shaped like `HostModel.tree()`."""
    cast = lambda a: jnp.asarray(a).astype(dtype)  # noqa: E731
    x = jnp.take(cast(params["embed"]), input_ids, axis=0)
    fn = jax.checkpoint(layer_fn.__call__) if remat else layer_fn.__call__
    for layer in params["layers"]:
        x = fn({k: cast(v) for k, v in layer.items()}, x, positions, segment_ids)
    return rms_norm(x, cast(params["norm"]), cfg.rms_norm_eps)


def head_weight(params: dict[str, Any], cfg: ModelConfig) -> Any:
    return params["embed"] if cfg.tie_word_embeddings else params["lm_head"]


def logits(params: dict[str, Any], cfg: ModelConfig, input_ids: jax.Array, positions: jax.Array,
           segment_ids: jax.Array | None = None, dtype: Any = jnp.float32) -> jax.Array:
    """Full logits [B, S, V] in fp32 (naive: for tests and small models)."""
    h = hidden_states(params, cfg, input_ids, positions, segment_ids, LayerFn(cfg), dtype)
    w = jnp.asarray(head_weight(params, cfg)).astype(dtype)
    return jnp.einsum("bsh,vh->bsv", h, w, preferred_element_type=jnp.float32)


def mean_loss(params: dict[str, Any], cfg: ModelConfig, batch: dict[str, jax.Array],
              dtype: Any = jnp.float32, layer_fn: LayerFn | None = None) -> jax.Array:
    """Mean next-token cross-entropy over all supervised tokens of `batch` (naive full logits).

    `batch` holds [N, B, S] arrays (N micro-batches, as the engine takes them): input_ids, labels
    (-100 = no loss), positions and segment_ids.
    """
    layer_fn = layer_fn or LayerFn(cfg)
    ids = batch["input_ids"].reshape(-1, batch["input_ids"].shape[-1])
    pos = batch["positions"].reshape(ids.shape)
    seg = batch["segment_ids"].reshape(ids.shape) if batch.get("segment_ids") is not None else None
    labels = batch["labels"].reshape(-1)
    h = hidden_states(params, cfg, ids, pos, seg, layer_fn, dtype).reshape(-1, cfg.hidden_size)
    w = jnp.asarray(head_weight(params, cfg)).astype(dtype)
    z = jnp.einsum("nh,vh->nv", h, w, preferred_element_type=jnp.float32)
    valid = labels != -100
    lse = jax.nn.logsumexp(z, axis=-1)
    target = jnp.take_along_axis(z, jnp.where(valid, labels, 0)[:, None], axis=-1)[:, 0]
    return jnp.sum(jnp.where(valid, lse - target, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def train_step(params: dict[str, Any], opt_state: Any, tx: optax.GradientTransformation,
               cfg: ModelConfig, batch: dict[str, jax.Array], max_grad_norm: float = 0.0,
               dtype: Any = jnp.float32) -> tuple[dict[str, Any], Any, jax.Array, jax.Array]:
    """One whole-model step: (new params, new opt state, loss, global grad norm before clipping)."""
    loss, grads = jax.value_and_grad(mean_loss)(params, cfg, batch, dtype)
    norm = optax.tree.norm(grads) if hasattr(optax, "tree") and hasattr(optax.tree, "norm") else optax.global_norm(grads)
    if max_grad_norm > 0:
        scale = max_grad_norm / jnp.maximum(norm, max_grad_norm)  # optax.clip_by_global_norm
        grads = jax.tree.map(lambda g: g * scale, grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, norm
