"""Trains a tiny model on N simulated CPU devices and saves the final fp32 masters (a subprocess of
tests/test_data_parallel.py: the device count must be set before jax starts)."""

import sys

import jax

n_devices, out = int(sys.argv[1]), sys.argv[2]
jax.config.update("jax_num_cpu_devices", n_devices)
jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402
import optax  # noqa: E402

from slidejax.config import ModelConfig  # noqa: E402
from slidejax.engine import SlidingEngine  # noqa: E402
from slidejax.host_memory import HostModel  # noqa: E402
from slidejax.host_optimizer import HostAdamW  # noqa: E402
from slidejax.model import init_params  # noqa: E402

seed = int(sys.argv[3])
tied = sys.argv[4] == "tied"
gpu_update = int(sys.argv[5]) if len(sys.argv) > 5 else 0
cfg = ModelConfig(model_type="llama", vocab_size=600 if tied else 97, hidden_size=32, intermediate_size=48,
                  num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=tied)
host = HostModel(cfg)
host.load_tree(init_params(cfg, seed=seed))
initial = {name: u.master.copy() for name, u in host.units.items()}
devices = jax.devices()[:n_devices]
assert len(devices) == n_devices, jax.devices()
opt = HostAdamW(learning_rate=optax.linear_schedule(5e-4, 1e-4, 8), weight_decay=0.1, eps=1e-6)
engine = SlidingEngine(host, opt, compute_dtype="float32", max_grad_norm=1e-3, devices=devices,
                       gpu_update_layers=gpu_update)
rng = np.random.default_rng(seed)
batches = []
for _ in range(3):
    ids = rng.integers(0, cfg.vocab_size, (2, 4, 8)).astype(np.int32)
    labels = rng.integers(0, cfg.vocab_size, (2, 4, 8)).astype(np.int32)
    labels[rng.random(labels.shape) < 0.3] = -100
    seg = np.ones_like(ids)
    seg[:, 1:, 5:] = 2
    pos = np.where(seg == 2, np.arange(8) - 5, np.arange(8)).astype(np.int32)
    batches.append({"input_ids": ids, "labels": labels, "segment_ids": seg, "positions": pos})
# Next-ids promises: step 0's has 3 rows (no even split over 2 or 4 devices, and not what comes:
# only the rows it names are updated first), step 1's is the true next batch (its rows are
# staged ahead by the host worker), step 2 makes none.
promises = [batches[1]["input_ids"][:, :3], batches[2]["input_ids"], None]
losses = [engine.step(b, next_input_ids=nxt).loss for b, nxt in zip(batches, promises)]
assert engine.staged_ahead_steps == 1, engine.staged_ahead_steps
engine.sync()
moved = min(np.linalg.norm(u.master - initial[name]) / np.linalg.norm(initial[name]) for name, u in host.units.items())
np.savez(out, losses=np.array(losses), moved=moved, **{name: u.master for name, u in host.units.items()})
