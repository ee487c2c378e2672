"""The sliding engine computes the update of a plain whole-model `jax.grad` + optax step.

Every configuration trains a tiny random model for several steps with the engine (fp32 compute,
host AdamW) and with `slidejax.reference.train_step` (whole model on one device, naive full-logits
loss, the same optax transformation) on the same batches, and compares all parameters.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from slidejax import reference
from slidejax.config import ModelConfig
from slidejax.engine import SlidingEngine
from slidejax.errors import SlidejaxError
from slidejax.host_memory import HostModel, vocab_chunks
from slidejax.host_optimizer import HostAdamW, HostOptax
from slidejax.model import init_params

B, S = 2, 8
RTOL = 1e-5


def make_cfg(tied: bool, vocab: int, layers: int = 3) -> ModelConfig:
    return ModelConfig(model_type="llama", vocab_size=vocab, hidden_size=32, intermediate_size=48,
                       num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=tied)


@functools.lru_cache(maxsize=None)
def adamw() -> HostAdamW:
    # A small lr keeps Adam's sign-like update of near-zero gradients from amplifying rounding noise.
    return HostAdamW(learning_rate=optax.linear_schedule(5e-4, 1e-4, 8), weight_decay=0.1, eps=1e-6)


@functools.lru_cache(maxsize=None)
def reference_step(cfg: ModelConfig, clip: float, tx_key: str):
    tx = tx_for(tx_key)
    return jax.jit(lambda p, s, b: reference.train_step(p, s, tx, cfg, b, clip))


@functools.lru_cache(maxsize=None)
def tx_for(key: str) -> optax.GradientTransformation:
    if key == "adamw":
        return adamw().to_optax(mask=lambda p: jax.tree.map(lambda a: a.ndim > 1, p))
    return optax.chain(optax.add_decayed_weights(0.01), optax.sgd(0.05, momentum=0.9))


def random_batch(rng: np.random.Generator, vocab: int, M: int, packed: bool) -> dict[str, np.ndarray]:
    ids = rng.integers(0, vocab, (M, B, S)).astype(np.int32)
    labels = rng.integers(0, vocab, (M, B, S)).astype(np.int32)
    labels[rng.random((M, B, S)) < 0.3] = -100
    seg = np.ones((M, B, S), np.int32)
    pos = np.broadcast_to(np.arange(S, dtype=np.int32), (M, B, S)).copy()
    if packed:  # two documents per row, and a padded tail in the first row
        cut = int(rng.integers(2, S - 2))
        seg[..., cut:] = 2
        pos[..., cut:] -= cut
        seg[:, 0, S - 1] = 0
        pos[:, 0, S - 1] = 0
        labels[:, 0, S - 1] = -100
    return {"input_ids": ids, "labels": labels, "segment_ids": seg, "positions": pos}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def run_case(*, tied=False, vocab=97, M=2, prefetch=2, resident=0, clip=0.0, steps=3, packed=True,
             split=None, opt="adamw", layers=3, seed=0, gpu_update=0, speculative=0, wrong_next=False,
             expect_deferred=False, max_lag=None):
    cfg = make_cfg(tied, vocab, layers)
    rng = np.random.default_rng(seed)
    host = HostModel(cfg)
    host.load_tree(init_params(cfg, seed=int(rng.integers(1 << 30))))
    ref_params = jax.tree.map(jnp.asarray, host.tree())
    tx = tx_for(opt)
    ref_state = tx.init(ref_params)
    optimizer = adamw() if opt == "adamw" else HostOptax(tx)
    engine = SlidingEngine(host, optimizer, compute_dtype="float32", prefetch=prefetch,
                           resident_layers=resident, max_grad_norm=clip, gpu_update_layers=gpu_update,
                           speculative_units=speculative)
    if max_lag is not None:
        engine.max_deferred_steps = max_lag
    step_ref = reference_step(cfg, clip, opt)
    batches = [random_batch(rng, vocab, M, packed) for _ in range(steps)]
    for t, batch in enumerate(batches):
        engine_batch = batch
        if split is not None:  # the same tokens, cut into `split` micro-batches
            engine_batch = {k: v.reshape(split, -1, S) for k, v in batch.items()}
        nxt = batches[t + 1]["input_ids"] if t + 1 < len(batches) else None
        if wrong_next and nxt is not None:  # a caller's wrong promise: other tokens come next
            nxt = (nxt + 1 + rng.integers(0, vocab - 1, nxt.shape)).astype(np.int32) % vocab
        metrics = engine.step(engine_batch, next_input_ids=nxt)
        ref_params, ref_state, loss, norm = step_ref(ref_params, ref_state, {k: jnp.asarray(v) for k, v in batch.items()})
        assert metrics.loss == pytest.approx(float(loss), rel=1e-5)
        assert metrics.grad_norm == pytest.approx(float(norm), rel=1e-4)
        if expect_deferred:  # rows without a gradient owe the step; the next losses still match
            engine.worker.join()
            assert sum(engine.opt_state[u.name].behind().size for u in host.embed_units) > 0
            for u in host.embed_units:
                st = engine.opt_state[u.name]
                if st.row_count is not None:
                    assert st.count - st.row_count.min() <= engine.max_deferred_steps
    # The next step's layer-0 input is gathered ahead by the host worker when the promise of
    # the next ids holds (and then only: a wrong promise or another micro-batch split restages).
    streamed_rows = not engine.all_resident and getattr(optimizer, "supports_rows", False)
    ahead = steps - 1 if streamed_rows and not wrong_next and split in (None, M) else 0
    assert engine.staged_ahead_steps == ahead
    engine.sync()
    if expect_deferred:
        assert all(engine.opt_state[u.name].row_count is None for u in host.embed_units)
    got = host.tree()
    errors = {}
    for key in ("embed", "norm", "lm_head"):
        if key in got:
            errors[key] = rel_err(got[key], ref_params[key])
    for i, (a, b) in enumerate(zip(got["layers"], ref_params["layers"])):
        for n in a:
            errors[f"layers.{i}.{n}"] = rel_err(a[n], b[n])
    worst = max(errors, key=errors.get)
    assert errors[worst] < RTOL, f"{worst}: relative error {errors[worst]:.2e}"
    return engine


@pytest.mark.parametrize("prefetch", [1, 2, 3])
def test_window_sizes(prefetch):
    run_case(prefetch=prefetch, M=2)


@pytest.mark.parametrize("split", [1, 2, 4])
def test_micro_batch_splits_give_the_same_update(split):
    run_case(M=4, split=split, packed=True, clip=1e-3)


def test_next_input_ids_that_are_not_the_next_batch(monkeypatch):
    """`next_input_ids` that the next batch does not keep: the next forward must wait for the
    whole embedding update, not read rows whose update is still to come. The rest of the table's
    update is slowed down so that a forward that did not wait would read stale rows."""
    import time as _time

    opt = adamw()
    update = opt.update

    def slow_rest(state, master, grad, *args, rows=None, grad_index=None, **kw):
        if grad_index is not None and rows is None:  # the embedding's rows not done first
            _time.sleep(0.3)
        return update(state, master, grad, *args, rows=rows, grad_index=grad_index, **kw)

    monkeypatch.setattr(opt, "update", slow_rest)
    run_case(wrong_next=True, M=2, steps=3, clip=1e-3)


def _engine(cfg, opt=None, **kw):
    host = HostModel(cfg)
    host.load_tree(init_params(cfg, seed=0))
    return SlidingEngine(host, opt or adamw(), compute_dtype="float32", **kw)


@pytest.mark.parametrize("summed_first", [True, False])
def test_a_failed_row_sum_leaves_the_embedding_untouched(monkeypatch, summed_first):
    """Without clipping the embedding's update is queued as soon as the backward is dispatched; when
    a task summing its row gradient fails (before or after that), the failed step's partial
    gradient must never be applied, and the next step runs."""
    cfg = make_cfg(False, 97)
    rng = np.random.default_rng()
    b0, b1, b2 = (random_batch(rng, 97, 2, True) for _ in range(3))
    engine = _engine(cfg)
    before = {u.name: u.master.copy() for u in engine.host.embed_units}
    add, backward = SlidingEngine._add_rows, SlidingEngine._backward

    def add_rows(self, rowgrad, mb, dx):
        if mb == 1:
            raise MemoryError("row sum failed")
        return add(self, rowgrad, mb, dx)

    def backward_then_wait(self, *a):
        backward(self, *a)
        for ev in self._rows_added:  # the host got there before the driver queued the update
            ev.wait()

    monkeypatch.setattr(SlidingEngine, "_add_rows", add_rows)
    if summed_first:
        monkeypatch.setattr(SlidingEngine, "_backward", backward_then_wait)
    with pytest.raises(MemoryError):
        engine.step(b0, next_input_ids=b1["input_ids"])
    monkeypatch.undo()
    engine.sync()
    for u in engine.host.embed_units:
        np.testing.assert_array_equal(u.master, before[u.name], err_msg=u.name)
        assert engine.opt_state[u.name].count == 0
    assert np.isfinite(engine.step(b1, next_input_ids=b2["input_ids"]).loss)


def test_next_input_ids_are_checked_before_the_step_changes_anything():
    cfg = make_cfg(False, 97)
    rng = np.random.default_rng()
    b0, b1 = random_batch(rng, 97, 2, True), random_batch(rng, 97, 2, True)
    engine = _engine(cfg)
    with pytest.raises(SlidejaxError, match=r"next_input_ids must be token ids in \[0, 97\)"):
        engine.step(b0, next_input_ids=b1["input_ids"] + 97)
    assert np.isfinite(engine.step(b0, next_input_ids=b1["input_ids"].tolist()).loss)  # a list is fine
    assert np.isfinite(engine.step(b1).loss)


def test_load_state_dict_drops_rows_staged_from_the_old_weights():
    """A step told the next ids has the host worker gather their rows; a `load_state_dict` before
    the next step replaces the weights they came from: that step equals a fresh engine's."""
    import copy

    cfg = make_cfg(False, 97)
    rng = np.random.default_rng()
    b0, b1 = random_batch(rng, 97, 2, True), random_batch(rng, 97, 2, True)
    a = _engine(cfg)
    start = copy.deepcopy(a.state_dict())
    a.step(b0, next_input_ids=b1["input_ids"])
    a.load_state_dict(start)
    b = _engine(cfg)
    b.load_state_dict(start)
    assert a.step(b1).loss == b.step(b1).loss


def test_a_staging_task_skipped_after_an_error_is_not_used():
    """The host worker fails on the next rows' update, so the staging task queued behind it is
    skipped; the step that retries after the error must gather its own rows (the staging buffers
    still hold the last step's)."""
    cfg = make_cfg(False, 97)
    rng = np.random.default_rng()
    b0, b1 = random_batch(rng, 97, 2, True), random_batch(rng, 97, 2, True)
    opt = HostAdamW(learning_rate=1e-3, weight_decay=0.1)
    engine = _engine(cfg, opt, max_grad_norm=1.0)
    update, armed = opt.update, [True]

    def failing(state, master, grad, *args, rows=None, **kw):
        if rows is not None and armed:
            armed.clear()
            raise MemoryError("simulated failure of the next rows' update")
        return update(state, master, grad, *args, rows=rows, **kw)

    opt.update = failing
    seen = []
    embed = engine._embed

    def checked(ids):
        acts = embed(ids)
        table = np.concatenate([u.master.reshape(u.rows[1] - u.rows[0], -1) for u in engine.host.embed_units])
        seen.append(np.array_equal(np.asarray(acts.host[0]).reshape(-1, cfg.hidden_size),
                                   table[ids[0].reshape(-1)]))
        return acts

    engine._embed = checked
    engine.step(b0, next_input_ids=b1["input_ids"])
    with pytest.raises(MemoryError):
        engine.wait_updates()
    engine.step(b1)
    assert seen == [True, True] and engine.staged_ahead_steps == 0


def test_clipping_exact_and_active():
    engine = run_case(clip=1e-3, M=3)
    assert engine.step_count == 3


@pytest.mark.parametrize("clip", [0.5, 0.0])  # without clipping the update is queued early
def test_tied_embeddings_several_vocab_blocks(clip):
    cfg = make_cfg(True, 600)
    assert len(vocab_chunks(cfg)) > 1
    run_case(tied=True, vocab=600, M=2, clip=clip)


def test_untied_several_vocab_blocks_and_single_micro_batch():
    run_case(vocab=600, M=1)


@pytest.mark.parametrize("wrong_next,max_lag,clip", [(False, 32, 1e-3), (True, 32, 1e-3), (False, 1, 1e-3),
                                                     (False, 2, 0.0), (True, 32, 0.0)])
def test_embedding_rows_without_a_gradient_defer_their_step(wrong_next, max_lag, clip):
    """Most of a large table's rows get no gradient in a step: they defer their (zero-gradient)
    AdamW step until looked up (or, past `max_deferred_steps`, until the rest of the table's
    update), with or without a correct promise of the next batch's ids; each step's loss and the
    final weights (after `sync`) equal the whole-model reference's."""
    engine = run_case(vocab=600, M=2, steps=4, clip=clip, wrong_next=wrong_next, expect_deferred=True,
                      max_lag=max_lag)
    assert engine.max_deferred_steps == max_lag


def test_resident_layers_mixed_with_streamed():
    run_case(resident=2, M=2, clip=1e-3)


@pytest.mark.parametrize("clip,resident,gpu_update,opt", [(1e-3, 0, 2, "adamw"), (0.0, 1, 1, "adamw"),
                                                          (1e-3, 0, 3, "sgd")])
def test_gpu_updated_layers(clip, resident, gpu_update, opt):
    engine = run_case(clip=clip, resident=resident, gpu_update=gpu_update, opt=opt, layers=4, M=2)
    assert len(engine.gpu_updated) == gpu_update
    assert not engine.gpu_updated & engine.resident


def test_all_resident_reference_mode():
    run_case(resident=3, M=2, tied=True, vocab=600)


def test_resident_units_of_one_layout_share_one_compiled_update():
    cfg = make_cfg(tied=False, vocab=600)
    host = HostModel(cfg)
    host.load_tree(init_params(cfg, seed=1))
    engine = SlidingEngine(host, adamw(), resident_layers=cfg.num_layers)
    updates = {n: st["update"] for n, st in engine.dev_state.items()}
    assert len({id(updates[f"layers.{i}"]) for i in range(cfg.num_layers)}) == 1
    assert len(set(map(id, updates.values()))) == len({host.units[n].layout for n in updates})


def test_auto_resident_layers_fill_the_budget():
    """resident_layers='auto' picks the most layers whose plan fits the budget, and plans grow
    with each resident layer by at least its weights and state."""
    cfg = make_cfg(False, 97, layers=4)
    host = HostModel(cfg)
    host.load_tree(init_params(cfg, seed=11))
    probe = SlidingEngine(host, adamw(), compute_dtype="float32")
    mb = (2, S)
    totals = [probe.plan_memory(mb, resident_layers=r)["total"] for r in range(cfg.num_layers + 1)]
    per_layer = cfg.layer_params * (4 + 8 + 4)
    assert all(b - a >= per_layer for a, b in zip(totals[:3], totals[1:4])), totals
    want = int(np.random.default_rng().integers(0, 3))
    # A budget between the plans of `want` and `want + 1` resident layers.
    budget = (totals[want] + totals[want + 1]) / 2 / SlidingEngine.AUTO_MARGIN
    engine = SlidingEngine(host, adamw(), compute_dtype="float32", resident_layers="auto",
                           gpu_memory=int(budget), micro_batch=mb)
    assert engine.resident_layers == want
    assert SlidingEngine(host, adamw(), compute_dtype="float32", resident_layers="auto").resident_layers == 0
    with pytest.raises(SlidejaxError, match="micro_batch"):
        SlidingEngine(host, adamw(), compute_dtype="float32", resident_layers="auto", gpu_memory="1GB")
    with pytest.raises(SlidejaxError, match="resident_layers"):
        SlidingEngine(host, adamw(), compute_dtype="float32", resident_layers="most")


def test_infeasible_budget_refused_before_allocating(monkeypatch):
    """With the micro-batch known, a budget the plan exceeds is refused by the constructor, before
    any pinned buffer (whose zero-fill needs device memory) exists."""
    import slidejax.engine as engine_mod

    cfg = make_cfg(False, 97)
    host = HostModel(cfg)
    host.load_tree(init_params(cfg, seed=int(np.random.default_rng().integers(1 << 30))))
    made = []
    real = engine_mod.PinnedBuffer
    monkeypatch.setattr(engine_mod, "PinnedBuffer", lambda *a, **k: made.append(1) or real(*a, **k))
    with pytest.raises(SlidejaxError, match="GPU memory budget .* too small"):
        SlidingEngine(host, adamw(), compute_dtype="float32", gpu_memory="1KB", micro_batch=(2, S))
    assert not made
    engine = SlidingEngine(host, adamw(), compute_dtype="float32", gpu_memory="1KB")  # shape unknown yet
    assert made
    with pytest.raises(SlidejaxError, match="too small"):
        engine.step(random_batch(np.random.default_rng(), cfg.vocab_size, 1, packed=False))


def test_budget_floor_is_checked_before_compiling_and_compile_oom_is_refused(monkeypatch):
    """A budget below the plan's floor is refused without compiling (on a GPU, the compile for
    XLA's memory analysis autotunes on the device and would fail inside XLA); one above the floor
    but below the compiled plan is refused with the whole plan; an out-of-memory compile is
    refused with the engine's message."""
    cfg = make_cfg(False, 97)
    host = HostModel(cfg)
    host.load_tree(init_params(cfg, seed=int(np.random.default_rng().integers(1 << 30))))
    compiles = []
    real = SlidingEngine.plan_memory

    def spy(self, *args, compiled=True, **kwargs):
        compiles.append(compiled)
        return real(self, *args, compiled=compiled, **kwargs)

    monkeypatch.setattr(SlidingEngine, "plan_memory", spy)
    with pytest.raises(SlidejaxError, match=r"needs more than .* compiled working sets"):
        SlidingEngine(host, adamw(), compute_dtype="float32", gpu_memory="1KB", micro_batch=(2, S))
    assert compiles == [False]
    engine = SlidingEngine(host, adamw(), compute_dtype="float32")
    floor = real(engine, (2, S), compiled=False)["total"]
    full = real(engine, (2, S))
    assert full["layer_backward"] > 0 and full["total"] > floor
    compiles.clear()
    with pytest.raises(SlidejaxError, match=r"needs about .*layer_backward"):
        SlidingEngine(host, adamw(), compute_dtype="float32", gpu_memory=(floor + full["total"]) // 2,
                      micro_batch=(2, S))
    assert compiles == [False, True]

    def oom(self, *args, compiled=True, **kwargs):
        if compiled:
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
        return real(self, *args, compiled=False, **kwargs)

    monkeypatch.setattr(SlidingEngine, "plan_memory", oom)
    with pytest.raises(SlidejaxError, match="ran out of it compiling"):
        SlidingEngine(host, adamw(), compute_dtype="float32", gpu_memory=full["total"] * 2, micro_batch=(2, S))


def test_generic_optax_path():
    run_case(opt="sgd", M=2, packed=False)


def test_logits_match_reference():
    cfg = make_cfg(False, 600)
    host = HostModel(cfg)
    host.load_tree(init_params(cfg, seed=3))
    engine = SlidingEngine(host, None, compute_dtype="float32")
    rng = np.random.default_rng(1)
    ids = rng.integers(0, cfg.vocab_size, (2, S))
    pos = np.broadcast_to(np.arange(S), ids.shape)
    want = reference.logits(jax.tree.map(jnp.asarray, host.tree()), cfg, jnp.asarray(ids), jnp.asarray(pos))
    assert rel_err(engine.logits(ids), want) < 1e-6


def test_eval_loss_matches_reference():
    cfg = make_cfg(False, 97)
    host = HostModel(cfg)
    host.load_tree(init_params(cfg, seed=4))
    engine = SlidingEngine(host, None, compute_dtype="float32")
    batch = random_batch(np.random.default_rng(5), cfg.vocab_size, 3, packed=True)
    total, n = engine.eval_loss(batch)
    want = reference.mean_loss(jax.tree.map(jnp.asarray, host.tree()), cfg, {k: jnp.asarray(v) for k, v in batch.items()})
    assert n == int(np.sum(batch["labels"] != -100))
    assert total / n == pytest.approx(float(want), rel=1e-5)


def test_state_dict_roundtrip_resumes_exactly():
    cfg = make_cfg(False, 97)
    rng = np.random.default_rng(6)
    params = init_params(cfg, seed=7)
    batches = [random_batch(rng, cfg.vocab_size, 2, packed=True) for _ in range(4)]

    def engine():
        host = HostModel(cfg)
        host.load_tree(params)
        return host, SlidingEngine(host, adamw(), compute_dtype="float32", max_grad_norm=0.5)

    host_a, a = engine()
    for b in batches:
        a.step(b)
    a.sync()

    host_b, b_ = engine()
    for b in batches[:2]:
        b_.step(b)
    state = jax.tree.map(np.copy, b_.state_dict())
    host_c, c = engine()
    c.load_state_dict(state)
    for b in batches[2:]:
        c.step(b)
    c.sync()
    for name, unit in host_a.units.items():
        np.testing.assert_array_equal(unit.master, host_c.units[name].master, err_msg=name)


@pytest.mark.parametrize("opt", ["adamw", "sgd"])
@pytest.mark.parametrize("before,after", [((0, 0), (2, 0)), ((2, 0), (0, 0)), ((0, 2), (0, 0)), ((0, 0), (1, 2))])
def test_checkpoint_resumes_with_other_resident_layers(opt, before, after):
    """A state_dict does not depend on which units were resident or GPU-updated: saved with
    `before` = (resident, GPU-updated) layers and resumed with `after`, training continues as if
    uninterrupted."""
    cfg = make_cfg(False, 97)
    rng = np.random.default_rng()
    params = init_params(cfg, seed=int(rng.integers(1 << 30)))
    batches = [random_batch(rng, cfg.vocab_size, 2, packed=True) for _ in range(4)]

    def engine(layers):
        host = HostModel(cfg)
        host.load_tree(params)
        optimizer = adamw() if opt == "adamw" else HostOptax(tx_for(opt))
        return host, SlidingEngine(host, optimizer, compute_dtype="float32", max_grad_norm=0.5,
                                   resident_layers=layers[0], gpu_update_layers=layers[1])

    host_a, a = engine(before)
    for b in batches:
        a.step(b)
    a.sync()
    _, b_ = engine(before)
    for b in batches[:2]:
        b_.step(b)
    state = jax.tree.map(np.copy, b_.state_dict())
    host_c, c = engine(after)
    c.load_state_dict(state)
    assert c.step_count == 2
    for b in batches[2:]:
        c.step(b)
    c.sync()
    for name, unit in host_a.units.items():
        assert rel_err(host_c.units[name].master, unit.master) < RTOL, name


def test_bad_batches_are_refused():
    from slidejax.errors import SlidejaxError

    cfg = make_cfg(False, 97)
    host = HostModel(cfg)
    host.load_tree(init_params(cfg))
    engine = SlidingEngine(host, adamw(), compute_dtype="float32")
    batch = random_batch(np.random.default_rng(0), 97, 1, packed=False)
    with pytest.raises(SlidejaxError, match="out of range"):
        engine.step({**batch, "input_ids": batch["input_ids"] + 97})
    with pytest.raises(SlidejaxError, match="no supervised tokens"):
        engine.step({**batch, "labels": np.full_like(batch["labels"], -100)})


class _Landing:
    """Stands in for a download: `is_ready` until the test says it landed."""

    def __init__(self, ready: bool):
        self.ready = ready

    def is_ready(self) -> bool:
        return self.ready


@pytest.mark.parametrize("landed", [False, True])
def test_host_worker_runs_the_most_urgent_ready_task_and_keeps_step_order(landed):
    import threading

    from slidejax.engine import HostWorker

    worker = HostWorker(None)
    order, gate = [], threading.Event()
    download = _Landing(landed)
    ev = lambda: threading.Event()  # noqa: E731
    worker.submit((0, -9), "gate", gate.wait, ev())  # holds the worker while the rest is queued
    worker.submit((1, 0), "next step", lambda: order.append("next step"), ev())
    worker.submit((0, 1), "urgent", lambda: order.append("urgent"), ev(), waits_for=download)

    def lazy():
        order.append("lazy")
        download.ready = True  # lands while the worker does other work
    worker.submit((0, 5), "lazy", lazy, ev())
    gate.set()
    worker.join()
    worker.stop()
    # A gradient still in flight does not hold up ready work; a landed one goes first; the next
    # step's work always waits for this step's.
    assert order == (["urgent", "lazy", "next step"] if landed else ["lazy", "urgent", "next step"])


def test_host_worker_task_after_other_host_tasks():
    """A task reading what other host tasks write (the next rows' update, after the rows are
    summed) waits for them, even when it is the most urgent, and then goes before everything
    less urgent."""
    import threading

    from slidejax.engine import HostWorker, _AllSet

    worker = HostWorker(None)
    order, gate = [], threading.Event()
    download = _Landing(False)
    ev = lambda: threading.Event()  # noqa: E731
    summed = ev()
    worker.submit((0, -9), "gate", gate.wait, ev())
    worker.submit((0, -1), "sum rows", lambda: order.append("sum rows"), summed, waits_for=download)
    worker.submit((0, 0), "next rows", lambda: order.append("next rows"), ev(), waits_for=_AllSet([summed]))

    def lazy():
        order.append("lazy")
        download.ready = True
    worker.submit((0, 3), "lazy", lazy, ev())
    worker.submit((0, 4), "late", lambda: order.append("late"), ev())
    gate.set()
    worker.join()
    worker.stop()
    assert order == ["lazy", "sum rows", "next rows", "late"]


# ----------------------------------------------------------------------------------------------
# The device memory budget in XLA's allocator


XLA_ALLOCATOR_VARS = ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION")


def test_limit_device_memory_caps_xla_allocator_and_keeps_user_settings(monkeypatch):
    from slidejax import engine as engine_mod

    for var in XLA_ALLOCATOR_VARS:
        monkeypatch.delenv(var, raising=False)
    assert engine_mod.limit_device_memory(None) == {} and engine_mod.limit_device_memory("unlimited") == {}
    assert not any(v in __import__("os").environ for v in XLA_ALLOCATOR_VARS)

    got = engine_mod.limit_device_memory("24GB", total=141 * 10**9)
    assert got == {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.1702"}
    import os
    assert {v: os.environ[v] for v in XLA_ALLOCATOR_VARS} == got

    # What the user set stays; a budget above the GPU is capped at XLA's 0.95.
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE")
    assert engine_mod.limit_device_memory(200 * 10**9, total=141 * 10**9) == {
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.5"
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION")
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE")
    assert engine_mod.limit_device_memory(200 * 10**9, total=141 * 10**9)[
        "XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.9500"

    # GPU size unknown: no preallocation, no cap.
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION")
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE")
    monkeypatch.setattr(engine_mod, "gpu_total_bytes", lambda: None)
    assert engine_mod.limit_device_memory("24GB") == {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}


def test_gpu_total_bytes_reads_nvidia_smi(tmp_path, monkeypatch):
    from slidejax.engine import gpu_total_bytes

    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    assert gpu_total_bytes() is None
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 143771\necho 143771\n")
    fake.chmod(0o755)
    assert gpu_total_bytes() == 143771 * 2**20
    fake.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    assert gpu_total_bytes() is None


# ----------------------------------------------------------------------------------------------
# Speculative updates


def _speculation_finishes_in_the_backward(monkeypatch) -> None:
    """Let every speculative update run before the backward's end is acted on (on a real model
    they overlap a backward far longer than theirs; here the worker might not get to them)."""
    release = SlidingEngine._release_updates

    def wait_then_release(self, next_ids):
        self.worker.join()
        release(self, next_ids)

    monkeypatch.setattr(SlidingEngine, "_release_updates", wait_then_release)


@pytest.mark.parametrize("clip,tied,expect", [(1e3, False, "committed"), (1e-3, False, "redone"),
                                               (1e3, True, "committed"), (1e3, False, "skipped")])
def test_speculative_updates_are_exact_whether_committed_redone_or_skipped(monkeypatch, clip, tied, expect):
    """Units updated speculatively during the backward (the head's chunks, then the last layers)
    give the reference's parameters (whole-model jax.grad + optax with clipping) whether the norm
    stays within the threshold (committed: buffers swapped), or not (redone), or the backward ends
    before they start (skipped: updated in place afterwards), and bit for bit what the engine
    gives without speculation."""
    if expect == "skipped":  # the step's outcome known before each speculative update runs
        speculate = SlidingEngine._speculate

        def late(self, name, grad, retired):
            self._outcome["scale"] = -1.0  # replaced by the real scale at the end of the backward
            speculate(self, name, grad, retired)

        monkeypatch.setattr(SlidingEngine, "_speculate", late)
    else:
        _speculation_finishes_in_the_backward(monkeypatch)
    cfg = make_cfg(tied, 97, layers=3)
    count = 5
    engine = run_case(tied=tied, clip=clip, steps=3, speculative=count)
    expected_units = ([] if tied else [f"lm_head.{c}" for c in reversed(range(len(vocab_chunks(cfg))))])
    expected_units = (expected_units + [f"layers.{i}" for i in (2, 1, 0)])[:count]
    assert list(engine._spec) == expected_units
    assert engine.speculation == {k: 3 * len(expected_units) if k == expect else 0
                                  for k in ("committed", "redone", "skipped")}
    monkeypatch.undo()
    plain = run_case(tied=tied, clip=clip, steps=3)
    for name, unit in engine.host.units.items():
        np.testing.assert_array_equal(unit.master, plain.host.units[name].master, err_msg=name)
        a, b = engine.opt_state[name].state_dict(), plain.opt_state[name].state_dict()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name} {key}")


def test_a_step_that_raised_leaves_nothing_behind_for_the_next(monkeypatch):
    """A step that raises mid-backward while the host worker is busy leaves queued host tasks (a
    speculative update of its gradient, its embedding rows). The next step, on another batch,
    must give exactly what it gives when the failed attempt never ran: no leftover may write into
    the buffers it reuses. (The retry's own speculation is made to start after its backward, so a
    leftover's write would be committed as the retry's.)"""
    import threading

    cfg = make_cfg(False, 97, layers=2)
    params = init_params(cfg, seed=int(np.random.default_rng().integers(1 << 30)))
    rng = np.random.default_rng()
    first, failing, retry = (random_batch(rng, 97, 2, True) for _ in range(3))

    def engine() -> SlidingEngine:
        host = HostModel(cfg)
        host.load_tree(params)
        return SlidingEngine(host, adamw(), compute_dtype="float32", max_grad_norm=1e3, speculative_units=1)

    want = engine()
    want.step(first)
    want.step(retry)
    want.sync()

    got = engine()
    got.step(first)
    got.sync()
    gate = threading.Event()  # the worker stays busy until the retry's backward ends (or 3 s pass)
    got.worker.submit((got.step_count - 1, 99), "busy", lambda: gate.wait(3.0), threading.Event())
    finish, speculate, embedding = (SlidingEngine._finish_unit, SlidingEngine._speculate,
                                    SlidingEngine._embedding_gradient)

    def fail_at_norm(self, name, acc, tied_done=False):
        if name == "norm":
            raise RuntimeError("injected")
        return finish(self, name, acc, tied_done)

    monkeypatch.setattr(SlidingEngine, "_finish_unit", fail_at_norm)
    with pytest.raises(RuntimeError, match="injected"):
        got.step(failing)
    monkeypatch.setattr(SlidingEngine, "_finish_unit", finish)

    def late(self, name, grad, retired):
        self._outcome["scale"] = -1.0  # the retry's own speculation: skipped
        speculate(self, name, grad, retired)

    def open_gate(self):
        gate.set()
        return embedding(self)

    monkeypatch.setattr(SlidingEngine, "_speculate", late)
    monkeypatch.setattr(SlidingEngine, "_embedding_gradient", open_gate)
    got.step(retry)
    got.sync()
    for name, unit in got.host.units.items():
        np.testing.assert_array_equal(unit.master, want.host.units[name].master, err_msg=name)
    got.close()
    want.close()


def test_a_host_task_error_is_raised_and_the_next_step_does_not_hang():
    """An error in a host task (an update) is raised in the driver; the step after that one must
    not wait forever for embedding rows whose update the failed step never queued."""
    import threading

    cfg = make_cfg(False, 97, layers=2)
    host = HostModel(cfg)
    host.load_tree(init_params(cfg, seed=int(np.random.default_rng().integers(1 << 30))))
    engine = SlidingEngine(host, adamw(), compute_dtype="float32", max_grad_norm=1.0)
    rng = np.random.default_rng()
    engine.step(random_batch(rng, 97, 2, True))  # its embedding update waits for the next step

    def boom():
        raise RuntimeError("boom")

    ran = threading.Event()
    engine.worker.submit((engine.step_count - 1, -5), "boom", boom, ran)
    assert ran.wait(30)
    with pytest.raises(RuntimeError, match="boom"):
        engine.step(random_batch(rng, 97, 2, True))
    outcome = []

    def next_step():
        try:
            outcome.append(engine.step(random_batch(rng, 97, 2, True)).loss)
        except Exception as e:  # noqa: BLE001 - only whether it returns matters here
            outcome.append(e)

    thread = threading.Thread(target=next_step, daemon=True)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "the step after a host error hangs"
    assert outcome and np.isfinite(outcome[0])


def test_speculation_crossing_the_threshold_between_steps_and_its_refusals(monkeypatch):
    """A threshold the norm crosses between steps (some steps committed, some redone) stays
    exact; no clipping means nothing to speculate; the generic optax path is refused with one
    line."""
    _speculation_finishes_in_the_backward(monkeypatch)
    rng = np.random.default_rng(3)
    cfg = make_cfg(False, 97, layers=2)
    host = HostModel(cfg)
    host.load_tree(init_params(cfg, seed=5))
    probe = SlidingEngine(host, adamw(), compute_dtype="float32", max_grad_norm=1e9)
    batches = [random_batch(rng, 97, 2, True) for _ in range(4)]
    norms = [probe.step(b).grad_norm for b in batches[:1]]
    probe.close()
    clip = norms[0] * 0.999  # the first step clips; later ones (smaller norms after it) may not
    host = HostModel(cfg)
    host.load_tree(init_params(cfg, seed=5))
    ref = jax.tree.map(jnp.asarray, host.tree())
    tx = tx_for("adamw")
    ref_state = tx.init(ref)
    engine = SlidingEngine(host, adamw(), compute_dtype="float32", max_grad_norm=clip, speculative_units=2)
    step_ref = reference_step(cfg, clip, "adamw")
    scales = []
    for t, batch in enumerate(batches):
        nxt = batches[t + 1]["input_ids"] if t + 1 < len(batches) else None
        scales.append(engine.step(batch, next_input_ids=nxt).clip_scale)
        ref, ref_state, _, _ = step_ref(ref, ref_state, {k: jnp.asarray(v) for k, v in batch.items()})
    engine.sync()
    assert scales[0] < 1.0 and 1.0 in scales, scales  # both outcomes
    assert engine.speculation == {"committed": 2 * sum(s == 1.0 for s in scales),
                                  "redone": 2 * sum(s < 1.0 for s in scales), "skipped": 0}
    got = host.tree()
    assert rel_err(got["lm_head"], ref["lm_head"]) < RTOL
    for a, b in zip(got["layers"], ref["layers"]):
        for n in a:
            assert rel_err(a[n], b[n]) < RTOL, n
    engine.close()

    assert SlidingEngine(HostModel(cfg), adamw(), compute_dtype="float32", speculative_units=3)._spec == {}
    with pytest.raises(SlidejaxError, match=r"update\(into=\)"):
        SlidingEngine(HostModel(cfg), HostOptax(tx), compute_dtype="float32", max_grad_norm=1.0,
                      speculative_units=1)
