"""Model configuration: one decoder description for the Llama family, read from a HF `config.json`.

Covers Llama 2 / 3 / 3.1 / 3.2, Qwen2 / Qwen2.5, Qwen3 and Mistral. They differ only in a few
switches (qkv bias, q/k RMSNorm, RoPE scaling, tied embeddings, sliding window), so one
`ModelConfig` and one set of modules serve them all.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from slidejax.errors import SlidejaxError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The architecture of a decoder-only model, in the names slidejax uses."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    # Extra RoPE parameters (factor, low_freq_factor, ...) as sorted (key, value) pairs so the
    # config stays hashable and can be a static jit argument.
    rope_params: tuple[tuple[str, float], ...] = ()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    # The HF config as read, kept so export writes back what the user gave us.
    hf_config: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def num_params(self) -> int:
        """Total parameter count (tied embeddings counted once)."""
        return self.embed_params + self.num_layers * self.layer_params + self.head_params

    @property
    def embed_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def head_params(self) -> int:
        """Final norm plus, when untied, the lm_head matrix."""
        return self.hidden_size + (0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size)

    @property
    def layer_params(self) -> int:
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        n = h * q + 2 * h * kv + q * h + 3 * h * self.intermediate_size + 2 * h
        if self.qkv_bias:
            n += q + 2 * kv
        if self.o_bias:
            n += h
        if self.mlp_bias:
            n += 2 * self.intermediate_size + h
        if self.qk_norm:
            n += 2 * d
        return n

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies (float32, [head_dim // 2]), as transformers computes them."""
        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
        inv = inv.astype(np.float32)
        p = dict(self.rope_params)
        if self.rope_type == "linear":
            inv = inv / np.float32(p["factor"])
        elif self.rope_type == "llama3":
            factor, lo, hi = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
            old = p["original_max_position_embeddings"]
            low_wavelen, high_wavelen = old / lo, old / hi
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
            smooth = (old / wavelen - lo) / (hi - lo)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
            inv = np.where(medium, smoothed, scaled).astype(np.float32)
        return inv

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ----- HF config.json in and out -----

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Build from a HF config dict (transformers 4 or 5 spelling of RoPE settings)."""
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise SlidejaxError(
                f"{source}: model_type {model_type!r} is not supported; slidejax supports "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )

        def need(key: str) -> Any:
            if key not in d or d[key] is None:
                raise SlidejaxError(f"{source}: missing field {key!r} (model_type {model_type})")
            return d[key]

        def number(key: str, value: Any, kind: type = float) -> Any:
            """`value` as a positive int / float, else a one-line error naming `key`."""
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
            if ok and kind is int:
                ok = float(value).is_integer()
            if not ok:
                what = "a positive integer" if kind is int else "a positive number"
                raise SlidejaxError(f"{source}: field {key!r} must be {what}, got {value!r}")
            return kind(value)

        def size(key: str, default: Any = None) -> int:
            return number(key, need(key) if default is None else (d.get(key) or default), int)

        hidden, heads = size("hidden_size"), size("num_attention_heads")
        kv_heads = size("num_key_value_heads", heads)
        if d.get("head_dim"):
            head_dim = size("head_dim")
        elif hidden % heads:
            raise SlidejaxError(f"{source}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
                                " (and there is no head_dim)")
        else:
            head_dim = hidden // heads
        if heads % kv_heads:
            raise SlidejaxError(f"{source}: num_attention_heads {heads} is not a multiple of "
                                f"num_key_value_heads {kv_heads}")
        if head_dim % 2:
            raise SlidejaxError(f"{source}: head_dim {head_dim} is odd; RoPE needs an even head_dim")
        v5, v4 = d.get("rope_parameters") or {}, d.get("rope_scaling") or {}
        if not isinstance(v5, dict) or not isinstance(v4, dict):
            raise SlidejaxError(f"{source}: field 'rope_parameters' / 'rope_scaling' must be an object")
        rope = v4 or v5  # transformers 5 takes rope_scaling, when given, in place of rope_parameters
        rope_theta = number("rope_theta", rope.get("rope_theta", d.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise SlidejaxError(
                f"{source}: rope type {rope_type!r} is not supported; slidejax supports "
                f"{', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        rope_keys = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                         "original_max_position_embeddings")}
        rope_params = []
        for key in rope_keys.get(rope_type, ()):
            if key not in rope:
                raise SlidejaxError(f"{source}: rope type {rope_type!r} needs field {key!r}")
            rope_params.append((key, number(key, rope[key])))

        # The MLP is SwiGLU with SiLU; another activation would load silently and compute wrongly.
        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise SlidejaxError(f"{source}: hidden_act {act!r} is not supported; slidejax supports silu")

        dropout = d.get("attention_dropout") or 0.0
        if dropout:  # fine-tuning recipes rarely use it; training would differ from transformers'
            warnings.warn(f"{source}: attention_dropout {dropout} is ignored: slidejax trains without dropout",
                          stacklevel=2)

        window = None
        if model_type == "mistral":
            window = d.get("sliding_window", 4096)  # transformers' default when the key is absent
        elif d.get("use_sliding_window") and d.get("sliding_window"):  # no window size: full attention
            # transformers 4 configs have no layer_types: layers from max_window_layers on slide
            layer_types = d.get("layer_types") or [
                "sliding_attention" if i >= d.get("max_window_layers", 28) else "full_attention"
                for i in range(size("num_hidden_layers"))]
            kinds = set(layer_types)
            if kinds == {"sliding_attention"}:
                window = d.get("sliding_window")
            elif kinds != {"full_attention"}:
                raise SlidejaxError(
                    f"{source}: use_sliding_window with full-attention layers mixed in is not supported"
                )
        if window:
            window = number("sliding_window", window, int)
        switches = {"attention_bias": bool(d.get("attention_bias", False)), "mlp_bias": bool(d.get("mlp_bias", False))}
        qkv_bias, o_bias, mlp_bias = (switches[b] if isinstance(b, str) else b for b in _BIASES[model_type])
        return cls(
            model_type=model_type,
            vocab_size=size("vocab_size"),
            hidden_size=hidden,
            intermediate_size=size("intermediate_size"),
            num_layers=size("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=number("rms_norm_eps", d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_type=rope_type,
            rope_params=tuple(sorted(rope_params)),
            max_position_embeddings=size("max_position_embeddings", 4096),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            qk_norm=model_type == "qwen3",
            sliding_window=int(window) if window else None,
            hf_config=dict(d),
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        """Read `<path>/config.json` (or a config.json file path)."""
        path = Path(path)
        file = path if path.is_file() else path / "config.json"
        if not path.exists():
            raise SlidejaxError(f"{path}: no such model folder")
        if not file.exists():
            raise SlidejaxError(f"{path}: no config.json in the model folder")
        try:
            d = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise SlidejaxError(f"{file}: invalid JSON at line {e.lineno}: {e.msg}") from None
        if not isinstance(d, dict):
            raise SlidejaxError(f"{file}: expected a JSON object")
        return cls.from_hf_dict(d, source=str(file))

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json dict that transformers loads back into the same architecture: the config
        as read, with every field that shapes the computation written from this one."""
        self._check_hf_expressible()
        d = dict(self.hf_config)
        d.update(
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
        )
        if not d.get("architectures"):
            d["architectures"] = [_ARCHITECTURES[self.model_type]]
        # RoPE in both spellings (transformers 5 reads rope_parameters, 4 rope_theta and
        # rope_scaling), the same settings in each.
        params = {k: int(v) if k == "original_max_position_embeddings" else v for k, v in self.rope_params}
        d["rope_theta"] = self.rope_theta
        d["rope_parameters"] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta, **params}
        d["rope_scaling"] = None if self.rope_type == "default" else {"rope_type": self.rope_type, **params}
        rules = _BIASES[self.model_type]
        if rules[0] == "attention_bias":
            d["attention_bias"] = self.qkv_bias
        if rules[2] == "mlp_bias":
            d["mlp_bias"] = self.mlp_bias
        if self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        else:
            sliding = self.sliding_window is not None
            d["use_sliding_window"] = sliding
            d["sliding_window"] = self.sliding_window
            d["max_window_layers"] = 0 if sliding else self.num_layers  # layers from this one on slide
            d["layer_types"] = ["sliding_attention" if sliding else "full_attention"] * self.num_layers
        return d

    def _check_hf_expressible(self) -> None:
        """Refuse a config (built directly) that no transformers class of its model_type computes."""
        t = self.model_type
        qkv, o, mlp = _BIASES[t]
        bad = []
        if isinstance(qkv, str) and self.qkv_bias != self.o_bias:  # one switch builds both
            bad.append("q/k/v and o_proj biases that differ")
        if not isinstance(qkv, str) and (self.qkv_bias, self.o_bias) != (qkv, o):
            bad.append(f"qkv_bias={self.qkv_bias}, o_bias={self.o_bias}")
        if self.mlp_bias and not isinstance(mlp, str):
            bad.append("MLP biases")
        if self.qk_norm != (t == "qwen3"):
            bad.append(f"qk_norm={self.qk_norm}")
        if self.sliding_window is not None and t == "llama":
            bad.append("a sliding window")
        if bad:
            raise SlidejaxError(f"a {t} model in transformers has no {', '.join(bad)}: this config "
                                "cannot be written as a Hugging Face config.json")


# The biases each transformers class builds, (q/k/v, o_proj, MLP): the config.json switch that
# turns one on, or always (True) or never (False). Mistral's class ignores the switches.
_BIASES: dict[str, tuple[str | bool, str | bool, str | bool]] = {
    "llama": ("attention_bias", "attention_bias", "mlp_bias"),
    "qwen3": ("attention_bias", "attention_bias", False),
    "qwen2": (True, False, False),
    "mistral": (False, False, False),
}

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
