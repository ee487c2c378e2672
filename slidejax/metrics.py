"""Training metrics: the FLOP formula, memory probes, the per-step log (JSONL + TensorBoard), the
progress bar and the loss-curve plot.

`flops_per_token` is THE formula slidejax reports TFLOP/s with, in the trainer and in the
benchmarks alike::

    6 * N + 6 * L * S * n_heads * head_dim

N is the parameter count without the embedding lookup (decoder layers, final norm and lm_head,
which is a matmul even when tied to the embedding). 6N is the forward and backward matmuls over
the parameters; the second term is causal attention's two S x S matmuls, forward and backward
(12 * L * S * d, halved by the causal mask). Recomputation is not counted: a system that
recomputes more is not credited for it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from slidejax.config import ModelConfig

# ----------------------------------------------------------------------------------------------
# Counting


def flop_params(cfg: ModelConfig) -> int:
    """N of the FLOP formula: every parameter that takes part in a matmul per token, i.e. all but
    the embedding lookup (the lm_head counts even when it is tied to the embedding)."""
    return cfg.num_layers * cfg.layer_params + cfg.hidden_size + cfg.vocab_size * cfg.hidden_size


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token at sequence length `seq_len`: ``6*N + 6*L*S*n_heads*head_dim``."""
    attention = 6 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim
    return 6.0 * flop_params(cfg) + attention


# ----------------------------------------------------------------------------------------------
# Memory probes


def gpu_peak_bytes(device: Any = None) -> int | None:
    """Peak bytes in use on the accelerator (XLA's allocator); None where the backend does not
    report it (the CPU backend)."""
    import jax

    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return None
    stats = device.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else int(peak)


def host_rss_bytes() -> int:
    """Resident set size of this process."""
    return int(psutil.Process().memory_info().rss)


def format_bytes(n: float | None) -> str:
    """'1.23 GB' style (decimal units, as budgets are written)."""
    if n is None:
        return "-"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


# ----------------------------------------------------------------------------------------------
# The per-step log


class _TensorBoard:
    """Scalars to TensorBoard event files, through the `tensorboard` package's own event writer
    (no TensorFlow or PyTorch needed)."""

    def __init__(self, logdir: Path):
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
        self._writer = EventFileWriter(str(logdir))

    def scalars(self, step: int, values: dict[str, float], wall_time: float) -> None:
        summary = self._summary_pb2.Summary(
            value=[self._summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()])
        self._writer.add_event(self._event_pb2.Event(wall_time=wall_time, step=step, summary=summary))

    def restart_at(self, step: int) -> None:
        """A SessionLog.START at `step`: TensorBoard drops this run's older events with step >=
        `step` (those of a process that went past the checkpoint a resumed run starts from)."""
        log = self._event_pb2.SessionLog(status=self._event_pb2.SessionLog.START)
        self._writer.add_event(self._event_pb2.Event(wall_time=time.time(), step=step, session_log=log))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


# Scalars that go to TensorBoard, under "train/" or "eval/" (the JSONL has everything).
_TB_TRAIN = ("loss", "grad_norm", "lr", "tokens_per_s", "tflops", "clip_scale")


class MetricsLogger:
    """Writes each record to ``<run>/metrics.jsonl`` (one JSON object a line) and its scalars to
    TensorBoard event files in ``<run>/tensorboard``.

    Records are dicts with ``"step"`` and ``"kind"`` ("train" or "eval"). On resume,
    `restart_at(step)` drops the JSONL records after the checkpoint's step, so the log reads as one
    run.
    """

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = _TensorBoard(self.run_dir / "tensorboard") if tensorboard else None

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (flushed, so a crash loses at most the current line)."""
        clean = {k: _jsonable(v) for k, v in record.items() if v is not None}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self._tb is not None:
            kind = record.get("kind", "train")
            keys = _TB_TRAIN if kind == "train" else [k for k in record if k not in ("step", "kind", "time")]
            numbers = {k: float(record[k]) for k in keys  # numpy scalars too
                       if isinstance(record.get(k), (int, float, np.integer, np.floating))}
            values = {f"{kind}/{k}": v for k, v in numbers.items() if math.isfinite(v)}
            if values:
                self._tb.scalars(int(record["step"]), values, record.get("time", time.time()))

    def restart_at(self, step: int) -> None:
        """Resuming from the checkpoint of `step`: forget what was logged after it."""
        self._file.close()
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        if self._tb is not None:
            self._tb.restart_at(step + 1)

    def flush(self) -> None:
        self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the information
    return v


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (a torn last line, from a crash, is skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def plot_metrics(records: Iterable[dict[str, Any]], path: str | os.PathLike) -> Path | None:
    """Loss curve PNG: training loss per step and eval loss; the task metric on a second panel
    when there is one. Returns the path, or None when there is nothing to plot."""
    # A bare Figure renders with Agg and leaves pyplot's backend (a notebook's, say) alone.
    from matplotlib.figure import Figure

    records = list(records)
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train" and isinstance(r.get("loss"), float)]
    evals = [r for r in records if r.get("kind") == "eval"]
    ev_loss = [(r["step"], r["eval_loss"]) for r in evals if isinstance(r.get("eval_loss"), float)]
    ev_task = [(r["step"], r["exact_match"]) for r in evals if isinstance(r.get("exact_match"), (int, float))]
    if not train and not ev_loss:
        return None
    panels = 2 if ev_task else 1
    fig = Figure(figsize=(6 * panels, 4))
    axes = fig.subplots(1, panels, squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if ev_loss:
        ax.plot(*zip(*ev_loss), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over supervised tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    if ev_task:
        ax2 = axes[0][1]
        ax2.plot(*zip(*ev_task), "o-", color="tab:green")
        ax2.set_xlabel("step")
        ax2.set_ylabel("exact match (greedy)")
        ax2.set_ylim(-0.02, 1.02)
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


# ----------------------------------------------------------------------------------------------
# The progress bar


class Progress:
    """A tqdm bar (step, loss, tokens/s, TFLOP/s, GPU peak, host RSS, ETA) on a terminal; on
    anything else (a log file, CI) one plain line every `every` steps instead of bar redraws."""

    def __init__(self, total: int | None, initial: int = 0, *, enabled: bool = True, every: int | None = None,
                 file: Any = None):
        from tqdm import tqdm

        self.file = file or sys.stderr
        self.tty = enabled and hasattr(self.file, "isatty") and self.file.isatty()
        self.enabled = enabled
        self.total, self.start, self.t0 = total, initial, time.perf_counter()
        self.every = every or max(1, (total or 100) // 20)
        self._bar = tqdm(total=total, initial=initial, unit="step", file=self.file, dynamic_ncols=True,
                         disable=not self.tty) if self.tty else None

    @staticmethod
    def describe(m: dict[str, Any]) -> dict[str, str]:
        out = {"loss": f"{m['loss']:.4f}"}
        if m.get("tokens_per_s") is not None:
            out["tok/s"] = f"{m['tokens_per_s']:.0f}"
        if m.get("tflops") is not None:
            out["TFLOP/s"] = f"{m['tflops']:.3g}"
        if m.get("gpu_peak_bytes") is not None:
            out["gpu"] = format_bytes(m["gpu_peak_bytes"])
        if m.get("host_rss_bytes") is not None:
            out["rss"] = format_bytes(m["host_rss_bytes"])
        return out

    def update(self, m: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix(self.describe(m), refresh=False)
            self._bar.update(1)
            return
        step = m["step"]
        if step % self.every == 0 or step == self.total:
            self.write(self.line(m))

    def line(self, m: dict[str, Any]) -> str:
        step = m["step"]
        parts = [f"step {step}" + (f"/{self.total}" if self.total else "")]
        parts += [f"{k} {v}" for k, v in self.describe(m).items()]
        done = step - self.start
        if self.total and done > 0:
            eta = (time.perf_counter() - self.t0) / done * (self.total - step)
            parts.append(f"eta {format_duration(eta)}")
        return "  ".join(parts)

    def write(self, text: str) -> None:
        """A message (printed even with the bar disabled) that does not break the bar."""
        if self._bar is not None:
            self._bar.write(text, file=self.file)
        else:
            print(text, file=self.file, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


__all__ = [
    "MetricsLogger",
    "Progress",
    "flop_params",
    "flops_per_token",
    "format_bytes",
    "gpu_peak_bytes",
    "host_rss_bytes",
    "plot_metrics",
    "read_metrics",
]
