"""What every benchmark runner shares: model shapes, the FLOP formula, measurement, CLI, results.

Every system (slidejax and each baseline) is a script that takes the same arguments
(:func:`runner_parser`), trains the same Llama-3.1-8B-shaped model with ``--layers`` decoder layers
on random token ids, and writes one JSON object (:func:`make_result`) to ``--out``. Keeping the
shapes, the FLOP count and the measurement here means the systems are compared on one definition.

Measurement:
  * step time: ``warmup`` untimed steps, then ``steps`` timed ones, each ended by a device sync;
    median, min and max are reported (:func:`time_steps`, :func:`summarize`).
  * host memory: the peak over the whole run of the RSS summed over the process tree, sampled every
    ~50 ms, and the kernel's own high-water mark (VmHWM) of the runner process; the larger is
    ``peak_host_rss_bytes``. Pinned (page-locked) buffers that the CUDA driver maps may not show in
    RSS, so the drop of the system's available memory since start is kept too
    (``peak_host_used_bytes``).
  * GPU memory: the device's used memory (NVML) sampled the same way, over the training steps
    (``peak_gpu_bytes``: what the process really holds: context, allocator pools, workspaces), and
    the framework allocator's own peak (``peak_gpu_allocator_bytes``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import psutil

GB = 1e9


@dataclass(frozen=True)
class ModelShape:
    """A Llama decoder's shapes (untied embedding and lm_head, SwiGLU MLP, GQA attention)."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5

    def layer_params(self) -> int:
        """Parameters of one decoder layer: q, k, v, o, gate, up, down and two RMSNorm weights."""
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        return attn + mlp + 2 * self.hidden

    def flop_params(self, layers: int) -> int:
        """N of the FLOP formula: decoder layers, final norm and lm_head (embedding excluded)."""
        return layers * self.layer_params() + self.hidden + self.vocab * self.hidden

    def total_params(self, layers: int) -> int:
        """Every trained parameter: N plus the embedding table."""
        return self.flop_params(layers) + self.vocab * self.hidden

    def hf_config_kwargs(self, layers: int) -> dict[str, Any]:
        """Keyword arguments of transformers' ``LlamaConfig`` for this shape."""
        return dict(
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            vocab_size=self.vocab,
            rms_norm_eps=self.norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            max_position_embeddings=131072,
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
            use_cache=False,
        )


LLAMA31_8B = ModelShape(
    hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128, vocab=128256
)
# A model small enough for a CPU test of every runner's code path (--tiny).
TINY = ModelShape(hidden=64, intermediate=160, heads=4, kv_heads=2, head_dim=16, vocab=512)


def flops_per_token(shape: ModelShape, layers: int, seq_len: int) -> float:
    """Training FLOPs per token, the one formula used for every system.

    ``6 * N + 6 * L * S * heads * head_dim``: 6N for the forward and backward matmuls over the
    parameters N (:meth:`ModelShape.flop_params`), plus causal attention's two S x S matmuls,
    forward and backward (12 * L * S * d, halved by the causal mask). Recomputation is not
    counted: a system that recomputes more is not credited for it.
    """
    attention = 6 * layers * seq_len * shape.heads * shape.head_dim
    return 6.0 * shape.flop_params(layers) + attention


def micro_batching(tokens_per_step: int, seq_len: int, micro_batch_tokens: int) -> tuple[int, int]:
    """(sequences per micro-batch, micro-batches per step) for a step of ``tokens_per_step``.

    The micro-batch is the largest whole number of sequences, at most ``micro_batch_tokens``
    tokens, that divides the step's sequences evenly.
    """
    if tokens_per_step % seq_len:
        raise SystemExit(f"--tokens-per-step {tokens_per_step} is not a multiple of --seq-len {seq_len}")
    sequences = tokens_per_step // seq_len
    most = max(1, micro_batch_tokens // seq_len)
    batch = max(b for b in range(1, min(most, sequences) + 1) if sequences % b == 0)
    return batch, sequences // batch


# ----------------------------------------------------------------------------------------------
# Memory


def _proc_status_bytes(key: str, pid: int | str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def vm_hwm_bytes(pid: int | str = "self") -> int:
    """The kernel's peak resident set size of one process (``VmHWM``), in bytes; 0 if unknown."""
    return _proc_status_bytes("VmHWM", pid)


def vm_rss_bytes(pid: int | str = "self") -> int:
    """The kernel's current resident set size of one process (``VmRSS``), in bytes; 0 if unknown."""
    return _proc_status_bytes("VmRSS", pid)


def resident_map(pid: int | str = "self", big: int = 1 << 28) -> dict[str, Any]:
    """Where one process's resident memory is, from ``/proc/<pid>/smaps``: resident bytes of
    anonymous mappings, of each device file (pinned buffers the GPU driver maps show there), of
    other files, and the sizes and resident bytes of anonymous mappings of at least `big` bytes
    (large numpy arrays; regions of an allocator's pool), largest first."""
    groups: dict[str, int] = {}
    large: list[tuple[int, int]] = []
    path, size = "", 0
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                head = line.split()
                if not head:
                    continue
                if "-" in head[0] and not head[0].endswith(":"):  # a mapping's first line
                    lo, hi = (int(x, 16) for x in head[0].split("-"))
                    size, path = hi - lo, (head[5] if len(head) > 5 else "")
                elif head[0] == "Rss:":
                    rss = int(head[1]) * 1024
                    key = ("anonymous" if not path or path.startswith("[") else
                           path if path.startswith("/dev/") else "files")
                    groups[key] = groups.get(key, 0) + rss
                    if key == "anonymous" and size >= big:
                        large.append((size, rss))
    except OSError:
        return {}
    large.sort(reverse=True)
    return {"resident": groups, "large_anonymous": [{"size": s, "rss": r} for s, r in large[:40]]}


def tree_rss_bytes(proc: psutil.Process) -> int:
    """RSS of a process and all its descendants, in bytes (processes that vanish count 0)."""
    total = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def _nvml_handle() -> Any | None:
    """An NVML handle for the first visible GPU, or None where there is no GPU or no NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
        index = int(visible) if visible.isdigit() else 0
        return pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:  # no pynvml, no driver, no device: GPU memory is then not sampled
        return None


def _nvml_used_bytes(handle: Any) -> int:
    import pynvml

    return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)


class PeakSampler:
    """Samples host RSS (process tree), system memory in use and GPU memory in a daemon thread.

    Use as a context manager around the whole run; call :meth:`reset_gpu` when the timed phase
    starts so that set-up transients (a model materialised on the GPU before partitioning, say) do
    not count as the training peak.
    """

    def __init__(self, interval_s: float = 0.05, pid: int | None = None):
        self.interval_s = interval_s
        self._proc = psutil.Process(pid or os.getpid())
        self._gpu = _nvml_handle()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-sampler", daemon=True)
        self._lock = threading.Lock()
        self._available0 = psutil.virtual_memory().available
        self.host_rss_peak = 0
        self.host_used_peak = 0
        self.gpu_peak = 0
        self.samples = 0

    def _sample(self) -> None:
        rss = tree_rss_bytes(self._proc)
        used = self._available0 - psutil.virtual_memory().available
        gpu = _nvml_used_bytes(self._gpu) if self._gpu is not None else 0
        with self._lock:
            self.host_rss_peak = max(self.host_rss_peak, rss)
            self.host_used_peak = max(self.host_used_peak, used)
            self.gpu_peak = max(self.gpu_peak, gpu)
            self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> "PeakSampler":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def reset_gpu(self) -> None:
        """Forget the GPU peak so far (call after set-up, before the first training step)."""
        with self._lock:
            self.gpu_peak = 0
        if self._gpu is not None:
            self._sample()

    def peaks(self) -> dict[str, int]:
        """The result fields this sampler fills, in bytes."""
        with self._lock:
            return {
                "peak_host_rss_bytes": max(self.host_rss_peak, vm_hwm_bytes(self._proc.pid)),
                "peak_host_used_bytes": max(self.host_used_peak, 0),
                "peak_gpu_bytes": self.gpu_peak,
            }


def torch_allocator_peak_bytes() -> int:
    """PyTorch's CUDA caching allocator peak of allocated bytes (0 without CUDA)."""
    import torch

    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else 0


def jax_allocator_peak_bytes() -> int:
    """XLA's device allocator peak of bytes in use on the first device (0 where not reported)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return int(stats.get("peak_bytes_in_use", 0))


# ----------------------------------------------------------------------------------------------
# Time


def time_steps(
    step: Callable[[], Any], warmup: int, steps: int, sync: Callable[[], Any] = lambda: None
) -> list[float]:
    """Runs ``warmup`` untimed then ``steps`` timed calls of ``step``; returns the step times (s).

    ``sync`` must block until the device has finished the step (``torch.cuda.synchronize``, or
    ``jax.block_until_ready`` on the step's outputs), so each time covers the whole step.
    """
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def summarize(times: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and all of a list of step times."""
    if not times:
        raise ValueError("no step times to summarize")
    return {
        "median": statistics.median(times),
        "min": min(times),
        "max": max(times),
        "all": list(times),
    }


# ----------------------------------------------------------------------------------------------
# CLI and results


def runner_parser(description: str) -> argparse.ArgumentParser:
    """The argument parser every runner starts from (each may add its own options)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--layers", type=int, required=True, help="decoder layers of the 8B shape")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--tokens-per-step", type=int, default=16384)
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    p.add_argument("--out", type=Path, required=True, help="result JSON file")
    p.add_argument("--gpu-budget", default=None, help="GPU memory budget, e.g. 24GB (if supported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="a tiny model, for CPU tests of the runner")
    return p


def check_runner_args(args: argparse.Namespace) -> None:
    """Fails fast, with one line, on arguments no runner can honour."""
    for name in ("layers", "seq_len", "tokens_per_step", "steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        raise SystemExit("--warmup must be >= 0")
    if args.tokens_per_step % args.seq_len:
        raise SystemExit(
            f"--tokens-per-step {args.tokens_per_step} is not a multiple of --seq-len {args.seq_len}"
        )


def model_shape(args: argparse.Namespace) -> ModelShape:
    """The model shape a runner's arguments select."""
    return TINY if args.tiny else LLAMA31_8B


def make_result(
    *,
    system: str,
    shape: ModelShape,
    layers: int,
    seq_len: int,
    tokens_per_step: int,
    step_times: Sequence[float],
    peaks: dict[str, int],
    notes: str = "",
    **extra: Any,
) -> dict[str, Any]:
    """The result object every runner writes (schema in bench/README.md).

    ``peaks`` holds ``peak_gpu_bytes`` and ``peak_host_rss_bytes`` (and optionally
    ``peak_host_used_bytes``, ``peak_gpu_allocator_bytes``); ``extra`` adds runner-specific
    fields (micro-batching, losses).
    """
    summary = summarize(step_times)
    tokens_per_s = tokens_per_step / summary["median"]
    fpt = flops_per_token(shape, layers, seq_len)
    result = {
        "system": system,
        "layers": layers,
        "seq_len": seq_len,
        "tokens_per_step": tokens_per_step,
        "steps": len(step_times),
        "step_time_s": summary,
        "tokens_per_s": tokens_per_s,
        "model_tflops": fpt * tokens_per_s / 1e12,
        "peak_gpu_bytes": int(peaks.get("peak_gpu_bytes", 0)),
        "peak_host_rss_bytes": int(peaks.get("peak_host_rss_bytes", 0)),
        "params": shape.total_params(layers),
        "notes": notes,
        "flop_params": shape.flop_params(layers),
        "flops_per_token": fpt,
    }
    for key in ("peak_host_used_bytes", "peak_gpu_allocator_bytes"):
        if key in peaks:
            result[key] = int(peaks[key])
    result.update(extra)
    return result


RESULT_KEYS = (
    "system", "layers", "seq_len", "tokens_per_step", "steps", "step_time_s", "tokens_per_s",
    "model_tflops", "peak_gpu_bytes", "peak_host_rss_bytes", "params", "notes",
)


def check_result(result: dict[str, Any]) -> None:
    """Raises ValueError if a result object lacks a schema field or has a non-finite number."""
    missing = [k for k in RESULT_KEYS if k not in result]
    if missing:
        raise ValueError(f"result lacks {missing}")
    for key in ("tokens_per_s", "model_tflops"):
        if not math.isfinite(result[key]) or result[key] <= 0:
            raise ValueError(f"result field {key} = {result[key]!r}")


def write_result(path: Path, result: dict[str, Any]) -> None:
    """Writes a result object as JSON (atomically: a killed runner leaves no half file)."""
    check_result(result)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)


def print_result(result: dict[str, Any]) -> None:
    """One human line for a result."""
    t = result["step_time_s"]
    print(
        f"{result['system']}: {result['layers']} layers, {result['tokens_per_step']} tokens/step: "
        f"{result['tokens_per_s']:.0f} tokens/s, {result['model_tflops']:.1f} TFLOP/s, step "
        f"{t['median']:.3f} s [{t['min']:.3f}-{t['max']:.3f}], GPU {result['peak_gpu_bytes'] / GB:.1f} GB, "
        f"host {result['peak_host_rss_bytes'] / GB:.1f} GB"
        + (f" ({result['notes']})" if result["notes"] else ""),
        flush=True,
    )
