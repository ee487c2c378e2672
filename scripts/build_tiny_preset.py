"""Build the embedded "tiny" preset: a tiny Llama config, a byte-level BPE tokenizer and a task.

The task is sorting letters: the prompt ``"sort q d k ="`` asks for ``" d k q"``. A 4-layer,
hidden-128 model learns it within about a minute of CPU training (greedy exact match on the
held-out prompts goes from 0 to ~0.9), so a user sees a fine-tune work without any download.

Everything is generated deterministically from fixed seeds; the outputs are committed under
``slidejax/presets/tiny/`` and this script regenerates them byte for byte::

    python scripts/build_tiny_preset.py [--out slidejax/presets/tiny]
"""

from __future__ import annotations

import argparse
import json
import random
import string
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

TRAIN_EXAMPLES = 8000
EVAL_EXAMPLES = 200
MIN_LETTERS, MAX_LETTERS = 3, 6
SEED = 20240611

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [PAD, BOS, EOS, *ROLE_TOKENS]
BPE_VOCAB_SIZE = 320  # 256 byte symbols + specials + a few dozen merges of the task's text
MAX_POSITIONS = 512

# Each turn is "<|role|>content</s>"; the BOS opens the conversation. Kept deliberately plain so
# the masking of assistant turns can be checked by eye.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def sort_example(rng: random.Random) -> dict[str, str]:
    """One prompt/completion pair: distinct letters in random order, and the same letters sorted."""
    letters = rng.sample(string.ascii_lowercase, rng.randint(MIN_LETTERS, MAX_LETTERS))
    return {"prompt": "sort " + " ".join(letters) + " =", "completion": " " + " ".join(sorted(letters))}


def make_task(rng: random.Random) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Train and eval examples; eval prompts never occur in train, so eval measures generalisation."""
    train = [sort_example(rng) for _ in range(TRAIN_EXAMPLES)]
    seen = {ex["prompt"] for ex in train}
    evals: list[dict[str, str]] = []
    while len(evals) < EVAL_EXAMPLES:
        ex = sort_example(rng)
        if ex["prompt"] not in seen:
            seen.add(ex["prompt"])
            evals.append(ex)
    return train, evals


def train_tokenizer(texts: list[str]) -> Tokenizer:
    """Byte-level BPE (any UTF-8 text encodes), digits split one per token, BOS added by convention."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def tokenizer_config() -> dict:
    """tokenizer_config.json for transformers' AutoTokenizer (fast tokenizer from tokenizer.json)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "additional_special_tokens": ROLE_TOKENS,
        "model_max_length": MAX_POSITIONS,
        "padding_side": "right",
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def model_config(tok: Tokenizer) -> dict:
    """A tiny Llama: 4 layers, hidden 128, 4 query heads sharing 2 KV heads (GQA), untied head."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": tok.get_vocab_size(),
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "bos_token_id": tok.token_to_id(BOS),
        "eos_token_id": tok.token_to_id(EOS),
        "pad_token_id": tok.token_to_id(PAD),
        "torch_dtype": "float32",
    }


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def build(out: Path) -> None:
    """Write config.json, tokenizer.json, tokenizer_config.json, train.jsonl and eval.jsonl to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    train, evals = make_task(random.Random(SEED))
    tok = train_tokenizer([ex["prompt"] + ex["completion"] for ex in train])
    tok.save(str(out / "tokenizer.json"), pretty=True)
    write_json(out / "tokenizer_config.json", tokenizer_config())
    write_json(out / "config.json", model_config(tok))
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "eval.jsonl", evals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default = Path(__file__).resolve().parents[1] / "slidejax" / "presets" / "tiny"
    parser.add_argument("--out", type=Path, default=default, help="output folder (default: %(default)s)")
    build(parser.parse_args().out)


if __name__ == "__main__":
    main()
