"""Fused linear + cross-entropy vs the naive XLA loss: peak extra device memory and time.

    python bench/bench_linear_cross_entropy.py --out runs/lce

Cases: tokens {16K, 64K} x vocab {128256, 151936} x hidden 4096, bf16 h and w, ~10% of the
labels ignored. Each (case, implementation) runs in a fresh subprocess, so that the device's
``peak_bytes_in_use`` belongs to that case alone. Implementations:

* ``triton``: :func:`slidejax.kernels.linear_cross_entropy` with ``impl="triton"``;
* ``jax``: the same with the pure-JAX twin (``impl="jax"``);
* ``naive``: what one writes in plain JAX: bf16 logits ``h @ w.T`` upcast to fp32, logsumexp
  cross-entropy, ``jax.value_and_grad``; skipped (and said so) when XLA's buffer assignment
  for it exceeds the device's memory.

Measured per run, for ``jax.value_and_grad`` (forward + backward, dh and dw) of the summed loss:

* ``extra``: ``peak_bytes_in_use`` during the first call minus ``bytes_in_use`` before it (inputs
  h, w, labels already resident). The returned gradients (bf16 dh and dw) are part of it;
  ``extra_beyond_grads`` subtracts them, and is what the target (<= 10% of the fp32 N x V
  logits, ``N * V * 4`` bytes) is checked against. Compilation's own transients (GEMM
  autotuning) happen before the baseline; if the run does not raise the process's peak above
  them, the figure is an upper bound and flagged.
* ``xla_temp``: the scratch bytes XLA's buffer assignment gives the compiled program (exact, static).
* ``time``: median over ``--repeats`` calls after one warm-up, each ended by a device sync.

Prints a table last; writes ``DIR/results.json`` (everything) and ``DIR/results.md`` (the table
and the exact command).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

IMPLS = ("triton", "jax", "naive")
GIB = 2**30


# --------------------------------------------------------------------------- child: one run

def _uniform(shape, seed: int, scale: float, dtype):
    """Pseudo-random values in [-scale, scale), made by one elementwise fusion (an integer hash
    of the index), so creating the inputs leaves no large transient in the device's peak."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def make():
        idx = jax.lax.broadcasted_iota(jnp.uint32, shape, 0)
        if len(shape) == 2:  # row-major flat index
            idx = idx * jnp.uint32(shape[1]) + jax.lax.broadcasted_iota(jnp.uint32, shape, 1)
        x = idx * jnp.uint32(0x9E3779B1) + jnp.uint32((seed * 0x85EBCA77 + 1) % 2**32)
        x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
        x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
        x = x ^ (x >> 16)
        u = (x >> 8).astype(jnp.float32) * (2.0 / 2**24) - 1.0
        return (u * scale).astype(dtype)

    return make()


def naive_xla(h, w, labels, ignore_index: int = -100):
    """The plain-JAX loss: bf16 logits from the GEMM, fp32 log-softmax, summed over valid tokens."""
    import jax
    import jax.numpy as jnp

    logits = (h @ w.T).astype(jnp.float32)
    valid = labels != ignore_index
    lse = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, jnp.where(valid, labels, 0)[:, None], axis=-1)[:, 0]
    return jnp.sum(jnp.where(valid, lse - target, 0.0)), jnp.sum(valid, dtype=jnp.int32)


def run_case(tokens: int, vocab: int, hidden: int, impl: str, repeats: int,
             chunk_size: int | None = None) -> dict:
    """One (case, implementation) in this process; returns the measurements."""
    import jax
    import jax.numpy as jnp

    from slidejax.kernels import linear_cross_entropy
    from slidejax.kernels.linear_cross_entropy_jax import choose_chunk

    dev = jax.devices()[0]
    stats = lambda: dev.memory_stats() or {}  # noqa: E731  (None on the CPU backend)
    h = _uniform((tokens, hidden), 1, 1.7, jnp.bfloat16)  # ~unit variance, like normed states
    w = _uniform((vocab, hidden), 2, 1.7 * 3 / hidden**0.5, jnp.bfloat16)  # logits ~ N(0, 9)
    raw = _uniform((tokens,), 3, 1.0, jnp.float32)
    labels = jnp.where(raw < -0.8, -100, ((raw + 1) * 0.5 * (vocab - 1)).astype(jnp.int32))
    jax.block_until_ready((h, w, labels))

    if impl == "naive":
        loss = lambda h, w: naive_xla(h, w, labels)  # noqa: E731
    else:
        loss = lambda h, w: linear_cross_entropy(h, w, labels, impl=impl,  # noqa: E731
                                                 chunk_size=chunk_size)
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

    out: dict = dict(tokens=tokens, vocab=vocab, hidden=hidden, impl=impl, device=dev.device_kind,
                     jax=jax.__version__, logits_fp32_bytes=tokens * vocab * 4,
                     grads_bytes=(tokens + vocab) * hidden * 2,
                     chunk=None if impl == "naive" else choose_chunk(tokens, vocab, chunk_size))
    t0 = time.perf_counter()
    compiled = step.lower(h, w).compile()
    out["compile_s"] = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    if ma is not None:
        out["xla_temp_bytes"] = int(ma.temp_size_in_bytes)
        out["xla_output_bytes"] = int(ma.output_size_in_bytes)
    limit = stats().get("bytes_limit")
    need = out.get("xla_temp_bytes", 0) + out.get("xla_output_bytes", 0)
    if limit and need > limit - stats().get("bytes_in_use", 0):
        out["skipped"] = (f"needs {need / GIB:.1f} GiB of scratch + outputs, "
                          f"device limit {limit / GIB:.1f} GiB")
        return out

    before = stats()
    t0 = time.perf_counter()
    (value, count), grads = compiled(h, w)
    jax.block_until_ready(grads)
    out["first_call_s"] = time.perf_counter() - t0
    after = stats()
    if "peak_bytes_in_use" in after:
        out["extra_bytes"] = after["peak_bytes_in_use"] - before["bytes_in_use"]
        out["extra_is_upper_bound"] = after["peak_bytes_in_use"] <= before["peak_bytes_in_use"]
        out["extra_beyond_grads_bytes"] = out["extra_bytes"] - out["grads_bytes"]
    out["loss_sum"], out["n_valid"] = float(value), int(count)
    out["finite"] = bool(all(bool(jnp.all(jnp.isfinite(g.astype(jnp.float32)))) for g in grads))
    del grads

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(h, w))
        times.append(time.perf_counter() - t0)
    out["times_s"] = times
    out["time_s"] = statistics.median(times)
    return out


# --------------------------------------------------------------------------- parent

def _child(case: dict, repeats: int, chunk_size: int | None, timeout: float) -> dict:
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # bytes_limit = the whole device
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    cmd = [sys.executable, __file__, "--child", json.dumps({**case, "repeats": repeats,
                                                                  "chunk_size": chunk_size})]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**case, "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        err = next((ln for ln in reversed(tail) if "Error" in ln or "error" in ln), tail[-1] if tail else "")
        if "RESOURCE_EXHAUSTED" in proc.stderr or "out of memory" in proc.stderr.lower():
            err = "out of device memory: " + err[-200:]
        return {**case, "error": err[-400:], "returncode": proc.returncode}
    return json.loads(lines[-1])


def _fmt_bytes(b) -> str:
    return "-" if b is None else f"{b / GIB:.2f}"


def table(results: list[dict]) -> str:
    """Markdown table, one row per (case, implementation)."""
    naive_time = {(r["tokens"], r["vocab"]): r.get("time_s") for r in results if r["impl"] == "naive"}
    rows = ["| tokens | vocab | impl | chunk | fwd+bwd ms | x naive | extra GiB | beyond grads GiB "
            "| % fp32 logits | XLA temp GiB | loss/token | note |",
            "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        t, base = r.get("time_s"), naive_time.get((r["tokens"], r["vocab"]))
        beyond = r.get("extra_beyond_grads_bytes")
        pct = f"{100 * beyond / (r['tokens'] * r['vocab'] * 4):.1f}" if beyond is not None else "-"
        note = r.get("error") or r.get("skipped") or ("upper bound" if r.get("extra_is_upper_bound") else "")
        if r.get("finite") is False:
            note = "NON-FINITE GRADIENTS " + note
        per_tok = f"{r['loss_sum'] / max(r['n_valid'], 1):.4f}" if "loss_sum" in r else "-"
        rows.append(
            f"| {r['tokens']} | {r['vocab']} | {r['impl']} | {r.get('chunk') or '-'} | "
            f"{'-' if t is None else f'{1e3 * t:.1f}'} | "
            f"{f'{t / base:.2f}' if t and base else '-'} | {_fmt_bytes(r.get('extra_bytes'))} | "
            f"{_fmt_bytes(beyond)} | {pct} | {_fmt_bytes(r.get('xla_temp_bytes'))} | {per_tok} | "
            f"{note} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="directory for results.json and results.md")
    p.add_argument("--tokens", default="16384,65536", help="comma-separated token counts")
    p.add_argument("--vocab", default="128256,151936", help="comma-separated vocabulary sizes")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--impls", default=",".join(IMPLS), help=f"subset of {','.join(IMPLS)}")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per run (median)")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="tokens per logits block for triton/jax (default: the library's choice)")
    p.add_argument("--timeout", type=float, default=180, help="seconds per run")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        c = json.loads(args.child)
        print(json.dumps(run_case(c["tokens"], c["vocab"], c["hidden"], c["impl"], c["repeats"],
                                  c["chunk_size"])))
        return
    if args.out is None:
        p.error("--out DIR is required")
    impls = [i for i in args.impls.split(",") if i]
    if unknown := set(impls) - set(IMPLS):
        p.error(f"unknown --impls {sorted(unknown)}")
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python bench/bench_linear_cross_entropy.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))

    results, t_start = [], time.perf_counter()
    for tokens in (int(x) for x in args.tokens.split(",")):
        for vocab in (int(x) for x in args.vocab.split(",")):
            for impl in impls:
                case = dict(tokens=tokens, vocab=vocab, hidden=args.hidden, impl=impl)
                t0 = time.perf_counter()
                r = _child(case, args.repeats, args.chunk_size, args.timeout)
                r["wall_s"] = time.perf_counter() - t0
                results.append(r)
                print(f"[{time.perf_counter() - t_start:6.1f} s] {tokens} x {vocab} {impl}: "
                      f"{r.get('error') or r.get('skipped') or 'ok'}", flush=True)
                (args.out / "results.json").write_text(json.dumps(
                    {"command": command, "results": results}, indent=1))

    md = table(results)
    (args.out / "results.md").write_text(
        f"`{command}`\n\nextra = peak_bytes_in_use during fwd+bwd minus bytes in use before it "
        f"(inputs resident); beyond grads = extra minus the bf16 dh and dw; % fp32 logits = "
        f"beyond grads / (N x V x 4). naive = bf16 logits + fp32 log-softmax through "
        f"jax.value_and_grad.\n\n{md}\n")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; full results in {args.out}/results.json\n")
    print(md)


if __name__ == "__main__":
    main()
