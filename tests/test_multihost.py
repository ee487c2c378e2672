"""Several processes (jax.distributed on localhost, CPU, gloo) give the single-process update.

Two processes, each using one (and in one case two) simulated CPU devices, train a tiny model on
their halves of the same global batches (`tests/multihost_worker.py`); their gathered training
state (fp32 masters, AdamW moments, step counts) and per-step metrics must equal one process with
one device on the whole batches, which tests/test_engine.py checks against whole-model optax.
Covered: clipping on and off, tied and untied embeddings, a resident layer and every layer
resident, a shard handed to a fresh engine, `gather_masters`, invalid or mismatched batches on one
process raising on every process instead of hanging (the Trainer on several processes:
tests/test_multihost_trainer.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("multihost_worker.py")
_spec = importlib.util.spec_from_file_location("multihost_worker", WORKER)
mw = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(tmp_path: Path, n_dev: int | str, seed: int, cases: list[str], bad: bool = False,
           processes: int = 2, timeout: float = 240) -> tuple[dict[int, dict], dict[str, tuple]]:
    """Run the worker in `processes` processes (meanwhile, the cases' references here); any
    failure kills them all at once (a process whose peer died would otherwise wait in a
    collective until jax's timeouts). n_dev "gpu": process r gets GPU r. Returns (each
    process's report, each case's reference)."""
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")]))
    if n_dev != "gpu":
        env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"  # compiles in about half the time
    def cmd(r: int) -> list[str]:
        return [sys.executable, str(WORKER), str(port), str(r), str(processes), str(n_dev), str(tmp_path),
                str(seed), ",".join(cases)] + (["--bad"] if bad else [])

    logs = [open(tmp_path / f"log{r}.txt", "w+") for r in range(processes)]
    procs = []
    try:
        for r in range(processes):
            penv = dict(env, CUDA_VISIBLE_DEVICES=str(r)) if n_dev == "gpu" else env
            procs.append(subprocess.Popen(cmd(r), stdout=logs[r], stderr=subprocess.STDOUT, env=penv))
        deadline = time.monotonic() + timeout
        by_case: dict[str, tuple] = {}
        for spec in cases:
            case = spec.split("@")[0]
            by_case[case] = by_case.get(case) or reference(case, seed, "gpu" if n_dev == "gpu" else "cpu")
        refs = {spec: by_case[spec.split("@")[0]] for spec in cases}
        while any(p.poll() is None for p in procs):
            failed = [r for r, p in enumerate(procs) if p.returncode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    codes = [p.returncode for p in procs]
    if any(codes):
        tails = []
        for r, log in enumerate(logs):
            log.seek(0)
            tails.append(f"--- process {r} (exit {codes[r]}):\n" + log.read()[-3000:])
        pytest.fail("\n".join(tails))
    for log in logs:
        log.close()
    return {r: json.loads((tmp_path / f"process{r}.json").read_text()) for r in range(processes)}, refs


def reference(case: str, seed: int, platform: str = "cpu") -> tuple[list, dict[str, np.ndarray]]:
    """One process, one device, whole batches: metrics of every step, states after STEPS and
    STEPS + 1 steps."""
    import jax

    engine = mw.make_engine(case, seed, [jax.devices(platform)[0]])
    metrics, states = [], {}
    for i, b in enumerate(mw.global_batches(case, seed)):
        if i == mw.STEPS:
            states.update(mw.flat_state(engine.state_dict(), "s0/"))
        m = engine.step(b)
        metrics.append([m.loss, m.grad_norm, m.tokens, m.clip_scale])
    states.update(mw.flat_state(engine.state_dict(), "s1/"))
    engine.close()
    return metrics, states


def check_case(tmp_path: Path, spec: str, report: dict[int, dict], refs: dict[str, tuple]) -> None:
    case = spec.split("@")[0]
    ref_metrics, ref = refs[spec]
    got = dict(np.load(tmp_path / f"{spec}.npz"))
    for r, rep in report.items():
        np.testing.assert_allclose(rep[spec]["metrics"], ref_metrics, rtol=1e-5, err_msg=f"process {r}")
    # Every sharded unit has exactly one owner; both own some; the others' masters are released.
    units = {k.split("/")[1] for k in ref if k.startswith("s0/") and k.endswith("/master")}
    n_resident = mw.CASES[case][3]
    resident = units if n_resident == 3 else {f"layers.{i}" for i in range(n_resident)}  # the first ones
    embed = {u for u in units if u.startswith("embed.")} - resident
    owned = [set(rep[spec]["owned"]) for rep in report.values()]
    assert all(embed <= o for o in owned)  # the embedding is replicated
    sharded = [o - embed for o in owned]
    assert not sharded[0] & sharded[1]
    assert sharded[0] | sharded[1] == units - resident - embed
    assert all(sharded) or not units - resident - embed
    for r, rep in report.items():
        assert rep[spec]["released"], f"process {r} kept masters of units it does not own"
        assert set(rep[spec]["shard_units"]) == owned[r] | resident
        assert rep[spec]["shard"] == {"process_index": r, "process_count": len(report)}
    assert got.keys() == ref.keys() | {f"gm/{u}" for u in units}
    for key, want in ref.items():
        have = got[key]
        assert have.shape == want.shape and have.dtype == want.dtype, key
        if want.dtype.kind in "iu":
            np.testing.assert_array_equal(have, want, err_msg=key)
            continue
        err = np.linalg.norm(have.astype(np.float64) - want) / max(np.linalg.norm(want.astype(np.float64)), 1e-30)
        assert err < 1e-5, f"{case} {key}: relative error {err:.2e}"
    for u in units:  # gather_masters: every master on every process (process 0 saved its copy)
        np.testing.assert_array_equal(got[f"gm/{u}"], got[f"s1/{u}/master"])
    # Training moved every unit, so agreement is not that of untouched weights.
    for u in units:
        init = got[f"s0/{u}/master"]
        assert not np.array_equal(init, got[f"s1/{u}/master"]), u


def test_two_processes_same_state_as_one(tmp_path):
    """2 processes x 1 device: clipping on and off, tied and untied, resident layers; then
    2 processes x 2 devices; then invalid batches on one process."""
    seed = int(np.random.default_rng().integers(1 << 20))
    specs = ["untied-clip@1", "untied-noclip@1", "all-resident@1", "tied-clip@1", "tied-noclip@1",
             "untied-clip@2"]
    report, refs = launch(tmp_path, 2, seed, specs, bad=True)
    for spec in specs:
        check_case(tmp_path, spec, report, refs)
    # Process 1's bad batch: it names its own error, process 0 names process 1; then the shapes.
    assert "token id out of range" in report[1]["bad"][0]
    assert "process(es) [1] rejected" in report[0]["bad"][0]
    for r in (0, 1):
        assert "different shapes" in report[r]["bad"][1]


def test_owners_balanced_and_interleaved():
    sizes = {"layers.0": 10, "layers.1": 10, "layers.2": 10, "layers.3": 10, "norm": 1, "lm_head.0": 7,
             "lm_head.1": 6}
    from slidejax.distributed import assign_owners

    owners = assign_owners(sizes, 2)
    assert [owners[f"layers.{i}"] for i in range(4)] == [0, 1, 0, 1]
    load = [sum(n for u, n in sizes.items() if owners[u] == p) for p in (0, 1)]
    assert abs(load[0] - load[1]) <= max(sizes.values())
    assert assign_owners(sizes, 1) == {u: 0 for u in sizes}
    many = assign_owners({f"layers.{i}": 5 for i in range(7)}, 3)
    assert sorted(list(many.values()).count(p) for p in range(3)) == [2, 2, 3]


@pytest.mark.gpu
def test_two_processes_one_gpu_each(tmp_path):
    """The same contract on two GPUs, one per process (NCCL), in float32."""
    import jax

    if len(jax.devices("gpu")) < 2:
        pytest.skip("needs two GPUs")
    seed = int(np.random.default_rng().integers(1 << 20))
    specs = ["untied-clip@1", "tied-noclip@1"]
    report, refs = launch(tmp_path, "gpu", seed, specs, timeout=540)
    for spec in specs:
        check_case(tmp_path, spec, report, refs)
