"""The command line: complete help, one clear line for each kind of bad input (with nothing
already saved touched), and `export` to a folder transformers loads with the same logits."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import slidejax
from slidejax import cli
from slidejax.presets import preset_path
from slidejax.trainer import TrainConfig, Trainer

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--seq-len", "32", "--micro-batch-size", "2", "--tokens-per-step", "128", "--no-progress"]


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        rc = cli.main(list(argv))
    except SystemExit as e:  # argparse (help, usage errors)
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def task_rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    rows = []
    for _ in range(n):
        pick = rng.choice(letters, size=int(rng.integers(3, 6)), replace=False)
        rows.append({"prompt": "sort " + " ".join(pick) + " =", "completion": " " + " ".join(sorted(pick))})
    return rows


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------
# Help


def test_train_help_lists_every_setting(capsys):
    rc, out, _ = run_main(capsys, "train", "--help")
    assert rc == 0
    for field in TrainConfig.fields():
        assert "--" + field.replace("_", "-") in out, field
    for word in ("--config", "--no-shuffle", "--resume", "supervised tokens", "130 / 143"):
        assert word in out


def test_help_of_every_command(capsys):
    rc, out, _ = run_main(capsys, "--help")
    assert rc == 0 and all(c in out for c in ("train", "export", "info"))
    rc, out, _ = run_main(capsys, "export", "--help")
    assert rc == 0 and "--hf" in out and "bfloat16" in out and "float32" in out and "RUN_OR_CHECKPOINT" in out
    rc, out, _ = run_main(capsys, "info", "--help")
    assert rc == 0 and "MODEL_OR_RUN" in out and "--seq-len" in out


def test_entry_points():
    exe = shutil.which("slidejax", path=str(Path(sys.executable).parent))
    assert exe is not None, "the slidejax console script is not installed"
    done = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "train" in done.stdout
    done = subprocess.run([sys.executable, "-m", "slidejax", "info", "tiny"], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "862,336" in done.stdout and "FLOPs/token" in done.stdout and "host RAM" in done.stdout


# ----------------------------------------------------------------------------------------------
# Bad input: one line, non-zero exit, nothing written


@pytest.fixture
def bad_model(tmp_path) -> Path:
    """A model folder with weights and config but no tokenizer files."""
    folder = tmp_path / "no_tokenizer"
    slidejax.load_pretrained("tiny").save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink(missing_ok=True)
    return folder


CASES = {
    "invalid json line": (["{bad"], "{data}:2: invalid JSON"),
    "missing field": (['{"prompt": "sort b a ="}'], "{data}:2: missing field 'completion'"),
    "empty dataset": (None, "{data}: no documents (empty data file)"),
    "overlong refused": (['{"prompt": "sort ' + "a " * 30 + '=", "completion": " a"}'], "more than seq_len=32"),
    "data file not found": ("missing", "data file not found"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_is_one_line_and_writes_nothing(tmp_path, capsys, case):
    extra, expected = CASES[case]
    data = tmp_path / "data.jsonl"
    if extra is None:
        data.write_text("")
    elif extra != "missing":
        write_lines(data, [json.dumps(task_rows(1)[0]), *extra])
    args = ["train", "--data", str(data), "--output-dir", str(tmp_path / "runs"), *SMALL]
    if case == "overlong refused":
        args += ["--on-overlong", "error"]
    rc, _, err = run_main(capsys, *args)
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert expected.format(data=data) in lines[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_missing_tokenizer(tmp_path, capsys, bad_model):
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in task_rows(3)])
    rc, _, err = run_main(capsys, "train", "--model", str(bad_model), "--data", str(data), "--output-dir",
                          str(tmp_path / "runs"), *SMALL)
    assert rc == 1 and err.count("\n") == 1
    assert f"error: {bad_model}: no tokenizer files" in err and "--tokenizer" in err
    assert not (tmp_path / "runs").exists()


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    rc, _, err = run_main(capsys, "train", "--output-dir", str(blocker / "runs"), *SMALL)
    assert rc == 1 and err.count("\n") == 1
    assert "cannot write the output folder" in err and str(blocker) in err


@pytest.mark.parametrize("argv, expected", [
    (["train", "--model", "no/such/folder"], "no/such/folder: no such model folder"),
    (["train", "--config", "{tmp}/none.toml"], "none.toml: config file not found"),
    (["train", "--resume", "{tmp}"], "no slidejax checkpoint here"),
    (["train", "--steps", "3", "--epochs", "1"], "set steps or epochs, not both"),
    (["train", "--tokens-per-step", "100"], "must be a multiple of micro_batch_size x seq_len"),
    (["export", "{tmp}", "--hf", "{tmp}/out"], "no slidejax checkpoint here"),
    (["info", "{tmp}/nothing"], "no such model folder"),
])
def test_bad_arguments_are_one_line(tmp_path, capsys, argv, expected):
    rc, _, err = run_main(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert rc == 1 and err.count("\n") == 1 and err.startswith("error: ") and expected in err, err


def test_bad_toml_setting(tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text("steps = 10\nlearnig_rate = 0.1\n")
    rc, _, err = run_main(capsys, "train", "--config", str(toml))
    assert rc == 1 and err == f"error: {toml}: unknown setting 'learnig_rate'\n"


# ----------------------------------------------------------------------------------------------
# A run to export and resume


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run of the tiny preset trained for one step (fp32), checkpointed."""
    tmp = tmp_path_factory.mktemp("cli")
    data = write_lines(tmp / "d.jsonl", [json.dumps(r) for r in task_rows(60)])
    config = TrainConfig.load(model="tiny", steps=1, seq_len=32, micro_batch_size=2, tokens_per_step=128,
                              lr=1e-2, progress=False, data=[str(data)], output_dir=str(tmp), run_name="run")
    trainer = Trainer(slidejax.load_pretrained("tiny", dtype="float32"), config=config)
    trainer.fit()
    trainer.close()
    return tmp / "run"


def test_resume_with_another_model_is_refused_and_changes_nothing(tmp_path, capsys, run_dir):
    other = tmp_path / "other"
    cfg = json.loads((preset_path("tiny") / "config.json").read_text())
    cfg.update(hidden_size=64, intermediate_size=96, head_dim=16)
    slidejax.from_config(slidejax.ModelConfig.from_hf_dict(cfg)).save_pretrained(other)
    before = digest(run_dir)
    rc, _, err = run_main(capsys, "train", "--resume", str(run_dir), "--model", str(other))
    assert rc == 1 and err.count("\n") == 1
    assert "checkpoint of a different model" in err and "hidden_size 128 vs 64" in err
    assert digest(run_dir) == before


def test_resume_with_other_data_is_refused_and_changes_nothing(tmp_path, capsys, run_dir):
    other = write_lines(tmp_path / "other.jsonl", [json.dumps(r) for r in task_rows(30, seed=9)])
    before = digest(run_dir)
    rc, _, err = run_main(capsys, "train", "--resume", str(run_dir), "--data", str(other))
    assert rc == 1 and err.count("\n") == 1
    assert f"error: {other}: differs from the data the state was saved with" in err
    assert digest(run_dir) == before


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, capsys, run_dir, dtype):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    rc, stdout, err = run_main(capsys, "export", str(run_dir), "--hf", str(out), "--dtype", dtype)
    assert rc == 0, err
    assert f"exported step 1 of {run_dir}" in stdout
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert next(hf.parameters()).dtype == getattr(torch, dtype)
    tok = AutoTokenizer.from_pretrained(out)
    ids = np.asarray([tok("sort q d k = d k q")["input_ids"]], np.int64)
    with torch.no_grad():
        theirs = hf.float()(torch.as_tensor(ids)).logits.numpy()  # fp32 compute on the saved weights
    # The same saved weights through slidejax's own layer-by-layer path ...
    reloaded = slidejax.load_pretrained(out, dtype="float32").logits(ids.astype(np.int32))
    np.testing.assert_allclose(theirs, reloaded, rtol=1e-4, atol=1e-4)
    # ... and the run's fp32 masters (equal in fp32, within bf16 rounding of the weights in bf16).
    trained = Trainer.restore(run_dir).model.logits(ids.astype(np.int32))
    tol = 1e-4 if dtype == "float32" else 0.1
    np.testing.assert_allclose(theirs, trained, rtol=tol, atol=tol)
    assert not np.allclose(trained, slidejax.load_pretrained("tiny", dtype="float32").logits(ids.astype(np.int32)),
                           atol=1e-3)  # the export holds the trained weights, not the initial ones


def test_info_on_a_run(capsys, run_dir):
    rc, out, _ = run_main(capsys, "info", str(run_dir))
    assert rc == 0 and "checkpoints  1 (latest 1)" in out and "last step    1: loss" in out


def test_train_caps_xla_allocator_before_jax_starts(tmp_path, capsys, monkeypatch):
    """The budget (flag or TOML) reaches `limit_device_memory` before anything starts jax's
    backend (joining the processes does); without one it is called with None."""
    from slidejax import engine as engine_mod

    calls = []
    monkeypatch.setattr(engine_mod, "limit_device_memory", lambda budget: calls.append(("limit", budget)))

    def stop(args):
        calls.append(("join",))
        raise slidejax.SlidejaxError("stopped here")

    monkeypatch.setattr(cli, "_join_processes", stop)
    rc, _, err = run_main(capsys, "train", "--gpu-memory", "24GB", *SMALL)
    assert rc == 1 and "stopped here" in err
    toml = tmp_path / "run.toml"
    toml.write_text('gpu_memory = "10GiB"\n')
    run_main(capsys, "train", "--config", str(toml), *SMALL)
    run_main(capsys, "train", *SMALL)
    assert calls == [("limit", "24GB"), ("join",), ("limit", "10GiB"), ("join",), ("limit", None), ("join",)]
