"""The benchmark harness and the PyTorch baselines, checked on the CPU with tiny models."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import common, harness  # noqa: E402

torch = pytest.importorskip("torch")
# One thread: on a 2-core CI box OpenMP's hand-off costs more than these tiny ops.
CHILD_ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _hf_param_counts(shape: common.ModelShape, layers: int) -> tuple[int, int]:
    """(all parameters, embedding parameters) of transformers' own Llama on the meta device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**shape.hf_config_kwargs(layers)))
    total = sum(p.numel() for p in model.parameters())
    return total, model.model.embed_tokens.weight.numel()


@pytest.mark.parametrize("shape,layers", [(common.LLAMA31_8B, 3), (common.TINY, 2)])
def test_param_counts_match_transformers(shape, layers):
    total, embedding = _hf_param_counts(shape, layers)
    assert shape.total_params(layers) == total
    assert shape.flop_params(layers) == total - embedding


def test_llama31_8b_is_8b():
    # The published size of Llama-3.1-8B: 8,030,261,248 parameters.
    assert common.LLAMA31_8B.total_params(32) == 8_030_261_248


def test_flops_per_token_formula():
    s, layers, seq = common.LLAMA31_8B, 4, 4096
    n = layers * 218_112_000 + 4096 + 128256 * 4096  # 218.1M per layer, by hand
    assert s.flop_params(layers) == n
    attention = 12 * layers * seq * 32 * 128 / 2  # causal: half of forward + backward S x S
    assert common.flops_per_token(s, layers, seq) == 6 * n + attention


def test_flop_formula_is_the_trainers():
    """The benchmarks and the trainer's progress bar report TFLOP/s with one formula."""
    from slidejax.config import ModelConfig
    from slidejax.metrics import flops_per_token

    shape, layers, seq = common.LLAMA31_8B, 7, 2048
    cfg = ModelConfig(model_type="llama", vocab_size=shape.vocab, hidden_size=shape.hidden,
                      intermediate_size=shape.intermediate, num_layers=layers, num_heads=shape.heads,
                      num_kv_heads=shape.kv_heads, head_dim=shape.head_dim)
    assert common.flops_per_token(shape, layers, seq) == pytest.approx(flops_per_token(cfg, seq), rel=1e-12)


@pytest.mark.parametrize("tokens,seq,cap,want", [
    (16384, 4096, 16384, (4, 1)), (65536, 4096, 16384, (4, 4)), (65536, 1024, 16384, (16, 4)),
    (12288, 4096, 8192, (1, 3)), (4096, 4096, 1, (1, 1)), (40960, 4096, 16384, (2, 5)),
])
def test_micro_batching(tokens, seq, cap, want):
    batch, accum = common.micro_batching(tokens, seq, cap)
    assert (batch, accum) == want
    assert batch * accum * seq == tokens


def test_micro_batching_rejects_partial_sequences():
    with pytest.raises(SystemExit, match="multiple"):
        common.micro_batching(5000, 4096, 16384)


def test_time_steps_counts_and_times():
    calls, synced = [], []
    rng = np.random.default_rng()
    delays = rng.uniform(0.01, 0.03, size=4)
    it = iter([0.0, 0.0, *delays])
    times = common.time_steps(lambda: (calls.append(1), time.sleep(next(it))), warmup=2, steps=4,
                              sync=lambda: synced.append(1))
    assert len(calls) == 6 and len(times) == 4 and len(synced) == 5
    for got, want in zip(times, delays):
        assert want <= got < want + 0.05
    s = common.summarize(times)
    assert s["median"] == pytest.approx(float(np.median(times)))
    assert s["min"] == min(times) and s["max"] == max(times) and s["all"] == times


def test_peak_sampler_sees_own_and_child_memory():
    size = 300_000_000
    with common.PeakSampler(interval_s=0.02) as sampler:
        before = common.tree_rss_bytes(sampler._proc)
        buf = np.random.default_rng().integers(0, 255, size=size, dtype=np.uint8)  # touched pages
        time.sleep(0.2)
        del buf
        child = subprocess.Popen([sys.executable, "-c",
                                  "import numpy as np, time; b = np.ones(400_000_000, np.uint8); "
                                  "time.sleep(1.0)"])
        child.wait()
    peaks = sampler.peaks()
    assert sampler.samples > 10
    # the child's 400 MB is seen only by sampling the process tree (VmHWM is this process only)
    assert sampler.host_rss_peak >= before + 0.9 * 400_000_000
    assert peaks["peak_host_rss_bytes"] >= before + 0.9 * size
    assert peaks["peak_host_rss_bytes"] < before + 2_000_000_000
    assert peaks["peak_gpu_bytes"] == 0  # no GPU here


def _fake_times(tokens: int) -> list[float]:
    return list(np.random.default_rng().uniform(0.5, 1.5, size=5) * tokens / 1e4)


def test_make_result_schema_and_derived_numbers(tmp_path):
    times = _fake_times(16384)
    peaks = {"peak_gpu_bytes": 7, "peak_host_rss_bytes": 11, "peak_host_used_bytes": 5}
    r = common.make_result(system="x", shape=common.LLAMA31_8B, layers=4, seq_len=4096,
                           tokens_per_step=16384, step_times=times, peaks=peaks, notes="n", k=1)
    assert set(common.RESULT_KEYS) <= set(r)
    median = float(np.median(times))
    assert r["tokens_per_s"] == pytest.approx(16384 / median)
    flops = 6 * common.LLAMA31_8B.flop_params(4) + 6 * 4 * 4096 * 32 * 128
    assert r["model_tflops"] == pytest.approx(flops * 16384 / median / 1e12)
    assert r["params"] == common.LLAMA31_8B.total_params(4)
    assert (r["peak_gpu_bytes"], r["peak_host_rss_bytes"], r["peak_host_used_bytes"], r["k"]) == (7, 11, 5, 1)
    path = tmp_path / "a" / "r.json"
    common.write_result(path, r)
    assert json.loads(path.read_text()) == r
    bad = dict(r)
    del bad["params"]
    with pytest.raises(ValueError, match="params"):
        common.write_result(tmp_path / "bad.json", bad)
    assert not (tmp_path / "bad.json").exists()


def test_error_line_picks_the_failure():
    log = textwrap.dedent("""\
        loading
        /x/y.py:3: UserWarning: something is deprecated
          warnings.warn(
        Traceback (most recent call last):
          File "x.py", line 1
        torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB
        """)
    assert harness.error_line(log).startswith("torch.OutOfMemoryError: CUDA out of memory")
    assert harness.error_line("a\nb\n") == "b"
    assert harness.error_line("") == "no output"


# ----------------------------------------------------------------------------------------------
# The harness end to end, with fake systems

FAKE = """\
import sys, time
sys.path.insert(0, {repo!r})
from bench import common
p = common.runner_parser("fake")
p.add_argument("--speed", type=float, default=1.0)
p.add_argument("--mode", default="ok")
p.add_argument("--clip", type=float, default=1.0)
a = p.parse_args()
if a.mode == "oom":
    print("some progress", flush=True)
    raise SystemExit("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 9.00 GiB")
if a.mode == "hang":
    time.sleep(60)
if a.mode == "nojson":
    sys.exit(0)
times = [a.tokens_per_step / (1000.0 * a.speed) * (1 + 0.01 * i) for i in range(a.steps)]
peaks = dict(peak_gpu_bytes=int(2e9 * a.speed), peak_host_rss_bytes=int(4e9 / a.speed))
r = common.make_result(system="fake-" + a.mode, shape=common.model_shape(a), layers=a.layers,
                       seq_len=a.seq_len, tokens_per_step=a.tokens_per_step, step_times=times,
                       peaks=peaks, notes=f"fake, clip {{a.clip}}")
common.write_result(a.out, r)
"""


def _fake_systems(tmp_path: Path) -> dict[str, list[str]]:
    script = tmp_path / "fake.py"
    script.write_text(FAKE.format(repo=str(REPO)))
    return {
        "slidejax": [str(script), "--speed", "4"],
        "deepspeed": [str(script), "--speed", "1"],
        "fsdp2": [str(script), "--mode", "oom"],
        "hang": [str(script), "--mode", "hang"],
        "nojson": [str(script), "--mode", "nojson"],
    }


def test_harness_end_to_end_with_fake_systems(tmp_path, capsys):
    out = tmp_path / "out"
    cells = harness.main(["--out", str(out), "--systems", "slidejax,deepspeed,fsdp2",
                          "--tokens", "256,1024", "--seq-len", "128", "--layers", "2",
                          "--steps", "3", "--warmup", "1", "--repeats", "2", "--tiny"],
                         systems=_fake_systems(tmp_path))
    by = {(c.system, c.tokens): c for c in cells}
    for tokens in (256, 1024):
        fast, slow = by["slidejax", tokens].summary(), by["deepspeed", tokens].summary()
        assert fast["runs"] == slow["runs"] == 2
        assert fast["tokens_per_s"] == pytest.approx(4 * slow["tokens_per_s"])
        assert len(slow["step_time_s"]["all"]) == 6  # pooled over the repeats
        assert by["fsdp2", tokens].summary() is None
        assert len(by["fsdp2", tokens].errors) == 2
        assert "CUDA out of memory" in by["fsdp2", tokens].errors[0]
    md = (out / "results.md").read_text()
    rows = {tuple(c.strip() for c in ln.split("|")[1:3]): ln for ln in md.splitlines()
            if ln.startswith("| ") and not ln.startswith("| system")}
    assert len(rows) == 6
    assert "| 1.00 / 1.00 |" in rows["slidejax", "256"]
    assert "| 0.25 / 4.00 |" in rows["deepspeed", "1024"]  # 4x slower, 4x the host memory
    assert "FAILED" in rows["fsdp2", "256"] and "out of memory" in rows["fsdp2", "256"]
    assert "command: `python3 bench/harness.py --out" in md and "machine:" in md
    png = (out / "throughput.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["cells"]) == 6
    assert len(list((out / "runs").glob("*.log"))) == 12
    printed = capsys.readouterr().out
    assert "vs slidejax" in printed and printed.rstrip().endswith("throughput.png")


def test_harness_survives_hang_and_missing_result(tmp_path):
    t0 = time.monotonic()
    cells = harness.main(["--out", str(tmp_path), "--systems", "hang,nojson", "--tokens", "256",
                          "--seq-len", "128", "--layers", "2", "--timeout", "3", "--tiny"],
                         systems=_fake_systems(tmp_path))
    assert time.monotonic() - t0 < 30
    assert "time limit" in cells[0].errors[0]
    assert "no valid result" in cells[1].errors[0]
    assert "FAILED" in (tmp_path / "results.md").read_text()


def test_harness_rejects_unknown_system_before_running(tmp_path):
    with pytest.raises(SystemExit, match="unknown system"):
        harness.main(["--out", str(tmp_path), "--systems", "slidejax,nope"])
    with pytest.raises(SystemExit, match="multiples"):
        harness.main(["--out", str(tmp_path), "--systems", "deepspeed", "--tokens", "1000"])
    assert not (tmp_path / "runs").exists()


def test_harness_passes_the_clip_to_every_system(tmp_path):
    cells = harness.main(["--out", str(tmp_path), "--systems", "slidejax,deepspeed", "--tokens", "256",
                          "--seq-len", "128", "--layers", "2", "--steps", "2", "--warmup", "0", "--tiny",
                          "--clip", "0"], systems=_fake_systems(tmp_path))
    assert [c.summary()["notes"] for c in cells] == ["fake, clip 0.0"] * 2
    default = harness.main(["--out", str(tmp_path / "d"), "--systems", "slidejax", "--tokens", "256",
                            "--seq-len", "128", "--layers", "2", "--steps", "2", "--warmup", "0", "--tiny"],
                           systems=_fake_systems(tmp_path))
    assert default[0].summary()["notes"] == "fake, clip 1.0"


def test_harness_merges_separate_calls(tmp_path):
    systems = _fake_systems(tmp_path)
    common_args = ["--tokens", "256", "--seq-len", "128", "--layers", "2", "--steps", "2",
                   "--warmup", "0", "--tiny"]
    harness.main(["--out", str(tmp_path / "a"), "--systems", "slidejax", *common_args], systems)
    harness.main(["--out", str(tmp_path / "b"), "--systems", "deepspeed,fsdp2", *common_args],
                 systems)
    cells = harness.main(["--out", str(tmp_path / "all"), "--merge",
                          f"{tmp_path / 'a' / 'results.json'},{tmp_path / 'b' / 'results.json'}"])
    assert [c.system for c in cells] == ["slidejax", "deepspeed", "fsdp2"]
    md = (tmp_path / "all" / "results.md").read_text()
    assert "| 0.25 / 4.00 |" in md and "FAILED" in md
    assert md.count("python3 bench/harness.py") == 2  # both calls' commands
    assert (tmp_path / "all" / "throughput.png").stat().st_size > 10_000
    harness.main(["--out", str(tmp_path / "c"), "--systems", "slidejax", *common_args,
                  "--layers", "3"], systems)  # the last --layers wins
    with pytest.raises(SystemExit, match="layers"):
        harness.main(["--out", str(tmp_path / "x"), "--merge",
                      f"{tmp_path / 'a' / 'results.json'},{tmp_path / 'c' / 'results.json'}"])


# ----------------------------------------------------------------------------------------------
# The baselines' own code on tiny models


def _reference_first_loss(seed: int, layers: int, accum: int, batch: int, seq: int) -> float:
    """The first step's last micro-batch loss (what runners record), by a plain fp32 HF model."""
    from bench.baselines import hf_llama

    model = hf_llama.llama_on_meta(common.TINY, layers, torch.float32)
    hf_llama.materialize_(model, "cpu", seed)
    ids = hf_llama.random_batches(common.TINY.vocab, accum, batch, seq, seed, "cpu")[-1]
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def test_materialize_fills_every_parameter_reproducibly():
    from bench.baselines import hf_llama

    a = hf_llama.llama_on_meta(common.TINY, 2, torch.float32)
    b = hf_llama.llama_on_meta(common.TINY, 2, torch.bfloat16)
    hf_llama.materialize_(a, "cpu", seed=3)
    hf_llama.materialize_(b, "cpu", seed=3)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert pa.device.type == "cpu" and pb.dtype == torch.bfloat16
        torch.testing.assert_close(pa.to(torch.bfloat16), pb, rtol=0, atol=0)
        if pa.dim() == 1:
            assert torch.all(pa == 1), name
        else:
            assert 0.015 < pa.std().item() < 0.025 and abs(pa.mean().item()) < 0.005, name
    rot = a.model.rotary_emb.inv_freq
    want = 1.0 / (common.TINY.rope_theta ** (torch.arange(0, 16, 2).float() / 16))
    torch.testing.assert_close(rot, want)
    c = hf_llama.llama_on_meta(common.TINY, 2, torch.float32)
    hf_llama.materialize_(c, "cpu", seed=4)
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)


def _run_runner(script: str, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / f"{Path(script).stem}.json"
    cmd = [sys.executable, str(REPO / script), "--layers", "2", "--seq-len", "32",
           "--tokens-per-step", "128", "--micro-batch-tokens", "64", "--steps", "3",
           "--warmup", "1", "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=CHILD_ENV, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    common.check_result(result)
    return result


def _check_training(result: dict) -> None:
    assert (result["micro_batch"], result["grad_accum"]) == (2, 2)
    if torch.cuda.is_available() and "dry run" not in result["notes"]:  # ran on the GPU
        assert result["peak_gpu_bytes"] > 0 and result["peak_gpu_allocator_bytes"] > 0
    losses = result["losses"]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses  # same batch: AdamW descends
    # bf16 compute against the fp32 reference of the same weights and tokens
    assert losses[0] == pytest.approx(_reference_first_loss(0, 2, 2, 2, 32), rel=5e-3)


def test_fsdp2_baseline_tiny(tmp_path):
    """The whole FSDP2 offload path on a tiny model: gloo on the CPU here, NCCL on a GPU."""
    result = _run_runner("bench/baselines/fsdp2_offload.py", tmp_path, "--tiny")
    assert result["system"] == "fsdp2-cpu-offload"
    assert "CPU AdamW" in result["notes"]
    _check_training(result)


def test_deepspeed_baseline_dry_run(tmp_path):
    result = _run_runner("bench/baselines/deepspeed_zero3.py", tmp_path, "--dry-run")
    assert "dry run" in result["notes"]
    _check_training(result)


def test_deepspeed_config_is_valid():
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    from bench.baselines.deepspeed_zero3 import ds_config

    cfg = DeepSpeedConfig(ds_config(4096, micro_batch=4, grad_accum=4, clip=1.0))
    z = cfg.zero_config
    assert cfg.zero_optimization_stage == 3 and cfg.bfloat16_config.enabled
    assert z.offload_param.device == "cpu" and z.offload_optimizer.device == "cpu"
    assert z.offload_param.pin_memory and z.offload_optimizer.pin_memory
    assert z.prefetch_bucket_size == int(0.9 * 4096**2)
    assert z.param_persistence_threshold == 40960
    assert cfg.train_batch_size == 16 and cfg.gradient_accumulation_steps == 4
    assert cfg.gradient_clipping == 1.0


@pytest.mark.slow
def test_deepspeed_baseline_tiny(tmp_path):
    """The whole ZeRO-3 offload path on a tiny model: DeepSpeed's CPU accelerator here, CUDA on a
    GPU (the first run JIT-builds CPU Adam: a minute or more)."""
    pytest.importorskip("deepspeed")
    result = _run_runner("bench/baselines/deepspeed_zero3.py", tmp_path, "--tiny")
    assert result["notes"].endswith("DeepSpeedCPUAdam")
    _check_training(result)


def test_host_optimizer_bench_runs_every_method(tmp_path):
    """bench_host_optimizer.py on a small unit: every method, including the engine's in-place
    upload, gives a positive time; the table and JSON are written."""
    out = tmp_path / "hostopt"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_host_optimizer.py"), "--out", str(out), "--sizes", "1M",
         "--repeats", "2", "--warmup", "1", "--threads", "1"],
        capture_output=True, text=True, timeout=600, env=CHILD_ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((out / "results.json").read_text())["results"]
    methods = {r["method"] for r in rows}
    assert {"fused", "fused_inplace", "fused_bf16m", "torch", "optax", "stream", "replay8"} <= methods
    assert all(r["median_s"] > 0 and r["params"] == 2**20 for r in rows)
    assert "fused_inplace" in (out / "results.md").read_text()
    info = json.loads((out / "results.json").read_text())
    assert info["machine"]["threads_per_core"] >= 1
    assert info["summary"][str(2**20)]["fused_inplace/stream"] > 0

    # --methods picks a subset, in its order; an unknown name is refused before anything runs.
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_host_optimizer.py"), "--out", str(out), "--sizes", "64K",
         "--repeats", "1", "--warmup", "0", "--threads", "1", "--methods", "stream,fused_inplace"],
        capture_output=True, text=True, timeout=600, env=CHILD_ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["method"] for r in json.loads((out / "results.json").read_text())["results"]] == \
        ["stream", "fused_inplace"]
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_host_optimizer.py"), "--out", str(out), "--methods", "adam"],
        capture_output=True, text=True, timeout=600, env=CHILD_ENV)
    assert proc.returncode == 2 and "unknown adam" in proc.stderr
