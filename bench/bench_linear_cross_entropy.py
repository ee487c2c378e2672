"""Fused linear + cross-entropy vs the naive XLA loss: peak extra device memory and time.

    python bench/bench_linear_cross_entropy.py --out runs/lce

Cases: tokens {16K, 64K} x vocab {128256, 151936} x hidden 4096, bf16 h and w, ~10% of the
labels ignored. Each (case, implementation) runs in a fresh subprocess. Implementations:

* ``naive``: what one writes in plain JAX: bf16 logits ``h @ w.T`` upcast to fp32, logsumexp
  cross-entropy, ``jax.value_and_grad`` (bf16 dh, dw); skipped (and said so) when XLA's buffer
  assignment for it exceeds the device's memory;
* ``triton`` / ``jax``: ``jax.value_and_grad`` of :func:`slidejax.kernels.linear_cross_entropy`
  (bf16 dh, dw) with ``impl="triton"`` / the pure-JAX twin;
* ``acc-triton`` / ``acc-jax``: :func:`slidejax.kernels.lce_fused_accumulate` adding dw into a
  donated fp32 [V * H] accumulator (bf16 dh), as the engine uses it: the accumulator is an input
  that exists before the call and is updated in place, the returned one fed to the next call.

Measured per run:

* ``extra``: peak bytes in use during the first call minus bytes in use before it (inputs h, w,
  labels, and the accumulator for ``acc-*``, resident). The device's ``peak_bytes_in_use`` is a
  process-wide maximum that compilation (GEMM autotuning) has already raised; so before the call a
  ballast is allocated that lifts ``bytes_in_use`` to that peak, and the call's own peak then
  shows on top of it (flagged "upper bound" if the ballast could not be afforded or the peak did
  not move).
* ``beyond_io``: ``extra`` minus the bytes of new outputs (XLA's output size minus the donated,
  aliased bytes): the call's scratch, what the target (<= 10% of the fp32 N x V logits, ``N * V *
  4`` bytes) is checked against, given also as ``% fp32 logits``.
* ``xla_*``: XLA's static buffer assignment (temp, argument, output, alias bytes), and its
  largest buffers (``xla_buffers``, also ``buffers/<case>.txt`` in ``--out``) from the compiler's
  memory-usage report.
* ``time``: median of ``--repeats`` calls after ``--warmup`` calls, each ended by a device sync.

Prints a table last; writes ``DIR/results.json`` (everything) and ``DIR/results.md`` (the table
and the exact command). A total ``--budget`` of seconds keeps the run short: cases that would
start after it are listed as not run.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMPLS = ("naive", "acc-triton", "triton", "acc-jax", "jax")
# Run order: what the targets are judged on first, the twins after, so that a run cut short by
# the budget still has the essentials.
FIRST_ROUND = ("naive", "acc-triton", "triton")
GIB = 2**30
STEP_NAME = "lce_bench_step"  # the jitted function's name: XLA's module is jit_<STEP_NAME>


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


def make_step(impl: str, chunk_size: int | None = None):
    """``(jitted step, donate)``: ``step(h, w, labels[, acc]) -> (loss_sum, n_valid, dh, dw)``.

    For ``acc-*`` the step also takes the fp32 accumulator (donated) and its ``dw`` is the updated
    accumulator; for the others ``dw`` is the bf16 gradient."""
    import jax

    from slidejax.kernels import lce_fused_accumulate, linear_cross_entropy

    if impl.startswith("acc-"):
        def lce_bench_step(h, w, labels, acc):
            return lce_fused_accumulate(h, w, labels, acc, impl=impl[4:], chunk_size=chunk_size)

        return jax.jit(lce_bench_step, donate_argnums=(3,)), True

    if impl == "naive":
        loss = naive_xla
    else:
        def loss(h, w, labels):
            return linear_cross_entropy(h, w, labels, impl=impl, chunk_size=chunk_size)

    def lce_bench_step(h, w, labels):  # the same name: it names XLA's module
        (total, count), (dh, dw) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            h, w, labels)
        return total, count, dh, dw

    return jax.jit(lce_bench_step), False


def _xla_dump_env(dump_dir: str) -> str:
    flags = (f"--xla_dump_to={dump_dir} --xla_dump_hlo_as_text "
             f"--xla_dump_hlo_module_re=.*{STEP_NAME}.*")
    return (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()


def _memory_report(dump_dir: str | None) -> tuple[str | None, list[str]]:
    """The compiler's memory-usage report for the step (last one dumped) and its top lines."""
    if not dump_dir:
        return None, []
    files = sorted(glob.glob(os.path.join(dump_dir, f"*{STEP_NAME}*memory-usage-report.txt")))
    if not files:
        return None, []
    text = Path(files[-1]).read_text()
    top = [ln.strip() for ln in text.splitlines()[:16] if "(" in ln and ";" in ln]
    return text, top


BALLAST_ROW = 4 * 2**20  # ballast in rows of 4 MiB: no 2**31-element limit to meet


def ballast_rows(stats: dict, need: int) -> tuple[int, bool]:
    """Rows of :data:`BALLAST_ROW` bytes that lift ``bytes_in_use`` to ``peak_bytes_in_use``
    (raised by compilation), keeping 10% + 1 GiB of headroom beyond the ``need`` bytes the call
    will take; and whether that falls short of the peak by more than a row (then the call's own
    peak may hide under the old one). None when the call needs at least the gap: its own peak
    then tops the old one unless it used less than XLA planned, which :func:`call_peak` flags;
    and a ballast's allocator regions, never returned to the device, could leave no contiguous
    room for the call's largest buffer (measured: the naive loss at 64K x 151936 ran out)."""
    gap = stats["peak_bytes_in_use"] - stats["bytes_in_use"]
    if need >= gap:
        return 0, False
    room = stats.get("bytes_limit", stats["peak_bytes_in_use"] + 2 * need + 2**31) \
        - stats["bytes_in_use"] - int(1.1 * need) - 2**30
    rows = max(min(gap, room), 0) // BALLAST_ROW
    return rows, gap - rows * BALLAST_ROW > BALLAST_ROW


def call_peak(before: dict, after: dict, ballast_short: bool, new_outputs: int) -> dict:
    """The call's extra bytes from allocator statistics taken just before and after it."""
    extra = after["peak_bytes_in_use"] - before["bytes_in_use"]
    return {"extra_bytes": extra, "beyond_io_bytes": extra - new_outputs,
            "extra_is_upper_bound": bool(
                ballast_short or after["peak_bytes_in_use"] <= before["peak_bytes_in_use"])}


def run_case(tokens: int, vocab: int, hidden: int, impl: str, repeats: int, warmup: int = 2,
             chunk_size: int | None = None, dump_dir: str | None = None) -> dict:
    """One (case, implementation) in this process; returns the measurements."""
    import jax
    import jax.numpy as jnp

    from slidejax.kernels.linear_cross_entropy_jax import choose_chunk

    dev = jax.devices()[0]
    stats = lambda: dev.memory_stats() or {}  # noqa: E731  (None on the CPU backend)
    h = _uniform((tokens, hidden), 1, 1.7, jnp.bfloat16)  # ~unit variance, like normed states
    w = _uniform((vocab, hidden), 2, 1.7 * 3 / hidden**0.5, jnp.bfloat16)  # logits ~ N(0, 9)
    raw = _uniform((tokens,), 3, 1.0, jnp.float32)
    labels = jnp.where(raw < -0.8, -100, ((raw + 1) * 0.5 * (vocab - 1)).astype(jnp.int32))
    step, donate = make_step(impl, chunk_size)
    args = [h, w, labels] + ([jnp.zeros((vocab * hidden,), jnp.float32)] if donate else [])
    jax.block_until_ready(args)
    del raw

    out: dict = dict(tokens=tokens, vocab=vocab, hidden=hidden, impl=impl, device=dev.device_kind,
                     jax=jax.__version__, logits_fp32_bytes=tokens * vocab * 4,
                     chunk=None if impl == "naive" else choose_chunk(tokens, vocab, chunk_size))
    t0 = time.perf_counter()
    compiled = step.lower(*args).compile()
    out["compile_s"] = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    if ma is not None:
        for k in ("temp", "argument", "output", "alias"):
            out[f"xla_{k}_bytes"] = int(getattr(ma, f"{k}_size_in_bytes"))
    report, out["xla_buffers"] = _memory_report(dump_dir)
    if report is not None:
        out["xla_memory_report"] = report
    new_outputs = out.get("xla_output_bytes", 0) - out.get("xla_alias_bytes", 0)
    need = out.get("xla_temp_bytes", 0) + new_outputs
    s = stats()
    limit = s.get("bytes_limit")
    if limit and need > limit - s.get("bytes_in_use", 0):
        out["skipped"] = (f"needs {need / GIB:.1f} GiB of scratch + outputs, "
                          f"device limit {limit / GIB:.1f} GiB")
        return out

    ballast = None
    if "peak_bytes_in_use" in s:
        rows, out["ballast_short"] = ballast_rows(s, need)
        out["ballast_bytes"] = rows * BALLAST_ROW
        if rows:
            ballast = jax.block_until_ready(jnp.zeros((rows, BALLAST_ROW // 4), jnp.uint32))

    before = stats()
    t0 = time.perf_counter()
    try:
        loss, count, dh, dw = jax.block_until_ready(compiled(*args))
    except Exception as exc:  # noqa: BLE001  (XlaRuntimeError's module moves between versions)
        if ballast is None or "RESOURCE_EXHAUSTED" not in str(exc):
            raise
        # The ballast's rows leave no contiguous room for the call's largest buffer (measured:
        # the naive loss's 47 GiB at 64K tokens): measure without it, an upper bound if the
        # compile-time peak was higher than the call's.
        del ballast
        ballast, out["ballast_bytes"], out["ballast_short"] = None, 0, True
        out["ballast_dropped"] = True
        before = stats()
        t0 = time.perf_counter()
        loss, count, dh, dw = jax.block_until_ready(compiled(*args))
    out["first_call_s"] = time.perf_counter() - t0
    after = stats()
    if "peak_bytes_in_use" in after:
        out.update(call_peak(before, after, out.get("ballast_short", True), new_outputs))
    del ballast
    out["loss_sum"], out["n_valid"] = float(loss), int(count)
    grads = (dh, dw)
    out["finite"] = bool(all(bool(jnp.all(jnp.isfinite(g.astype(jnp.float32)))) for g in grads))
    if donate:
        args[3] = dw  # the donated accumulator is gone; go on from the updated one
    del loss, count, dh, dw, grads

    def call():
        res = jax.block_until_ready(compiled(*args))
        if donate:
            args[3] = res[3]

    for _ in range(max(warmup - 1, 0)):  # the measured first call was one warm-up
        call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    out["times_s"] = times
    out["time_s"] = statistics.median(times)
    return out


# --------------------------------------------------------------------------- parent

def _child(case: dict, settings: dict, out_dir: Path, timeout: float) -> dict:
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # bytes_limit = the whole device
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    dump_dir = tempfile.mkdtemp(prefix="lce_dump_")
    env["XLA_FLAGS"] = _xla_dump_env(dump_dir)
    payload = json.dumps({**case, **settings, "dump_dir": dump_dir})
    cmd = [sys.executable, os.path.abspath(__file__), "--child", payload]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**case, "error": f"timed out after {timeout:.0f} s"}
    finally:
        shutil.rmtree(dump_dir, ignore_errors=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        err = next((ln for ln in reversed(tail) if "Error" in ln or "error" in ln),
                   tail[-1] if tail else "")
        if "RESOURCE_EXHAUSTED" in proc.stderr or "out of memory" in proc.stderr.lower():
            err = "out of device memory: " + err[-200:]
        return {**case, "error": err[-400:], "returncode": proc.returncode}
    result = json.loads(lines[-1])
    report = result.pop("xla_memory_report", None)
    if report:
        (out_dir / "buffers").mkdir(exist_ok=True)
        name = f"{case['tokens']}x{case['vocab']}_{case['impl']}.txt"
        (out_dir / "buffers" / name).write_text(report)
    return result


def _gib(b) -> str:
    return "-" if b is None else f"{b / GIB:.2f}"


def table(results: list[dict]) -> str:
    """Markdown table, one row per (case, implementation), cases in order, IMPLS order within."""
    naive_time = {(r["tokens"], r["vocab"]): r.get("time_s") for r in results
                  if r["impl"] == "naive"}
    order = {impl: i for i, impl in enumerate(IMPLS)}
    rows = ["| tokens | vocab | impl | chunk | fwd+bwd ms | x naive | extra GiB | beyond I/O GiB "
            "| % fp32 logits | XLA temp GiB | loss/token | note |",
            "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in sorted(results, key=lambda r: (r["tokens"], r["vocab"], order.get(r["impl"], 99))):
        t, base = r.get("time_s"), naive_time.get((r["tokens"], r["vocab"]))
        beyond = r.get("beyond_io_bytes")
        pct = f"{100 * beyond / (r['tokens'] * r['vocab'] * 4):.1f}" if beyond is not None else "-"
        note = r.get("error") or r.get("skipped") or (
            "upper bound" if r.get("extra_is_upper_bound") else "")
        if r.get("finite") is False:
            note = "NON-FINITE GRADIENTS " + note
        per_tok = f"{r['loss_sum'] / max(r['n_valid'], 1):.4f}" if "loss_sum" in r else "-"
        rows.append(
            f"| {r['tokens']} | {r['vocab']} | {r['impl']} | {r.get('chunk') or '-'} | "
            f"{'-' if t is None else f'{1e3 * t:.1f}'} | "
            f"{f'{t / base:.2f}' if t and base else '-'} | {_gib(r.get('extra_bytes'))} | "
            f"{_gib(beyond)} | {pct} | {_gib(r.get('xla_temp_bytes'))} | {per_tok} | {note} |")
    return "\n".join(rows)


def run_order(shapes: list[tuple[int, int]], impls: list[str]) -> list[tuple[int, int, str]]:
    """``(tokens, vocab, impl)`` runs: the :data:`FIRST_ROUND` implementations on every shape,
    then the others on every shape."""
    first = [(t, v, i) for t, v in shapes for i in impls if i in FIRST_ROUND]
    return first + [(t, v, i) for t, v in shapes for i in impls if i not in FIRST_ROUND]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="directory for results.json and results.md")
    p.add_argument("--tokens", default="16384,65536", help="comma-separated token counts")
    p.add_argument("--vocab", default="128256,151936", help="comma-separated vocabulary sizes")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--impls", default=",".join(IMPLS), help=f"subset of {','.join(IMPLS)}")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per run (first included)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per run (median)")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="tokens per chunk for the fused paths (default: the library's)")
    p.add_argument("--timeout", type=float, default=120, help="seconds per run at most")
    p.add_argument("--budget", type=float, default=330,
                   help="seconds for the whole run: no run starts after it")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        c = json.loads(args.child)
        print(json.dumps(run_case(c["tokens"], c["vocab"], c["hidden"], c["impl"], c["repeats"],
                                  c["warmup"], c["chunk_size"], c.get("dump_dir"))))
        return
    if args.out is None:
        p.error("--out DIR is required")
    impls = [i for i in args.impls.split(",") if i]
    if unknown := set(impls) - set(IMPLS):
        p.error(f"unknown --impls {sorted(unknown)}")
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python bench/bench_linear_cross_entropy.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    settings = dict(repeats=args.repeats, warmup=args.warmup, chunk_size=args.chunk_size)

    shapes = [(t, v) for t in _ints(args.tokens) for v in _ints(args.vocab)]
    results, t_start = [], time.perf_counter()
    for tokens, vocab, impl in run_order(shapes, impls):
        case = dict(tokens=tokens, vocab=vocab, hidden=args.hidden, impl=impl)
        left = args.budget - (time.perf_counter() - t_start)
        if left < 10:
            r = {**case, "skipped": "not run: over the time budget"}
        else:
            t0 = time.perf_counter()
            r = _child(case, settings, args.out, min(args.timeout, left))
            r["wall_s"] = time.perf_counter() - t0
        results.append(r)
        print(f"[{time.perf_counter() - t_start:6.1f} s] {tokens} x {vocab} {impl}: "
              f"{r.get('error') or r.get('skipped') or 'ok'}", flush=True)
        (args.out / "results.json").write_text(json.dumps(
            {"command": command, "results": results}, indent=1))

    md = table(results)
    (args.out / "results.md").write_text(
        f"`{command}`\n\nextra = peak bytes in use during the first call minus bytes in use "
        f"before it (inputs resident; compile-time peak lifted by a ballast); beyond I/O = extra "
        f"minus new (not donated) outputs; % fp32 logits = beyond I/O / (N x V x 4). naive = bf16 "
        f"logits + fp32 log-softmax through jax.value_and_grad; triton/jax = value_and_grad of "
        f"linear_cross_entropy (bf16 dh, dw); acc-* = lce_fused_accumulate into a donated fp32 "
        f"dw accumulator (bf16 dh).\n\n{md}\n")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; full results in "
          f"{args.out}/results.json\n")
    print(md)


if __name__ == "__main__":
    main()
