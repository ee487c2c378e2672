"""GPU behaviour of the engine: bounded device memory, the memory budget, bf16 training.

Each memory measurement runs `bench/bench_engine.py` in a fresh process, so the allocator's peak
belongs to that run alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[1]


def run_engine(tmp_path: Path, layers: int, tokens: int, *extra: str) -> dict:
    out = tmp_path / f"r{layers}_{tokens}_{len(extra)}.json"
    cmd = [sys.executable, str(ROOT / "bench" / "bench_engine.py"), "--layers", str(layers),
           "--hidden", "1024", "--seq-len", "2048", "--tokens-per-step", str(tokens),
           "--micro-batch-tokens", "4096", "--steps", "1", "--warmup", "1", "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_peak_memory_independent_of_depth_and_tokens(tmp_path):
    shallow = run_engine(tmp_path, 8, 4096)["peak_gpu_allocator_bytes"]
    deep = run_engine(tmp_path, 32, 4096)["peak_gpu_allocator_bytes"]
    many_tokens = run_engine(tmp_path, 8, 16384)["peak_gpu_allocator_bytes"]
    print(f"peak GPU bytes: 8 layers {shallow}, 32 layers {deep}, 4x tokens {many_tokens}")
    assert abs(deep - shallow) / shallow < 0.10
    assert many_tokens <= shallow * 1.10


def test_budget_is_honoured_and_infeasible_budget_refused(tmp_path):
    result = run_engine(tmp_path, 8, 8192, "--gpu-memory", "3GB")
    assert 0 < result["peak_gpu_allocator_bytes"] <= 3e9
    # The planner fills the same budget with resident layers, and still stays inside it.
    auto = run_engine(tmp_path, 8, 8192, "--gpu-memory", "3GB", "--resident-layers", "auto")
    print(f"budget 3GB: streamed peak {result['peak_gpu_allocator_bytes']}, auto peak "
          f"{auto['peak_gpu_allocator_bytes']} ({auto['notes']})")
    assert 0 < auto["peak_gpu_allocator_bytes"] <= 3e9
    assert "resident layers 0" not in auto["notes"]
    out = tmp_path / "refused.json"
    cmd = [sys.executable, str(ROOT / "bench" / "bench_engine.py"), "--layers", "4", "--hidden", "1024",
           "--seq-len", "2048", "--tokens-per-step", "4096", "--steps", "1", "--warmup", "0",
           "--gpu-memory", "200MB", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "GPU memory budget" in proc.stderr and "too small" in proc.stderr


def test_pinned_pool_capped_at_the_plan_suffices_and_an_overflow_is_refused(tmp_path):
    """The host plan bounds what XLA's pinned pool must hold: a pool capped at it (+15%, +1 GiB)
    trains; a pool below it is refused by the engine, not by an XLA failure mid-step."""
    capped = run_engine(tmp_path, 8, 16384, "--pinned-pool", "plan")
    plan = capped["planned_host_bytes"]
    print(f"pinned pool capped: planned pinned {plan['pinned']}, total {plan['total']}, peak RSS "
          f"{capped['peak_host_rss_bytes']}, RSS by phase {capped['host_rss_phases']} ({capped['notes']})")
    assert "pinned pool capped" in capped["notes"] and capped["tokens_per_s"] > 0
    cmd = [sys.executable, str(ROOT / "bench" / "bench_engine.py"), "--layers", "8", "--hidden", "1024",
           "--seq-len", "2048", "--tokens-per-step", "65536", "--micro-batch-tokens", "4096", "--steps", "1",
           "--warmup", "0", "--out", str(tmp_path / "overflow.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB="1"))
    assert proc.returncode != 0
    assert "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB=" in proc.stderr, proc.stderr[-3000:]


def test_bf16_training_tracks_the_fp32_reference():
    from slidejax import reference
    from slidejax.config import ModelConfig
    from slidejax.engine import SlidingEngine
    from slidejax.host_memory import HostModel
    from slidejax.host_optimizer import HostAdamW
    from slidejax.model import init_params

    cfg = ModelConfig(model_type="llama", vocab_size=5000, hidden_size=256, intermediate_size=512,
                      num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64)
    host = HostModel(cfg)
    host.load_tree(init_params(cfg, seed=int(np.random.default_rng().integers(1 << 30))))
    params = jax.tree.map(jnp.asarray, host.tree())
    opt = HostAdamW(1e-3, weight_decay=0.01)
    engine = SlidingEngine(host, opt, compute_dtype="bfloat16", max_grad_norm=1.0)
    rng = np.random.default_rng()
    ids = rng.integers(0, cfg.vocab_size, (2, 4, 257)).astype(np.int32)
    seg = np.ones((2, 4, 256), np.int32)
    seg[:, 1:, 100:] = 2  # packed rows: the masked cuDNN path
    pos = np.where(seg == 2, np.arange(256) - 100, np.arange(256)).astype(np.int32)
    labels = ids[..., 1:].copy()
    labels[:, 1:, 99] = -100
    batch = {"input_ids": ids[..., :-1], "labels": labels, "segment_ids": seg, "positions": pos}
    want = float(reference.mean_loss(params, cfg, {k: jnp.asarray(v) for k, v in batch.items()}))
    losses = [engine.step(batch).loss for _ in range(5)]
    assert all(np.isfinite(losses))
    assert losses[0] == pytest.approx(want, rel=2e-2)
    assert losses[-1] < losses[0]  # the same batch five times: it must be learnt
    engine.sync()
    assert all(np.isfinite(u.master).all() for u in host.units.values())
