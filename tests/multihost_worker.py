"""One process of a multi-process run (a subprocess of tests/test_multihost.py), and the
shared recipe (model, batches, schedule) its single-process reference also uses.

    python multihost_worker.py PORT PROCESS_ID PROCESSES DEVICES OUT_DIR SEED CASE@N[,CASE@N...] [--bad]

DEVICES simulated CPU devices per process ("gpu": the GPU(s) CUDA_VISIBLE_DEVICES leaves this
process); a case runs on the first N of each process's devices. For each case: train STEPS
steps on this process's rows of each global batch, gather the full state (step STEPS), hand this
process's shard to a fresh engine (built from other weights), take one more step there and
gather again (step STEPS + 1). Process 0 saves the gathered states; every
process saves its metrics, the units it owns and whether the others' masters were released.
With --bad, afterwards process 1 passes an invalid batch, then batches of another shape: every
process must raise SlidejaxError (not hang).
"""

from __future__ import annotations

import json
import sys

import numpy as np

STEPS = 3
M, ROWS, SEQ = 2, 4, 8  # micro-batches, global rows per micro-batch, sequence length
CASES = {  # name: (vocab, tied, max_grad_norm, resident_layers); cases of one model share compilations
    "untied-clip": (600, False, 1e-3, 0),  # 3 vocabulary blocks: two-pass head, lm_head blocks owned
    "untied-noclip": (600, False, 0.0, 1),  # and one resident layer
    "all-resident": (600, False, 1e-3, 3),  # every unit on the devices: nothing owned
    "tied-clip": (97, True, 1e-3, 0),  # 1 block: the fused head, reading the replicated embedding
    "tied-noclip": (97, True, 0.0, 0),
}


def model_config(case: str):
    from slidejax.config import ModelConfig

    vocab, tied, _, _ = CASES[case]
    return ModelConfig(model_type="llama", vocab_size=vocab, hidden_size=32, intermediate_size=48,
                       num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=tied)


def make_engine(case: str, seed: int, devices):
    import optax

    from slidejax.engine import SlidingEngine
    from slidejax.host_memory import HostModel
    from slidejax.host_optimizer import HostAdamW
    from slidejax.model import init_params

    cfg = model_config(case)
    _, _, clip, resident = CASES[case]
    host = HostModel(cfg)
    host.load_tree(init_params(cfg, seed=seed))
    opt = HostAdamW(learning_rate=optax.linear_schedule(5e-4, 1e-4, 8), weight_decay=0.1, eps=1e-6)
    return SlidingEngine(host, opt, compute_dtype="float32", max_grad_norm=clip, resident_layers=resident,
                         devices=devices)


def global_batches(case: str, seed: int) -> list[dict[str, np.ndarray]]:
    """STEPS + 1 global batches [M, ROWS, SEQ]: the first half of the rows plain documents, the
    second half packed (two documents: segment masks needed)."""
    vocab = CASES[case][0]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(STEPS + 1):
        ids = rng.integers(0, vocab, (M, ROWS, SEQ)).astype(np.int32)
        labels = rng.integers(0, vocab, (M, ROWS, SEQ)).astype(np.int32)
        labels[rng.random(labels.shape) < 0.3] = -100
        seg = np.ones_like(ids)
        seg[:, ROWS // 2:, 5:] = 2
        pos = np.where(seg == 2, np.arange(SEQ) - 5, np.arange(SEQ)).astype(np.int32)
        out.append({"input_ids": ids, "labels": labels, "segment_ids": seg, "positions": pos})
    return out


def local_part(batch: dict[str, np.ndarray], index: int, count: int) -> dict[str, np.ndarray]:
    """Process `index`'s rows; rows with one document each go without segments or positions."""
    per = ROWS // count
    part = {k: v[:, index * per:(index + 1) * per] for k, v in batch.items()}
    if (part["segment_ids"] == 1).all():
        del part["segment_ids"], part["positions"]
    return part


def flat_state(state: dict, prefix: str) -> dict[str, np.ndarray]:
    import jax

    out = {f"{prefix}step": np.array(state["step"])}  # copies: a state_dict holds live buffers
    for name, u in state["units"].items():
        out[f"{prefix}{name}/master"] = np.array(u["master"], np.float32)
        for path, v in jax.tree_util.tree_flatten_with_path(u["opt"])[0]:
            out[f"{prefix}{name}/opt{jax.tree_util.keystr(path)}"] = np.array(v)
    return out


def run(case: str, seed: int, devices, index: int, count: int) -> tuple[dict, dict]:
    """(metrics etc. of this process, gathered states) of one case."""
    engine = make_engine(case, seed, devices)
    batches = global_batches(case, seed)
    metrics = []
    for b in batches[:STEPS]:
        m = engine.step(local_part(b, index, count))
        metrics.append([m.loss, m.grad_norm, m.tokens, m.clip_scale])
    owned = sorted(engine.opt_state)
    released = all(not u.master.any() for n, u in engine.host.units.items() if not engine._owns(n))
    shard = engine.state_dict()
    states = flat_state(engine.state_dict(gather=True), "s0/")
    engine.close()

    fresh = make_engine(case, seed + 1, devices)
    fresh.load_state_dict(shard)
    m = fresh.step(local_part(batches[STEPS], index, count))
    metrics.append([m.loss, m.grad_norm, m.tokens, m.clip_scale])
    states.update(flat_state(fresh.state_dict(gather=True), "s1/"))
    fresh.gather_masters()
    full = {n: u.master.copy() for n, u in fresh.host.units.items()}
    states.update({f"gm/{n}": v for n, v in full.items()})
    fresh.close()
    info = {"metrics": metrics, "owned": owned, "released": bool(released),
            "shard_units": sorted(shard["units"]), "shard": {k: int(v) for k, v in shard["shard"].items()}}
    return info, states


def bad_batches(case: str, seed: int, devices, index: int, count: int) -> list[str]:
    """Process 1 passes an out-of-range token, then a batch of another shape: every process must
    raise a SlidejaxError, not wait in a collective."""
    from slidejax.errors import SlidejaxError

    engine = make_engine(case, seed, devices)
    good = local_part(global_batches(case, seed)[0], index, count)
    errors = []
    for kind in ("token", "shape"):
        b = dict(good)
        if index == 1 and kind == "token":
            b["input_ids"] = b["input_ids"].copy()
            b["input_ids"][0, 0, 0] = 10_000
        if index == 1 and kind == "shape":
            b = {k: v[:1] for k, v in b.items()}
        try:
            engine.step(b)
            errors.append("no error")
        except SlidejaxError as e:
            errors.append(str(e))
    engine.close()
    return errors


def main() -> None:
    port, index, count, n_dev, out, seed, cases = sys.argv[1:8]
    index, count, seed = int(index), int(count), int(seed)
    import jax

    if n_dev != "gpu":
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", int(n_dev))
    jax.config.update("jax_default_matmul_precision", "highest")
    from slidejax import distributed

    distributed.initialize(f"localhost:{port}", num_processes=count, process_id=index)
    assert jax.process_count() == count and jax.process_index() == index
    devices = jax.devices()
    assert n_dev == "gpu" or len(devices) == count * int(n_dev), devices
    report = {}
    for spec in cases.split(","):
        case, n = spec.split("@")
        per = [[d for d in devices if d.process_index == p][: int(n)] for p in range(count)]
        info, states = run(case, seed, [d for ds in per for d in ds], index, count)
        report[spec] = info
        if index == 0:
            np.savez(f"{out}/{spec}.npz", **states)
    if "--bad" in sys.argv:
        report["bad"] = bad_batches(cases.split(",")[0].split("@")[0], seed, devices, index, count)
    with open(f"{out}/process{index}.json", "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
