"""Parity of slidejax's models with transformers (PyTorch) for every supported family, in fp32.

For each family a tiny random model is built with transformers (norms and biases randomised too),
saved with `save_pretrained`, loaded with `slidejax.load_pretrained(..., dtype="float32")`, and
checked against PyTorch: logits through the engine's layer-by-layer path and through the plain
reference, the loss and the gradient of every parameter (PyTorch autograd), export -> transformers
reload, and packed rows (segment ids, padding) against each document run alone.

The families are chosen so that together they cover GQA ratios 1, 2, 4 and MQA, tied and untied
embeddings, odd vocabulary sizes, vocabulary matrices split into one and several row blocks,
head_dim != hidden / heads, llama3 RoPE scaling and a sliding window shorter than the sequence.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import slidejax
from slidejax import reference
from slidejax.config import ModelConfig
from slidejax.host_memory import vocab_chunks

SEQ = 24
BATCH = 2
TOL = 1e-5


def rel_err(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    config_cls: type
    kwargs: dict
    vocab_blocks: int  # row blocks of the vocabulary matrices (slidejax.host_memory.vocab_chunks)


# initializer_range 0.1 (not 0.02) makes attention scores O(1), so attention patterns, RoPE and
# windows visibly shape the logits instead of averaging out.
_COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=256,
               initializer_range=0.1, rms_norm_eps=1e-6)
_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

FAMILIES = {
    f.name: f
    for f in [
        # Llama 3.x: llama3 RoPE scaling, GQA 2, odd vocab, untied, several vocab blocks.
        Family("llama3", transformers.LlamaConfig,
               dict(_COMMON, vocab_size=1009, num_attention_heads=4, num_key_value_heads=2,
                    rope_scaling=_LLAMA3_ROPE), 3),
        # Llama 2: plain RoPE, multi-head attention (GQA ratio 1); with the attention_bias and
        # mlp_bias that Llama configs allow, so o_proj and MLP biases are covered too.
        Family("llama2", transformers.LlamaConfig,
               dict(_COMMON, vocab_size=601, num_attention_heads=4, num_key_value_heads=4,
                    attention_bias=True, mlp_bias=True), 2),
        # Qwen2 / 2.5: q/k/v bias, no o bias, tied embeddings, GQA 2.
        Family("qwen2", transformers.Qwen2Config,
               dict(_COMMON, vocab_size=1009, num_attention_heads=4, num_key_value_heads=2,
                    tie_word_embeddings=True), 3),
        # Qwen3: q/k RMSNorm, head_dim 32 != 64 / 4, MQA, vocab in one block.
        Family("qwen3", transformers.Qwen3Config,
               dict(_COMMON, vocab_size=257, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                    tie_word_embeddings=False), 1),
        # Mistral: sliding window (8) shorter than the sequence, GQA 4.
        Family("mistral", transformers.MistralConfig,
               dict(_COMMON, vocab_size=701, num_attention_heads=8, num_key_value_heads=2, sliding_window=8), 2),
    ]
}


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Norm weights and biases away from their trivial 1 / 0 init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def build_torch(fam: Family, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = fam.config_cls(**fam.kwargs)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    randomize_(model, seed + 1)
    return model.eval()


def torch_logits(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()


# A packed row: (segment, length) runs, padding (segment 0) at the front, between and after the
# documents, each document longer than Mistral's window.
PACKED = [(0, 2), (1, 10), (0, 1), (2, 9), (0, 2)]


def packed_batch(ids: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Row 0: one document filling the row. Row 1: `PACKED`, positions restarting per document.

    Labels are the next token within a document, some dropped (-100), none on padding.
    """
    ids = ids.copy()
    seg = np.ones_like(ids)
    seg[1] = np.concatenate([np.full(n, s) for s, n in PACKED])
    pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()
    pos[1] = np.concatenate([np.arange(n) if s else rng.integers(0, 50, n) for s, n in PACKED])
    labels = np.full_like(ids, -100)
    same_doc = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
    labels[:, :-1] = np.where(same_doc, ids[:, 1:], -100)
    labels[rng.random(ids.shape) < 0.25] = -100
    assert (labels != -100).sum() > ids.size // 3
    return {k: a.astype(np.int32) for k, a in
            dict(input_ids=ids, positions=pos, segment_ids=seg, labels=labels).items()}


def documents(batch: dict[str, np.ndarray]) -> list[tuple[int, int, int]]:
    """(row, start, end) of every document (maximal run of one non-zero segment id)."""
    out = []
    for r, seg in enumerate(batch["segment_ids"]):
        start = 0
        for t in range(1, len(seg) + 1):
            if t == len(seg) or seg[t] != seg[start]:
                if seg[start]:
                    out.append((r, start, t))
                start = t
    return out


def torch_packed_logits(model: torch.nn.Module, batch: dict[str, np.ndarray]) -> torch.Tensor:
    """[B, S, V] logits with every document run alone through transformers (zeros on padding)."""
    ids = torch.as_tensor(batch["input_ids"], dtype=torch.long)
    rows = [[None] * ids.shape[1] for _ in range(ids.shape[0])]
    v = model.config.vocab_size
    for r, a, b in documents(batch):
        out = model(ids[r: r + 1, a:b]).logits[0]
        for t in range(a, b):
            rows[r][t] = out[t - a]
    return torch.stack([torch.stack([x if x is not None else torch.zeros(v) for x in row]) for row in rows])


def tree_path(hf_name: str) -> tuple:
    """HF parameter name -> path in `HostModel.tree()`."""
    if hf_name == "model.embed_tokens.weight":
        return ("embed",)
    if hf_name == "model.norm.weight":
        return ("norm",)
    if hf_name == "lm_head.weight":
        return ("lm_head",)
    _, _, i, rest = hf_name.split(".", 3)
    return ("layers", int(i), rest)


def tree_get(tree: Any, path: tuple) -> Any:
    for p in path:
        tree = tree[p]
    return tree


@functools.lru_cache(maxsize=None)
def _ref_fns(cfg: ModelConfig):
    """One jitted function per architecture: reference logits of plain rows (causal attention, no
    segment ids) and the loss and gradients of a packed batch, compiled together."""

    def run(params, ids, packed):
        pos = jax.numpy.broadcast_to(jax.numpy.arange(ids.shape[1]), ids.shape)
        batch = {k: a[None] for k, a in packed.items()}
        loss, grads = jax.value_and_grad(reference.mean_loss)(params, cfg, batch)
        return reference.logits(params, cfg, ids, pos), loss, grads

    # Compile time dominates these tiny runs on CPU; XLA's backend optimisations buy nothing here.
    cpu = jax.default_backend() == "cpu"
    return jax.jit(run, compiler_options={"xla_backend_optimization_level": 0} if cpu else None)


@dataclasses.dataclass
class Case:
    fam: Family
    torch_model: torch.nn.Module
    folder: Path
    model: slidejax.Model
    ids: np.ndarray  # [BATCH, SEQ] plain rows
    expected_logits: np.ndarray  # transformers' logits of `ids`
    packed: dict[str, np.ndarray]  # a packed batch (see `packed_batch`)

    @functools.cached_property
    def reference(self):
        return _ref_fns(self.model.config)(self.model.host.tree(), self.ids.astype(np.int32), self.packed)


@pytest.fixture(scope="module", params=list(FAMILIES))
def case(request, tmp_path_factory) -> Case:
    fam = FAMILIES[request.param]
    seed = list(FAMILIES).index(fam.name)
    tm = build_torch(fam, seed)
    folder = tmp_path_factory.mktemp(fam.name)
    tm.save_pretrained(folder)
    model = slidejax.load_pretrained(folder, dtype="float32")
    rng = np.random.default_rng(100 + seed)
    ids = rng.integers(0, fam.kwargs["vocab_size"], (BATCH, SEQ))
    packed = packed_batch(rng.integers(0, fam.kwargs["vocab_size"], (BATCH, SEQ)), rng)
    return Case(fam, tm, folder, model, ids, torch_logits(tm, ids), packed)


# --------------------------------------------------------------------------- the families


def test_config_is_read_as_intended(case):
    cfg, kw = case.model.config, case.fam.kwargs
    assert cfg.model_type == case.fam.config_cls.model_type
    assert (cfg.vocab_size, cfg.num_heads, cfg.num_kv_heads) == (
        kw["vocab_size"], kw["num_attention_heads"], kw["num_key_value_heads"])
    assert cfg.head_dim == kw.get("head_dim", kw["hidden_size"] // kw["num_attention_heads"])
    assert cfg.tie_word_embeddings == case.torch_model.config.tie_word_embeddings
    assert len(vocab_chunks(cfg)) == case.fam.vocab_blocks
    assert len(case.model.host.embed_units) == case.fam.vocab_blocks
    assert cfg.sliding_window == kw.get("sliding_window")
    biases = {n.split(".", 3)[-1] for n, _ in case.torch_model.named_parameters() if n.endswith(".bias")}
    assert set(n for n in case.model.host.tree()["layers"][0] if n.endswith(".bias")) == biases
    if cfg.sliding_window:
        assert cfg.sliding_window < SEQ


def test_weights_load_exactly(case):
    tree = case.model.host.tree()
    sd = case.torch_model.state_dict()
    names = {n for n, _ in case.torch_model.named_parameters()}  # tied lm_head appears once
    for name in names:
        np.testing.assert_array_equal(tree_get(tree, tree_path(name)), sd[name].numpy(), err_msg=name)
    n_tree = 1 + len(tree["layers"]) * len(tree["layers"][0]) + 1 + ("lm_head" in tree)
    assert n_tree == len(names)


def test_engine_logits_match_transformers(case):
    """`model.logits` (the engine's layer-by-layer path) on the packed batch: row 0 is one document
    filling the row, row 1 packs two documents between padding. Every document's logits equal
    those of the document run alone in transformers, so packed documents never see each other or
    the padding. (The unmasked path runs through the engine in the tiny-preset and bf16 tests,
    and through the reference below; one engine compile per family keeps this module fast.)"""
    p = case.packed
    got = case.model.logits(p["input_ids"], p["positions"], p["segment_ids"])
    assert got.shape == (BATCH, SEQ, case.fam.kwargs["vocab_size"]) and got.dtype == np.float32
    with torch.no_grad():
        expected = torch_packed_logits(case.torch_model, p).numpy()
    docs = documents(p)
    assert docs[0] == (0, 0, SEQ) and len(docs) == 3
    for r, a, b in docs:
        assert rel_err(got[r, a:b], expected[r, a:b]) < TOL, (r, a, b)


def test_reference_logits_loss_and_every_gradient_match_autograd(case):
    """Reference logits of plain rows; loss and the gradient of every parameter on the packed
    batch against PyTorch autograd (each document run alone, cross-entropy over next tokens)."""
    logits, loss, grads = case.reference
    assert rel_err(logits, case.expected_logits) < TOL

    tm = case.torch_model
    tm.zero_grad()
    out = torch_packed_logits(tm, case.packed)
    t_loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]),
                                               torch.as_tensor(case.packed["labels"], dtype=torch.long).reshape(-1),
                                               ignore_index=-100)
    t_loss.backward()
    assert abs(float(loss) - t_loss.item()) < TOL * abs(t_loss.item())

    seen = 0
    for name, p in tm.named_parameters():
        g = np.asarray(tree_get(grads, tree_path(name)))
        assert p.grad is not None and g.shape == tuple(p.shape), name
        assert np.linalg.norm(p.grad.numpy()) > 0, name
        assert rel_err(g, p.grad.numpy()) < TOL, (name, rel_err(g, p.grad.numpy()))
        seen += 1
    # every slidejax parameter was compared (tied: one embedding gets both uses' gradients)
    assert seen == len(jax.tree.leaves(grads))


def test_export_reloads_in_transformers(case, tmp_path):
    out = case.model.save_pretrained(tmp_path / "fp32", dtype="float32")
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(back) is type(case.torch_model)
    assert back.config.tie_word_embeddings == case.torch_model.config.tie_word_embeddings
    assert rel_err(torch_logits(back, case.ids), case.expected_logits) < TOL
    # and slidejax reads its own export back bit for bit
    again = slidejax.load_pretrained(out, dtype="float32").host.tree()
    jax.tree.map(np.testing.assert_array_equal, again, case.model.host.tree())


def test_bf16_export_loads_in_transformers(case, tmp_path):
    out = case.model.save_pretrained(tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    sd, ref = back.state_dict(), case.torch_model.state_dict()
    for name, p in back.named_parameters():
        assert p.dtype == torch.bfloat16, name
        torch.testing.assert_close(sd[name], ref[name].bfloat16(), rtol=0, atol=0, msg=name)
    assert rel_err(torch_logits(back.float(), case.ids), case.expected_logits) < 0.05


# --------------------------------------------------------------------------- features that must matter


@pytest.mark.parametrize("rope", [None, {"rope_type": "linear", "factor": 4.0}, _LLAMA3_ROPE],
                         ids=["default", "linear", "llama3"])
def test_rope_frequencies_match_transformers(rope):
    """inv_freq equals that of transformers' rotary embedding, and scaling really changes it."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    kw = dict(FAMILIES["llama3"].kwargs, rope_scaling=rope, rope_theta=50000.0)
    if rope is None:
        del kw["rope_scaling"]
    tcfg = transformers.LlamaConfig(**kw)
    rotary = LlamaRotaryEmbedding(config=tcfg)
    assert rotary.attention_scaling == 1.0  # slidejax applies no extra cos/sin scale
    cfg = ModelConfig.from_hf_dict(tcfg.to_dict())
    np.testing.assert_allclose(cfg.inv_freq(), rotary.inv_freq.numpy(), rtol=1e-6)
    plain = cfg.replace(rope_type="default", rope_params=()).inv_freq()
    assert (np.abs(plain - cfg.inv_freq()).max() > 1e-2 * np.abs(plain).max()) == (rope is not None)


@pytest.mark.parametrize("spelling", ["v5", "v4"])
@pytest.mark.parametrize("max_window_layers, window", [(0, 8), (1, None), (2, None)])
def test_qwen2_sliding_window_config(max_window_layers, window, spelling):
    """Qwen2 slides where every layer does (layers from max_window_layers on slide, as in
    transformers); a mix of windowed and full layers is refused. transformers 4 configs have no
    layer_types."""
    d = transformers.Qwen2Config(**dict(FAMILIES["qwen2"].kwargs, use_sliding_window=True, sliding_window=8,
                                        max_window_layers=max_window_layers)).to_dict()
    if spelling == "v4":
        del d["layer_types"]
    if max_window_layers == 1:
        with pytest.raises(slidejax.SlidejaxError, match="full-attention layers mixed in"):
            ModelConfig.from_hf_dict(d)
    else:
        assert ModelConfig.from_hf_dict(d).sliding_window == window
    # With no window size, transformers attends fully in every layer, whatever the layer kinds.
    d["sliding_window"] = None
    assert ModelConfig.from_hf_dict(d).sliding_window is None
    assert transformers.Qwen2Config(**{k: v for k, v in d.items() if k != "layer_types"}).sliding_window is None


def test_bf16_compute_is_as_close_as_transformers_bf16(tmp_path):
    """The training dtype: slidejax's bf16 logits are no further from the fp32 truth than
    transformers' own bf16 forward is."""
    fam = FAMILIES["llama3"]
    tm = build_torch(fam, 11)
    tm.save_pretrained(tmp_path)
    ids = np.random.default_rng(12).integers(0, fam.kwargs["vocab_size"], (BATCH, SEQ))
    exact = torch_logits(tm, ids)
    torch_bf16 = rel_err(torch_logits(tm.to(torch.bfloat16), ids), exact)
    got = slidejax.load_pretrained(tmp_path, dtype="bfloat16").logits(ids)
    assert got.dtype == np.float32
    assert 1e-3 < rel_err(got, exact) < 2 * torch_bf16, (rel_err(got, exact), torch_bf16)


@pytest.mark.parametrize("spelling", ["v4", "v5", "both"])
def test_llama31_config_spellings(spelling):
    """A real Llama-3.1-8B config.json (transformers 4 spelling), its transformers 5 form, and a
    config with both keys, where transformers takes the scaling from rope_scaling."""
    d = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
         "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
         "max_position_embeddings": 131072, "tie_word_embeddings": False}
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    if spelling == "v4":
        d.update(rope_theta=500000.0, rope_scaling=dict(scaling, rope_type="llama3"))
    elif spelling == "v5":
        d.update(rope_parameters=dict(scaling, rope_type="llama3", rope_theta=500000.0))
    else:
        d.update(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rope_theta=500000.0,
                 rope_scaling=dict(scaling, rope_type="llama3"))
        assert transformers.LlamaConfig(**d).rope_parameters["rope_type"] == "llama3"
    cfg = ModelConfig.from_hf_dict(d)
    assert (cfg.rope_type, cfg.rope_theta, cfg.head_dim) == ("llama3", 500000.0, 128)
    assert cfg.num_params == 8_030_261_248  # Llama-3.1-8B's published count
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](transformers.LlamaConfig(**d), "cpu")
    np.testing.assert_allclose(cfg.inv_freq(), expected.numpy(), rtol=1e-6)


def test_sliding_window_changes_the_logits():
    """Guard for the Mistral case: with the window, transformers' logits differ from full attention."""
    fam = FAMILIES["mistral"]
    tm = build_torch(fam, 4)
    ids = np.random.default_rng(5).integers(0, fam.kwargs["vocab_size"], (1, SEQ))
    windowed = torch_logits(tm, ids)
    full = torch_logits(build_torch(dataclasses.replace(fam, kwargs=dict(fam.kwargs, sliding_window=None)), 4), ids)
    assert rel_err(windowed[:, fam.kwargs["sliding_window"]:], full[:, fam.kwargs["sliding_window"]:]) > 1e-2
    np.testing.assert_allclose(windowed[:, : fam.kwargs["sliding_window"]], full[:, : fam.kwargs["sliding_window"]],
                               rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- the embedded preset


def test_tiny_preset_loads_runs_exports_and_reloads(tmp_path):
    model = slidejax.load_pretrained("tiny", dtype="float32")
    cfg = model.config
    assert cfg.model_type == "llama" and len(vocab_chunks(cfg)) == 1
    ids = np.random.default_rng(9).integers(0, cfg.vocab_size, (2, 16))
    logits = model.logits(ids)
    assert logits.shape == (2, 16, cfg.vocab_size) and np.isfinite(logits).all() and logits.std() > 0
    # [seq] input, alone and with positions / segment ids of the same shape
    np.testing.assert_allclose(model.logits(ids[1]), logits[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.logits(ids[1], np.arange(16), np.ones(16, np.int32)), logits[1],
                               rtol=1e-5, atol=1e-6)
    out = model.save_pretrained(tmp_path / "tiny", dtype="float32")
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert rel_err(torch_logits(back, ids), logits) < TOL
    tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert len(tok) == cfg.vocab_size


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["llama3", "mistral"])
def test_gpu_cudnn_attention_matches_xla(name):
    """On the GPU, a bf16 decoder layer through cuDNN attention equals the XLA path, for plain
    causal rows, a sliding window and packed rows (segment mask)."""
    import jax.numpy as jnp

    from slidejax.model import LayerFn, init_params

    fam = FAMILIES[name]
    # head_dim 64: a size every cuDNN flash-attention version takes
    cfg = ModelConfig.from_hf_dict(fam.config_cls(**fam.kwargs).to_dict()).replace(head_dim=64)
    rng = np.random.default_rng(13)
    # weights 5x transformers' init so attention is peaked, not uniform
    w = {k: jnp.asarray(v * (5.0 if v.ndim > 1 else 1.0), jnp.bfloat16)
         for k, v in init_params(cfg.replace(num_layers=1), seed=13)["layers"][0].items()}
    s = 128
    x = jnp.asarray(rng.standard_normal((2, s, cfg.hidden_size)), jnp.bfloat16)
    pos = np.broadcast_to(np.arange(s, dtype=np.int32), (2, s))
    seg = np.ones((2, s), np.int32)
    seg[1, 40:90], seg[1, 90:120], seg[1, 120:] = 2, 3, 0
    packed_pos = pos.copy()
    packed_pos[1, 40:90], packed_pos[1, 90:120] = np.arange(50), np.arange(30)
    for p, sg in ((pos, None), (packed_pos, seg)):
        xla = jax.jit(LayerFn(cfg, None).__call__)(w, x, p, sg)
        cudnn = jax.jit(LayerFn(cfg, "cudnn").__call__)(w, x, p, sg)
        real = np.ones((2, s), bool) if sg is None else sg > 0
        assert rel_err(np.asarray(cudnn, np.float32)[real], np.asarray(xla, np.float32)[real]) < 2e-2


_BUILT = {
    "llama3-rope-biases": ModelConfig(model_type="llama", vocab_size=301, hidden_size=64, intermediate_size=96,
                                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=5e5,
                                      rope_type="llama3", rope_params=tuple(sorted(
                                          (k, float(v)) for k, v in _LLAMA3_ROPE.items() if k not in
                                          ("rope_type", "rope_theta"))),
                                      qkv_bias=True, o_bias=True, mlp_bias=True),
    "qwen3-bias-window": ModelConfig(model_type="qwen3", vocab_size=257, hidden_size=64, intermediate_size=96,
                                     num_layers=2, num_heads=4, num_kv_heads=1, head_dim=32, qkv_bias=True,
                                     o_bias=True, qk_norm=True, sliding_window=8),
    "qwen2-linear-window": ModelConfig(model_type="qwen2", vocab_size=257, hidden_size=64, intermediate_size=96,
                                       num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rope_type="linear",
                                       rope_params=(("factor", 4.0),), qkv_bias=True, sliding_window=8,
                                       tie_word_embeddings=True),
    "mistral-no-window": ModelConfig(model_type="mistral", vocab_size=257, hidden_size=64, intermediate_size=96,
                                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16),
}


@pytest.mark.parametrize("name", list(_BUILT))
def test_a_config_built_in_slidejax_exports_the_model_it_computes(name, tmp_path):
    """A `ModelConfig` made in code (no config.json behind it: RoPE scaling, biases, windows)
    is written so that transformers rebuilds the same model, and reads back equal."""
    cfg = _BUILT[name]
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    model = slidejax.from_config(cfg, dtype="float32", seed=int(np.random.default_rng().integers(1 << 30)))
    rng = np.random.default_rng()
    for leaf in jax.tree.leaves(model.params()):  # biases and norms away from their 0 / 1 init
        leaf[...] += 0.1 * rng.standard_normal(leaf.shape).astype(np.float32)
    ids = rng.integers(0, cfg.vocab_size, (BATCH, SEQ))
    out = model.save_pretrained(tmp_path / "hf", dtype="float32")
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert rel_err(torch_logits(back, ids), model.logits(ids)) < TOL


def test_configs_transformers_cannot_express_are_refused_and_mistral_defaults_its_window():
    base = _BUILT["mistral-no-window"]
    for change in (dict(qkv_bias=True), dict(mlp_bias=True), dict(qk_norm=True)):
        with pytest.raises(slidejax.SlidejaxError, match="cannot be written"):
            base.replace(**change).to_hf_dict()
    with pytest.raises(slidejax.SlidejaxError, match="cannot be written"):
        _BUILT["llama3-rope-biases"].replace(o_bias=False).to_hf_dict()
    d = base.to_hf_dict()
    assert "sliding_window" in d and d["sliding_window"] is None
    del d["sliding_window"]  # a config.json without the key: transformers' default window
    assert ModelConfig.from_hf_dict(d).sliding_window == transformers.MistralConfig().sliding_window == 4096
