"""The training front end: one configuration, a `Trainer` with step / fit / evaluate / save /
restore / export, progress, metrics and checkpoints.

    import slidejax
    from slidejax.trainer import Trainer, TrainConfig

    model = slidejax.load_pretrained("tiny")                 # or a Hugging Face folder
    trainer = Trainer(model, config=TrainConfig.load(model="tiny", steps=40))
    trainer.fit()                                            # the preset's data; or fit("data.jsonl")
    trainer.export("out/hf")                                 # a folder transformers loads

The loss of a step is the mean over all supervised tokens of the step (token-weighted across its
micro-batches), which is what the engine differentiates. The optimizer is an optax
transformation or a `HostAdamW`; by default a `HostAdamW` with the configured schedule.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time
import tomllib
import types
import typing
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from slidejax.checkpointing import (Checkpointer, find_checkpoint, load_params_tree, optimizer_tree, params_tree,
                                    ABANDONED, run_of, set_aside_later, unnest)
from slidejax.config import ModelConfig
from slidejax.errors import SlidejaxError, writable_dir
from slidejax.metrics import (MetricsLogger, Progress, flops_per_token, format_bytes, gpu_peak_bytes,
                              host_rss_bytes, plot_metrics, read_metrics)

SCHEDULES = ("constant", "linear", "cosine")
COMPUTE_DTYPES = ("auto", "bfloat16", "float32")

# Settings a preset brings along (beneath a TOML file and flags): what makes `slidejax train`
# with no arguments a complete, quick demonstration on a CPU.
PRESET_TRAINING: dict[str, dict[str, Any]] = {
    "tiny": dict(seq_len=128, micro_batch_size=8, tokens_per_step=2048, steps=64, lr=2e-3, schedule="cosine",
                 warmup=0.1, weight_decay=0.0, max_grad_norm=1.0, eval_every=16, save_every=32,
                 task_examples=64),
}


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a training run (TOML keys and CLI flags have the same names).

    Model and data
      model: a Hugging Face model folder or a preset name ("tiny").
      data / eval_data: training / evaluation files (.txt or .jsonl; see `slidejax.data`). For a
        preset, default to its own task data.
      format: force the data format (txt, text, prompt_completion, chat, tokens); else detected.
      tokenizer: a tokenizer folder, when the model folder has none.
      on_overlong: "truncate" (counted warning) or "error" for documents longer than seq_len.
    Batch
      seq_len: tokens per row (documents are packed into rows).
      micro_batch_size: rows per micro-batch (what the GPU holds at once).
      tokens_per_step: tokens per optimizer step, a multiple of micro_batch_size x seq_len
        (default: one micro-batch); the step's micro-batches pass every layer together.
    Length: steps (optimizer steps) or epochs (passes over the data; default 1).
    Optimizer (AdamW on the host)
      lr, schedule (constant, linear, cosine; decaying to 0 at the end), warmup (whole steps if >= 1,
      else a fraction of the steps, rounded up; linear from lr/warmup), weight_decay (matrices only), b1, b2,
      eps, moment_dtype (float32, or bfloat16 to save 4 bytes/parameter of host RAM),
      max_grad_norm (global norm clipping; 0 = off), seed (data order; trainer RNG), shuffle.
    Output
      output_dir, run_name (the run writes to output_dir/run_name; default name: model + time),
      save_every (steps; 0 = only at the end), keep_last (checkpoints kept; 0 = all), resume (a
      run or checkpoint directory, or "latest": the newest run in output_dir, or run_name's),
      eval_every (steps; 0 = only at the end), task_examples (eval prompts for the exact-match
      metric), progress (the progress bar).
    System
      compute_dtype (auto = bfloat16 on a GPU, float32 on CPU), gpu_memory / host_memory (budgets
      like "24GB"; the run is refused up front when it cannot fit), prefetch (layers uploaded
      ahead), resident_layers (layers kept on the GPU; "auto", the default: as many as gpu_memory, or the
      GPU, fits; none on a CPU without gpu_memory), devices (local accelerators for data
      parallelism, per process: each micro-batch's rows are split across them, and across the
      processes of a `slidejax.distributed` run), trace (write a Chrome trace to this file;
      process 0's timeline).
    """

    model: str = "tiny"
    data: list[str] | None = None
    eval_data: list[str] | None = None
    format: str | None = None
    tokenizer: str | None = None
    on_overlong: str = "truncate"
    seq_len: int = 2048
    micro_batch_size: int = 1
    tokens_per_step: int | None = None
    steps: int | None = None
    epochs: int | None = None
    lr: float = 2e-5
    schedule: str = "cosine"
    warmup: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    moment_dtype: str = "float32"
    max_grad_norm: float = 1.0
    seed: int = 0
    shuffle: bool = True
    output_dir: str = "runs"
    run_name: str | None = None
    save_every: int = 500
    keep_last: int = 2
    resume: str | None = None
    eval_every: int = 0
    task_examples: int = 64
    progress: bool = True
    compute_dtype: str = "auto"
    gpu_memory: str | None = None
    host_memory: str | None = None
    prefetch: int = 2
    resident_layers: int | str = "auto"
    devices: int = 1
    trace: str | None = None

    # -- building

    @classmethod
    def fields(cls) -> dict[str, Any]:
        """Field name -> type annotation (resolved)."""
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)}

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, *, base: dict[str, Any] | None = None,
             **overrides: Any) -> "TrainConfig":
        """Defaults < the preset's training settings < `base` (e.g. a checkpoint's settings) <
        the TOML file at `path` < `overrides` (None values are ignored). Validated."""
        layers: list[dict[str, Any]] = [dict(base or {})]
        if path is not None:
            layers.append(read_toml(path))
        layers.append({k: v for k, v in overrides.items() if v is not None})
        for layer in layers:
            _check_keys(layer, "settings")
        model = cls.model
        for layer in layers:
            model = layer.get("model", model)
        merged: dict[str, Any] = dict(PRESET_TRAINING.get(model, {})) if not base else {}
        for layer in layers:
            # steps and epochs are one choice: a layer naming one replaces the other below it.
            for one, other in (("steps", "epochs"), ("epochs", "steps")):
                if layer.get(one) is not None and layer.get(other) is None:
                    merged.pop(other, None)
            merged.update(layer)
        return cls.from_dict(merged)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "settings") -> "TrainConfig":
        _check_keys(d, where)
        values = {name: _coerce(name, d[name], typ, where) for name, typ in cls.fields().items() if name in d}
        config = cls(**values)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **{k: v for k, v in changes.items()}})

    def to_toml(self) -> str:
        """The settings as TOML (None values left out), loadable with `--config`."""
        lines = []
        for k, v in self.to_dict().items():
            if v is None:
                continue
            lines.append(f"{k} = {_toml_value(v)}")
        return "\n".join(lines) + "\n"

    # -- checks and derived values

    def validate(self) -> None:
        """Raise a one-line SlidejaxError for an impossible setting."""
        def positive(name: str, allow_none: bool = False, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if v is None or v < 0 or (v == 0 and not allow_zero):
                raise SlidejaxError(f"{name} must be {'>= 0' if allow_zero else 'positive'}, got {v!r}")

        for name in ("seq_len", "micro_batch_size", "prefetch", "devices"):
            positive(name)
        for name in ("tokens_per_step", "steps", "epochs"):
            positive(name, allow_none=True)
        for name in ("save_every", "keep_last", "eval_every", "task_examples", "seed",
                     "max_grad_norm", "weight_decay", "warmup"):
            positive(name, allow_zero=True)
        if self.resident_layers != "auto":
            if isinstance(self.resident_layers, str) and self.resident_layers.isdigit():
                self.resident_layers = int(self.resident_layers)
            if not isinstance(self.resident_layers, int):
                raise SlidejaxError(f"resident_layers must be a number or 'auto', got {self.resident_layers!r}")
            positive("resident_layers", allow_zero=True)
        if self.warmup > 1 and self.warmup != int(self.warmup):
            raise SlidejaxError(f"warmup must be a whole number of steps, or a fraction below 1, got {self.warmup!r}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise SlidejaxError(f"lr must be a positive number, got {self.lr!r}")
        if self.steps is not None and self.epochs is not None:
            raise SlidejaxError("set steps or epochs, not both")
        if self.schedule not in SCHEDULES:
            raise SlidejaxError(f"schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise SlidejaxError(f"compute_dtype {self.compute_dtype!r} is not one of {', '.join(COMPUTE_DTYPES)}")
        if self.moment_dtype not in ("float32", "bfloat16"):
            raise SlidejaxError(f"moment_dtype {self.moment_dtype!r} is not float32 or bfloat16")
        if self.on_overlong not in ("truncate", "error"):
            raise SlidejaxError(f"on_overlong {self.on_overlong!r} is not 'truncate' or 'error'")
        from slidejax.data import FORMATS

        if self.format is not None and self.format not in FORMATS:
            raise SlidejaxError(f"format {self.format!r} is not one of {', '.join(FORMATS)}")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise SlidejaxError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.tokens_per_step is not None and self.tokens_per_step % (self.micro_batch_size * self.seq_len):
            raise SlidejaxError(f"tokens_per_step ({self.tokens_per_step}) must be a multiple of micro_batch_size x "
                                f"seq_len ({self.micro_batch_size} x {self.seq_len} = "
                                f"{self.micro_batch_size * self.seq_len})")
        if self.run_name is not None and (not self.run_name or "/" in self.run_name or self.run_name in (".", "..")):
            raise SlidejaxError(f"run_name {self.run_name!r} must be a plain folder name")
        for name in ("gpu_memory", "host_memory"):
            _parse_bytes(getattr(self, name), name)

    @property
    def micro_batches(self) -> int:
        """Micro-batches per optimizer step."""
        return (self.tokens_per_step or self.micro_batch_size * self.seq_len) // (self.micro_batch_size * self.seq_len)

    @property
    def step_tokens(self) -> int:
        return self.micro_batches * self.micro_batch_size * self.seq_len

    def warmup_steps(self, total: int) -> int:
        """Warm-up steps: `warmup` itself when >= 1, else that fraction of `total` rounded up (as
        transformers' warmup_ratio, but 0.07 x 100 is 7, not the 8 float noise would give)."""
        return int(self.warmup) if self.warmup >= 1 else math.ceil(round(self.warmup * total, 6))


def _check_keys(d: dict[str, Any], where: str) -> None:
    known = TrainConfig.fields()
    for k in d:
        if k not in known:
            close = [n for n in known if n.replace("_", "") == str(k).replace("_", "").replace("-", "")]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SlidejaxError(f"{where}: unknown setting {k!r}{hint}")


def _coerce(name: str, value: Any, typ: Any, where: str) -> Any:
    """`value` as the field's type (ints accepted for floats; a single path for a list of paths)."""
    args = typing.get_args(typ)
    optional = type(None) in args
    if value is None:
        if optional:
            return None
        raise SlidejaxError(f"{where}: setting {name!r} cannot be empty")
    base = next((a for a in args if a is not type(None)), typ) if args else typ
    origin = typing.get_origin(base)
    bad = SlidejaxError(f"{where}: setting {name!r} must be {_type_name(base)}, got {value!r}")
    if base is int and str in args:  # a count or "auto" (resident_layers)
        if isinstance(value, str) and (value == "auto" or value.isdigit()):
            return value
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise SlidejaxError(f"{where}: setting {name!r} must be an integer or 'auto', got {value!r}")
        return int(value)
    if origin is list:
        if isinstance(value, (str, os.PathLike)):
            value = [value]
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, (str, os.PathLike)) for v in value):
            raise bad
        return [os.fspath(v) for v in value]
    if base is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise bad
        return int(value)
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
            raise bad
        return float(value)
    if base is str:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and name in ("gpu_memory", "host_memory"):
            return str(value)
        if not isinstance(value, str):
            raise bad
        return value
    return value


def _type_name(t: Any) -> str:
    if typing.get_origin(t) is list:
        return "a path or a list of paths"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(t, str(t))


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    # A TOML basic string is a JSON string, but for \uXXXX surrogate pairs (characters beyond
    # the BMP), which TOML rejects: those stay literal.
    return json.dumps(str(v), ensure_ascii=False)


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    """A flat TOML file of TrainConfig settings ("-" in keys is accepted for "_")."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            d = tomllib.load(f)
    except FileNotFoundError:
        raise SlidejaxError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise SlidejaxError(f"{path}: invalid TOML ({e})") from None
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            raise SlidejaxError(f"{path}: tables ([{k}]) are not used; write settings as top-level keys")
        out[k.replace("-", "_")] = v
    _check_keys(out, str(path))
    for name, typ in TrainConfig.fields().items():
        if name in out:
            out[name] = _coerce(name, out[name], typ, str(path))
    return out


def _parse_bytes(value: Any, name: str) -> int | None:
    from slidejax.engine import parse_bytes

    try:
        return parse_bytes(value)
    except SlidejaxError as e:
        raise SlidejaxError(f"{name}: {e}") from None


# ----------------------------------------------------------------------------------------------
# Schedule, optimizer, compute dtype


def lr_schedule(lr: float, schedule: str, warmup_steps: int, total_steps: int | None) -> optax.Schedule:
    """The learning rate as a function of completed steps (0-based, as optax calls schedules).

    Warm-up rises linearly to `lr` over `warmup_steps` steps, starting at lr/warmup_steps (no
    step is wasted at 0); then constant, or linear / cosine decay reaching 0 one step after the
    last one.
    """
    if schedule not in SCHEDULES:
        raise SlidejaxError(f"schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")
    if schedule != "constant" and total_steps is None:
        raise SlidejaxError(f"the {schedule} schedule needs the number of steps: set steps (or epochs with a data file)")
    w = int(warmup_steps)
    decay_steps = max(1, (total_steps or 1) - w)

    def fn(count: Any) -> Any:
        t = jnp.asarray(count, jnp.float32)
        progress = jnp.clip((t - w) / decay_steps, 0.0, 1.0)
        if schedule == "constant":
            value = jnp.float32(lr) * jnp.ones_like(t)
        elif schedule == "linear":
            value = lr * (1.0 - progress)
        else:
            value = lr * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        if w > 0:
            value = jnp.where(t < w, lr * (t + 1.0) / w, value)
        return value

    return fn


def default_compute_dtype() -> str:
    """bfloat16 on an accelerator; float32 on the CPU backend (where bf16 matmuls are emulated)."""
    return "float32" if jax.devices()[0].platform == "cpu" else "bfloat16"


def make_optimizer(config: TrainConfig, total_steps: int | None) -> Any:
    """The CLI's optimizer: `HostAdamW` with the configured schedule."""
    import ml_dtypes

    from slidejax.host_optimizer import HostAdamW

    schedule = lr_schedule(config.lr, config.schedule, config.warmup_steps(total_steps or 0), total_steps)
    return HostAdamW(schedule, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay,
                     moment_dtype=np.float32 if config.moment_dtype == "float32" else ml_dtypes.bfloat16, seed=config.seed)


# ----------------------------------------------------------------------------------------------
# Host memory


def host_memory_need(cfg: ModelConfig, config: TrainConfig, optimizer: Any = None) -> dict[str, int]:
    """Host RAM a run needs, by part (bytes): the engine's plan (`host_memory.plan_host_memory`:
    fp32 masters, optimizer state, the pinned upload copies, a step's gradients and activation
    checkpoints, the embedding's row gradient), a checkpoint's snapshot (a copy of masters and
    optimizer state while it is written in the background) and the runtime. Resident layers are
    planned as streamed: they hold their state on the GPU while steps run, but every checkpoint
    brings their masters and moments back to the host (`sync`, `state_dict`), and the masters
    stay there until the next step."""
    from slidejax.host_memory import plan_host_memory, vocab_chunks
    from slidejax.host_optimizer import HostAdamW, HostOptax

    host_adamw = optimizer is None or isinstance(optimizer, HostAdamW)
    moments = config.moment_dtype if optimizer is None else getattr(optimizer, "moment_dtype", np.float32)
    need = plan_host_memory(cfg, (config.micro_batch_size, config.seq_len), config.micro_batches,
                            compute_dtype=_resolve_dtype(config.compute_dtype), moment_dtype=moments)
    if not host_adamw:  # any optax transformation: its state, counted from its own init
        tx = optimizer.tx if isinstance(optimizer, HostOptax) else optimizer
        need["optimizer"] = _optax_state_bytes(tx, cfg, vocab_chunks(cfg))
    for key in ("pinned", "total", "gpu_updated_state"):  # the trainer has no GPU-updated layers
        need.pop(key)
    need["snapshot"] = need["masters"] + need["optimizer"]
    need["runtime"] = 1_000_000_000
    return need


def _optax_state_bytes(tx: optax.GradientTransformation, cfg: ModelConfig, chunks: list[tuple[int, int]]) -> int:
    from slidejax.model import layer_template

    def state_bytes(shapes: dict[str, tuple[int, ...]]) -> int:
        tree = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}
        out = jax.eval_shape(tx.init, tree)
        return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(out))

    _, layer = layer_template(cfg)
    total = cfg.num_layers * state_bytes({k: s for k, (s, _) in layer.items()})
    total += state_bytes({"weight": (cfg.hidden_size,)})
    matrices = 1 if cfg.tie_word_embeddings else 2
    for a, b in chunks:
        total += matrices * state_bytes({"weight": (b - a, cfg.hidden_size)})
    return total


def check_host_memory(cfg: ModelConfig, config: TrainConfig, optimizer: Any = None,
                      already_allocated: int = 0) -> tuple[bool, dict[str, int]]:
    """Refuse (SlidejaxError) a run whose host RAM need exceeds the budget (``host_memory``) or
    what the machine has available. Returns (whether checkpoint snapshots fit, the need by part);
    when only the snapshot does not fit, checkpoints are written without one (training waits
    for each write)."""
    import psutil

    need = host_memory_need(cfg, config, optimizer)
    budget = _parse_bytes(config.host_memory, "host_memory")
    available = psutil.virtual_memory().available + already_allocated
    limit, what = (budget, f"the host_memory budget {format_bytes(budget)}") if budget is not None else \
        (available, f"the {format_bytes(available)} of host RAM available")
    base = sum(v for k, v in need.items() if k != "snapshot")
    if base > limit:
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in need.items() if k != "snapshot")
        raise SlidejaxError(f"host memory: this run needs about {format_bytes(base)} ({parts}), more than {what}; "
                            "lower tokens_per_step, use moment_dtype bfloat16, or a machine with more RAM")
    return base + need["snapshot"] <= limit, need


def _resolve_dtype(compute_dtype: str) -> str:
    return default_compute_dtype() if compute_dtype == "auto" else compute_dtype


# ----------------------------------------------------------------------------------------------
# Task metric: greedy exact match


def greedy_generate(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations of `prompts` (until EOS or `max_new_tokens`), decoded.

    All prompts run as one right-padded batch of fixed width, so one compiled forward serves every
    generated token (the logits are recomputed for the whole prefix each time, which is fine for
    the short task prompts this is for). With several processes every process passes all the
    prompts (its rows of a global batch of copies; the forward is collective) and runs all
    `max_new_tokens` forwards, so none waits for another that stopped early.
    """
    from slidejax.data import encode_prompt

    enc = [encode_prompt(tokenizer, p) for p in prompts]
    width = max(len(e) for e in enc) + max_new_tokens
    if width > model.config.max_position_embeddings:
        raise SlidejaxError(f"eval prompts plus {max_new_tokens} new tokens exceed the model's "
                            f"{model.config.max_position_embeddings} positions")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = tokenizer.eos_token_id
    ids = np.full((len(enc), width), pad, np.int32)
    cur = np.array([len(e) for e in enc])
    for r, e in enumerate(enc):
        ids[r, :len(e)] = e
    out: list[list[int]] = [[] for _ in enc]
    done = np.zeros(len(enc), bool)
    rows = np.arange(len(enc))
    for _ in range(max_new_tokens):
        logits = model.logits(ids)
        nxt = logits[rows, cur - 1].argmax(-1)
        for r in np.flatnonzero(~done):
            if eos is not None and nxt[r] == eos:
                done[r] = True
            else:
                out[r].append(int(nxt[r]))
                ids[r, cur[r]] = nxt[r]
                cur[r] += 1
        if done.all() and jax.process_count() == 1:  # several: every process runs every forward
            break
    return [tokenizer.decode(o, skip_special_tokens=True) for o in out]


def _prompt_completion_examples(paths: Sequence[str], limit: int) -> tuple[list[str], list[str]]:
    """The first `limit` prompt/completion pairs of JSONL files (already validated by the loader)."""
    prompts, refs = [], []
    for p in paths:
        with open(p, encoding="utf-8-sig") as f:  # as the loader, which accepts a byte-order mark
            for line in f:
                if len(prompts) >= limit:
                    return prompts, refs
                if line.strip():
                    row = json.loads(line)
                    prompts.append(row["prompt"])
                    refs.append(row["completion"])
    return prompts, refs


# ----------------------------------------------------------------------------------------------
# The trainer


def load_tokenizer(path: str | os.PathLike) -> Any:
    """A transformers tokenizer from a local folder, or a one-line SlidejaxError."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise SlidejaxError(f"{path}: tokenizer folder not found")
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise SlidejaxError(f"{path}: no tokenizer files (tokenizer.json / tokenizer_config.json); "
                            "pass a tokenizer folder with --tokenizer")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as e:
        raise SlidejaxError(f"{path}: cannot load the tokenizer ({str(e).strip().splitlines()[0]})") from None


def data_paths(config: TrainConfig, kind: str, preset: str | None = None) -> list[str] | None:
    """The configured training ("train") or eval ("eval") files, else the preset's own (its eval
    data only along with its training data: other data gets no unrelated eval by default)."""
    from slidejax.presets import preset_path

    configured = config.data if kind == "train" else config.eval_data
    if configured:
        return list(configured)
    if kind == "eval" and config.data and preset is not None and \
            [str(Path(p).resolve()) for p in config.data] != [str((preset_path(preset) / "train.jsonl").resolve())]:
        return None
    if preset is not None:
        return [str(preset_path(preset) / ("train.jsonl" if kind == "train" else "eval.jsonl"))]
    return None


def make_loader(config: TrainConfig, tokenizer: Any, paths: Sequence[str], kind: str) -> Any:
    """The packed `DataLoader` of a run: training ("train": seeded order, steps or epochs) or eval
    ("eval": file order, one pass). Every record is validated here, before any weights load."""
    from slidejax.data import DataLoader, eval_loader

    c = config
    if kind == "eval":
        return eval_loader(paths, tokenizer, seq_len=c.seq_len, micro_batch_size=c.micro_batch_size,
                           micro_batches_per_step=c.micro_batches, on_overlong="truncate", format=c.format)
    return DataLoader(paths, tokenizer, seq_len=c.seq_len, micro_batch_size=c.micro_batch_size,
                      micro_batches_per_step=c.micro_batches, seed=c.seed, shuffle=c.shuffle,
                      num_epochs=None if c.steps is not None else (c.epochs or 1), on_overlong=c.on_overlong,
                      format=c.format)


def check_run_dir(run: Path, resuming: bool) -> None:
    """The run directory can be written (created if needed) and, unless resuming, holds no other
    run's checkpoints (which a new run must not overwrite)."""
    writable_dir(run)
    ckdir = run / "checkpoints"
    if not resuming and ckdir.is_dir() and any(p.name.isdigit() for p in ckdir.iterdir()):
        raise SlidejaxError(f"{run} already holds checkpoints of another run: resume it (--resume {run}) "
                            "or choose another run name")


def default_run_name(model_name: str) -> str:
    return f"{model_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _preset_of(model: Any) -> str | None:
    from slidejax.presets import PRESETS, preset_path

    source = getattr(model, "source", None)
    for name in PRESETS:
        with contextlib.suppress(SlidejaxError):
            if source is not None and Path(source).resolve() == preset_path(name).resolve():
                return name
    return None


class Trainer:
    """Fine-tunes a `slidejax.Model` with the sliding-window engine.

    Args:
      model: from `slidejax.load_pretrained` / `from_config` (its fp32 masters are trained in place).
      optimizer: an optax `GradientTransformation` or a `HostAdamW`; default `make_optimizer`
        (HostAdamW with the configured schedule; built once the number of steps is known).
      config: a `TrainConfig` (default: `TrainConfig.load(model=<the model's preset>)`).
      tokenizer: a transformers tokenizer (default: `config.tokenizer`, else the model's own).
      **overrides: TrainConfig fields to change.

    `step(batch)` runs one optimizer step; `fit(data)` runs the configured schedule with eval,
    checkpoints, progress and metrics; `save()` / `Trainer.restore(...)` / `resume(...)` handle
    checkpoints; `export(path)` writes a Hugging Face folder.

    Several processes (after `slidejax.distributed.initialize`): every process builds the same
    Trainer with the same settings and data and calls the same methods (each is collective).
    Batches are global: each process steps on its rows (`process_rows`), so a run equals the
    one-process run on the same batches; eval losses are global. Process 0 alone writes the run
    directory (settings, metrics, TensorBoard, loss plot, progress), the checkpoints (the state
    gathered from every process) and exports; every process reads a checkpoint to resume, so the
    output directory must be on a filesystem all processes see.
    """

    def __init__(self, model: Any, optimizer: Any = None, config: TrainConfig | None = None, *,
                 tokenizer: Any = None, **overrides: Any):
        if config is None:
            config = TrainConfig.load(model=_preset_of(model) or str(getattr(model, "source", None) or "tiny"),
                                      **overrides)
        elif overrides:
            config = config.replace(**overrides)
        config.validate()
        self.model, self.config = model, config
        self._optimizer_arg = optimizer
        self.optimizer: Any = None
        self.engine: Any = None
        self.step_count = 0
        self.total_steps: int | None = config.steps
        self.rng = np.random.default_rng(config.seed)
        self.history: list[dict[str, Any]] = []
        self.compute_dtype = _resolve_dtype(config.compute_dtype)
        self._tokenizer = tokenizer
        self._train: Any = None  # the training batches (a DataLoader or any iterable of Batch)
        self._data_state: dict | None = None  # the loader's position after the last step's batch
        self._eval: Any = None
        self._task: tuple[list[str], list[str]] | None = None
        self._run_dir: Path | None = None
        self._logger: MetricsLogger | None = None
        self._ckpt: Checkpointer | None = None
        self._snapshot = True
        self._stop: str | None = None
        self._t_last: float | None = None
        self._fpt = flops_per_token(model.config, config.seq_len)
        self._resumed_from: Path | None = None
        self._skipped = 0
        self._trained_epochs: float | None = None  # set by fit while it steps on a batch read earlier
        self._opened = False  # open_run done (on every process; only process 0 writes files)
        self._devices: list[Any] | None = None

    # ------------------------------------------------------------------ set-up

    @property
    def tokenizer(self) -> Any:
        """The tokenizer for the data (config.tokenizer, else the model folder's)."""
        if self._tokenizer is None:
            if self.config.tokenizer is not None:
                self._tokenizer = load_tokenizer(self.config.tokenizer)
            else:
                try:
                    self._tokenizer = self.model.tokenizer()
                except SlidejaxError as e:
                    raise SlidejaxError(f"{e} (pass a tokenizer folder with --tokenizer)") from None
        return self._tokenizer

    def _data_paths(self, data: Any, kind: str) -> list[str] | None:
        if data is not None:
            return [os.fspath(data)] if isinstance(data, (str, os.PathLike)) else [os.fspath(p) for p in data]
        return data_paths(self.config, kind, _preset_of(self.model))

    def set_train_data(self, data: Any = None) -> Any:
        """Use `data` for training: file path(s) (packed by a `DataLoader` built from the config),
        a `DataLoader`, or any iterable of `Batch`es. None: config.data, or the preset's."""
        if data is not None and not isinstance(data, (str, os.PathLike, list, tuple)):
            self._train = data
            return data
        paths = self._data_paths(data, "train")
        if paths is None:
            raise SlidejaxError("no training data: pass a data file (--data)")
        if self.config.data is None:
            self.config.data = paths  # recorded with the run, so a resume reads the same files
        self._train = make_loader(self.config, self.tokenizer, paths, "train")
        return self._train

    def set_eval_data(self, data: Any = None) -> Any:
        """Use `data` for evaluation (paths, a DataLoader or an iterable of Batches; None: config.eval_data,
        or the preset's). Prompt/completion files also give the exact-match task metric."""
        if data is None or isinstance(data, (str, os.PathLike, list, tuple)):
            paths = self._data_paths(data, "eval")
            if paths is None:
                self._eval = self._task = None
                return None
            if self.config.eval_data is None:
                self.config.eval_data = paths
            loader = make_loader(self.config, self.tokenizer, paths, "eval")
        else:
            loader, paths = data, self.config.eval_data
        self._eval, self._task = loader, None
        formats = getattr(loader, "formats", None)
        if paths and formats and all(f == "prompt_completion" for f in formats) and self.config.task_examples > 0:
            self._task = _prompt_completion_examples(paths, self.config.task_examples)
        return loader

    def _count_total(self) -> int | None:
        if self.config.steps is not None:
            return self.config.steps
        count = getattr(self._train, "count_steps", None)
        if count is not None and getattr(self._train, "num_epochs", None) is not None:
            return int(count())
        return None

    def build(self) -> None:
        """Build the optimizer and the engine (once). The number of steps must be known for a
        decaying schedule: from config.steps, or counted from the training data for epochs."""
        if self.engine is not None:
            return
        from slidejax.engine import SlidingEngine
        from slidejax.host_optimizer import make_host_optimizer

        c = self.config

        def prepare() -> None:
            if self.total_steps is None:
                if self._train is None and self._data_paths(None, "train") is not None and c.schedule != "constant":
                    self.set_train_data()
                self.total_steps = self._count_total()
            opt = self._optimizer_arg
            if opt is None:
                opt = make_optimizer(c, self.total_steps)
            self.optimizer = make_host_optimizer(opt)
            self._snapshot, _ = check_host_memory(self.model.config, c, self.optimizer,
                                                  already_allocated=self.model.host.nbytes)
            self._devices = engine_devices(c.devices, c.micro_batch_size)

        run_together(prepare)  # a setting refused on one process is refused on all
        kwargs: dict[str, Any] = dict(compute_dtype=self.compute_dtype, prefetch=c.prefetch,
                                      resident_layers=c.resident_layers, max_grad_norm=c.max_grad_norm,
                                      trace=c.trace is not None)
        if c.gpu_memory is not None:  # only when set: engines without a budget keep working
            kwargs["gpu_memory"] = c.gpu_memory
        kwargs["micro_batch"] = (c.micro_batch_size, c.seq_len)  # the budget is checked before allocating
        if self._devices is not None:
            kwargs["devices"] = self._devices
        self.engine = SlidingEngine(self.model.host, self.optimizer, **kwargs)
        self.model.attach(self.engine)

    # ------------------------------------------------------------------ the run directory

    @property
    def run_dir(self) -> Path:
        """output_dir/run_name (created when first needed)."""
        if self._run_dir is None:
            name = self.config.run_name or default_run_name(self._model_name())
            self._run_dir = Path(self.config.output_dir) / name
        return self._run_dir

    def _model_name(self) -> str:
        preset = _preset_of(self.model)
        if preset:
            return preset
        source = getattr(self.model, "source", None)
        return Path(source).name if source else "model"

    def open_run(self) -> Path:
        """Create the run directory (refusing an unwritable one, or one holding another run's
        checkpoints when not resuming), save the settings and model files, open the metrics log.
        With several processes every process calls it (they agree on the run's name) and process
        0 alone writes."""
        if self._opened:
            return self.run_dir
        if self._run_dir is None and self.config.run_name is None and jax.process_count() > 1:
            self._run_dir = Path(self.config.output_dir) / broadcast_text(default_run_name(self._model_name()))
        run = self.run_dir

        def create() -> None:
            check_run_dir(run, resuming=self._resumed_from is not None)
            ckdir = run / "checkpoints"
            # The run's settings, not how this process started (a resume is not one of them).
            (run / "config.toml").write_text(self.config.replace(resume=None).to_toml(), encoding="utf-8")
            self._save_model_files(run / "model")
            self._ckpt = self._ckpt or Checkpointer(ckdir, keep_last=self.config.keep_last, snapshot=self._snapshot)
            self._logger = MetricsLogger(run)

        on_main_process(create)
        self._opened = True
        return run

    def _save_model_files(self, folder: Path) -> None:
        """config.json and the tokenizer files, so the run is self-contained (export, restore)."""
        from slidejax.hf_checkpoint import copy_tokenizer_files

        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.model.config.to_hf_dict(), indent=2), encoding="utf-8")
        src = self.config.tokenizer or getattr(self.model, "source", None)
        if src is not None and Path(src).is_dir():
            copy_tokenizer_files(src, folder)

    # ------------------------------------------------------------------ one step

    def step(self, batch: Any, next_input_ids: np.ndarray | None = None) -> dict[str, Any]:
        """One optimizer step on `batch` ([M, B, S] arrays, e.g. a `slidejax.data.Batch`); returns
        its metrics (loss = mean over the step's supervised tokens). `next_input_ids`: the next
        batch's ids, when known, so the embedding rows it needs are updated first."""
        self.build()
        t_start = time.perf_counter()
        index, count = jax.process_index(), jax.process_count()
        if count > 1:  # this process's rows of the global batch
            batch = process_rows(batch, index, count)
            if next_input_ids is not None:
                next_input_ids = process_rows({"input_ids": next_input_ids}, index, count)["input_ids"]
        m = self.engine.step(batch, next_input_ids)
        now = time.perf_counter()
        # Throughput over the whole interval since the previous step (data and logging included);
        # the first step after a pause (start, eval, save) is timed on its own.
        dt = now - self._t_last if self._t_last is not None else now - t_start
        self._t_last = now
        self.step_count += 1
        record: dict[str, Any] = {
            "kind": "train", "step": self.step_count, "loss": m.loss, "grad_norm": m.grad_norm,
            "clip_scale": m.clip_scale, "lr": self.learning_rate(self.step_count - 1), "tokens": m.tokens,
            "positions": m.positions * count, "step_seconds": dt, "tokens_per_s": m.positions * count / dt,
            "tflops": self._fpt * m.positions * count / dt / 1e12, "gpu_peak_bytes": gpu_peak_bytes(),
            "host_rss_bytes": host_rss_bytes(), "time": time.time(),
        }
        # fit reads the next batch before this step: it notes where this batch's ended
        epoch = self._trained_epochs if self._trained_epochs is not None else getattr(self._train, "epochs_read", None)
        if epoch is not None:
            record["epoch"] = round(float(epoch), 6)
        self._log(record)
        return record

    def learning_rate(self, count: int) -> float | None:
        """The learning rate of the step after `count` completed steps (None for an optimizer
        whose rate slidejax does not know)."""
        lr = getattr(self.optimizer, "learning_rate", None)
        if lr is None:
            return None
        if not callable(lr):
            return float(lr)
        with jax.default_device(jax.local_devices(backend="cpu")[0]):  # this process's
            return float(lr(count))

    def _log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self._logger is not None:
            self._logger.log(record)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, eval_data: Any = None) -> dict[str, Any]:
        """Eval loss (mean over all supervised eval tokens) and, for prompt/completion eval data,
        greedy exact match on its first `task_examples` prompts. Logged like a step."""
        if eval_data is not None or self._eval is None:
            self.set_eval_data(eval_data)
        if self._eval is None:
            raise SlidejaxError("no eval data: pass an eval data file (--eval-data)")
        if jax.process_count() > 1:
            self.build()  # the engine over every process's devices, not a per-process one
        engine = self.engine if self.engine is not None else self.model.engine
        if hasattr(self._eval, "rewind"):
            self._eval.rewind()
        total, n = 0.0, 0
        index, count = jax.process_index(), jax.process_count()
        for batch in self._eval:
            s, k = engine.eval_loss(batch if count == 1 else process_rows(batch, index, count))  # global sums
            total, n = total + s, n + k
        record: dict[str, Any] = {"kind": "eval", "step": self.step_count,
                                  "eval_loss": total / n if n else float("nan"), "eval_tokens": n}
        if self._task is not None:
            prompts, refs = self._task
            from slidejax.presets import exact_match

            longest = max(len(self.tokenizer(r, add_special_tokens=False)["input_ids"]) for r in refs)
            preds = greedy_generate(self.model, self.tokenizer, prompts, longest + 2)
            record["exact_match"] = exact_match(preds, refs)
            record["samples"] = [{"prompt": p, "output": o, "reference": r}
                                 for p, o, r in zip(prompts[:3], preds[:3], refs[:3])]
        record["time"] = time.time()
        self._log(record)
        self._t_last = None
        return record

    # ------------------------------------------------------------------ checkpoints

    def save(self, *, wait: bool = False) -> Path:
        """Checkpoint the full training state at the current step (in the background: returns once
        the state is snapshotted). Returns the checkpoint's directory."""
        self.build()
        self.open_run()
        several = jax.process_count() > 1
        # Finishes pending updates: the state of this step (several processes: gathered on each).
        state = self.engine.state_dict(gather=several)
        meta = {
            "step": self.step_count, "engine_step": int(state["step"]), "total_steps": self.total_steps,
            "data": self._data_state, "rng": self.rng.bit_generator.state, "train_config": self.config.to_dict(),
            "model_config": self.model.config.to_hf_dict(), "optimizer": repr(self.optimizer),
            "time": time.time(),
        }

        def write() -> Path:
            with _masters(self.model.host, state["units"]):  # several processes: the gathered ones
                params = params_tree(self.model.host)
            return self._ckpt.save(self.step_count, params, optimizer_tree(state), meta, wait=wait)

        path = on_main_process(write) if several else write()
        del state
        self._t_last = None
        return path if path is not None else self._checkpoint_path(self.step_count)

    def wait(self) -> None:
        """Wait for a checkpoint being written in the background."""
        if self._ckpt is not None:
            self._ckpt.wait()

    def resume(self, path: str | os.PathLike = "latest") -> Path:
        """Load a checkpoint's full training state (weights, optimizer, step, schedule position,
        data position, RNG) into this trainer; its run directory becomes this run's. `path`: a run
        directory, a checkpoint directory, or "latest". Returns the checkpoint directory. With
        several processes every process reads the whole checkpoint (a filesystem all of them
        see) and keeps its share. Resuming a checkpoint before the run's latest sets the later
        ones aside (`checkpointing.set_aside_later`)."""
        # A save of this trainer still being written lands first (on process 0, before any
        # process looks for the latest checkpoint).
        run_together(self.wait)
        folder, step = find_checkpoint(self._resolve_resume(path))
        if folder.name.startswith(ABANDONED):
            raise SlidejaxError(f"{folder / str(step)} was set aside when its run resumed an earlier checkpoint, "
                                "and the run's checkpoints now continue another way: to go on from it, copy "
                                f"{folder} to <new run>/checkpoints and resume that run (or export it)")
        reader = Checkpointer(folder, keep_last=self.config.keep_last, read_only=True)
        try:
            meta = reader.read_meta(step)
            where = str(reader.path(step))
            saved = ModelConfig.from_hf_dict(meta["model_config"], source=where)
            _check_same_model(saved, self.model.config, where)
            if self._train is None and self._data_paths(None, "train") is not None:
                self.set_train_data()
            if self.total_steps is None:
                # The saved count, unless the run is resumed to train a different number of
                # epochs: then the count (and the schedule over it) for the new number.
                saved_epochs = (meta.get("train_config") or {}).get("epochs")
                changed = self.config.epochs is not None and self.config.epochs != saved_epochs
                self.total_steps = (self._count_total() if changed else None) or meta.get("total_steps")
            if meta.get("data") is not None and hasattr(self._train, "load_state_dict"):
                self._train.load_state_dict(meta["data"])  # checks the data is the same, before any allocation
            elif meta.get("data") is not None:
                warnings.warn("the training data is not a DataLoader: its position is not restored", stacklevel=2)
            self.build()
            state = self.engine.state_dict()
            restored = reader.restore(step)
            opt = {}
            for name, unit in state["units"].items():
                if unit["opt"] is None or not jax.tree_util.tree_leaves(unit["opt"]):
                    opt[name] = unit["opt"]
                    continue
                if name not in restored["optimizer"]:
                    raise SlidejaxError(f"{where}: no optimizer state for {name} (saved by a different optimizer)")
                like = jax.tree.map(np.asarray, unit["opt"])
                opt[name] = unnest(restored["optimizer"][name], like, where)
            load_params_tree(self.model.host, restored["params"], where)
            for name, unit in self.model.host.units.items():
                if name not in state["units"]:  # another process owns it: release it again
                    unit.master = np.zeros(unit.master.size, np.float32)
            self.engine.load_state_dict({"step": meta["engine_step"], "units": {
                name: {"master": self.model.host.units[name].master, "opt": opt[name]} for name in state["units"]}})
        finally:
            reader.close()
        self.step_count = int(meta["step"])
        self._data_state = meta.get("data")
        self.rng.bit_generator.state = meta["rng"]
        self._resumed_from = reader.path(step)
        self._run_dir = run_of(folder)
        # Only now, with the state loaded: a move that fails leaves a consistent trainer, warned.
        try:
            later, dest = on_main_process(lambda: set_aside_later(folder, step)) or ([], None)
        except SlidejaxError as e:
            warnings.warn(f"{e}; a later 'resume latest' may take them for this continuation's", stacklevel=2)
            later = []
        if later:
            warnings.warn(f"resumed from step {step}: the checkpoints of the continuation it abandons (steps "
                          f"{', '.join(map(str, later))}) were moved to {dest}", stacklevel=2)
        # A run this trainer had open is opened again: on the resumed run, its checkpoints re-read.
        self.close()
        self.open_run()
        if self._logger is not None:
            self._logger.restart_at(self.step_count)
            self.history = [r for r in read_metrics(self._logger.path) if r.get("step", 0) <= self.step_count]
        return self._resumed_from

    def _resolve_resume(self, path: str | os.PathLike) -> Path:
        if str(path) != "latest":
            return Path(path)
        if self.config.run_name:
            return Path(self.config.output_dir) / self.config.run_name
        return latest_run(self.config.output_dir)

    @classmethod
    def restore(cls, path: str | os.PathLike, model: Any = None, optimizer: Any = None, *, tokenizer: Any = None,
                **overrides: Any) -> "Trainer":
        """A trainer continuing the checkpoint at `path` (a run or checkpoint directory): its saved
        settings (with `overrides`), its model (weights from the checkpoint; pass `model` to reuse
        one already built), optimizer state, step, data position and RNG."""
        config, model = restore_setup(path, model, overrides)
        trainer = cls(model, optimizer, config, tokenizer=tokenizer)
        trainer.resume(path)
        return trainer

    # ------------------------------------------------------------------ fit

    def fit(self, train_data: Any = None, eval_data: Any = None, *, until_step: int | None = None) -> dict[str, Any]:
        """Train to the configured number of steps (or epochs): progress bar, metrics to
        ``<run>/metrics.jsonl`` and TensorBoard, eval every `eval_every` steps and at the end,
        checkpoints every `save_every` steps and at the end, a loss-curve PNG. SIGINT/SIGTERM finish
        the current step, save and return (``summary["interrupted"]`` names the signal).
        `until_step` stops early at that global step (saving), with the schedule unchanged."""
        c = self.config
        if train_data is not None or self._train is None:
            self.set_train_data(train_data)
        if eval_data is not None or self._eval is None:
            self.set_eval_data(eval_data)
        if c.resume is not None and self._resumed_from is None:
            self.resume(c.resume)
        self.build()
        run = self.open_run()
        total = self.total_steps
        limits = [x for x in (total, until_step) if x is not None]
        stop_at = min(limits) if limits else None
        main = jax.process_index() == 0
        progress = Progress(total, self.step_count, enabled=c.progress and main)
        summary: dict[str, Any] = {"run_dir": str(run), "interrupted": None}
        self._stop = None
        handlers = self._install_signal_handlers()
        try:
            with warnings.catch_warnings():
                # Warnings (e.g. truncated documents) as one line that does not break the bar.
                warnings.showwarning = lambda message, *a, **k: main and progress.write(f"warning: {message}")
                if self._eval is None and c.eval_every > 0:
                    warnings.warn(f"eval_every={c.eval_every} does nothing: there is no eval data "
                                  f"(eval_data, --eval-data)", stacklevel=2)
                if self._eval is not None and c.eval_every > 0 and self.step_count == 0:
                    self._report_eval(self.evaluate(), progress)
                last_eval = last_save = self.step_count
                if self._data_state is not None and hasattr(self._train, "load_state_dict"):
                    # Back to just after the last trained batch (a previous fit read one ahead).
                    self._train.load_state_dict(self._data_state)
                it = iter(self._train)
                batch = self._next(it)
                self._t_last = None
                while batch is not None and (stop_at is None or self.step_count < stop_at) and self._stop is None:
                    before_next = self._loader_state()
                    self._trained_epochs = getattr(self._train, "epochs_read", None)
                    nxt = self._next(it)
                    try:
                        m = self.step(batch, None if nxt is None else _input_ids(nxt))
                    finally:
                        self._trained_epochs = None
                    self._agree_stop()
                    self._data_state = before_next
                    progress.update(m)
                    if not math.isfinite(m["loss"]):
                        raise SlidejaxError(f"step {self.step_count}: the loss is {m['loss']} (diverged); "
                                            "lower lr or keep max_grad_norm on; the last checkpoint is intact")
                    if self._eval is not None and c.eval_every > 0 and self.step_count % c.eval_every == 0:
                        self._report_eval(self.evaluate(), progress)
                        last_eval = self.step_count
                    if c.save_every > 0 and self.step_count % c.save_every == 0:
                        self.save()
                        last_save = self.step_count
                    batch = nxt
            if self._stop is not None and main:
                progress.write(f"{self._stop}: stopping after step {self.step_count}; saving a checkpoint")
            finished = self._stop is None
            if finished and self._eval is not None and last_eval != self.step_count:
                self._report_eval(self.evaluate(), progress)
            if self.step_count > last_save:
                self.save()
            self.wait()
            summary["interrupted"] = self._stop
        finally:
            progress.close()
            self._restore_signal_handlers(handlers)
            if self._ckpt is not None:
                with contextlib.suppress(SlidejaxError):
                    self._ckpt.wait()
            if self._logger is not None:
                self._logger.flush()
        if c.trace is not None and main:  # process 0's timeline
            self.engine.save_trace(c.trace)
        plot = plot_metrics(self.history, run / "loss.png") if main else None
        truncated = getattr(self._train, "documents_truncated", 0)
        summary.update(step=self.step_count, total_steps=total, checkpoint=str(self._ckpt.path(self.step_count))
                       if self._ckpt and self.step_count in self._ckpt.steps() else None,
                       plot=str(plot) if plot else None, documents_truncated=truncated,
                       skipped_steps=self._skipped,
                       train=next((r for r in reversed(self.history) if r["kind"] == "train"), None),
                       eval=next((r for r in reversed(self.history) if r["kind"] == "eval"), None))
        return summary

    def _next(self, it: Iterator) -> Any:
        """The next batch with supervised tokens (an empty one, e.g. prompts without completions
        only, is skipped and counted), or None at the end of the data."""
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return None
            labels = np.asarray(batch.get("labels") if isinstance(batch, dict) else batch.labels)
            if np.any(labels != -100):
                return batch
            self._skipped += 1

    def _loader_state(self) -> dict | None:
        fn = getattr(self._train, "state_dict", None)
        return fn() if fn is not None else None

    def _report_eval(self, record: dict[str, Any], progress: Progress) -> None:
        if jax.process_index() != 0:
            return
        text = f"eval @ step {record['step']}: loss {record['eval_loss']:.4f}"
        if "exact_match" in record:
            text += f", exact match {record['exact_match']:.3f}"
            s = record["samples"][0]
            text += f"  (e.g. {s['prompt']!r} -> {s['output']!r})"
        progress.write(text)

    def _agree_stop(self) -> None:
        """Several processes: a signal caught by any process stops every process after the
        same step (one tiny exchange per step), so all save the same checkpoint together."""
        if jax.process_count() == 1:
            return
        from jax.experimental import multihost_utils

        mine = signal.Signals[self._stop].value if self._stop is not None else 0
        every = np.asarray(multihost_utils.process_allgather(np.array(mine, np.int32)))
        if self._stop is None and every.any():
            self._stop = signal.Signals(int(every[every > 0][0])).name

    def _checkpoint_path(self, step: int) -> Path:
        return (self.run_dir / "checkpoints").absolute() / str(step)

    # ------------------------------------------------------------------ signals

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum: int, frame: types.FrameType | None) -> None:
            # Only a flag: printing here could re-enter a write the main thread is in the middle of.
            if self._stop is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: abort now (checkpoints on disk stay intact)
            self._stop = signal.Signals(signum).name

        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, handler)
        return old

    @staticmethod
    def _restore_signal_handlers(old: dict[int, Any]) -> None:
        for sig, h in old.items():
            signal.signal(sig, h)

    # ------------------------------------------------------------------ export and teardown

    def export(self, path: str | os.PathLike, dtype: str = "bfloat16") -> Path:
        """Write the current weights as a Hugging Face folder (config.json, safetensors, tokenizer
        files) that `transformers.AutoModelForCausalLM.from_pretrained` loads. With several
        processes every process calls it (the weights are gathered) and process 0 writes."""
        if dtype not in ("bfloat16", "float32"):
            raise SlidejaxError(f"export dtype {dtype!r} is not bfloat16 or float32")
        if self.engine is not None:
            self.engine.gather_masters()  # one process: just sync
        from slidejax.hf_checkpoint import save_pretrained

        tok = self.config.tokenizer or getattr(self.model, "source", None)
        out = on_main_process(lambda: save_pretrained(self.model.host, path, dtype=dtype, tokenizer_dir=tok))
        return Path(path) if out is None else out

    def close(self) -> None:
        """Wait for checkpoint writes and close the logs."""
        if self._ckpt is not None:
            self._ckpt.close()
            self._ckpt = None
        if self._logger is not None:
            self._logger.close()
            self._logger = None
        self._opened = False

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------
# Several processes (after `slidejax.distributed.initialize`): the same data everywhere, each
# process trains on its rows; process 0 writes the run's files.


def engine_devices(devices: int, micro_batch_size: int) -> list[Any] | None:
    """The engine's devices: the first `devices` local devices of every process, process-major
    (None: the default single device). The micro-batch's rows must split evenly over them."""
    count = jax.process_count()
    if devices == 1 and count == 1:
        return None
    local = jax.local_devices()
    if devices > len(local):
        raise SlidejaxError(f"devices={devices} but only {len(local)} local devices exist")
    if count == 1:
        if micro_batch_size % devices:
            raise SlidejaxError(f"micro_batch_size {micro_batch_size} must be a multiple of devices={devices}")
        return local[:devices]
    if micro_batch_size % (devices * count):
        raise SlidejaxError(f"micro_batch_size {micro_batch_size} must be a multiple of devices x processes "
                            f"= {devices} x {count}: each process takes its share of every micro-batch's rows")
    of = lambda p: sorted((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)  # noqa: E731
    return [d for p in range(count) for d in of(p)[:devices]]


def process_rows(batch: Any, index: int, count: int) -> dict[str, np.ndarray]:
    """Process `index` of `count`'s part of a global batch ([M, B, S] arrays, a dict or a
    `Batch`): rows index * B/count to (index + 1) * B/count of every micro-batch. The engine
    concatenates the processes' rows in process order, so the step is the global batch's."""
    out = {}
    for name in ("input_ids", "labels", "segment_ids", "positions"):
        v = batch.get(name) if isinstance(batch, dict) else getattr(batch, name, None)
        if v is None:
            continue
        v = np.asarray(v)
        if v.ndim != 3 or v.shape[1] % count:
            raise SlidejaxError(f"{name} of shape {list(v.shape)}: a global batch [micro_batches, rows, seq_len] "
                                f"needs rows divisible by the {count} processes")
        per = v.shape[1] // count
        out[name] = v[:, index * per:(index + 1) * per]
    return out


_MESSAGE_BYTES = 2048


def _encode(text: str) -> np.ndarray:
    data = text.encode()[:_MESSAGE_BYTES]
    buf = np.zeros(_MESSAGE_BYTES, np.uint8)
    buf[:len(data)] = np.frombuffer(data, np.uint8)
    return buf


def _decode(buf: np.ndarray) -> str:
    return bytes(np.asarray(buf, np.uint8)).rstrip(b"\0").decode(errors="replace")


def broadcast_text(text: str) -> str:
    """Process 0's `text` on every process (collective), e.g. a run name made from the clock."""
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return text
    return _decode(multihost_utils.broadcast_one_to_all(_encode(text), is_source=jax.process_index() == 0))


def run_together(fn: Any) -> Any:
    """`fn()` on every process, then (several processes) an exchange of outcomes: if it raised on
    any process it raises on all (its own error there, a SlidejaxError naming that process
    elsewhere), so no process goes on to wait in a collective for one that stopped."""
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils

    error, result = None, None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - re-raised below, after the others have heard of it
        error = e
    text = "" if error is None else (str(error) or type(error).__name__)
    every = np.asarray(multihost_utils.process_allgather(_encode(text)))
    if error is not None:
        raise error
    failed = [(p, _decode(m)) for p, m in enumerate(every) if m.any()]
    if failed:
        p, message = failed[0]
        raise SlidejaxError(f"process {p} failed: {message}")
    return result


def on_main_process(fn: Any) -> Any:
    """`fn()` on process 0 only (its result there, None elsewhere); its failure is raised on every
    process (see `run_together`)."""
    return run_together(lambda: fn() if jax.process_index() == 0 else None)


@contextlib.contextmanager
def _masters(host: Any, units: dict[str, Any]) -> Iterator[None]:
    """`host`'s units read `units[name]["master"]` (a gathered state) meanwhile: with several
    processes the masters of units other processes own are not in this process's HostModel."""
    saved = {name: u.master for name, u in host.units.items()}
    try:
        for name, u in host.units.items():
            if units[name]["master"] is not u.master:
                u.master = np.asarray(units[name]["master"], np.float32).reshape(-1)
        yield
    finally:
        for name, u in host.units.items():
            u.master = saved[name]


# ----------------------------------------------------------------------------------------------
# Helpers shared with the CLI


def _input_ids(batch: Any) -> np.ndarray:
    return np.asarray(batch["input_ids"] if isinstance(batch, dict) else batch.input_ids)


def _check_same_model(saved: ModelConfig, current: ModelConfig, where: str) -> None:
    if saved == current:
        return
    diffs = [f"{f.name} {getattr(saved, f.name)!r} vs {getattr(current, f.name)!r}"
             for f in dataclasses.fields(ModelConfig) if f.compare and getattr(saved, f.name) != getattr(current, f.name)]
    raise SlidejaxError(f"{where}: checkpoint of a different model ({', '.join(diffs[:3])}: checkpoint vs this model)")


def latest_run(output_dir: str | os.PathLike) -> Path:
    """The most recently modified run directory with checkpoints under `output_dir`."""
    out = Path(output_dir)
    runs = [p for p in out.iterdir() if (p / "checkpoints").is_dir()] if out.is_dir() else []
    runs = [p for p in runs if any(s.name.isdigit() for s in (p / "checkpoints").iterdir())]
    if not runs:
        raise SlidejaxError(f"{out}: no run with a checkpoint to resume")
    return max(runs, key=lambda p: (p / "checkpoints").stat().st_mtime)


def restore_setup(path: str | os.PathLike, model: Any, overrides: dict[str, Any],
                  toml: str | os.PathLike | None = None) -> tuple[TrainConfig, Any]:
    """(settings, model) to continue the checkpoint at `path`: the checkpoint's settings under the
    TOML file and `overrides`, and `model` or one built from the checkpoint's config.json (its
    weights are filled in by `Trainer.resume`)."""
    from slidejax.host_memory import HostModel
    from slidejax.pretrained import Model

    folder, step = find_checkpoint(path)
    reader = Checkpointer(folder, read_only=True)
    try:
        meta = reader.read_meta(step)
    finally:
        reader.close()
    where = str(reader.path(step))
    saved_cfg = ModelConfig.from_hf_dict(meta["model_config"], source=where)
    if model is not None:
        _check_same_model(saved_cfg, model.config, where)
    elif overrides.get("model") is not None:  # a model named along with --resume must be the checkpoint's
        from slidejax.presets import PRESETS, preset_path

        name = overrides["model"]
        folder_of = preset_path(name) if name in PRESETS and not Path(name).exists() else Path(name)
        _check_same_model(saved_cfg, ModelConfig.from_pretrained(folder_of), where)
    run = run_of(folder)
    saved = dict(meta["train_config"])
    location = dict(output_dir=str(run.parent), run_name=run.name, resume=str(path))
    config = TrainConfig.load(toml, base={**saved, **location}, **overrides).replace(**location)
    if model is None:
        source = run / "model" if (run / "model").is_dir() else None
        model = Model(saved_cfg, HostModel(saved_cfg), _resolve_dtype(config.compute_dtype), source=source)
    return config, model


__all__ = [
    "PRESET_TRAINING",
    "broadcast_text",
    "on_main_process",
    "process_rows",
    "run_together",
    "check_run_dir",
    "data_paths",
    "load_tokenizer",
    "make_loader",
    "TrainConfig",
    "Trainer",
    "check_host_memory",
    "greedy_generate",
    "host_memory_need",
    "latest_run",
    "lr_schedule",
    "make_optimizer",
    "read_toml",
]
