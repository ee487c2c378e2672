"""The embedded "tiny" preset: files, offline tokenizer, config, task, metric, reproducible build."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

from slidejax.data import encode_prompt
from slidejax.errors import SlidejaxError
from slidejax.presets import PRESETS, exact_match, preset_path, task_eval_examples

ROOT = Path(__file__).resolve().parents[1]
FILES = ["config.json", "tokenizer.json", "tokenizer_config.json", "train.jsonl", "eval.jsonl"]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(preset_path("tiny"), local_files_only=True)


def test_preset_folder_is_complete_and_small():
    folder = preset_path("tiny")
    assert folder.is_dir() and set(PRESETS) == {"tiny"}
    assert all((folder / f).is_file() for f in FILES)
    assert sum((folder / f).stat().st_size for f in FILES) < 1_000_000


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(SlidejaxError, match=r"unknown preset 'huge'; known presets: tiny"):
        preset_path("huge")
    with pytest.raises(SlidejaxError, match="unknown preset"):
        task_eval_examples("huge")


def test_tokenizer_matches_config(tok):
    cfg = json.loads((preset_path("tiny") / "config.json").read_text())
    assert len(tok) == cfg["vocab_size"] and 256 < len(tok) < 512
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"])
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3


def test_tokenizer_is_byte_level_and_adds_bos(tok):
    rng = random.Random(3)
    # any text round-trips, including characters never seen in the task data
    for text in ["sort q d k =", "héllo wörld ✓ 123", "".join(chr(rng.randint(33, 0x2FFF)) for _ in range(40))]:
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text
    # digits are single tokens; each letter of the task is one token
    assert len(tok("12345", add_special_tokens=False).input_ids) == 5
    assert len(tok(" a b c d", add_special_tokens=False).input_ids) == 4


def test_chat_template_renders(tok):
    msgs = [{"role": "user", "content": "sort c a b ="}, {"role": "assistant", "content": " a b c"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == "<s><|user|>sort c a b =</s><|assistant|> a b c</s>"
    assert tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True).endswith("<|assistant|>")
    ids = tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
    assert ids[:2] == [tok.bos_token_id, tok.convert_tokens_to_ids("<|user|>")]


def test_config_builds_a_llama_that_runs(tok):
    cfg = AutoConfig.from_pretrained(preset_path("tiny"), local_files_only=True)
    assert cfg.model_type == "llama" and cfg.num_hidden_layers == 4
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)  # GQA
    assert 128 <= cfg.hidden_size <= 256 and cfg.intermediate_size == 3 * cfg.hidden_size
    rope = getattr(cfg, "rope_parameters", None) or {}  # transformers 5 moved rope_theta in here
    assert rope.get("rope_theta", getattr(cfg, "rope_theta", None)) == 10000
    assert not cfg.tie_word_embeddings
    assert cfg.max_position_embeddings == 512
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 2e6
    prompts, refs = task_eval_examples("tiny")
    ids = torch.tensor([encode_prompt(tok, prompts[0]) + tok(refs[0], add_special_tokens=False).input_ids])
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], len(tok))
    # an untrained model is near uniform over the vocabulary
    assert abs(out.loss.item() - np.log(len(tok))) < 0.5


def letters(prompt: str) -> list[str]:
    head, body = prompt.split(" ", 1)
    assert head == "sort" and body.endswith(" =")
    return body[:-2].split(" ")


def test_task_references_are_the_sorted_letters():
    prompts, refs = task_eval_examples("tiny")
    assert len(prompts) == len(refs) == 200
    for p, r in zip(prompts, refs, strict=True):
        got = letters(p)
        assert 3 <= len(got) <= 6 and len(set(got)) == len(got) and all(len(c) == 1 and c.isalpha() for c in got)
        assert r == " " + " ".join(sorted(got))
    train = [json.loads(line) for line in (preset_path("tiny") / "train.jsonl").read_text().splitlines()]
    assert len(train) == 8000 and all(r["completion"] == " " + " ".join(sorted(letters(r["prompt"]))) for r in train)
    assert not {r["prompt"] for r in train} & set(prompts)  # eval measures generalisation, not recall
    assert len(set(prompts)) == len(prompts)


def test_exact_match():
    refs = [" a b c", " d e", " f g h"]
    assert exact_match([" a b c", "d e ", " f g"], refs) == pytest.approx(2 / 3)
    assert exact_match(refs, refs) == 1.0 and exact_match(["x", "y", "z"], refs) == 0.0
    with pytest.raises(SlidejaxError, match="2 predictions for 3 references"):
        exact_match(refs[:2], refs)
    with pytest.raises(SlidejaxError, match="no references"):
        exact_match([], [])


def test_build_script_reproduces_the_committed_preset(tmp_path):
    spec = importlib.util.spec_from_file_location("build_tiny_preset", ROOT / "scripts" / "build_tiny_preset.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    build.build(tmp_path)
    for f in FILES:
        assert (tmp_path / f).read_bytes() == (preset_path("tiny") / f).read_bytes(), f
