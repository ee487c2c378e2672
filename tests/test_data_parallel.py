"""Data parallelism over several local devices gives the single-device update.

Simulated CPU devices (`jax_num_cpu_devices`, which must be set before jax starts), so each device
count runs in its own process (`tests/data_parallel_worker.py`): 1, 2 and 4 devices train the same
tiny model on the same batches (packed rows, clipping on) and must end with the same fp32
masters (which the single-device engine is tested to compute exactly, tests/test_engine.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("data_parallel_worker.py")


def train(tmp_path: Path, n: int, seed: int, tied: str, gpu_update: int = 0) -> dict[str, np.ndarray]:
    out = tmp_path / f"dp{n}_{tied}_{gpu_update}.npz"
    proc = subprocess.run([sys.executable, str(WORKER), str(n), str(out), str(seed), tied, str(gpu_update)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(out))


@pytest.mark.parametrize("tied,gpu_update", [("untied", 0), ("tied", 0), ("untied", 2)])
def test_one_two_four_devices_same_parameters(tmp_path, tied, gpu_update):
    seed = int(np.random.default_rng().integers(1 << 20))
    runs = {n: train(tmp_path, n, seed, tied, gpu_update) for n in (1, 2, 4)}
    base = runs[1]
    for n in (2, 4):
        np.testing.assert_allclose(runs[n]["losses"], base["losses"], rtol=1e-6)
        for name in base:
            if name in ("losses", "moved"):
                continue
            err = np.linalg.norm(runs[n][name] - base[name]) / np.linalg.norm(base[name])
            assert err < 1e-6, f"{n} devices, {name}: relative error {err:.2e}"
    # Training moved every unit, so equal results are not untouched initial weights.
    assert float(base["moved"]) > 1e-5


def test_cli_trains_on_two_devices_like_on_one(tmp_path):
    """`slidejax train --devices 2` (two simulated CPU devices) reaches the one-device weights."""
    import os

    from slidejax.checkpointing import load_params

    def run(devices: int) -> dict:
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
        cmd = [sys.executable, "-m", "slidejax", "train", "--steps", "3", "--devices", str(devices),
               "--micro-batch-size", "4", "--tokens-per-step", "1024", "--eval-every", "0",
               "--save-every", "0", "--no-progress", "--compute-dtype", "float32",
               "--output-dir", str(tmp_path), "--run-name", f"d{devices}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return load_params(tmp_path / f"d{devices}")[1]

    one, two = run(1), run(2)
    leaves_one = _flat(one)
    leaves_two = _flat(two)
    assert leaves_one.keys() == leaves_two.keys()
    for k in leaves_one:
        err = np.linalg.norm(leaves_two[k] - leaves_one[k]) / np.linalg.norm(leaves_one[k])
        assert err < 1e-5, f"{k}: {err:.2e}"


def _flat(tree, prefix="") -> dict[str, np.ndarray]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}/"))
        return out
    return {prefix: np.asarray(tree)}
