"""Embedded presets: models, tokenizers and tasks that ship with the package (no download).

A preset is a folder holding a Hugging Face ``config.json``, a tokenizer (``tokenizer.json`` +
``tokenizer_config.json``, loadable offline by ``transformers.AutoTokenizer.from_pretrained``)
and prompt/completion task data (``train.jsonl``, ``eval.jsonl``). The trainer's task metric is
greedy-decode exact match on the eval prompts::

    prompts, references = task_eval_examples("tiny")
    score = exact_match(predictions, references)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from slidejax.errors import SlidejaxError

PRESETS: dict[str, str] = {
    "tiny": "4-layer Llama (hidden 128, GQA 4/2 heads, 0.86M params), byte-level BPE, task: sort letters",
}

_ROOT = Path(__file__).resolve().parent


def preset_path(name: str) -> Path:
    """The folder of preset ``name`` (config.json, tokenizer files, train.jsonl, eval.jsonl)."""
    if name not in PRESETS:
        known = ", ".join(sorted(PRESETS))
        raise SlidejaxError(f"unknown preset {name!r}; known presets: {known}")
    folder = _ROOT / name
    if not (folder / "config.json").is_file():
        raise SlidejaxError(f"preset {name!r} is incomplete: {folder / 'config.json'} is missing (broken install?)")
    return folder


def task_eval_examples(name: str) -> tuple[list[str], list[str]]:
    """The eval prompts of preset ``name`` and their reference completions, in file order.

    A prompt is encoded for generation as the data pipeline encodes it in training (BOS if the
    tokenizer adds one, then the prompt's tokens, see ``slidejax.data.encode_prompt``); the model's
    greedy continuation up to EOS, decoded, is the prediction compared to the reference.
    """
    path = preset_path(name) / "eval.jsonl"
    prompts, references = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SlidejaxError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("prompt", "completion")):
                raise SlidejaxError(f"{path}:{lineno}: expected string fields 'prompt' and 'completion'")
            prompts.append(row["prompt"])
            references.append(row["completion"])
    if not prompts:
        raise SlidejaxError(f"{path}: no eval examples")
    return prompts, references


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference, ignoring leading/trailing whitespace."""
    if len(predictions) != len(references):
        raise SlidejaxError(f"exact_match: {len(predictions)} predictions for {len(references)} references")
    if not references:
        raise SlidejaxError("exact_match: no references to score")
    hits = sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True))
    return hits / len(references)


__all__ = ["PRESETS", "preset_path", "task_eval_examples", "exact_match"]
