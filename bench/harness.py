"""The benchmark's one entry point: every system x tokens-per-step, one table, results.md, a plot.

    python3 bench/harness.py --out runs/bench --systems slidejax,deepspeed,fsdp2 \\
        --layers 16 --tokens 16384,65536 --seq-len 4096 --steps 5 --repeats 2

    python3 bench/harness.py --out runs/all --merge call1/results.json,call2/results.json

Each (system, tokens per step, repeat) runs as a fresh subprocess (memory peaks are per process)
with a time limit and a host-memory guard; a system that fails, runs out of memory or hangs is
recorded with its error line and the rest go on. After every run the harness rewrites
``DIR/results.md`` (rows ready for bench/RESULTS.md, with date, machine and the exact command) and
``DIR/results.json`` (every run's full result); at the end it prints the table and draws
``DIR/throughput.png``. Per-run JSONs and logs are in ``DIR/runs/``. ``--merge`` makes one report
from several such results.json files (one per device call, say) without running anything.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import GB, LLAMA31_8B, TINY, check_result  # noqa: E402

# name -> the runner script (relative to the repository) and its fixed arguments.
SYSTEMS: dict[str, list[str]] = {
    # The planner keeps as many layers resident as the budget (or the whole GPU) fits.
    "slidejax": ["bench/bench_engine.py", "--gpu-memory", "24GB", "--resident-layers", "auto"],
    # bf16 AdamW moments (8 instead of 12 B/param of optimizer state; `HostAdamW`).
    "slidejax-bf16m": ["bench/bench_engine.py", "--gpu-memory", "24GB", "--resident-layers", "auto",
                       "--moments", "bfloat16"],
    "slidejax-unlimited": ["bench/bench_engine.py", "--gpu-memory", "unlimited", "--resident-layers", "auto"],
    # Every layer streamed, same budget: the sliding window alone.
    "streamed": ["bench/bench_engine.py", "--gpu-memory", "24GB", "--resident-layers", "0"],
    "resident": ["bench/bench_engine.py", "--resident"],
    "deepspeed": ["bench/baselines/deepspeed_zero3.py"],
    "fsdp2": ["bench/baselines/fsdp2_offload.py"],
}
REFERENCE = "slidejax"  # the system every ratio is taken against: 24 GB budget


@dataclass
class Cell:
    """Every run of one system at one tokens-per-step: results, or errors."""

    system: str
    tokens: int
    results: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any] | None:
        """The runs combined: step times pooled, peaks the largest; None if no run succeeded."""
        if not self.results:
            return None
        times = [t for r in self.results for t in r["step_time_s"]["all"]]
        median = statistics.median(times)
        first = self.results[0]
        tokens_per_s = self.tokens / median
        return {
            "system": self.system,
            "runner": first["system"],
            "layers": first["layers"],
            "params": first["params"],
            "tokens_per_step": self.tokens,
            "runs": len(self.results),
            "failed_runs": len(self.errors),
            "step_time_s": {"median": median, "min": min(times), "max": max(times), "all": times},
            "tokens_per_s": tokens_per_s,
            "model_tflops": tokens_per_s * first["model_tflops"] / first["tokens_per_s"],
            "peak_gpu_bytes": max(r["peak_gpu_bytes"] for r in self.results),
            "peak_host_rss_bytes": max(r["peak_host_rss_bytes"] for r in self.results),
            "peak_host_used_bytes": max(r.get("peak_host_used_bytes", 0) for r in self.results),
            "notes": first.get("notes", ""),
        }


# ----------------------------------------------------------------------------------------------
# Running one system


def error_line(log: str) -> str:
    """The line of a failed run's output that says what went wrong (the last such line)."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for key in ("OutOfMemoryError", "out of memory", "Error", "error", "Killed"):
        hits = [ln for ln in lines if key in ln and "Warning" not in ln]
        if hits:
            return hits[-1][:300]
    return lines[-1][:300] if lines else "no output"


def run_one(
    cmd: list[str], log_path: Path, timeout_s: float, min_free_bytes: float, env: dict[str, str]
) -> tuple[int | None, str | None]:
    """Runs ``cmd`` in its own session with output to ``log_path``; kills it on a limit.

    Returns (exit code or None if killed, why it was killed or None).
    """
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                start_new_session=True)
        killed = None
        while proc.poll() is None:
            time.sleep(0.2)
            if time.monotonic() - t0 > timeout_s:
                killed = f"killed: over the {timeout_s:.0f} s time limit"
            elif psutil.virtual_memory().available < min_free_bytes:
                killed = (f"killed: host memory nearly exhausted (< {min_free_bytes / GB:.1f} GB "
                          "available)")
            if killed:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
                break
        if killed:
            log.write(f"\n{killed}\n")
    return (None if killed else proc.returncode), killed


def run_system(
    name: str, runner: list[str], tokens: int, repeat: int, args: argparse.Namespace,
    out_dir: Path,
) -> dict[str, Any] | str:
    """One run of one system; its result object, or an error line."""
    stem = f"{name}_t{tokens}_r{repeat}"
    json_path, log_path = out_dir / "runs" / f"{stem}.json", out_dir / "runs" / f"{stem}.log"
    json_path.unlink(missing_ok=True)
    cmd = [args.python, str(REPO / runner[0]), *runner[1:],
           "--layers", str(args.layers), "--seq-len", str(args.seq_len),
           "--tokens-per-step", str(tokens), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--out", str(json_path)]
    if args.clip is not None:
        cmd += ["--clip", str(args.clip)]
    if args.tiny:
        cmd.append("--tiny")
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    # Without this JAX grabs 75% of the GPU at start and every GPU peak reads the same.
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    print(f"[{dt.datetime.now():%H:%M:%S}] {stem}: {shlex.join(cmd)}", flush=True)
    t0 = time.monotonic()
    rc, killed = run_one(cmd, log_path, args.timeout, args.min_free_gb * GB, env)
    took = time.monotonic() - t0
    if killed:
        why = killed
    elif rc != 0:
        why = f"exit {rc}: {error_line(log_path.read_text(errors='replace'))}"
    else:
        try:
            result = json.loads(json_path.read_text())
            check_result(result)
            print(f"    ok in {took:.0f} s: {result['tokens_per_s']:.0f} tokens/s", flush=True)
            return result
        except (OSError, ValueError) as exc:
            why = f"exit 0 but no valid result ({exc})"
    print(f"    FAILED in {took:.0f} s: {why} (log: {log_path})", flush=True)
    return why


# ----------------------------------------------------------------------------------------------
# Reporting


def _tokens_label(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens >= 1024 and tokens % 1024 == 0 else str(tokens)


def _params_label(params: int) -> str:
    return f"{params / 1e9:.2f} B" if params >= 1e8 else f"{params:,}"


def _gb(b: float) -> str:
    return f"{b / GB:.1f}" if b else "-"


def host_peak(summary: dict[str, Any]) -> int:
    """The host memory a run needed: the larger of its RSS peak and the system's used-memory rise.

    Page-locked memory that the CUDA driver maps may be missing from RSS (DeepSpeed and FSDP2
    keep most of their state there), so RSS alone could flatter them.
    """
    return max(summary["peak_host_rss_bytes"], summary.get("peak_host_used_bytes", 0))


def table_rows(cells: list[Cell]) -> list[list[str]]:
    """The table's rows: one per (system, tokens per step), ratios against REFERENCE."""
    ref = {c.tokens: c.summary() for c in cells if c.system == REFERENCE}
    rows = []
    for cell in cells:
        s = cell.summary()
        if s is None:
            err = cell.errors[-1] if cell.errors else "not run"
            rows.append([cell.system, str(cell.tokens), "FAILED", "", "", "", "", "", "", err])
            continue
        t = s["step_time_s"]
        r = ref.get(cell.tokens)
        tok_ratio = f"{s['tokens_per_s'] / r['tokens_per_s']:.2f}" if r else "-"
        host_ratio = (f"{host_peak(s) / host_peak(r):.2f}" if r and host_peak(r) else "-")
        runs = f" ({s['runs']} runs)" if s["runs"] > 1 else ""
        fails = f"; {s['failed_runs']} failed: {cell.errors[-1]}" if cell.errors else ""
        rows.append([
            cell.system, str(cell.tokens), f"{s['tokens_per_s']:.0f}", f"{s['model_tflops']:.1f}",
            f"{t['median']:.3f} [{t['min']:.3f}-{t['max']:.3f}]{runs}",
            _gb(s["peak_gpu_bytes"]), _gb(s["peak_host_rss_bytes"]),
            _gb(s["peak_host_used_bytes"]), f"{tok_ratio} / {host_ratio}",
            s["notes"] + fails,
        ])
    return rows


HEADER = ["system", "tokens/step", "tokens/s", "TFLOP/s", "step s median [min-max]", "GPU GB",
          "host RSS GB", "host used GB", f"vs {REFERENCE}: tok/s / host", "notes"]


def text_table(rows: list[list[str]]) -> str:
    """A fixed-width table of the rows (notes column last, unpadded)."""
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER) - 1)]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1]  # noqa: E731
    return "\n".join([fmt(HEADER), fmt(["-" * w for w in widths] + ["-----"]), *map(fmt, rows)])


def markdown(rows: list[list[str]], meta: dict[str, Any]) -> str:
    """results.md: the run's context, then the table as markdown rows."""
    lines = [
        f"### {meta['date']}: {meta['layers']} layers ({_params_label(meta['params'])} params), "
        f"seq {meta['seq_len']}",
        "",
        f"- machine: {meta['machine']}",
        f"- command: `{meta['command']}`",
        f"- {meta['steps']} timed steps after {meta['warmup']} warm-up, {meta['repeats']} "
        "repeat(s) per system; step times pooled over repeats",
        "- TFLOP/s: (6 N + 6 L S heads head_dim) x tokens/s, N = decoder layers + final norm "
        "+ lm_head (bench/common.py); GPU GB: device memory in use (NVML) over the training "
        "steps; host RSS GB: peak RSS of the process tree; host used GB: peak drop of the "
        "system's available memory; ratios are system / " + REFERENCE + " (host: the larger of RSS and "
        "used)",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(cells: list[Cell], path: Path, title: str) -> None:
    """throughput.png: tokens/s against tokens per step, and peak-memory bars per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    systems = list(dict.fromkeys(c.system for c in cells))
    for name in systems:
        pts = [(c.tokens, c.summary()) for c in cells if c.system == name and c.summary()]
        if not pts:
            continue
        x = [t for t, _ in pts]
        y = [s["tokens_per_s"] for _, s in pts]
        lo = [t / s["step_time_s"]["max"] for t, s in pts]
        hi = [t / s["step_time_s"]["min"] for t, s in pts]
        ax1.errorbar(x, y, yerr=[[a - b for a, b in zip(y, lo)], [b - a for a, b in zip(y, hi)]],
                     marker="o", capsize=3, label=name)
    ax1.set_xscale("log", base=2)
    ax1.set_ylim(bottom=0)
    ax1.set_xlabel("tokens per step")
    ax1.set_ylabel("tokens / s (median, min-max)")
    ax1.set_title("throughput")
    ax1.grid(alpha=0.3)
    if ax1.lines:
        ax1.legend()

    labels, gpu, host = [], [], []
    for c in cells:
        s = c.summary()
        if s:
            labels.append(f"{c.system}\n{_tokens_label(c.tokens)}")
            gpu.append(s["peak_gpu_bytes"] / GB)
            host.append(host_peak(s) / GB)
    xs = range(len(labels))
    ax2.bar([i - 0.2 for i in xs], gpu, 0.4, label="peak GPU")
    ax2.bar([i + 0.2 for i in xs], host, 0.4, label="peak host (max of RSS, used)")
    ax2.set_xticks(list(xs), labels, fontsize=8, rotation=35, ha="right")
    ax2.set_ylabel("GB")
    ax2.set_title("peak memory")
    ax2.legend()
    ax2.grid(axis="y", alpha=0.3)
    failed = [f"{c.system} at {_tokens_label(c.tokens)}" for c in cells if c.errors and not c.results]
    if failed:
        title += "\nfailed: " + ", ".join(failed)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> str:
    """GPU, CPU, cores and RAM of this machine, in one line."""
    gpu = "no GPU"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            gpu = "; ".join(out.stdout.strip().splitlines())
    except (OSError, subprocess.SubprocessError):
        pass
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    ram = psutil.virtual_memory().total / GB
    return f"{gpu}; {cpu}, {os.cpu_count()} cores, {ram:.0f} GB RAM; Python {platform.python_version()}"


def report(cells: list[Cell], out_dir: Path, meta: dict[str, Any], final: bool) -> None:
    """Writes results.md and results.json; when final also throughput.png and the table."""
    rows = table_rows(cells)
    (out_dir / "results.md").write_text(markdown(rows, meta))
    saved = [{"system": c.system, "tokens_per_step": c.tokens, "summary": c.summary(),
              "results": c.results, "errors": c.errors} for c in cells]
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "cells": saved}, indent=1))
    if final:  # plotting takes a second or two: once, at the end
        try:
            plot(cells, out_dir / "throughput.png",
                 f"{meta['layers']} layers, seq {meta['seq_len']}: {meta['machine'].split(';')[0]}")
        except Exception as exc:  # a plot must never cost the numbers
            print(f"plot failed: {exc}", flush=True)
        print()
        print(text_table(rows))
        print(f"\nwritten: {out_dir / 'results.md'}, {out_dir / 'throughput.png'}", flush=True)


# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--systems", default="slidejax,streamed,resident,deepspeed,fsdp2",
                   help=f"comma-separated, from {','.join(SYSTEMS)}")
    p.add_argument("--layers", type=int, default=16, help="decoder layers of the 8B shape")
    p.add_argument("--tokens", default="16384,65536", help="tokens per step, comma-separated")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--steps", type=int, default=5, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per run")
    p.add_argument("--repeats", type=int, default=1, help="fresh runs per system and tokens")
    p.add_argument("--timeout", type=float, default=540, help="seconds per run before it is killed")
    p.add_argument("--min-free-gb", type=float, default=3.0,
                   help="kill a run when the host's available memory falls below this")
    p.add_argument("--python", default=sys.executable, help="interpreter for the runners")
    p.add_argument("--clip", type=float, default=None,
                   help="max gradient norm for every system (0: off; default: each runner's, 1.0)")
    p.add_argument("--tiny", action="store_true", help="pass --tiny to every runner (CPU check)")
    p.add_argument("--merge", default=None, metavar="JSON[,JSON...]",
                   help="run nothing: combine earlier runs' results.json files into one report")
    return p.parse_args(argv)


def merge(paths: list[Path], out_dir: Path) -> list[Cell]:
    """One report from several harness runs' results.json (e.g. one per device call).

    Cells of the same system and tokens per step are pooled; the runs must share the model
    (layers) and sequence length.
    """
    cells: dict[tuple[str, int], Cell] = {}
    meta: dict[str, Any] = {}
    commands = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        m = data["meta"]
        if meta and (m["layers"], m["seq_len"]) != (meta["layers"], meta["seq_len"]):
            raise SystemExit(f"{path}: {m['layers']} layers, seq {m['seq_len']}; the first file "
                             f"has {meta['layers']} layers, seq {meta['seq_len']}")
        meta = meta or dict(m)
        commands.append(m["command"])
        meta["repeats"] = max(meta["repeats"], m["repeats"])
        for c in data["cells"]:
            cell = cells.setdefault((c["system"], c["tokens_per_step"]),
                                    Cell(c["system"], c["tokens_per_step"]))
            cell.results += c["results"]
            cell.errors += c["errors"]
    meta["command"] = " ; ".join(dict.fromkeys(commands))
    out_dir.mkdir(parents=True, exist_ok=True)
    ordered = sorted(cells.values(), key=lambda c: c.tokens)  # stable: systems keep their order
    report(ordered, out_dir, meta, final=True)
    return ordered


def main(argv: list[str] | None = None, systems: dict[str, list[str]] | None = None) -> list[Cell]:
    """Runs the matrix; ``systems`` overrides the registry (tests use fake systems)."""
    systems = SYSTEMS if systems is None else systems
    args = parse_args(argv)
    if args.merge:
        return merge([Path(p) for p in args.merge.split(",") if p.strip()], args.out)
    names = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [n for n in names if n not in systems]
    if unknown:
        raise SystemExit(f"unknown system(s) {unknown}; known: {', '.join(systems)}")
    missing = sorted({systems[n][0] for n in names if not (REPO / systems[n][0]).is_file()})
    if missing:
        raise SystemExit(f"runner script(s) missing: {missing}")
    try:
        tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    except ValueError:
        raise SystemExit(f"--tokens must be comma-separated integers, got {args.tokens!r}")
    bad = [t for t in tokens if t <= 0 or t % args.seq_len]
    if bad:
        raise SystemExit(f"--tokens {bad} not positive multiples of --seq-len {args.seq_len}")
    (args.out / "runs").mkdir(parents=True, exist_ok=True)

    cells = [Cell(n, t) for t in tokens for n in names]
    meta = {
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "command": shlex.join(["python3", "bench/harness.py", *(sys.argv[1:] if argv is None else argv)]),
        "layers": args.layers,
        "params": (TINY if args.tiny else LLAMA31_8B).total_params(args.layers),
        "seq_len": args.seq_len, "steps": args.steps,
        "warmup": args.warmup, "repeats": args.repeats,
    }
    print(f"machine: {meta['machine']}", flush=True)
    try:
        for repeat in range(args.repeats):  # repeats outermost: drift spreads over every system
            for cell in cells:
                out = run_system(cell.system, systems[cell.system], cell.tokens, repeat, args,
                                 args.out)
                if isinstance(out, dict):
                    cell.results.append(out)
                else:
                    cell.errors.append(out)
                report(cells, args.out, meta, final=False)
    finally:  # interrupted too: report what was measured
        report(cells, args.out, meta, final=True)
    return cells


if __name__ == "__main__":
    main()
