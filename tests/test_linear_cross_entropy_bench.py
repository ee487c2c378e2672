"""bench/bench_linear_cross_entropy.py on the CPU at tiny sizes: every implementation runs and
computes the same loss, the parent writes its JSON, Markdown and XLA buffer reports and prints
the table last, and the time budget is honoured. (The memory figures need a GPU's allocator
statistics; on the CPU they are absent and the table says '-'.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "bench_linear_cross_entropy.py"
sys.path.insert(0, str(SCRIPT.parent))

import bench_linear_cross_entropy as bench  # noqa: E402


@pytest.mark.parametrize("impl", ["naive", "jax", "acc-jax"])
def test_run_case_in_process(impl):
    r = bench.run_case(tokens=70, vocab=301, hidden=16, impl=impl, repeats=2, warmup=2,
                       chunk_size=32)
    assert r["finite"] and r["n_valid"] > 0 and len(r["times_s"]) == 2, r
    assert r["xla_temp_bytes"] >= 0 and r["xla_output_bytes"] > 0
    if impl == "acc-jax":  # the accumulator is donated and aliased to the output
        assert r["xla_alias_bytes"] == 301 * 16 * 4
    assert r["chunk"] == (None if impl == "naive" else 32)
    # Same data, same loss: the bf16 GEMM rounding differs (naive rounds logits to bf16).
    ref = bench.run_case(tokens=70, vocab=301, hidden=16, impl="jax", repeats=1, warmup=1)
    assert abs(r["loss_sum"] - ref["loss_sum"]) <= 2e-2 * abs(ref["loss_sum"])


def test_parent_writes_results_and_prints_the_table_last(tmp_path):
    out = tmp_path / "lce"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--tokens", "40", "--vocab", "257",
         "--hidden", "16", "--impls", "acc-jax,naive", "--repeats", "1", "--warmup", "1"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("[") and lines[-1].startswith("| 40 | 257 | acc-jax |"), lines
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["impl"] for r in results] == ["naive", "acc-jax"]  # naive's round first
    assert all("error" not in r and r["finite"] for r in results), results
    assert all(r["xla_buffers"] for r in results), "XLA's memory-usage report was not read"
    assert len(list((out / "buffers").glob("*.txt"))) == 2
    assert "lce_fused_accumulate" in (out / "results.md").read_text()


def test_run_order_puts_the_essentials_first():
    shapes = [(16, 100), (64, 100)]
    assert bench.run_order(shapes, ["jax", "acc-triton", "naive"]) == [
        (16, 100, "acc-triton"), (16, 100, "naive"), (64, 100, "acc-triton"),
        (64, 100, "naive"), (16, 100, "jax"), (64, 100, "jax")]


def test_budget_and_unknown_impls(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--tokens", "8", "--vocab", "64",
         "--hidden", "8", "--impls", "acc-jax", "--budget", "5"],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (r,) = json.loads((tmp_path / "results.json").read_text())["results"]
    assert r["skipped"].startswith("not run"), r
    bad = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--impls", "cuda"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert bad.returncode != 0 and "unknown --impls" in bad.stderr


def test_table_ratios():
    rows = [dict(tokens=10, vocab=100, impl="naive", time_s=0.2),
            dict(tokens=10, vocab=100, impl="acc-triton", chunk=8, time_s=0.21,
                 extra_bytes=3000, beyond_io_bytes=400, xla_temp_bytes=350, loss_sum=9.0,
                 n_valid=3, finite=True, extra_is_upper_bound=False)]
    md = bench.table(rows[::-1]).splitlines()
    assert md[2].startswith("| 10 | 100 | naive |")  # IMPLS order, whatever the input order
    cells = [c.strip() for c in md[3].split("|")[1:-1]]
    assert cells[4:6] == ["210.0", "1.05"] and cells[8] == "10.0" and cells[10] == "3.0000"


def test_ballast_lifts_bytes_in_use_to_the_compile_peak():
    gib, row = 2**30, bench.BALLAST_ROW
    s = dict(bytes_in_use=10 * gib, peak_bytes_in_use=17 * gib + 3, bytes_limit=100 * gib)
    rows, short = bench.ballast_rows(s, need=5 * gib)
    assert rows == 7 * gib // row and not short  # within a row of the peak
    # Not enough room for ballast + the call + headroom: a smaller ballast, flagged.
    rows, short = bench.ballast_rows(dict(s, bytes_limit=22 * gib), need=5 * gib)
    assert rows * row == 5.5 * gib and short
    rows, short = bench.ballast_rows(dict(s, peak_bytes_in_use=10 * gib), need=gib)
    assert rows == 0 and not short  # nothing to lift
    rows, short = bench.ballast_rows(s, need=7 * gib + 3)
    assert rows == 0 and not short  # the call itself tops the compile peak

    # The call's peak above the ballast: exact; no new peak: only an upper bound.
    before = dict(bytes_in_use=17 * gib, peak_bytes_in_use=17 * gib)
    got = bench.call_peak(before, dict(peak_bytes_in_use=20 * gib), False, new_outputs=gib)
    assert got == {"extra_bytes": 3 * gib, "beyond_io_bytes": 2 * gib,
                   "extra_is_upper_bound": False}
    assert bench.call_peak(before, dict(peak_bytes_in_use=17 * gib), False, 0)[
        "extra_is_upper_bound"]
    assert bench.call_peak(before, dict(peak_bytes_in_use=20 * gib), True, 0)[
        "extra_is_upper_bound"]
