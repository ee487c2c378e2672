"""Checkpoints: the full training state round-trips, saves are asynchronous snapshots, a failed or
killed save leaves the previous checkpoint loadable, keep-last-N, resume is bit-exact in a new
process, SIGINT/SIGTERM stop cleanly with a checkpoint, and the saved parameters load as plain
arrays with orbax alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import slidejax
from slidejax.cli import main
from slidejax.checkpointing import Checkpointer, find_checkpoint, nest, params_tree, unnest
from slidejax.errors import SlidejaxError
from slidejax.metrics import read_metrics
from slidejax.trainer import TrainConfig, Trainer

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(seq_len=32, micro_batch_size=2, tokens_per_step=128, progress=False, save_every=0, eval_every=0,
             lr=3e-3, warmup=1, weight_decay=0.1, max_grad_norm=0.5)
CLI_SMALL = ["--seq-len", "32", "--micro-batch-size", "2", "--tokens-per-step", "128", "--no-progress",
             "--save-every", "0", "--lr", "3e-3", "--warmup", "1", "--weight-decay", "0.1", "--max-grad-norm", "0.5"]


def task_file(path: Path, n: int = 200, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    with open(path, "w") as f:
        for _ in range(n):
            pick = rng.choice(letters, size=int(rng.integers(3, 6)), replace=False)
            f.write(json.dumps({"prompt": "sort " + " ".join(pick) + " =", "completion": " " + " ".join(sorted(pick))})
                    + "\n")
    return path


def tree_equal(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    return len(la) == len(lb) and all(pa == pb and np.array_equal(np.asarray(x), np.asarray(y))
                                      for (pa, x), (pb, y) in zip(la, lb))


def files_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_py(code: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def run_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "slidejax", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


# ----------------------------------------------------------------------------------------------
# Trees


def test_nest_unnest_roundtrip_of_optax_states():
    params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)}
    state = jax.tree.map(np.asarray, optax.chain(optax.adamw(1e-3), optax.scale(2.0)).init(params))
    state = jax.tree.map(lambda x: x + np.random.default_rng(0).standard_normal(x.shape).astype(x.dtype), state)
    nested = nest({"count": np.int32(7), "opt_state": state})
    assert isinstance(nested["opt_state"]["0"]["0"]["mu"]["w"], np.ndarray)  # plain dicts all the way
    back = unnest(nested, {"count": np.int32(0), "opt_state": state})
    assert tree_equal(back["opt_state"], state) and int(back["count"]) == 7
    assert type(back["opt_state"][0][0]) is type(state[0][0])  # namedtuples come back as namedtuples
    nested["opt_state"]["0"]["0"]["mu"]["w"] = np.zeros((3, 3), np.float32)
    with pytest.raises(SlidejaxError, match="has shape \\[3, 3\\], expected \\[2, 3\\]"):
        unnest(nested, {"count": np.int32(0), "opt_state": state})


# ----------------------------------------------------------------------------------------------
# The checkpointer: asynchronous, atomic, keep-last-N


def _state(seed: int) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    params = {"model": {"layers": {"0": {"mlp": {"w": rng.standard_normal((64, 32)).astype(np.float32)}}}}}
    opt = {"layers.0": {"mu": rng.standard_normal(2048).astype(np.float32), "count": np.asarray(seed, np.int32)}}
    return params, opt


@pytest.fixture
def slow_writes(monkeypatch):
    """Every array write takes `delay[0]` seconds longer (or raises `fail[0]`), inside orbax's
    background write."""
    handler = ocp.type_handlers.NumpyHandler
    orig = handler._background_serialize
    control = {"delay": 0.0, "fail": None}

    async def patched(self, *args, **kwargs):
        time.sleep(control["delay"])
        if control["fail"] is not None:
            raise control["fail"]
        return await orig(self, *args, **kwargs)

    monkeypatch.setattr(handler, "_background_serialize", patched)
    return control


@pytest.mark.parametrize("snapshot", [True, False])
def test_save_snapshots_then_writes_in_the_background(tmp_path, slow_writes, snapshot):
    ck = Checkpointer(tmp_path / "ck", snapshot=snapshot)
    params, opt = _state(1)
    saved = jax.tree.map(np.copy, (params, opt))
    slow_writes["delay"] = 1.0
    t0 = time.perf_counter()
    ck.save(1, params, opt, {"note": "x"})
    returned = time.perf_counter() - t0
    params["model"]["layers"]["0"]["mlp"]["w"][...] = 0.0  # training goes on and changes the weights
    opt["layers.0"]["mu"][...] = 0.0
    ck.wait()
    if snapshot:
        assert returned < 0.8, returned  # not held for the write
    else:
        assert returned >= 1.0  # no copy: the caller waits for the write instead
    got = ck.restore(1)
    assert tree_equal(got["params"], saved[0]) and tree_equal(got["optimizer"], saved[1])
    assert got["meta"]["note"] == "x" and got["meta"]["step"] == 1
    ck.close()


def test_keep_last_n(tmp_path):
    ck = Checkpointer(tmp_path / "ck", keep_last=2)
    for step in (1, 2, 3, 4):
        ck.save(step, *_state(step), {})
    ck.wait()
    assert ck.steps() == [3, 4]
    assert sorted(p.name for p in (tmp_path / "ck").iterdir() if p.name.isdigit()) == ["3", "4"]
    assert find_checkpoint(tmp_path / "ck") == ((tmp_path / "ck").absolute(), 4)
    ck.close()


def test_saving_an_existing_step_replaces_it(tmp_path):
    """After resuming from an earlier checkpoint, the new timeline's checkpoints replace the old
    timeline's of the same step."""
    ck = Checkpointer(tmp_path / "ck", keep_last=0)
    for step in (1, 2):
        ck.save(step, *_state(step), {"timeline": "old"})
    new = _state(7)
    ck.save(2, *new, {"timeline": "new"}, wait=True)
    got = ck.restore(2)
    assert ck.steps() == [1, 2] and got["meta"]["timeline"] == "new" and tree_equal(got["params"], new[0])
    ck.close()


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, slow_writes):
    ck = Checkpointer(tmp_path / "ck")
    first = _state(1)
    ck.save(1, *first, {"n": 1}, wait=True)
    before = files_digest(tmp_path / "ck" / "1")
    slow_writes["fail"] = OSError(28, "No space left on device")
    with pytest.raises(SlidejaxError) as e:
        ck.save(2, *_state(2), {"n": 2})
        ck.wait()
    msg = str(e.value)
    assert "saving checkpoint" in msg and "No space left on device" in msg and "\n" not in msg
    assert "previous checkpoints are intact" in msg
    slow_writes["fail"] = None
    again = Checkpointer(tmp_path / "ck")
    assert again.steps() == [1]
    assert files_digest(tmp_path / "ck" / "1") == before
    got = again.restore(1)
    assert tree_equal(got["params"], first[0]) and got["meta"]["n"] == 1
    again.save(2, *_state(2), {"n": 2}, wait=True)  # the directory is still usable
    assert again.steps() == [1, 2]
    again.close()


def test_a_process_killed_mid_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    code = """
        import sys, time, numpy as np, orbax.checkpoint as ocp
        from slidejax.checkpointing import Checkpointer
        d = sys.argv[1]
        rng = np.random.default_rng(0)
        params = {"model": {"w": rng.standard_normal(4096).astype(np.float32)}}
        opt = {"layers.0": {"mu": rng.standard_normal(4096).astype(np.float32)}}
        ck = Checkpointer(d)
        ck.save(1, params, opt, {"n": 1}, wait=True)
        np.save(d + "-step1.npy", params["model"]["w"])
        orig = ocp.type_handlers.NumpyHandler._background_serialize
        async def hang(self, *a, **k):
            await orig(self, *a, **k)   # the arrays are on disk, the checkpoint is not committed
            print("WRITING", flush=True)
            time.sleep(600)
        ocp.type_handlers.NumpyHandler._background_serialize = hang
        params["model"]["w"] += 1
        ck.save(2, params, opt, {"n": 2})
        ck.wait()
    """
    d = tmp_path / "ck"
    proc = run_py(code, str(d))
    deadline = time.time() + 120
    line = ""
    while time.time() < deadline and "WRITING" not in line:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
    assert "WRITING" in line, proc.stderr.read()
    proc.kill()
    proc.wait(timeout=30)
    leftovers = [p.name for p in d.iterdir() if p.name not in ("1",)]
    assert leftovers and all("tmp" in n for n in leftovers), leftovers  # the interrupted save's work area
    ck = Checkpointer(d)
    assert ck.steps() == [1]
    got = ck.restore(1)
    assert np.array_equal(got["params"]["model"]["w"], np.load(str(d) + "-step1.npy"))
    ck.save(2, got["params"], got["optimizer"], {"n": 2}, wait=True)
    assert ck.steps() == [1, 2]
    ck.close()


# ----------------------------------------------------------------------------------------------
# The trainer's checkpoints


def tiny() -> slidejax.Model:
    return slidejax.load_pretrained("tiny", dtype="float32")


def test_trainer_checkpoint_restores_the_full_state_and_continues_identically(tmp_path):
    data = task_file(tmp_path / "d.jsonl")
    config = TrainConfig.load(model="tiny", **SMALL, steps=5, data=[str(data)], output_dir=str(tmp_path),
                              run_name="a")
    a = Trainer(tiny(), config=config)
    a.rng.standard_normal(3)  # the trainer's RNG has moved: its state must come back too
    summary = a.fit(until_step=2)
    assert summary["step"] == 2 and summary["checkpoint"].endswith("checkpoints/2")
    shutil.copytree(tmp_path / "a", tmp_path / "b")

    b = Trainer.restore(tmp_path / "b")
    assert b.step_count == 2 and b.config.steps == 5 and b.config.lr == 3e-3
    assert b.run_dir == tmp_path / "b"
    assert b.rng.bit_generator.state == a.rng.bit_generator.state
    assert b._train.state_dict() == a._data_state
    sa, sb = a.engine.state_dict(), b.engine.state_dict()
    assert int(sa["step"]) == int(sb["step"]) == 2
    for name in sa["units"]:
        assert np.array_equal(sa["units"][name]["master"], sb["units"][name]["master"]), name
        assert tree_equal(sa["units"][name]["opt"], sb["units"][name]["opt"]), name
    # Both continue to the end of the schedule: bit for bit the same weights.
    a.fit()
    b.fit()
    a.close()
    b.close()
    for name, unit in a.model.host.units.items():
        assert np.array_equal(unit.master, b.model.host.units[name].master), name
    steps = [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5]

    # The parameters load with orbax alone: numpy arrays under Hugging Face names ...
    path = tmp_path / "b" / "checkpoints" / "5" / "params"
    plain = ocp.PyTreeCheckpointer().restore(path)
    mine = params_tree(b.model.host)
    assert tree_equal(plain, mine)
    assert plain["model"]["layers"]["0"]["mlp"]["up_proj"]["weight"].shape == (384, 128)
    # ... or straight into jax arrays on a device, given the shapes.
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
                            plain)
    on_device = ocp.StandardCheckpointer().restore(path, abstract)
    leaf = on_device["model"]["embed_tokens"]["weight"]
    assert isinstance(leaf, jax.Array) and np.array_equal(np.asarray(leaf), mine["model"]["embed_tokens"]["weight"])

    # A checkpoint of another model is refused in one line, and nothing on disk changes.
    before = files_digest(tmp_path / "b")
    other = slidejax.from_config(slidejax.ModelConfig.from_pretrained(slidejax.presets.preset_path("tiny")).replace(
        hidden_size=64, intermediate_size=96, head_dim=16), dtype="float32")
    with pytest.raises(SlidejaxError) as e:
        Trainer(other, config=config).resume(tmp_path / "b")
    assert "checkpoint of a different model" in str(e.value) and "hidden_size 128 vs 64" in str(e.value)
    assert files_digest(tmp_path / "b") == before


def _steps(folder: Path) -> list[int]:
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def _lr_of(folder: Path, step: int) -> float:
    return Checkpointer(folder, read_only=True).read_meta(step)["train_config"]["lr"]


def test_resume_latest_waits_for_the_save_in_flight(tmp_path, slow_writes):
    """`resume("latest")` right after a background save resumes that save's step (it lands
    first), and sets nothing aside."""
    data = task_file(tmp_path / "d.jsonl", n=40)
    config = TrainConfig.load(model="tiny", **SMALL, steps=4, keep_last=0, data=[str(data)],
                              output_dir=str(tmp_path), run_name="r")
    a = Trainer(tiny(), config=config)
    a.fit(until_step=2)
    a.step(next(iter(a._train)))
    slow_writes["delay"] = 1.0
    a.save()  # step 3, still being written
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is set aside
        got = a.resume("latest")
    assert a.step_count == 3 and got.name == "3"
    assert _steps(tmp_path / "r" / "checkpoints") == [2, 3]
    a.close()


def test_resuming_an_earlier_checkpoint_sets_the_abandoned_continuation_aside(tmp_path, monkeypatch):
    """Resumed from step 2 of 4, the run's checkpoints 3 and 4 belong to a continuation it abandons:
    they are moved, intact, into checkpoints/abandoned-<time>/, so neither `resume latest` nor
    `keep_last` takes them for the new continuation's; resuming one of those into the run is
    refused (the run continues another way), exporting it works. On the same trainer, a save still
    being written lands before the move, and keep_last counts only what is left. A move that fails
    puts back what it moved and warns; the trainer is resumed all the same. A failed resume leaves
    the trainer's own run open."""
    data = task_file(tmp_path / "d.jsonl", n=40)
    config = TrainConfig.load(model="tiny", **{**SMALL, "save_every": 1, "lr": 1e-3}, steps=4, keep_last=0,
                              data=[str(data)], output_dir=str(tmp_path), run_name="r")
    a = Trainer(tiny(), config=config)
    a.fit()
    a.close()
    run, ck = tmp_path / "r", tmp_path / "r" / "checkpoints"
    assert _steps(ck) == [1, 2, 3, 4]
    b = Trainer(tiny(), config=config.replace(lr=1e-2))  # continuation B, told apart by its lr
    with pytest.warns(UserWarning, match="steps 3, 4"):
        b.resume(ck / "2")
    assert find_checkpoint(run)[1] == 2
    aside = [p for p in ck.iterdir() if p.name.startswith("abandoned-")]
    assert len(aside) == 1 and _steps(aside[0]) == [3, 4] and _lr_of(aside[0], 4) == 1e-3
    # A resume that fails leaves the trainer's run as it was: it goes on.
    with pytest.raises(SlidejaxError, match="no such run"):
        b.resume(tmp_path / "nowhere")
    b.fit()
    b.close()
    assert _steps(ck) == [1, 2, 3, 4] and _lr_of(ck, 4) == 1e-2
    with pytest.raises(SlidejaxError, match="was set aside"):
        Trainer(tiny(), config=config).resume(aside[0] / "3")
    monkeypatch.chdir(aside[0] / "3")  # the same, named another way
    with pytest.raises(SlidejaxError, match="was set aside"):
        Trainer(tiny(), config=config).resume(".")
    monkeypatch.chdir(tmp_path)
    assert _steps(aside[0]) == [3, 4] and _steps(ck) == [1, 2, 3, 4]
    assert main(["export", str(aside[0] / "4"), "--hf", str(tmp_path / "hf")]) == 0
    # The same trainer goes back to step 2 with a save of step 4 still in flight (which, landing,
    # prunes step 1), and keeps 3 checkpoints: its new steps are never deleted for the ones set
    # aside.
    c = Trainer(tiny(), config=config.replace(keep_last=3))
    c.resume("latest")
    c._ckpt.save(4, *_state(4), {"n": 4})  # a write in the background when resume starts
    with pytest.warns(UserWarning, match="steps 3, 4"):
        c.resume(ck / "2")
    c.fit(until_step=3)
    assert _steps(ck) == [2, 3]
    c.close()
    # Resuming the latest sets nothing aside.
    before = sorted(p.name for p in ck.iterdir())
    d = Trainer(tiny(), config=config)
    d.resume("latest")
    d.fit(until_step=4)
    d.close()
    assert sorted(p.name for p in ck.iterdir()) == sorted(before + ["4"])
    # A rename that fails: what was moved goes back, a warning says why; the trainer is resumed.
    rename, calls = os.rename, []

    def flaky(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError(13, "Permission denied")
        return rename(src, dst)

    monkeypatch.setattr(os, "rename", flaky)
    before = sorted(p.name for p in ck.iterdir())
    e = Trainer(tiny(), config=config)
    with pytest.warns(UserWarning, match="cannot set aside .*Permission denied"):
        e.resume(ck / "2")
    monkeypatch.undo()
    assert sorted(p.name for p in ck.iterdir()) == before and e.step_count == 2
    e.close()


def test_a_new_run_does_not_overwrite_another_runs_checkpoints(tmp_path):
    data = task_file(tmp_path / "d.jsonl", n=40)
    config = TrainConfig.load(model="tiny", **SMALL, steps=1, data=[str(data)], output_dir=str(tmp_path),
                              run_name="x")
    t = Trainer(tiny(), config=config)
    t.save(wait=True)
    t.close()
    before = files_digest(tmp_path / "x")
    with pytest.raises(SlidejaxError, match="already holds checkpoints of another run"):
        Trainer(tiny(), config=config).fit()
    assert files_digest(tmp_path / "x") == before


# ----------------------------------------------------------------------------------------------
# New processes: bit-exact resume, signals


def test_resume_in_a_new_process_is_bit_exact(tmp_path):
    """4 steps straight == 2 steps + save + a new process resuming + 2 steps (final fp32 masters
    and optimizer state compared bit for bit)."""
    data = task_file(tmp_path / "d.jsonl")
    out = tmp_path / "runs"
    common = ["--data", str(data), "--steps", "4", "--output-dir", str(out), *CLI_SMALL]
    straight = run_cli("train", *common, "--run-name", "straight")
    half = run_py(f"""
        import slidejax
        from slidejax.trainer import TrainConfig, Trainer
        config = TrainConfig.load(model="tiny", steps=4, data=[{str(data)!r}], output_dir={str(out)!r},
                                  run_name="split", **{SMALL!r})
        trainer = Trainer(slidejax.load_pretrained("tiny", dtype="float32"), config=config)
        print(trainer.fit(until_step=2)["checkpoint"])
        trainer.close()
    """)
    rc, stdout, err = finish(half)
    assert rc == 0, err
    assert stdout.strip().endswith("split/checkpoints/2")
    rc, _, err = finish(run_cli("train", "--resume", str(out / "split")))
    assert rc == 0, err
    rc, _, err = finish(straight)
    assert rc == 0, err

    a = Checkpointer(out / "straight" / "checkpoints", read_only=True)
    b = Checkpointer(out / "split" / "checkpoints", read_only=True)
    assert a.steps() == [4] and b.steps() == [2, 4]
    ra, rb = a.restore(4), b.restore(4)
    assert tree_equal(ra["params"], rb["params"])
    assert tree_equal(ra["optimizer"], rb["optimizer"])
    for key in ("step", "engine_step", "data", "rng", "total_steps"):
        assert ra["meta"][key] == rb["meta"][key], key
    assert int(rb["optimizer"]["layers.0"]["count"]) == 4  # the schedule's position
    assert [r["step"] for r in read_metrics(out / "split" / "metrics.jsonl") if r["kind"] == "train"] == [1, 2, 3, 4]


def test_sigterm_finishes_the_step_saves_and_exits(tmp_path):
    data = task_file(tmp_path / "d.jsonl")
    out = tmp_path / "runs"
    proc = run_cli("train", "--data", str(data), "--steps", "5000", "--output-dir", str(out), "--run-name", "r",
                   *CLI_SMALL)
    deadline = time.time() + 240
    while time.time() < deadline:
        steps = [r["step"] for r in read_metrics(out / "r" / "metrics.jsonl") if r.get("kind") == "train"]
        if len(steps) >= 2:
            break
        if proc.poll() is not None:
            pytest.fail(f"the run ended early: {proc.stderr.read()}")
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    rc, _, err = finish(proc, timeout=120)
    assert rc == 143, err
    assert "Traceback" not in err
    trained = [r["step"] for r in read_metrics(out / "r" / "metrics.jsonl") if r["kind"] == "train"]
    last = trained[-1]
    assert f"SIGTERM: stopped at step {last}; continue with: slidejax train --resume" in err
    folder, step = find_checkpoint(out / "r")
    assert step == last and trained == list(range(1, last + 1)) and last < 5000
    assert Checkpointer(folder, read_only=True).read_meta(step)["step"] == last


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals need the main thread")
def test_sigint_during_a_step_finishes_it_and_saves(tmp_path):
    data = task_file(tmp_path / "d.jsonl", n=100)
    config = TrainConfig.load(model="tiny", **SMALL, steps=50, data=[str(data)], output_dir=str(tmp_path),
                              run_name="r")
    trainer = Trainer(tiny(), config=config)
    engine_step = None

    def step_then_interrupt(batch, next_input_ids=None):
        out = engine_step(batch, next_input_ids)
        if trainer.engine.step_count == 3:
            os.kill(os.getpid(), signal.SIGINT)  # arrives while step 3 is still being recorded
        return out

    trainer.build()
    engine_step = trainer.engine.step
    trainer.engine.step = step_then_interrupt
    summary = trainer.fit()
    trainer.close()
    assert summary["interrupted"] == "SIGINT" and summary["step"] == 3
    assert summary["checkpoint"] == str(tmp_path / "r" / "checkpoints" / "3")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
