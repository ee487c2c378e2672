"""The user's model object: load a Hugging Face folder or a preset, run it, save it back.

    model = slidejax.load_pretrained("path/to/hf-folder")      # or "tiny" (embedded preset)
    logits = model.logits(input_ids)                          # [B, S, V] fp32, numpy
    model.save_pretrained("out/")                             # loadable by transformers

The weights live in host memory as fp32 masters (`model.host`); the device only ever holds a
window of them, also for `logits`, which runs the same layer-by-layer path as training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from slidejax.config import ModelConfig
from slidejax.errors import SlidejaxError
from slidejax.hf_checkpoint import load_into, save_pretrained as _save_pretrained
from slidejax.host_memory import HostModel
from slidejax.model import init_params

_DTYPES = ("bfloat16", "float32")


def _check_dtype(dtype: str) -> None:
    if dtype not in _DTYPES:
        raise SlidejaxError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")


class Model:
    """A Llama-family model whose fp32 master weights live in host memory.

    Attributes:
      config: the architecture (`slidejax.config.ModelConfig`).
      host: the fp32 master weights, one flat buffer per layer (`slidejax.host_memory.HostModel`).
      dtype: the compute dtype on the device ("bfloat16", or "float32" for exactness).
      source: the folder the model came from (its tokenizer files are copied on export).
    """

    def __init__(self, config: ModelConfig, host: HostModel, dtype: str = "bfloat16",
                 source: Path | None = None):
        _check_dtype(dtype)
        self.config, self.host, self.dtype, self.source = config, host, dtype, source
        self._engine = None  # the engine whose device copies track `host` (a trainer's, or ours)

    def __repr__(self) -> str:
        c = self.config
        return (f"Model({c.model_type}, {c.num_layers} layers, hidden {c.hidden_size}, vocab {c.vocab_size}, "
                f"{c.num_params / 1e6:.1f}M params, dtype {self.dtype})")

    @property
    def engine(self) -> Any:
        """The sliding engine that runs this model (created for inference on first use)."""
        if self._engine is None:
            from slidejax.engine import SlidingEngine
            self._engine = SlidingEngine(self.host, None, compute_dtype=self.dtype)
        return self._engine

    def attach(self, engine: Any) -> None:
        """Route `logits` through `engine` (a trainer does this so its updates are seen)."""
        self._engine = engine

    def logits(self, input_ids: Any, positions: Any = None, segment_ids: Any = None) -> np.ndarray:
        """fp32 logits [B, S, vocab] for int token ids [B, S] (or [S])."""
        ids = np.asarray(input_ids)
        squeeze = ids.ndim == 1
        if ids.ndim not in (1, 2):
            raise SlidejaxError(f"input_ids must be [batch, seq] or [seq], got shape {list(ids.shape)}")
        extra = {"positions": positions, "segment_ids": segment_ids}
        for name, value in extra.items():
            if value is not None:
                extra[name] = np.asarray(value)
                if extra[name].shape != ids.shape:
                    raise SlidejaxError(f"{name} has shape {list(extra[name].shape)}, input_ids "
                                        f"{list(ids.shape)}: they must match")
                extra[name] = extra[name][None] if squeeze else extra[name]
        out = self.engine.logits(ids[None] if squeeze else ids, extra["positions"], extra["segment_ids"])
        return out[0] if squeeze else out

    def params(self) -> dict[str, Any]:
        """The fp32 weights as a plain tree of numpy arrays (HF names inside each layer): the
        weights now; after more training steps, call it again."""
        if self._engine is not None:
            self._engine.sync()
        return self.host.tree()

    def save_pretrained(self, path: str | Path, *, dtype: str = "bfloat16", max_shard_size: int | str = "5GB") -> Path:
        """Write a Hugging Face folder (config.json, sharded safetensors, tokenizer files)."""
        if self._engine is not None:
            self._engine.sync()
        return _save_pretrained(self.host, path, dtype=dtype, max_shard_size=max_shard_size,
                                tokenizer_dir=self.source)

    def tokenizer(self) -> Any:
        """The transformers tokenizer shipped with the model folder."""
        from transformers import AutoTokenizer

        if self.source is None or not any((self.source / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            raise SlidejaxError(f"{self.source}: no tokenizer files in the model folder")
        return AutoTokenizer.from_pretrained(str(self.source))


def load_pretrained(path: str | Path, dtype: str = "bfloat16") -> Model:
    """Load a HF folder (config.json + safetensors + tokenizer) or an embedded preset by name.

    A preset ("tiny") has no weights: it is initialised randomly (seed 0). Tensors are validated
    from the file headers before anything large is allocated, then read layer by layer.
    """
    from slidejax.presets import PRESETS, preset_path

    _check_dtype(dtype)  # before the weights are read, not after
    if isinstance(path, str) and path in PRESETS and not Path(path).exists():
        return from_config(preset_path(path), dtype=dtype)
    path = Path(path)
    config = ModelConfig.from_pretrained(path)
    if not path.is_dir():
        raise SlidejaxError(f"{path}: expected a model folder")
    from slidejax.hf_checkpoint import open_checkpoint

    reader = open_checkpoint(path, config)  # every tensor checked before the masters exist
    host = HostModel(config)
    load_into(host, path, reader)
    return Model(config, host, dtype, source=path)


def from_config(config: ModelConfig | str | Path, dtype: str = "bfloat16", seed: int = 0) -> Model:
    """A randomly initialised model (transformers' init) from a config or a folder with config.json."""
    _check_dtype(dtype)
    source = None
    if not isinstance(config, ModelConfig):
        source = Path(config)
        config = ModelConfig.from_pretrained(source)
    host = HostModel(config)
    host.load_tree(init_params(config, seed))
    return Model(config, host, dtype, source=source)
