"""Host memory: the plan counts what the engine allocates, XLA's pinned pool is sized from it, and
the untied embedding is looked up from its fp32 master (no bf16 copy of the table)."""

from __future__ import annotations

import jax
import ml_dtypes
import numpy as np
import pytest

from slidejax import engine as engine_module
from slidejax.config import ModelConfig
from slidejax.engine import SlidingEngine
from slidejax.errors import SlidejaxError
from slidejax.host_memory import (PINNED_POOL_ENV, HostModel, pinned_pool_bytes, plan_host_memory,
                                  size_pinned_pool)
from slidejax.host_optimizer import HostAdamW
from slidejax.model import init_params

ROWS, SEQ = 2, 8


def make_host(tied: bool, layers: int = 3, vocab: int = 300) -> HostModel:
    cfg = ModelConfig(model_type="llama", vocab_size=vocab, hidden_size=32, intermediate_size=48,
                      num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=tied)
    host = HostModel(cfg)
    host.load_tree(init_params(cfg, seed=int(np.random.default_rng().integers(1 << 30))))
    return host


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("resident,gpu_update,spec", [(0, 0, 0), (1, 0, 0), (3, 0, 0), (0, 2, 0), (1, 1, 0),
                                                      (0, 0, 4), (1, 1, 2)])
@pytest.mark.parametrize("moments", [np.float32, ml_dtypes.bfloat16])
def test_plan_counts_the_buffers_the_engine_allocates(tied, resident, gpu_update, spec, moments):
    host = make_host(tied)
    assert len(host.embed_units) > 1  # several vocabulary blocks
    engine = SlidingEngine(host, HostAdamW(1e-3, moment_dtype=moments), compute_dtype="bfloat16",
                           resident_layers=resident, gpu_update_layers=gpu_update, max_grad_norm=1.0,
                           speculative_units=spec)
    plan = engine.plan_host_memory((ROWS, SEQ), micro_batches=3)
    spec_params = sum(host.units[n].master.size for n in engine._spec)
    candidates = (0 if tied else len(host.head_units)) + host.cfg.num_layers - resident - gpu_update
    assert len(engine._spec) == min(spec, candidates if resident < host.cfg.num_layers else 0)
    assert plan == plan_host_memory(host.cfg, (ROWS, SEQ), 3, compute_dtype="bfloat16", moment_dtype=moments,
                                    resident_layers=resident, gpu_update_layers=gpu_update,
                                    speculated_params=spec_params)
    # Speculative units: a second master and moments, a second (pinned) copy, and during a step
    # the copy in use, kept until the commit (a copy's size: the spare's).
    assert plan["speculation"] == sum(sp.master.nbytes + sp.state.mu.nbytes + sp.state.nu.nbytes
                                      for sp in engine._spec.values())
    assert plan["speculation_copies"] == 2 * sum(sp.upload.host.nbytes for sp in engine._spec.values())
    assert (plan["speculation"] > 0) == (spec > 0)
    # GPU-updated layers: master, optimizer state and copy parked, room for a pending gradient.
    parked = sum(sum(x.nbytes for x in jax.tree.leaves(engine.dev_state[n]) if isinstance(x, jax.Array))
                 for n in engine.gpu_updated)
    pending = 2 * host.cfg.layer_params * gpu_update
    assert abs(plan["gpu_updated_state"] - pending - parked) <= 64 * gpu_update  # step counts
    # Resident units' masters are on the device while steps run (back on the host after a sync).
    ids = np.random.default_rng().integers(0, host.cfg.vocab_size, (3, ROWS, SEQ + 1)).astype(np.int32)
    engine.step({"input_ids": ids[..., :-1], "labels": ids[..., 1:]})
    assert plan["masters"] == host.nbytes
    engine.sync()
    assert host.nbytes == 4 * host.cfg.num_params
    assert all(np.isfinite(u.master).all() for u in host.units.values())
    assert plan["upload_copies"] == sum(b.host.nbytes for b in engine.upload_buf.values())
    assert plan["optimizer"] == sum(s.mu.nbytes + s.nu.nbytes for s in engine.opt_state.values())
    assert plan["gradients"] == (0 if resident == 3 else 3 * 2 * max(u.master.size for u in host.units.values()))
    assert plan["pinned"] == (plan["upload_copies"] + plan["gradients"] + plan["activations"]
                              + plan["gpu_updated_state"] + plan["speculation_copies"])
    assert plan["total"] == (plan["pinned"] + plan["masters"] + plan["optimizer"] + plan["embedding_rows"]
                             + plan["speculation"])
    # The untied embedding has no compute-dtype copy: it is gathered from its master.
    assert not any(n.startswith("embed.") for n in engine.upload_buf) or tied


def test_untied_embedding_rows_come_from_the_updated_master():
    """Step 2's layer-0 input holds, bit for bit, the bf16 rounding of the embedding rows as step 1's
    update left them (the rows the next step needs are updated first)."""
    host = make_host(tied=False)
    rng = np.random.default_rng()
    engine = SlidingEngine(host, HostAdamW(1e-2), compute_dtype="bfloat16")
    vocab = host.cfg.vocab_size

    def batch():
        ids = rng.integers(0, vocab, (2, ROWS, SEQ + 1)).astype(np.int32)
        return {"input_ids": ids[..., :-1], "labels": ids[..., 1:]}

    first, second = batch(), batch()
    before = host.tree()["embed"].copy()
    engine.step(first, next_input_ids=second["input_ids"])
    engine.sync()
    table = host.tree()["embed"]
    assert not np.array_equal(table[second["input_ids"]], before[second["input_ids"]])  # the rows moved
    engine.step(second)
    for mb in range(2):
        staged = engine._staging[mb][0].host.reshape(ROWS, SEQ, -1)
        want = table[second["input_ids"][mb]].astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(staged.view(np.uint16), want.view(np.uint16))


def test_size_pinned_pool_caps_with_slack_and_keeps_a_users_setting(monkeypatch):
    monkeypatch.delenv(PINNED_POOL_ENV, raising=False)
    assert pinned_pool_bytes() == 64 << 30  # XLA's default
    # 3.5 GiB + 15% + 1 GiB = 5.03 GiB: 6 whole GiB.
    assert size_pinned_pool(int(3.5 * (1 << 30))) == 6 << 30
    assert size_pinned_pool(1 << 40) == 6 << 30  # set once: the backend reads it once
    monkeypatch.setenv(PINNED_POOL_ENV, "100")
    assert size_pinned_pool(1 << 30) == 100 << 30


def _gpu_pool(monkeypatch, nbytes: int) -> None:
    """Pretend the device's pinned memory comes from an XLA pool of `nbytes`."""
    monkeypatch.setattr(engine_module, "_has_pinned_pool", lambda device: True)
    monkeypatch.setattr(engine_module, "pinned_pool_bytes", lambda: nbytes)


def test_an_engine_that_overflows_the_pinned_pool_is_refused_before_allocating(monkeypatch):
    host = make_host(tied=False)
    plan = plan_host_memory(host.cfg, (ROWS, SEQ), 1, compute_dtype="bfloat16")
    _gpu_pool(monkeypatch, plan["pinned"] - 1)

    def no_pinned(*args, **kwargs):
        raise AssertionError("a pinned buffer was allocated before the pool was checked")

    monkeypatch.setattr(engine_module, "PinnedBuffer", no_pinned)
    with pytest.raises(SlidejaxError, match=PINNED_POOL_ENV):
        SlidingEngine(host, HostAdamW(1e-3), compute_dtype="bfloat16", micro_batch=(ROWS, SEQ))


def test_a_step_that_overflows_the_pinned_pool_is_refused(monkeypatch):
    host = make_host(tied=False)
    plan = plan_host_memory(host.cfg, (ROWS, SEQ), 1, compute_dtype="bfloat16")
    _gpu_pool(monkeypatch, plan["pinned"] + plan["activations"])  # room for two micro-batches
    engine = SlidingEngine(host, HostAdamW(1e-3), compute_dtype="bfloat16", micro_batch=(ROWS, SEQ))
    ids = np.random.default_rng().integers(0, host.cfg.vocab_size, (3, ROWS, SEQ)).astype(np.int32)
    with pytest.raises(SlidejaxError, match="pinned"):
        engine.step({"input_ids": ids, "labels": ids})
    engine.step({"input_ids": ids[:2], "labels": ids[:2]})


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_updates_write_the_next_upload_copy_into_the_gradients_buffer(clip):
    """After a step, each streamed unit's upload copy is its download buffer, overwritten with the
    bf16 rounding of the new master; a copy released by a step that failed is rebuilt."""
    host = make_host(tied=False)
    rng = np.random.default_rng()
    engine = SlidingEngine(host, HostAdamW(1e-2), compute_dtype="bfloat16", max_grad_norm=clip)
    ids = rng.integers(0, host.cfg.vocab_size, (2, ROWS, SEQ + 1)).astype(np.int32)
    batch = {"input_ids": ids[..., :-1], "labels": ids[..., 1:]}
    before = {n: b.array for n, b in engine.upload_buf.items()}
    engine.step(batch)
    engine.sync()
    assert set(engine.upload_buf) == set(before)
    for name, buf in engine.upload_buf.items():
        assert buf.array is not before[name]
        want = host.units[name].master.astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(buf.host.view(np.uint16), want.view(np.uint16))
    lost = "layers.1"
    del engine.upload_buf[lost]
    engine.step(batch)
    engine.sync()
    want = host.units[lost].master.astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(engine.upload_buf[lost].host.view(np.uint16), want.view(np.uint16))


def test_load_tree_checks_every_shape():
    """A transposed matrix or a longer embedding has the right size or more; both are refused."""
    cfg = ModelConfig(model_type="llama", vocab_size=64, hidden_size=16, intermediate_size=24, num_layers=2,
                      num_heads=2, num_kv_heads=1, head_dim=8)
    tree = init_params(cfg, seed=int(np.random.default_rng().integers(1 << 30)))
    HostModel(cfg).load_tree(tree)
    bad = dict(tree, layers=[dict(layer) for layer in tree["layers"]])
    bad["layers"][1]["mlp.up_proj.weight"] = np.asarray(tree["layers"][1]["mlp.up_proj.weight"]).T
    with pytest.raises(SlidejaxError, match=r"layers\[1\].mlp.up_proj.weight has shape \[16, 24\]"):
        HostModel(cfg).load_tree(bad)
    with pytest.raises(SlidejaxError, match="embed has shape"):
        HostModel(cfg).load_tree(dict(tree, embed=np.zeros((80, 16), np.float32)))
    with pytest.raises(SlidejaxError, match="1 layers, the model has 2"):
        HostModel(cfg).load_tree(dict(tree, layers=tree["layers"][:1]))
    with pytest.raises(SlidejaxError, match="compute_dtype must be bfloat16 or float32"):
        SlidingEngine(HostModel(cfg), HostAdamW(1e-3), compute_dtype="float16")
