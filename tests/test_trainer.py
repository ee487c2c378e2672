"""The trainer: settings, schedule, one step against a whole-model reference, fit with its logs,
evaluation and the task metric, the FLOP formula, host memory checks, engine plumbing.

Every trainer here uses the same tiny shapes (the tiny preset in fp32, rows of 32 tokens, 2 rows
per micro-batch, 2 micro-batches per step), so the engine's compiled stage functions are shared
across the module.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import slidejax
from slidejax import reference
from slidejax.config import ModelConfig
from slidejax.data import DataLoader, encode_prompt
from slidejax.errors import SlidejaxError
from slidejax.host_optimizer import HostAdamW, HostOptax, decay_mask
from slidejax.metrics import flop_params, flops_per_token, read_metrics
from slidejax.presets import preset_path
from slidejax.trainer import (TrainConfig, Trainer, check_host_memory, greedy_generate, host_memory_need,
                              lr_schedule, read_toml)

SMALL = dict(seq_len=32, micro_batch_size=2, tokens_per_step=128, progress=False, task_examples=4,
             save_every=0, eval_every=0)


def small(**changes) -> TrainConfig:
    """Settings of the tiny preset at the module's shapes, with `changes`."""
    return TrainConfig.load(model="tiny", **{**SMALL, **changes})


def tiny_model() -> slidejax.Model:
    return slidejax.load_pretrained("tiny", dtype="float32")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def sort_rows(rng: np.random.Generator, n: int) -> list[dict]:
    """Fresh examples of the preset's task (distinct letters, sorted)."""
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    rows = []
    for _ in range(n):
        pick = rng.choice(letters, size=int(rng.integers(3, 6)), replace=False)
        rows.append({"prompt": "sort " + " ".join(pick) + " =", "completion": " " + " ".join(sorted(pick))})
    return rows


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ----------------------------------------------------------------------------------------------
# Settings


def test_config_precedence_defaults_preset_toml_flags(tmp_path):
    plain = TrainConfig()
    assert plain.lr == 2e-5 and plain.seq_len == 2048 and plain.steps is None
    assert plain.resident_layers == "auto"
    preset = TrainConfig.load(model="tiny")
    assert (preset.lr, preset.seq_len, preset.steps, preset.micro_batches) == (2e-3, 128, 64, 2)
    toml = tmp_path / "run.toml"
    toml.write_text('lr = 1e-3\nseq-len = 64\ndata = "a.jsonl"\nshuffle = false\nhost_memory = "2GB"\n')
    c = TrainConfig.load(toml, model="tiny", seq_len=32, steps=None)
    assert c.lr == 1e-3 and c.seq_len == 32 and c.steps == 64  # flag > toml > preset; None = not given
    assert c.data == ["a.jsonl"] and c.shuffle is False and c.host_memory == "2GB"
    # The saved TOML reads back to the same settings.
    again = tmp_path / "again.toml"
    again.write_text(c.to_toml())
    assert TrainConfig.from_dict(read_toml(again)) == c
    # steps and epochs are one choice: naming one drops the other from the layers below.
    assert (TrainConfig.load(model="tiny", epochs=2).steps, TrainConfig.load(model="tiny", epochs=2).epochs) == (None, 2)
    with pytest.raises(SlidejaxError, match="set steps or epochs, not both"):
        TrainConfig.from_dict({"steps": 3, "epochs": 1})


@pytest.mark.parametrize("value, expected", [("'auto'", "auto"), ("3", 3), ("'2'", 2)])
def test_resident_layers_from_toml(tmp_path, value, expected):
    """A count or "auto" in a TOML file (as a run's saved config.toml holds it) reads back."""
    path = tmp_path / "run.toml"
    path.write_text(f"resident_layers = {value}\n")
    c = TrainConfig.load(path)
    assert c.resident_layers == expected
    again = tmp_path / "again.toml"
    again.write_text(c.to_toml())
    assert TrainConfig.load(again).resident_layers == expected


@pytest.mark.parametrize("text, message", [
    ("learning_rate = 1e-3\n", "unknown setting 'learning_rate'"),
    ("steps = 'ten'\n", "setting 'steps' must be an integer"),
    ("resident_layers = 'most'\n", "setting 'resident_layers' must be an integer or 'auto'"),
    ("resident_layers = 1.5\n", "setting 'resident_layers' must be an integer or 'auto'"),
    ("lr = 1e-3\n[optimizer]\nb1 = 0.8\n", "tables ([optimizer]) are not used"),
    ("lr = \n", "invalid TOML"),
])
def test_bad_toml_is_one_clear_line(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(SlidejaxError) as e:
        TrainConfig.load(path)
    assert message in str(e.value) and "\n" not in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize("changes, message", [
    (dict(epochs=0), "epochs must be positive"),
    (dict(tokens_per_step=100, micro_batch_size=2, seq_len=32), "must be a multiple of micro_batch_size x seq_len"),
    (dict(lr=0.0), "lr must be a positive number"),
    (dict(schedule="exp"), "schedule 'exp' is not one of"),
    (dict(host_memory="lots"), "host_memory: cannot read memory size"),
    (dict(seq_len=0), "seq_len must be positive"),
    (dict(run_name="a/b"), "plain folder name"),
    (dict(warmup=10.5), "warmup must be a whole number of steps"),
])
def test_impossible_settings_are_refused(changes, message):
    with pytest.raises(SlidejaxError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig.load(**changes)


@pytest.mark.parametrize("warmup, total, steps", [(0.1, 95, 10), (0.1, 90, 9), (0.03, 1000, 30), (0.5, 3, 2),
                                                  (0.0, 50, 0), (1, 50, 1), (7.0, 50, 7),
                                                  (0.1, 85, 9), (0.07, 100, 7)])
def test_warmup_steps_as_transformers_counts_them(warmup, total, steps):
    """A fraction rounds up (transformers' warmup_ratio: ceil(total * ratio)); steps are steps."""
    assert TrainConfig.load(warmup=warmup).warmup_steps(total) == steps


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_schedule_values(schedule):
    lr, warm, total = 0.01, 4, 20
    fn = lr_schedule(lr, schedule, warm, total)
    for t in range(total + 2):
        if t < warm:
            want = lr * (t + 1) / warm
        else:
            p = min(1.0, (t - warm) / (total - warm))
            want = {"constant": lr, "linear": lr * (1 - p), "cosine": lr * 0.5 * (1 + math.cos(math.pi * p))}[schedule]
        assert float(fn(t)) == pytest.approx(want, rel=1e-6, abs=1e-9), t
    assert float(fn(total - 1)) > 0 or schedule == "constant"  # the last step still learns


# ----------------------------------------------------------------------------------------------
# One step against the whole-model reference


def _lr_table(config: TrainConfig, total: int) -> np.ndarray:
    """The schedule written out by hand (warm-up from lr/W, then cosine to 0)."""
    w = config.warmup_steps(total)
    out = []
    for t in range(total):
        if t < w:
            out.append(config.lr * (t + 1) / w)
        else:
            out.append(config.lr * 0.5 * (1 + math.cos(math.pi * (t - w) / (total - w))))
    return np.asarray(out, np.float32)


def test_steps_match_whole_model_reference(tmp_path):
    model = tiny_model()
    config = small(steps=4, lr=1e-3, warmup=2, weight_decay=0.1,
                              max_grad_norm=0.5, output_dir=str(tmp_path))
    trainer = Trainer(model, config=config)
    cfg = model.config
    params = jax.tree.map(jnp.asarray, model.host.tree())  # copies of the initial masters
    table = jnp.asarray(_lr_table(config, 4))
    tx = optax.adamw(lambda c: table[c], weight_decay=0.1, mask=decay_mask(params))
    opt_state = tx.init(params)
    step = jax.jit(lambda p, s, b: reference.train_step(p, s, tx, cfg, b, 0.5))
    loader = DataLoader(preset_path("tiny") / "train.jsonl", model.tokenizer(), seq_len=32, micro_batch_size=2,
                        micro_batches_per_step=2, seed=3)
    for k in range(2):
        batch = next(loader)
        got = trainer.step(batch)
        b = {f: jnp.asarray(getattr(batch, f)) for f in ("input_ids", "labels", "positions", "segment_ids")}
        params, opt_state, loss, norm = step(params, opt_state, b)
        assert got["step"] == k + 1
        assert got["loss"] == pytest.approx(float(loss), rel=1e-5)
        assert got["grad_norm"] == pytest.approx(float(norm), rel=1e-4)
        assert got["clip_scale"] == pytest.approx(min(1.0, 0.5 / float(norm)), rel=1e-4) and got["clip_scale"] < 1
        assert got["lr"] == pytest.approx(float(table[k]), rel=1e-6)
        assert got["tokens"] == int(np.sum(batch.labels != -100)) and got["positions"] == 128
    mine = trainer.model.params()
    for name, ref in [("embed", params["embed"]), ("lm_head", params["lm_head"]), ("norm", params["norm"])]:
        assert rel_err(mine[name], ref) < 1e-4, name
    for i, layer in enumerate(params["layers"]):
        for n, ref in layer.items():
            assert rel_err(mine["layers"][i][n], ref) < 1e-4, (i, n)
    assert not np.allclose(mine["layers"][0]["mlp.up_proj.weight"], tiny_model().host.tree()["layers"][0]["mlp.up_proj.weight"])


def test_optax_optimizer_through_the_trainer():
    model = tiny_model()
    tx = optax.chain(optax.add_decayed_weights(0.01), optax.sgd(0.3, momentum=0.9))
    trainer = Trainer(model, tx, small(steps=2, max_grad_norm=0.0))
    params = jax.tree.map(jnp.asarray, model.host.tree())
    opt_state = tx.init(params)
    loader = DataLoader(preset_path("tiny") / "train.jsonl", model.tokenizer(), seq_len=32, micro_batch_size=2,
                        micro_batches_per_step=2, seed=5)
    batch = next(loader)
    got = trainer.step(batch)
    assert isinstance(trainer.optimizer, HostOptax)
    b = {f: jnp.asarray(getattr(batch, f)) for f in ("input_ids", "labels", "positions", "segment_ids")}
    params, _, loss, _ = jax.jit(lambda p, s, b: reference.train_step(p, s, tx, model.config, b, 0.0))(params, opt_state, b)
    assert got["loss"] == pytest.approx(float(loss), rel=1e-5)
    assert got["lr"] is None  # an optax transformation's rate is its own business
    assert rel_err(trainer.model.params()["layers"][1]["self_attn.o_proj.weight"],
                   params["layers"][1]["self_attn.o_proj.weight"]) < 1e-4


# ----------------------------------------------------------------------------------------------
# fit: logs, progress, plot, eval and the task metric


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A short fit on fresh task data with eval every 3 steps."""
    tmp = tmp_path_factory.mktemp("fit")
    rng = np.random.default_rng(11)
    train = write_jsonl(tmp / "train.jsonl", sort_rows(rng, 300))
    evals = write_jsonl(tmp / "eval.jsonl", sort_rows(rng, 5))
    config = small(progress=True, steps=6, lr=3e-3, warmup=0, eval_every=3,
                              output_dir=str(tmp), run_name="run", data=[str(train)], eval_data=[str(evals)])
    trainer = Trainer(tiny_model(), config=config)
    summary = trainer.fit()
    trainer.close()
    return trainer, summary, tmp / "run"


def test_fit_runs_the_schedule_and_logs_every_step(fitted):
    trainer, summary, run = fitted
    assert summary["step"] == 6 and summary["interrupted"] is None
    records = read_metrics(run / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert train[-1]["loss"] < train[0]["loss"] and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    for r in train:
        assert set(r) >= {"loss", "grad_norm", "lr", "tokens", "positions", "tokens_per_s", "tflops", "host_rss_bytes"}
        assert "gpu_peak_bytes" not in r  # the CPU backend reports none: omitted, not zero
        assert r["tflops"] == pytest.approx(flops_per_token(trainer.model.config, 32) * r["tokens_per_s"] / 1e12)
        assert r["tokens_per_s"] == pytest.approx(r["positions"] / r["step_seconds"])
    assert [r["loss"] for r in train] == [r["loss"] for r in trainer.history if r["kind"] == "train"]
    assert (run / "config.toml").is_file() and (run / "model" / "tokenizer.json").is_file()
    assert summary["checkpoint"] == str(run / "checkpoints" / "6")


def test_tensorboard_events_hold_the_logged_scalars(fitted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, run = fitted
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    records = read_metrics(run / "metrics.jsonl")
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    want = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    assert [s for s, _ in loss] == [s for s, _ in want]
    np.testing.assert_allclose([v for _, v in loss], [v for _, v in want], rtol=1e-6)
    assert [e.step for e in acc.Scalars("eval/eval_loss")] == [0, 3, 6]
    assert {"train/lr", "train/tokens_per_s", "train/tflops", "eval/exact_match"} <= set(acc.Tags()["scalars"])


def test_tensorboard_takes_numpy_scalars(tmp_path):
    """Records with numpy scalars (a direct API user's values) reach TensorBoard, as in the JSONL."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from slidejax.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path)
    loss = float(np.random.default_rng().uniform(1, 5))
    logger.log({"kind": "train", "step": 1, "loss": np.float32(loss), "tokens_per_s": np.int64(100),
                "grad_norm": 0.5, "lr": 1e-3})
    logger.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert {"train/loss", "train/tokens_per_s", "train/grad_norm"} <= set(acc.Tags()["scalars"])
    assert acc.Scalars("train/loss")[0].value == pytest.approx(loss, rel=1e-6)


def test_loss_curve_png(fitted):
    _, summary, run = fitted
    png = Path(summary["plot"])
    assert png == run / "loss.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_progress_reports_eval_and_steps(fitted, capsys):
    from slidejax.metrics import Progress

    trainer, _, _ = fitted
    p = Progress(10, 0, enabled=True)
    line = p.line(next(r for r in trainer.history if r["kind"] == "train"))
    for key in ("step 1/10", "loss", "tok/s", "TFLOP/s", "rss", "eta"):
        assert key in line
    p.close()


def test_evaluate_matches_reference_loss_and_greedy_decoding(fitted):
    trainer, _, _ = fitted
    record = trainer.evaluate()
    cfg = trainer.model.config
    params = jax.tree.map(jnp.asarray, trainer.model.params())
    # Eval loss: the reference mean loss of every eval batch, token-weighted.
    loader = DataLoader(trainer.config.eval_data, trainer.tokenizer, seq_len=32, micro_batch_size=2,
                        micro_batches_per_step=2, shuffle=False, num_epochs=1)
    total, count = 0.0, 0
    for batch in loader:
        b = {f: jnp.asarray(getattr(batch, f)) for f in ("input_ids", "labels", "positions", "segment_ids")}
        total += float(reference.mean_loss(params, cfg, b)) * batch.num_targets
        count += batch.num_targets
    assert record["eval_tokens"] == count
    assert record["eval_loss"] == pytest.approx(total / count, rel=1e-5)
    # Exact match: the same predictions as a one-prompt-at-a-time greedy decode on the reference.
    prompts, refs = trainer._task
    tok = trainer.tokenizer
    max_new = max(len(tok(r, add_special_tokens=False)["input_ids"]) for r in refs) + 2
    preds = []
    for p in prompts:
        ids = encode_prompt(tok, p)
        out = []
        for _ in range(max_new):
            x = jnp.asarray([ids + out], jnp.int32)
            z = reference.logits(params, cfg, x, jnp.arange(x.shape[1])[None])
            t = int(jnp.argmax(z[0, -1]))
            if t == tok.eos_token_id:
                break
            out.append(t)
        preds.append(tok.decode(out, skip_special_tokens=True))
    assert greedy_generate(trainer.model, tok, prompts, max_new) == preds
    expected = sum(p.strip() == r.strip() for p, r in zip(preds, refs)) / len(refs)
    assert record["exact_match"] == pytest.approx(expected)
    assert record["samples"][0]["prompt"] == prompts[0]


def test_task_metric_rises_when_the_model_learns(tmp_path):
    """A model that knows the answers scores 1; the untrained one 0 (the metric can move)."""
    model = tiny_model()
    tok = model.tokenizer()
    assert greedy_generate(model, tok, ["sort b a ="], 4) != [" a b"]
    # Teach the answer by overfitting one example for a few steps.
    rows = [{"prompt": "sort b a =", "completion": " a b"}] * 64
    data = write_jsonl(tmp_path / "one.jsonl", rows)
    config = small(steps=30, lr=1e-2, warmup=0, schedule="constant",
                              output_dir=str(tmp_path), eval_every=0, data=[str(data)], eval_data=[str(data)],
                              task_examples=1)
    trainer = Trainer(model, config=config)
    summary = trainer.fit()
    trainer.close()
    assert summary["eval"]["exact_match"] == 1.0
    assert greedy_generate(model, tok, ["sort b a ="], 4) == [" a b"]


# ----------------------------------------------------------------------------------------------
# Data lengths and warnings


def test_epochs_count_the_steps_and_overlong_documents_are_counted(tmp_path, capsys):
    rng = np.random.default_rng(2)
    rows = sort_rows(rng, 40) + [{"prompt": "sort " + "a " * 40 + "=", "completion": " a"}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    config = small(epochs=1, output_dir=str(tmp_path), eval_every=5,
                              data=[str(data)], lr=1e-3)
    trainer = Trainer(tiny_model(), config=config)
    summary = trainer.fit()
    trainer.close()
    expected = DataLoader(str(data), trainer.tokenizer, seq_len=32, micro_batch_size=2, micro_batches_per_step=2,
                          num_epochs=1, seed=0).count_steps()
    assert summary["step"] == summary["total_steps"] == expected
    assert summary["documents_truncated"] == 1
    # Each step's epoch is where its own batch ends in the data (fit has read one batch ahead).
    fresh = DataLoader(str(data), trainer.tokenizer, seq_len=32, micro_batch_size=2, micro_batches_per_step=2,
                       num_epochs=1, seed=0)
    ends = []
    with pytest.warns(UserWarning, match="truncated"):
        for _ in fresh:
            ends.append(round(fresh.epochs_read, 6))
    train = [r for r in read_metrics(trainer.run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["epoch"] for r in train] == ends and ends[-1] == 1.0 and ends[0] < 0.5
    err = capsys.readouterr().err
    assert "warning:" in err  # one line, through the progress writer
    assert summary["eval"] is None  # the preset's eval data is not used for other data
    assert "eval_every=5 does nothing: there is no eval data" in err


def test_resume_with_more_epochs_recounts_the_steps(tmp_path):
    """An epoch-based run resumed with a larger `epochs` trains the new count (and its schedule);
    resumed as it was, it keeps the saved count."""
    rng = np.random.default_rng()
    data = write_jsonl(tmp_path / "d.jsonl", sort_rows(rng, 24))
    config = small(epochs=1, output_dir=str(tmp_path), run_name="a", data=[str(data)], lr=1e-3)
    first = Trainer(tiny_model(), config=config)
    one_epoch = first.fit()["step"]
    first.close()
    again = Trainer.restore(tmp_path / "a")
    assert again.total_steps == one_epoch
    again.close()
    more = Trainer.restore(tmp_path / "a", epochs=3, resume=str(tmp_path / "a"))  # as the CLI sets it
    three = DataLoader(str(data), more.tokenizer, seq_len=32, micro_batch_size=2, micro_batches_per_step=2,
                       num_epochs=3, seed=0).count_steps()
    assert three > one_epoch and more.total_steps == three
    assert more.fit()["step"] == three
    more.close()
    settings = read_toml(tmp_path / "a" / "config.toml")  # the run's settings, not the resume
    assert settings["epochs"] == 3 and "resume" not in settings


def test_task_examples_read_an_eval_file_with_a_byte_order_mark(tmp_path):
    """The task metric reads prompt/completion eval files as the loader does, BOM included."""
    from slidejax.trainer import _prompt_completion_examples

    rows = sort_rows(np.random.default_rng(), 3)
    path = tmp_path / "eval.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode())
    prompts, refs = _prompt_completion_examples([str(path)], 8)
    assert prompts == [r["prompt"] for r in rows] and refs == [r["completion"] for r in rows]


def test_config_toml_with_characters_beyond_the_bmp_reads_back(tmp_path):
    c = small(data=[str(tmp_path / "daten_\U0001F600.jsonl")], run_name="r\u00e9")
    path = tmp_path / "config.toml"
    path.write_text(c.to_toml(), encoding="utf-8")
    back = read_toml(path)
    assert back["data"] == c.data and back["run_name"] == c.run_name


# ----------------------------------------------------------------------------------------------
# FLOPs and memory


def test_flop_formula_matches_transformers_parameter_count_and_bench():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    for tied in (False, True):
        cfg = ModelConfig(model_type="llama", vocab_size=101, hidden_size=32, intermediate_size=40, num_layers=3,
                          num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=tied)
        hf = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.to_hf_dict().items() if k != "architectures"}))
        embed = hf.model.embed_tokens.weight.numel()
        n_unique = sum(p.numel() for p in hf.parameters())
        # N excludes the embedding lookup; a tied head still costs its matmul.
        assert flop_params(cfg) == n_unique - embed + (embed if tied else 0)
        assert flops_per_token(cfg, 64) == 6 * flop_params(cfg) + 6 * 3 * 64 * 4 * 8
    del torch
    from bench.common import ModelShape, flops_per_token as bench_fpt

    shape = ModelShape(hidden=32, intermediate=40, heads=4, kv_heads=2, head_dim=8, vocab=101)
    cfg = ModelConfig(model_type="llama", vocab_size=101, hidden_size=32, intermediate_size=40, num_layers=3,
                      num_heads=4, num_kv_heads=2, head_dim=8)
    assert flops_per_token(cfg, 128) == bench_fpt(shape, 3, 128)


def test_host_memory_budget_is_checked_up_front():
    cfg = ModelConfig.from_pretrained(preset_path("tiny"))
    config = TrainConfig.load(model="tiny")
    need = host_memory_need(cfg, config)
    assert need["masters"] == 4 * cfg.num_params and need["optimizer"] == 8 * cfg.num_params
    base = sum(v for k, v in need.items() if k != "snapshot")
    with pytest.raises(SlidejaxError, match="host memory: this run needs about .* more than the host_memory budget"):
        check_host_memory(cfg, config.replace(host_memory=str(base - 1)))
    assert check_host_memory(cfg, config.replace(host_memory=str(base + need["snapshot"])))[0] is True
    # Room for the run but not for a checkpoint snapshot: saves are written without one.
    assert check_host_memory(cfg, config.replace(host_memory=str(base + 1)))[0] is False
    bf16 = host_memory_need(cfg, config.replace(moment_dtype="bfloat16"))
    assert bf16["optimizer"] == 4 * cfg.num_params
    # Resident layers come back to the host at every checkpoint: the need is that of none.
    assert host_memory_need(cfg, config.replace(resident_layers=1)) == need


def test_optax_state_estimate_equals_the_engine_state():
    model = tiny_model()
    tx = optax.adamw(1e-3)
    trainer = Trainer(model, tx, small(steps=2))
    trainer.build()
    actual = sum(np.asarray(x).nbytes for u in trainer.engine.state_dict()["units"].values()
                 for x in jax.tree.leaves(u["opt"]["opt_state"]))
    assert host_memory_need(model.config, trainer.config, trainer.optimizer)["optimizer"] == actual


def test_gpu_memory_is_passed_to_the_engine_only_when_set(monkeypatch):
    import slidejax.engine as engine_mod

    seen = []

    class Recorder:
        def __init__(self, host, opt, **kwargs):
            seen.append(dict(kwargs, opt=opt))

    monkeypatch.setattr(engine_mod, "SlidingEngine", Recorder)
    for budget in ("24GB", None):
        model = tiny_model()
        model.attach = lambda engine: None
        Trainer(model, None, small(steps=1, gpu_memory=budget, moment_dtype="bfloat16", resident_layers=1,
                                   prefetch=3, max_grad_norm=0.0, weight_decay=0.05, trace="t.json",
                                   compute_dtype="bfloat16")).build()
    assert seen[0]["gpu_memory"] == "24GB" and "gpu_memory" not in seen[1]
    k = seen[0]
    assert (k["compute_dtype"], k["max_grad_norm"], k["prefetch"], k["resident_layers"], k["trace"]) == \
        ("bfloat16", 0.0, 3, 1, True)
    assert isinstance(k["opt"], HostAdamW) and k["opt"].moment_dtype.name == "bfloat16"
    assert k["opt"].weight_decay == 0.05


def test_trace_file(tmp_path):
    trace = tmp_path / "trace.json"
    data = write_jsonl(tmp_path / "d.jsonl", sort_rows(np.random.default_rng(8), 40))
    trainer = Trainer(tiny_model(), config=small(steps=2, trace=str(trace), data=[str(data)], output_dir=str(tmp_path)))
    trainer.fit()
    trainer.close()
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name", "").startswith("fwd") for e in events)
    assert any(e.get("name", "").startswith("update") for e in events)


# ----------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
def test_fit_checkpoint_and_resume_on_gpu_in_bf16(tmp_path):
    """bf16 on the GPU with a memory budget: the loss falls, GPU peak memory is reported, and a
    restored run continues to the same weights as the straight one."""
    import shutil

    data = write_jsonl(tmp_path / "d.jsonl", sort_rows(np.random.default_rng(4), 200))
    config = small(steps=8, lr=3e-3, warmup=0, gpu_memory="8GB", data=[str(data)], output_dir=str(tmp_path),
                   run_name="straight", compute_dtype="auto")
    trainer = Trainer(slidejax.load_pretrained("tiny"), config=config)
    assert trainer.compute_dtype == "bfloat16"
    trainer.fit(until_step=4)
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    summary = trainer.fit()
    trainer.close()
    train = [r for r in trainer.history if r["kind"] == "train"]
    assert summary["step"] == 8 and train[-1]["loss"] < train[0]["loss"]
    assert all(r["gpu_peak_bytes"] > 0 for r in train) and train[-1]["tflops"] > 0
    resumed = Trainer.restore(tmp_path / "resumed")
    assert resumed.step_count == 4 and resumed.compute_dtype == "bfloat16"
    resumed.fit()
    resumed.close()
    for name, unit in trainer.model.host.units.items():
        other = resumed.model.host.units[name].master
        diff = float(np.max(np.abs(unit.master - other)))
        assert diff == 0.0, f"{name}: resumed run differs by {diff} (non-deterministic GPU ops?)"


def test_default_resident_layers_fill_a_gpu_budget_and_train_alike(tmp_path):
    """resident_layers' default ("auto") keeps layers on the device when a budget is given (none
    on a CPU without one); the two runs train to the same losses up to float rounding (resident
    layers are updated by jitted optax, streamed ones by the host AdamW)."""
    data = write_jsonl(tmp_path / "d.jsonl", sort_rows(np.random.default_rng(11), 60))
    runs = {}
    for name, budget in (("budget", "2GB"), ("none", None)):
        trainer = Trainer(tiny_model(), config=small(steps=3, gpu_memory=budget, data=[str(data)], shuffle=False,
                                                     output_dir=str(tmp_path), run_name=name))
        trainer.fit()
        trainer.close()
        runs[name] = (trainer.engine.resident_layers, [r["loss"] for r in trainer.history if r["kind"] == "train"])
    assert runs["budget"][0] > 0 and runs["none"][0] == 0
    np.testing.assert_allclose(runs["budget"][1], runs["none"][1], rtol=1e-4)
    assert runs["budget"][1][-1] != runs["budget"][1][0]


def test_restore_brings_back_resident_layers_weights(tmp_path, monkeypatch):
    """Resuming with resident layers: their weights come from the checkpoint, not from the fresh
    engine's device copy. On the CPU backend an upload may share the host array's memory, which
    hid the difference; here it copies, as on a GPU."""
    import jax

    from slidejax.engine import SlidingEngine

    def put_master(self, unit):
        return jax.block_until_ready(jax.device_put(np.array(unit.master, copy=True), self.dev_sharding))

    monkeypatch.setattr(SlidingEngine, "_put_master", put_master)
    data = write_jsonl(tmp_path / "d.jsonl", sort_rows(np.random.default_rng(0), 40))
    config = small(steps=3, lr=3e-3, warmup=0, output_dir=str(tmp_path), run_name="a", data=[str(data)],
                   resident_layers=1)
    trainer = Trainer(tiny_model(), config=config)
    trainer.fit()
    path = trainer.save(wait=True)
    trainer.engine.sync()
    saved = {n: u.master.copy() for n, u in trainer.model.host.units.items()}
    trainer.close()
    fresh = Trainer.restore(path)
    fresh.engine.sync()
    assert "layers.0" in fresh.engine.resident
    for name, unit in fresh.model.host.units.items():
        np.testing.assert_array_equal(unit.master, saved[name], err_msg=name)
