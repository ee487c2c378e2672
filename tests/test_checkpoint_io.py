"""Hugging Face checkpoints in and out: sharding, tied weights, vocabulary row blocks, source dtypes,
re-export into a used folder, tokenizer files, config round trip, streaming reads.

Weights are compared bit for bit against transformers' own state dicts (no compilation needed);
the numerical parity of the models is tests/test_models_hf.py's job.
"""

from __future__ import annotations

import json
import shutil
import tracemalloc
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

import slidejax
from slidejax.config import ModelConfig
from slidejax.errors import SlidejaxError
from slidejax.hf_checkpoint import _parse_size
from slidejax.host_memory import vocab_chunks
from slidejax.presets import preset_path

SHARD = "20KB"  # small enough that every model below is cut into several shards


def tiny_torch(tied: bool, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random Llama with odd vocab 1009 whose vocabulary matrices span several row blocks."""
    torch.manual_seed(seed)
    kw = dict(vocab_size=1009, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    model = AutoModelForCausalLM.from_config(transformers.LlamaConfig(**kw), dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return model.eval()


def hf_tensors(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """What a checkpoint of `model` holds: its parameters (a tied lm_head once, as the embedding)."""
    return {n: p.detach().float().numpy() for n, p in model.named_parameters()}


def slidejax_tensors(model: slidejax.Model) -> dict[str, np.ndarray]:
    host = model.host
    return {hf: host.read_tensor(parts) for hf, parts in host.hf_names()}


def assert_same_tensors(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(expected)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def file_tensors(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of every *.safetensors file in `folder`, in the dtype stored."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="np") as f:
            for name in f.keys():
                assert name not in out, f"{name} stored twice"
                out[name] = f.get_tensor(name)
    return out


@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def tied(request) -> bool:
    return request.param


def test_vocabulary_spans_several_row_blocks():
    cfg = ModelConfig.from_hf_dict(tiny_torch(False).config.to_dict())
    chunks = vocab_chunks(cfg)
    assert len(chunks) >= 3 and chunks[0][0] == 0 and chunks[-1][1] == 1009
    assert all(a[1] == b[0] for a, b in zip(chunks[:-1], chunks[1:]))


def test_transformers_sharded_checkpoint_loads_exactly(tied, tmp_path):
    tm = tiny_torch(tied)
    tm.save_pretrained(tmp_path, max_shard_size=SHARD)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3 and not (tmp_path / "model.safetensors").exists()
    model = slidejax.load_pretrained(tmp_path, dtype="float32")
    assert model.config.tie_word_embeddings == tied
    assert len(model.host.embed_units) >= 3
    assert_same_tensors(slidejax_tensors(model), hf_tensors(tm))


def test_lone_weights_file_beside_an_index_is_read_as_transformers_reads_it(tmp_path):
    """A folder holding both a sharded checkpoint (with its index) and a lone model.safetensors
    of other weights: transformers loads the lone file, and so must slidejax."""
    tm_sharded, tm_lone = tiny_torch(False, seed=11), tiny_torch(False, seed=12)
    tm_sharded.save_pretrained(tmp_path, max_shard_size=SHARD)
    lone = tmp_path / "lone"
    tm_lone.save_pretrained(lone)
    shutil.copy(lone / "model.safetensors", tmp_path / "model.safetensors")
    assert (tmp_path / "model.safetensors.index.json").exists()
    reference = hf_tensors(AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32))
    assert_same_tensors(reference, hf_tensors(tm_lone))
    assert_same_tensors(slidejax_tensors(slidejax.load_pretrained(tmp_path, dtype="float32")), reference)


def test_sharded_export_has_index_and_transformers_reloads_it(tied, tmp_path):
    tm = tiny_torch(tied, seed=1)
    tm.save_pretrained(tmp_path / "src")
    model = slidejax.load_pretrained(tmp_path / "src", dtype="float32")
    out = model.save_pretrained(tmp_path / "out", dtype="float32", max_shard_size=SHARD)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n >= 3 and files == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert sorted(p.name for p in out.glob("*.safetensors")) == files
    stored = file_tensors(out)
    assert set(index["weight_map"]) == set(stored) == set(hf_tensors(tm))
    assert ("lm_head.weight" in stored) == (not tied)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in stored.values())
    for f in files:  # a shard exceeds the limit only when it holds one tensor bigger than it
        names = [k for k, v in index["weight_map"].items() if v == f]
        assert sum(stored[k].nbytes for k in names) <= _parse_size(SHARD) or len(names) == 1

    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert back.config.tie_word_embeddings == tied
    assert_same_tensors(hf_tensors(back), hf_tensors(tm))
    if tied:
        assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()
    assert_same_tensors(slidejax_tensors(slidejax.load_pretrained(out, dtype="float32")), hf_tensors(tm))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_source_round_trips_bit_for_bit(dtype, tmp_path):
    tm = tiny_torch(False, seed=2).to(dtype)
    tm.save_pretrained(tmp_path / "src", max_shard_size=SHARD)
    source = file_tensors(tmp_path / "src")
    np_dtype = {torch.bfloat16: ml_dtypes.bfloat16, torch.float16: np.float16}[dtype]
    assert all(a.dtype == np_dtype for a in source.values())

    model = slidejax.load_pretrained(tmp_path / "src", dtype="float32")
    # fp32 masters hold the source values exactly
    assert_same_tensors(slidejax_tensors(model), {k: a.astype(np.float32) for k, a in source.items()})
    name = {torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    out = model.save_pretrained(tmp_path / "out", dtype=name)
    exported = file_tensors(out)
    assert sorted(exported) == sorted(source)
    for k in source:  # same bits
        assert exported[k].dtype == np_dtype
        np.testing.assert_array_equal(exported[k].view(np.uint16), source[k].view(np.uint16), err_msg=k)
    assert json.loads((out / "config.json").read_text())["dtype"] == name
    back = AutoModelForCausalLM.from_pretrained(out)
    assert back.model.embed_tokens.weight.dtype == dtype


def test_tied_checkpoint_that_also_stores_lm_head_uses_the_embedding(tmp_path):
    """Some tied checkpoints also store lm_head.weight; the embedding is the weight used."""
    tm = tiny_torch(True, seed=3)
    tm.save_pretrained(tmp_path)
    from safetensors.numpy import save_file

    tensors = file_tensors(tmp_path)
    tensors["lm_head.weight"] = np.random.default_rng(0).standard_normal((1009, 32)).astype(np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model = slidejax.load_pretrained(tmp_path, dtype="float32")
    assert "lm_head" not in model.host.tree()
    assert_same_tensors(slidejax_tensors(model), hf_tensors(tm))


def test_reexport_into_a_used_folder_replaces_the_weights(tmp_path):
    """Exports single-file -> sharded -> single-file into one folder: each reload (transformers and
    slidejax) sees the latest weights, no earlier weight file survives, other files are kept."""
    tm = tiny_torch(False, seed=4)
    tm.save_pretrained(tmp_path / "src")
    model = slidejax.load_pretrained(tmp_path / "src", dtype="float32")
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"not ours")
    (out / "README.md").write_text("notes")
    for k, shard in enumerate(["5GB", SHARD, "5GB", SHARD]):
        model.host.units["norm"].master[:] = np.random.default_rng(k).uniform(0.5, 1.5, 32).astype(np.float32)
        model.save_pretrained(out, dtype="float32", max_shard_size=shard)
        expected = slidejax_tensors(model)
        assert_same_tensors(hf_tensors(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)), expected)
        assert_same_tensors(slidejax_tensors(slidejax.load_pretrained(out, dtype="float32")), expected)
        weights = {p.name for p in out.glob("model*.safetensors")}
        assert (weights == {"model.safetensors"}) == (shard == "5GB")
        assert (out / "model.safetensors.index.json").exists() == (shard == SHARD)
    assert (out / "adapter_model.safetensors").read_bytes() == b"not ours"
    assert (out / "README.md").read_text() == "notes"


def test_export_into_its_own_source_folder(tmp_path):
    tm = tiny_torch(False, seed=5)
    tm.save_pretrained(tmp_path, max_shard_size=SHARD)
    model = slidejax.load_pretrained(tmp_path, dtype="float32")
    model.host.units["norm"].master[:] = 2.0
    model.save_pretrained(tmp_path, dtype="float32")
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert_same_tensors(slidejax_tensors(slidejax.load_pretrained(tmp_path, dtype="float32")), slidejax_tensors(model))


def test_tokenizer_files_are_copied_and_config_round_trips(tmp_path):
    """A Mistral folder with a tokenizer: the export carries the tokenizer files byte for byte and a
    config.json transformers reads as the same architecture (window, rope, special ids)."""
    torch.manual_seed(6)
    tcfg = transformers.MistralConfig(vocab_size=292, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=1, sliding_window=16,
                                      rope_theta=123456.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    tm = AutoModelForCausalLM.from_config(tcfg)
    src = tmp_path / "src"
    tm.save_pretrained(src)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(preset_path("tiny") / f, src / f)
    model = slidejax.load_pretrained(src, dtype="float32")
    assert len(model.tokenizer()) == 292
    out = model.save_pretrained(tmp_path / "out", dtype="float32")
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).read_bytes() == (src / f).read_bytes(), f
    assert len(transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)) == 292

    ignore = {"dtype", "torch_dtype", "transformers_version", "_name_or_path", "architectures"}
    a = {k: v for k, v in AutoConfig.from_pretrained(src).to_dict().items() if k not in ignore}
    b = {k: v for k, v in AutoConfig.from_pretrained(out).to_dict().items() if k not in ignore}
    assert a == b
    assert b["sliding_window"] == 16 and b["rope_parameters"]["rope_theta"] == 123456.0
    assert_same_tensors(hf_tensors(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)), hf_tensors(tm))


def test_loading_streams_tensor_by_tensor(tmp_path):
    """Peak traced memory while loading stays near the fp32 masters plus a few tensors: the
    checkpoint (as large as the masters here) is never held whole."""
    tm = tiny_torch(False, seed=7, num_hidden_layers=12, hidden_size=128, intermediate_size=256)
    tm.save_pretrained(tmp_path, max_shard_size="1MB")
    checkpoint = sum(p.stat().st_size for p in tmp_path.glob("*.safetensors"))
    largest = max(a.nbytes for a in hf_tensors(tm).values())
    tracemalloc.start()
    try:
        model = slidejax.load_pretrained(tmp_path, dtype="float32")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    masters = model.host.nbytes
    assert masters == pytest.approx(checkpoint, rel=0.01)
    assert peak < masters + 4 * largest + 1_000_000, (peak, masters, largest)
    assert_same_tensors(slidejax_tensors(model), hf_tensors(tm))


def test_max_shard_size_spellings():
    assert _parse_size("20KB") == 20_000 and _parse_size("5GB") == 5 * 10**9
    assert _parse_size("1MiB") == 2**20 and _parse_size("2gib") == 2 * 2**30 and _parse_size("1.5KiB") == 1536
    assert _parse_size(12345) == 12345 and _parse_size("777") == 777
    for bad in ("lots", "5XB", "-1GB", "0", ""):
        with pytest.raises(SlidejaxError, match="max_shard_size"):
            _parse_size(bad)


def test_bad_export_settings_are_one_line_errors(tmp_path):
    tm = tiny_torch(False, seed=8)
    tm.save_pretrained(tmp_path / "src")
    model = slidejax.load_pretrained(tmp_path / "src", dtype="float32")
    with pytest.raises(SlidejaxError, match="export dtype 'int8'") as e:
        model.save_pretrained(tmp_path / "a", dtype="int8")
    assert "\n" not in str(e.value)
    with pytest.raises(SlidejaxError, match="max_shard_size 'big'"):
        model.save_pretrained(tmp_path / "b", max_shard_size="big")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SlidejaxError, match="not writable"):
        model.save_pretrained(blocker / "sub")
    assert not list((tmp_path / "a").glob("*.safetensors")) and not list((tmp_path / "b").glob("*.safetensors"))


def test_export_names_the_architecture_when_the_source_did_not(tmp_path):
    tm = tiny_torch(False, seed=9)
    tm.save_pretrained(tmp_path / "src")
    cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    cfg["architectures"] = None
    (tmp_path / "src" / "config.json").write_text(json.dumps(cfg))
    out = slidejax.load_pretrained(tmp_path / "src", dtype="float32").save_pretrained(tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
