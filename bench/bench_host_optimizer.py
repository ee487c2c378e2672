"""Host AdamW throughput: slidejax's fused numba pass vs torch's fused CPU AdamW vs generic optax.

    python bench/bench_host_optimizer.py --out runs/host_opt [--sizes 256M,1B] [--threads N]

One flat fp32 unit of each size is updated in place, side by side in one run:

* ``fused``: :class:`slidejax.host_optimizer.HostAdamW`, fp32 moments: reads the bf16 gradient,
  scales it, updates master, m and v, writes the bf16 upload copy. DRAM traffic 28 B/param
  (master, m, v read + written: 24; bf16 grad read: 2; bf16 upload written: 2), plus the
  write-allocate read of the upload (2) that the CPU does for a store it cannot stream.
* ``fused_inplace``: ``fused`` as the engine runs it: the bf16 upload copy is written over the
  bf16 gradient it reads (one pinned buffer): 26 B/param (no separate upload to write-allocate).
* ``fused_bf16m``: the same with bf16 moments (m rounded to nearest, v stochastically): 20 B/param.
* ``torch``: ``torch.optim.AdamW(fused=True)`` on the CPU, fp32 param and fp32 grad, same
  hyperparameters, ``torch.set_num_threads(threads)``: 28 B/param. It does *not* read a bf16
  gradient nor write a bf16 copy, and has no gradient scale; the step counter lives in a tensor.
* ``torch_all``: the same with torch's default thread count (all cores), if that differs.
* ``optax``: :class:`slidejax.host_optimizer.HostOptax` around ``optax.adamw``: XLA:CPU (its own
  thread pool, all cores) on zero-copy views of the buffers, then a threaded write-back of master
  and the bf16 copy.
* ``replay8``: :meth:`slidejax.host_optimizer.HostAdamW.catch_up` of embedding-like rows (4096
  wide, fp32 moments, none zero) that each owe 8 deferred steps: one pass over their memory (24
  B/param) with 8 AdamW steps of arithmetic per element. Against 8 x ``fused_inplace``'s time it
  says what deferring a row's zero-gradient steps saves, and how long a lookup waits for a row
  that owes many.
* ``stream``: not an optimizer but the ceiling of ``fused_inplace``: the same arrays, layout,
  threads and scheduling, the same 26 B/param, with a multiply-add per array instead of AdamW's
  three divisions and square root. ``fused_inplace`` near ``stream`` means the update is bound by
  host memory bandwidth; well below it, by arithmetic (worth a faster kernel).

Every method runs ``--warmup`` untimed updates (compilation, first touch of the pages), then
``--repeats`` timed ones; the median is reported as Gparam/s and, from the bytes each must move,
GB/s. Only one method's buffers are allocated at a time (1B params: 16 GB for fused / torch, ~22 GB
for optax). Prints a table last; writes ``DIR/results.json`` and ``DIR/results.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LR, WD = 1e-3, 0.01
BYTES_PER_PARAM = {"fused": 28, "fused_inplace": 26, "fused_bf16m": 20, "torch": 28, "torch_all": 28, "optax": None,
                   "stream": 26, "replay8": 24}


def parse_size(text: str) -> int:
    """'256M' -> 268435456 (binary K/M/G; B = billion, 10**9)."""
    text = text.strip().upper()
    mult = {"K": 2**10, "M": 2**20, "G": 2**30, "B": 10**9}.get(text[-1])
    return int(float(text[:-1]) * mult) if mult else int(text)


def fill(a: np.ndarray, seed: int, scale: float) -> None:
    """Random-looking values without a large temporary: a 1M-element random block, tiled."""
    block = (np.random.default_rng(seed).standard_normal(1 << 20) * scale).astype(a.dtype)
    flat = a.reshape(-1)
    for lo in range(0, flat.size, block.size):
        hi = min(flat.size, lo + block.size)
        flat[lo:hi] = block[: hi - lo]


def timed(step, warmup: int, repeats: int, before=None) -> list[float]:
    """Seconds of each of `repeats` calls of `step` after `warmup` untimed ones; `before`, if
    given, runs ahead of every call, untimed."""
    times = []
    for i in range(warmup + repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def run_fused(n: int, threads: int, moment_dtype, warmup: int, repeats: int, inplace: bool = False) -> list[float]:
    import ml_dtypes

    from slidejax.host_optimizer import HostAdamW, aligned_zeros

    bf16 = ml_dtypes.bfloat16
    opt = HostAdamW(LR, weight_decay=WD, moment_dtype=moment_dtype, threads=threads)
    master, grad = aligned_zeros(n), aligned_zeros(n, bf16)
    upload = grad if inplace else aligned_zeros(n, bf16)
    fill(master, 0, 1.0)
    fill(grad, 1, 1e-2)
    state = opt.init(n)
    # In place, each update turns the gradient into the weights' bf16 copy: refill it, untimed.
    refill = (lambda: fill(grad, 1, 1e-2)) if inplace else None
    return timed(lambda: opt.update(state, master, grad, upload, decay_split=n, grad_scale=0.5), warmup, repeats,
                 before=refill)


def run_replay(n: int, threads: int, warmup: int, repeats: int, owed: int = 8) -> list[float]:
    import optax

    from slidejax.host_optimizer import HostAdamW, aligned_zeros

    cols = 4096
    rows = max(1, n // cols)
    opt = HostAdamW(optax.linear_schedule(LR, LR / 10, 1000), weight_decay=WD, threads=threads)
    master = aligned_zeros((rows, cols))
    fill(master, 0, 1.0)
    state = opt.init(master.shape)
    fill(state.mu, 2, 1e-3)
    fill(state.nu, 3, 1e-6)
    np.abs(state.nu, out=state.nu)
    none = np.full(rows, -1, np.int32)  # no row has a gradient: every row defers the step
    grad = aligned_zeros((1, cols))

    def owe() -> None:
        for _ in range(owed):
            opt.update(state, master, grad, None, decay_split=master.size, grad_scale=0.5, grad_index=none,
                       defer=True)

    return timed(lambda: opt.catch_up(state, master, None, decay_split=master.size), warmup, repeats, before=owe)


def _stream_kernel():
    """The numba kernel of ``stream`` (built on first use: numba compiles it)."""
    from numba import njit, prange

    from slidejax.fused_adamw import _BLOCK, _OPTS, _rne_like, _to_f32

    @njit(parallel=True, **_OPTS)
    def stream(nchunks, master, m, v, grad, hp):
        # adamw_spans' memory pattern (gradient staged per block, copy written over it), with
        # AdamW's divisions and square root replaced by multiply-adds.
        c1, b1, c2, b2, neg_lr, scale = hp
        n = master.shape[0]
        for t in prange(nchunks):
            lo = n * t // nchunks
            hi = n * (t + 1) // nchunks
            p_, m_, v_, g_ = master[lo:hi], m[lo:hi], v[lo:hi], grad[lo:hi]
            gl = np.empty(_BLOCK, np.float32)
            for b0 in range(0, hi - lo, _BLOCK):
                kb = min(_BLOCK, hi - lo - b0)
                gb = g_[b0 : b0 + kb]
                for j in range(kb):
                    gl[j] = _to_f32(gb[j]) * scale
                pb, mb, vb = p_[b0 : b0 + kb], m_[b0 : b0 + kb], v_[b0 : b0 + kb]
                for j in range(kb):
                    g = gl[j]
                    mu = c1 * g + b1 * mb[j]
                    nu = c2 * (g * g) + b2 * vb[j]
                    p = pb[j] + neg_lr * (mu + nu)
                    pb[j] = p
                    mb[j] = mu
                    vb[j] = nu
                    gb[j] = _rne_like(p, gb)

    return stream


def run_stream(n: int, threads: int, warmup: int, repeats: int) -> list[float]:
    import ml_dtypes
    import numba

    from slidejax import fused_adamw as fa
    from slidejax.host_optimizer import aligned_zeros

    kernel = _stream_kernel()
    master, m, v = aligned_zeros(n), aligned_zeros(n), aligned_zeros(n)
    grad = aligned_zeros(n, ml_dtypes.bfloat16)
    fill(master, 0, 1.0)
    gbits = grad.view(np.uint16)
    hp = tuple(np.float32(x) for x in (0.1, 0.9, 0.001, 0.999, -LR, 0.5))
    nchunks = threads * fa.CHUNKS_PER_THREAD  # adamw_spans' dynamic chunks, as `launch` sets them
    numba.set_num_threads(threads)
    return timed(lambda: kernel(nchunks, master, m, v, gbits, hp), warmup, repeats,
                 before=lambda: fill(grad, 1, 1e-2))


def run_torch(n: int, threads: int | None, warmup: int, repeats: int) -> list[float]:
    import torch

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        param = torch.nn.Parameter(torch.empty(n))
        fill(param.data.numpy(), 0, 1.0)
        param.grad = torch.empty(n)
        fill(param.grad.numpy(), 1, 1e-2)
        opt = torch.optim.AdamW([param], lr=LR, weight_decay=WD, fused=True)
        return timed(opt.step, warmup, repeats)
    finally:
        torch.set_num_threads(previous)


def run_optax(n: int, threads: int, warmup: int, repeats: int) -> list[float]:
    import ml_dtypes
    import optax

    from slidejax.host_optimizer import HostOptax, aligned_zeros

    bf16 = ml_dtypes.bfloat16
    opt = HostOptax(optax.adamw(LR, weight_decay=WD), threads=threads)
    master, grad, upload = aligned_zeros(n), aligned_zeros(n, bf16), aligned_zeros(n, bf16)
    fill(master, 0, 1.0)
    fill(grad, 1, 1e-2)
    state = opt.init(n)
    return timed(lambda: opt.update(state, master, grad, upload, decay_split=n, grad_scale=0.5), warmup, repeats)


def machine() -> dict:
    import numba

    numba.get_num_threads()  # starts numba's threading layer, so it can be named
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:  # hyper-threads share a core's arithmetic units: 16 CPUs may be 8 cores
        siblings = Path("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list").read_text()
        threads_per_core = sum(
            int(b) - int(a) + 1 if "-" in part else 1
            for part in siblings.strip().split(",") for a, _, b in [part.partition("-")])
    except (OSError, ValueError):
        threads_per_core = None
    return {
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "threads_per_core": threads_per_core,
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "numba": numba.__version__,
        "numba_threading_layer": numba.threading_layer(),
        # slidejax.fused_adamw asks for 512-bit vectors on AVX-512 CPUs unless NUMBA_CPU_FEATURES is set
        "vector_bits_512": "-prefer-256-bit" in (numba.config.CPU_FEATURES or ""),
        "python": platform.python_version(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="directory for results.json / results.md")
    parser.add_argument("--sizes", default="256M,1B", help="comma-separated unit sizes (K/M/G binary, B = 1e9)")
    parser.add_argument("--threads", type=int, default=None, help="threads (default: CPUs - 1)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--methods", default=None,
                        help="comma-separated subset of fused,fused_inplace,fused_bf16m,torch,optax,stream,replay8 "
                             "(default: all, and torch_all when torch's thread count differs)")
    args = parser.parse_args()

    from slidejax.host_optimizer import default_threads

    threads = args.threads or default_threads()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    import ml_dtypes
    import torch

    methods = {
        "fused": lambda n: run_fused(n, threads, np.float32, args.warmup, args.repeats),
        "fused_inplace": lambda n: run_fused(n, threads, np.float32, args.warmup, args.repeats, inplace=True),
        "fused_bf16m": lambda n: run_fused(n, threads, ml_dtypes.bfloat16, args.warmup, args.repeats),
        "torch": lambda n: run_torch(n, threads, args.warmup, args.repeats),
        "optax": lambda n: run_optax(n, threads, args.warmup, args.repeats),
        "stream": lambda n: run_stream(n, threads, args.warmup, args.repeats),
        "replay8": lambda n: run_replay(n, threads, args.warmup, args.repeats),
    }
    if args.methods is None:
        if torch.get_num_threads() != threads:
            methods["torch_all"] = lambda n: run_torch(n, None, args.warmup, args.repeats)
    else:
        chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = sorted(set(chosen) - set(methods))
        if unknown:
            parser.error(f"--methods: unknown {', '.join(unknown)} (from {', '.join(methods)})")
        methods = {m: methods[m] for m in chosen}

    results = []
    for n in sizes:
        for name, run in methods.items():
            times = run(n)
            gc.collect()
            median = statistics.median(times)
            row = {
                "method": name,
                "params": n,
                "threads": torch.get_num_threads() if name == "torch_all" else threads,
                "median_s": median,
                "min_s": min(times),
                "times_s": times,
                "gparam_per_s": n / median / 1e9,
                "gb_per_s": None if BYTES_PER_PARAM[name] is None else n * BYTES_PER_PARAM[name] / median / 1e9,
            }
            results.append(row)
            print(f"{name:12s} {n / 2**20:8.0f}M  {row['gparam_per_s']:6.2f} Gparam/s", flush=True)

    def ratio(n: int, a: str, b: str) -> float | None:
        rows = {r["method"]: r for r in results if r["params"] == n}
        return rows[a]["gparam_per_s"] / rows[b]["gparam_per_s"] if a in rows and b in rows else None

    summary = {
        f"{n}": {
            "fused/torch": ratio(n, "fused", "torch"),
            "fused_inplace/fused": ratio(n, "fused_inplace", "fused"),
            "fused/torch_all": ratio(n, "fused", "torch_all"),
            "fused/optax": ratio(n, "fused", "optax"),
            "fused_bf16m/optax": ratio(n, "fused_bf16m", "optax"),
            "fused_inplace/stream": ratio(n, "fused_inplace", "stream"),
            # > 1: replaying 8 owed steps in one pass beats 8 in-place updates
            "replay8/fused_inplace x8": None if ratio(n, "replay8", "fused_inplace") is None
            else 8 * ratio(n, "replay8", "fused_inplace"),
        }
        for n in sizes
    }
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    lines = [
        f"`{command}`",
        "",
        "| method | params | threads | median ms | Gparam/s | GB/s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        gbs = "" if r["gb_per_s"] is None else f"{r['gb_per_s']:.1f}"
        lines.append(
            f"| {r['method']} | {r['params'] / 2**20:.0f}M | {r['threads']} | {r['median_s'] * 1e3:.1f} "
            f"| {r['gparam_per_s']:.2f} | {gbs} |"
        )
    lines.append("")
    for n, s in summary.items():
        parts = [f"{k} = {v:.2f}x" for k, v in s.items() if v is not None]
        lines.append(f"{int(n) / 2**20:.0f}M: " + ", ".join(parts))
    args.out.mkdir(parents=True, exist_ok=True)
    info = {"command": command, "machine": machine(), "results": results, "summary": summary}
    (args.out / "results.json").write_text(json.dumps(info, indent=2))
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"\n{info['machine']['cpu']}, {threads} threads, numba layer {info['machine']['numba_threading_layer']}"
          f"{', 512-bit vectors' if info['machine']['vector_bits_512'] else ''}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
