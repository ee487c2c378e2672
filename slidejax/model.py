"""Llama-family decoder in Flax NNX, cut into the stages the sliding-window engine streams.

A model is three kinds of stage:
- the embedding: a [vocab, hidden] table looked up by token id;
- `num_layers` identical `DecoderLayer`s: every layer has the same graph definition, so one
  compiled function serves them all and only the weights change as the window slides;
- the head: the final RMSNorm and the lm_head ([vocab, hidden], or the embedding when tied), whose
  loss is the fused linear cross-entropy of `slidejax.kernels`.

Weights keep Hugging Face's names and layouts (`self_attn.q_proj.weight` is [out, in]), so
checkpoint I/O is a copy, not a transpose. Modules compute in the dtype of their weights: the
engine uploads bf16 copies of fp32 master weights for training, fp32 for exactness tests. Norms,
RoPE tables and softmax run in fp32 as transformers does.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from slidejax.config import ModelConfig

Array = jax.Array


class Linear(nnx.Module):
    """y = x @ W.T (+ b) with W stored [out, in] like PyTorch / Hugging Face."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, rngs: nnx.Rngs,
                 init_std: float = 0.02):
        self.weight = nnx.Param(init_std * jax.random.normal(rngs.params(), (out_features, in_features), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32)) if bias else None

    def __call__(self, x: Array) -> Array:
        w = self.weight[...]
        y = jnp.einsum("...i,oi->...o", x.astype(w.dtype), w)
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class RMSNorm(nnx.Module):
    """RMSNorm computed in fp32, cast back to the input dtype before the weight (as transformers)."""

    def __init__(self, dim: int, eps: float):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        dtype = x.dtype
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        w = self.weight[...]
        return w * xf.astype(dtype) if w.dtype == dtype else (w * xf.astype(dtype)).astype(dtype)


def rope_tables(inv_freq: np.ndarray, positions: Array, dtype: Any) -> tuple[Array, Array]:
    """cos/sin tables [B, S, head_dim] for integer positions [B, S], computed in fp32."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate-half RoPE on [B, S, heads, head_dim]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def attention(q: Array, k: Array, v: Array, segment_ids: Array | None, window: int | None,
              implementation: str | None) -> Array:
    """Causal GQA attention; `segment_ids` [B, S] (0 = padding) keeps packed documents apart.

    Without segment ids the cuDNN flash path applies causality itself; with them the mask is
    built explicitly. Padding rows (segment 0) attend within their own padding run so no row is
    empty (their outputs are never supervised).
    """
    local = (window - 1, 0) if window else None
    if segment_ids is None:
        return _sdpa(q, k, v, implementation, is_causal=True, local_window_size=local)
    s = q.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = jnp.tril(jnp.ones((s, s), dtype=bool))
    mask = same & causal[None]
    if window:
        idx = jnp.arange(s)
        mask = mask & ((idx[:, None] - idx[None, :]) < window)[None]
    return _sdpa(q, k, v, implementation, mask=mask[:, None])


def _sdpa(q: Array, k: Array, v: Array, implementation: str | None, **kw: Any) -> Array:
    """`jax.nn.dot_product_attention`, falling back to XLA where cuDNN refuses the case."""
    if implementation is not None:
        try:
            return jax.nn.dot_product_attention(q, k, v, implementation=implementation, **kw)
        except (ValueError, NotImplementedError, TypeError, RuntimeError):
            pass
    return jax.nn.dot_product_attention(q, k, v, **kw)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.q_proj = Linear(h, cfg.num_heads * d, bias=cfg.qkv_bias, rngs=rngs)
        self.k_proj = Linear(h, cfg.num_kv_heads * d, bias=cfg.qkv_bias, rngs=rngs)
        self.v_proj = Linear(h, cfg.num_kv_heads * d, bias=cfg.qkv_bias, rngs=rngs)
        self.o_proj = Linear(cfg.num_heads * d, h, bias=cfg.o_bias, rngs=rngs)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.window = cfg.sliding_window
        self.inv_freq = tuple(float(f) for f in cfg.inv_freq())  # static: hashable, not a weight

    def __call__(self, x: Array, positions: Array, segment_ids: Array | None,
                 implementation: str | None = None) -> Array:
        b, s, _ = x.shape
        q = self.q_proj(x).reshape(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope_tables(np.asarray(self.inv_freq, np.float32), positions, q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = attention(q, k, v, segment_ids, self.window, implementation)
        return self.o_proj(o.reshape(b, s, self.num_heads * self.head_dim))


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        h, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(h, f, bias=cfg.mlp_bias, rngs=rngs)
        self.up_proj = Linear(h, f, bias=cfg.mlp_bias, rngs=rngs)
        self.down_proj = Linear(f, h, bias=cfg.mlp_bias, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """Pre-norm attention + SwiGLU block; the unit the engine streams through the GPU."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x: Array, positions: Array, segment_ids: Array | None = None,
                 implementation: str | None = None) -> Array:
        x = x + self.self_attn(self.input_layernorm(x), positions, segment_ids, implementation)
        return x + self.mlp(self.post_attention_layernorm(x))


# ----- Parameters as flat, named pytrees (HF names) -----

def _state_to_named(state: nnx.State) -> dict[str, Array]:
    out = {}
    for path, leaf in nnx.to_flat_state(state):
        out[".".join(str(p) for p in path)] = leaf.get_value() if hasattr(leaf, "get_value") else leaf.value
    return out


def layer_template(cfg: ModelConfig) -> tuple[nnx.GraphDef, dict[str, tuple[tuple[int, ...], bool]]]:
    """The layer graph definition and its parameters' names -> (shape, weight-decayed?).

    Built abstractly (no allocation), so it is cheap for any model size.
    """
    abstract = nnx.eval_shape(lambda: DecoderLayer(cfg, nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    names = _state_to_named(state)
    return graphdef, {n: (tuple(a.shape), len(a.shape) > 1) for n, a in names.items()}


def init_params(cfg: ModelConfig, seed: int = 0) -> dict[str, Any]:
    """Random fp32 parameters (HF's init: normal(0.02) matrices, unit norms, zero biases).

    Returns {"embed": [V, H], "layers": [ {name: array} ] * L, "norm": [H], "lm_head": [V, H] or
    absent when tied}, numpy float32.
    """
    rng = np.random.default_rng(seed)
    _, shapes = layer_template(cfg)

    def draw(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name.endswith("norm.weight"):
            return np.ones(shape, np.float32)
        if name.endswith("bias"):
            return np.zeros(shape, np.float32)
        return (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)

    params: dict[str, Any] = {
        "embed": draw("embed", (cfg.vocab_size, cfg.hidden_size)),
        "layers": [{n: draw(n, s) for n, (s, _) in shapes.items()} for _ in range(cfg.num_layers)],
        "norm": np.ones((cfg.hidden_size,), np.float32),
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = draw("lm_head", (cfg.vocab_size, cfg.hidden_size))
    return params


class LayerFn:
    """A decoder layer as a pure function of (named weights, activations).

    `LayerFn(cfg)(weights, x, positions, segment_ids)` merges the shared graph definition with
    `weights` (a dict of HF-named arrays) and applies it. All layers use the same instance, so
    jitting it compiles once per input shape.
    """

    def __init__(self, cfg: ModelConfig, attention_impl: str | None = None):
        self.cfg = cfg
        self.graphdef, self.shapes = layer_template(cfg)
        self.attention_impl = attention_impl
        _, abstract_state = nnx.split(nnx.eval_shape(lambda: DecoderLayer(cfg, nnx.Rngs(0))))
        self._paths = [path for path, _ in nnx.to_flat_state(abstract_state)]
        self._abstract_state = abstract_state

    def state_of(self, weights: dict[str, Array]) -> nnx.State:
        flat = []
        for path, leaf in nnx.to_flat_state(self._abstract_state):
            name = ".".join(str(p) for p in path)
            flat.append((path, leaf.replace(weights[name]) if hasattr(leaf, "replace") else weights[name]))
        return nnx.from_flat_state(flat)

    def __call__(self, weights: dict[str, Array], x: Array, positions: Array,
                 segment_ids: Array | None = None) -> Array:
        layer = nnx.merge(self.graphdef, self.state_of(weights))
        return layer(x, positions, segment_ids, self.attention_impl)


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
    """The final norm as a function (same numerics as `RMSNorm`)."""
    dtype = x.dtype
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (weight * xf.astype(dtype)).astype(dtype)
