"""`slidejax train` on two processes (jax.distributed on localhost, CPU, gloo) equals one process.

Two processes with one simulated CPU device each run the CLI on the tiny preset (fp32) with
checkpoints and evaluation; a one-process run of the same settings runs here meanwhile. The
two-process checkpoint (written by process 0 from the gathered state: masters and AdamW state),
the eval loss and the per-step metrics must equal the one-process run's; then both processes
resume from the two-process run's first checkpoint, and the checkpoint they write must again
equal the one-process run's. Process 1 writes and prints nothing.
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

import jax
import numpy as np
import pytest

ROOT = Path(__file__).parents[1]
STEPS, SAVE_EVERY = 3, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# AdamW's eps at 1e-6, not the default 1e-8: the two runs sum each gradient in another order, and
# where an element's terms cancel to nearly zero its fp32 rounding differs relatively a lot; Adam's
# m / (sqrt(v) + eps) turns that into a visible share of a whole step for that element (one
# element of a 128 x 128 matrix off by 1% of lr gave a relative error of 1.6e-5 at eps 1e-8). An
# eps above that rounding keeps such elements' steps proportional to their gradients, so the
# comparison stays at 1e-5 (below 1e-6 over seeds), far below what any sharding mistake moves.
ADAM_EPS = "1e-6"


def _settings(tmp_path: Path, seed: int) -> list[str]:
    """A short run on a slice of the tiny preset's task (fp32, 2 micro-batches of 4 rows)."""
    from slidejax.presets import preset_path

    for kind, n in (("train", 200), ("eval", 8)):
        lines = (preset_path("tiny") / f"{kind}.jsonl").read_text().splitlines()[:n]
        (tmp_path / f"{kind}.jsonl").write_text("\n".join(lines) + "\n")
    return ["train", "--model", "tiny", "--data", str(tmp_path / "train.jsonl"), "--eval-data",
            str(tmp_path / "eval.jsonl"), "--steps", str(STEPS), "--save-every", str(SAVE_EVERY),
            "--eval-every", "0", "--task-examples", "4", "--seq-len", "64", "--micro-batch-size", "4",
            "--tokens-per-step", "512", "--compute-dtype", "float32", "--seed", str(seed), "--lr", "3e-3",
            "--eps", ADAM_EPS, "--warmup", "1", "--max-grad-norm", "0.5", "--no-progress", "--run-name", "r"]


def launch(tmp_path: Path, args: list[str], name: str, meanwhile=None, timeout: float = 150,
           worker: list[str] | None = None) -> list[str]:
    """`slidejax <args>` (or `worker` PORT PROCESS_ID <args>) in two processes, and `meanwhile()`
    here in the meantime. Any failure or the timeout kills both at once (a process whose peer
    died would otherwise wait in a collective until jax's own timeouts). Returns their outputs."""
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest",
               XLA_FLAGS="--xla_backend_optimization_level=0")  # compiles in about half the time
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    logs = [open(tmp_path / f"{name}{r}.txt", "w+") for r in range(2)]
    procs = []
    try:
        for r in range(2):
            cmd = [sys.executable, "-m", "slidejax.cli", *args, "--coordinator", f"localhost:{port}",
                   "--num-processes", "2", "--process-id", str(r)] if worker is None else \
                [sys.executable, *worker, str(port), str(r), *args]
            procs.append(subprocess.Popen(cmd, stdout=logs[r], stderr=subprocess.STDOUT, env=env, cwd=tmp_path))
        deadline = time.monotonic() + timeout
        if meanwhile is not None:
            meanwhile()
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    outs = []
    for log in logs:
        log.seek(0)
        outs.append(log.read())
        log.close()
    codes = [p.returncode for p in procs]
    if any(codes):
        pytest.fail("\n".join(f"--- process {r} (exit {c}):\n{o[-3000:]}" for r, (c, o) in enumerate(zip(codes, outs))))
    return outs


def checkpoint(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(meta, {path: array}) of the params and optimizer items of checkpoint `path`."""
    from slidejax.checkpointing import Checkpointer, find_checkpoint

    folder, step = find_checkpoint(path)
    reader = Checkpointer(folder, read_only=True)
    try:
        got = reader.restore(step)
    finally:
        reader.close()
    flat = jax.tree_util.tree_flatten_with_path({"params": got["params"], "optimizer": got["optimizer"]})[0]
    return got["meta"], {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def assert_same_checkpoint(got_path: Path, want_path: Path) -> None:
    meta, got = checkpoint(got_path)
    want_meta, want = checkpoint(want_path)
    assert got.keys() == want.keys() and len(got) > 20
    for key, w in want.items():
        g = got[key]
        assert g.shape == w.shape and g.dtype == w.dtype, key
        if w.dtype.kind in "iu":
            np.testing.assert_array_equal(g, w, err_msg=key)
            continue
        err = np.linalg.norm(g.astype(np.float64) - w) / max(np.linalg.norm(w.astype(np.float64)), 1e-30)
        assert err < 1e-5, f"{key}: relative error {err:.2e}"
    for key in ("step", "engine_step", "data", "rng", "total_steps"):
        assert meta[key] == want_meta[key], key


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_cli_two_processes_equal_one_and_resume(tmp_path):
    from slidejax import cli

    seed = int(np.random.default_rng().integers(1000))
    args = _settings(tmp_path, seed)
    one, two = tmp_path / "one", tmp_path / "two"

    def reference() -> None:  # the one-process run, here while the two processes run
        assert cli.main([*args, "--output-dir", str(one)]) == 0

    outs = launch(tmp_path, [*args, "--output-dir", str(two)], "run", meanwhile=reference)
    assert f"checkpoint  {two / 'r' / 'checkpoints' / str(STEPS)}" in outs[0]
    assert "checkpoint" not in outs[1] and "model " not in outs[1]  # process 1 prints nothing of its own

    # Training moved the weights, and the two-process run is the one-process run.
    _, init = checkpoint(one / "r" / "checkpoints" / str(SAVE_EVERY))
    _, final = checkpoint(one / "r" / "checkpoints" / str(STEPS))
    assert any(not np.array_equal(init[k], final[k]) for k in final if k.startswith("['params']"))
    for step in (SAVE_EVERY, STEPS):
        assert_same_checkpoint(two / "r" / "checkpoints" / str(step), one / "r" / "checkpoints" / str(step))
    got, want = records(two / "r"), records(one / "r")
    assert [(r["kind"], r["step"]) for r in got] == [(r["kind"], r["step"]) for r in want]  # written once
    for g, w in zip(got, want):
        for key in ("loss", "grad_norm", "clip_scale", "tokens", "positions", "eval_loss", "eval_tokens"):
            if key in w:
                np.testing.assert_allclose(g[key], w[key], rtol=1e-5, err_msg=f"{w['kind']} {w['step']} {key}")
        if "exact_match" in w:
            assert g["exact_match"] == w["exact_match"]
    assert (two / "r" / "loss.png").is_file()

    # Resume both processes from the first checkpoint: the same final state again.
    kept = tmp_path / "kept"
    (two / "r" / "checkpoints" / str(STEPS)).rename(kept)
    outs = launch(tmp_path, ["train", "--resume", str(two / "r" / "checkpoints" / str(SAVE_EVERY)),
                             "--no-progress"], "resume")
    assert "resuming" in outs[0] and "resuming" not in outs[1]
    assert_same_checkpoint(two / "r" / "checkpoints" / str(STEPS), one / "r" / "checkpoints" / str(STEPS))
    assert [(r["kind"], r["step"]) for r in records(two / "r")] == [(r["kind"], r["step"]) for r in want]


def test_trainer_two_processes_export(tmp_path):
    """The Python API on two processes: `fit(until_step=...)`, then `export` (gathered masters,
    written by process 0) gives the one-process run's weights."""
    from safetensors.numpy import load_file

    worker = Path(__file__).with_name("multihost_trainer_worker.py")
    spec = importlib.util.spec_from_file_location("multihost_trainer_worker", worker)
    mw = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mw)
    seed = int(np.random.default_rng().integers(1000))
    _settings(tmp_path, seed)  # writes train.jsonl
    data = str(tmp_path / "train.jsonl")
    launch(tmp_path, [str(tmp_path / "two"), data, str(seed)], "api", worker=[str(worker)],
           meanwhile=lambda: mw.train_and_export(str(tmp_path / "one"), data, seed))

    def weights(folder: Path) -> dict[str, np.ndarray]:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    got, want = weights(tmp_path / "two" / "hf"), weights(tmp_path / "one" / "hf")
    assert got.keys() == want.keys() and len(want) > 10
    for key, w in want.items():
        assert got[key].dtype == np.float32 and got[key].shape == w.shape, key
        err = np.linalg.norm(got[key].astype(np.float64) - w) / np.linalg.norm(w.astype(np.float64))
        assert err < 1e-5, f"{key}: relative error {err:.2e}"
    # Two steps moved the weights away from the preset's.
    import slidejax

    init = slidejax.load_pretrained("tiny", dtype="float32").params()
    assert not np.array_equal(init["norm"], want["model.norm.weight"])
    assert (tmp_path / "two" / "r" / "checkpoints" / "2").is_dir()  # fit(until_step) saved
