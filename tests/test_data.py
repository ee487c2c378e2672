"""Data pipeline: formats, label masking, packing, order, resumption and bad input."""

from __future__ import annotations

import copy
import json
import random
import string
import warnings

import numpy as np
import pytest
from transformers import AutoTokenizer

from slidejax.data import IGNORE, Batch, DataLoader, encode_chat, encode_prompt, eval_loader
from slidejax.errors import SlidejaxError
from slidejax.presets import preset_path


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(preset_path("tiny"))


GENERATION_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>{% generation %}{{ m['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}{{ '<|' + m['role'] + '|>' }}{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Plain-text role markers: BPE may merge across turn boundaries, the hard case for masking.
TEXT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def with_template(tok, template):
    t = copy.deepcopy(tok)
    t.chat_template = template
    return t


def words(rng: random.Random, lo=1, hi=8) -> str:
    return " ".join("".join(rng.choices(string.ascii_letters + "0123456789,.!?", k=rng.randint(1, 7)))
                    for _ in range(rng.randint(lo, hi)))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def documents(batches: list[Batch]):
    """Split packed batches back into documents: (input_ids, labels) per segment, in row order.

    Also checks the packing invariants every row must keep, token by token.
    """
    out = []
    for b in batches:
        m, bs, s = b.input_ids.shape
        for arr in (b.input_ids, b.labels, b.segment_ids, b.positions):
            assert arr.dtype == np.int32 and arr.shape == (m, bs, s)
        for ids, labels, seg, pos in zip(*(a.reshape(m * bs, s) for a in
                                           (b.input_ids, b.labels, b.segment_ids, b.positions)), strict=True):
            n_docs = seg.max()
            used = int(np.count_nonzero(seg))
            # documents are contiguous runs 1, 2, .., k from the row start, then padding only
            assert np.all(seg[:used] > 0) and np.all(seg[used:] == 0)
            assert np.all(np.diff(seg[:used]) >= 0) and np.all(np.diff(seg[:used]) <= 1)
            assert np.all(labels[used:] == IGNORE) and np.all(pos[used:] == 0)
            for t in range(s - 1):
                if labels[t] != IGNORE:  # a loss target is the next token of the same document
                    assert seg[t + 1] == seg[t] != 0 and labels[t] == ids[t + 1]
            for k in range(1, n_docs + 1):
                where = np.flatnonzero(seg == k)
                np.testing.assert_array_equal(pos[where], np.arange(len(where)))
                assert labels[where[-1]] == IGNORE  # no loss across the document boundary
                out.append((ids[where].tolist(), labels[where].tolist()))
    return out


def shifted(ids, targets):
    """Reference: the label of position t is targets[t+1] (HF-style, -100 = no loss), computed by a loop."""
    labels = []
    for t in range(len(ids)):
        labels.append(targets[t + 1] if t + 1 < len(ids) else IGNORE)
    return labels


def load_all(path, tokenizer, seq_len=192, **kw):
    kw.setdefault("micro_batch_size", 3)
    kw.setdefault("micro_batches_per_step", 2)
    dl = DataLoader(path, tokenizer, seq_len=seq_len, num_epochs=1, **kw)
    return dl, list(dl)


def assert_same_documents(got, expected):
    key = lambda d: (tuple(d[0]), tuple(d[1]))  # noqa: E731
    assert sorted(map(key, got)) == sorted(map(key, expected))


# ----------------------------------------------------------------------------------------------
# Formats, each against an independently built reference


def test_prompt_completion_masks_the_prompt(tok, tmp_path):
    rng = random.Random(11)
    rows = [{"prompt": words(rng), "completion": " " + words(rng)} for _ in range(40)]
    dl, batches = load_all(write_jsonl(tmp_path / "pc.jsonl", rows), tok)
    assert dl.formats == ["prompt_completion"]
    expected = []
    for r in rows:
        prompt = tok(r["prompt"]).input_ids  # the tokenizer's own BOS convention
        assert prompt[0] == tok.bos_token_id
        completion = tok(r["completion"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        ids = prompt + completion
        expected.append((ids, shifted(ids, [IGNORE] * len(prompt) + completion)))
        assert encode_prompt(tok, r["prompt"]) == prompt
    assert_same_documents(documents(batches), expected)
    assert dl.documents_seen == len(rows) and dl.documents_truncated == 0


def test_jsonl_text_supervises_every_token(tok, tmp_path):
    rng = random.Random(12)
    rows = [{"text": words(rng, 1, 20), "meta": rng.random()} for _ in range(30)]
    _, batches = load_all(write_jsonl(tmp_path / "t.jsonl", rows), tok)
    expected = []
    for r in rows:
        ids = tok(r["text"]).input_ids + [tok.eos_token_id]
        expected.append((ids, shifted(ids, ids)))
    assert_same_documents(documents(batches), expected)


def test_txt_blocks_are_documents(tok, tmp_path):
    rng = random.Random(13)
    blocks = ["\n".join(words(rng) for _ in range(rng.randint(1, 3))) for _ in range(12)]
    # blank lines (some with spaces, some several) separate documents; a missing final newline is fine
    sep = ["\n\n", "\n  \n", "\n\n\n"]
    (tmp_path / "d.txt").write_text("\n" + "".join(b + sep[k % 3] for k, b in enumerate(blocks[:-1])) + blocks[-1])
    dl, batches = load_all(tmp_path / "d.txt", tok)
    assert dl.formats == ["txt"] and dl.num_documents == len(blocks)
    expected = []
    for b in blocks:
        ids = tok(b).input_ids + [tok.eos_token_id]
        expected.append((ids, shifted(ids, ids)))
    assert_same_documents(documents(batches), expected)


def test_pretokenized_used_verbatim(tok, tmp_path):
    rng = np.random.default_rng(14)
    rows, expected = [], []
    for k in range(25):
        n = int(rng.integers(2, 30))
        ids = rng.integers(0, len(tok), n).tolist()
        row = {"input_ids": ids}
        targets = ids
        if k % 2:
            targets = [t if rng.random() < 0.6 else IGNORE for t in ids]
            row["labels"] = targets
        rows.append(row)
        expected.append((ids, shifted(ids, targets)))
    dl, batches = load_all(write_jsonl(tmp_path / "tok.jsonl", rows), tok)
    assert dl.formats == ["tokens"]
    assert_same_documents(documents(batches), expected)
    # no tokenizer is needed for pre-tokenized data
    _, again = load_all(tmp_path / "tok.jsonl", None)
    assert_same_documents(documents(again), expected)


def test_no_bos_when_the_tokenizer_adds_none(tok, tmp_path):
    from tokenizers import processors
    nobos = copy.deepcopy(tok)
    nobos._tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    assert nobos("ab").input_ids == tok("ab", add_special_tokens=False).input_ids
    rows = [{"text": "hello there"}, {"prompt": "sort b a =", "completion": " a b"}]
    write_jsonl(tmp_path / "a.jsonl", rows[:1])
    write_jsonl(tmp_path / "b.jsonl", rows[1:])
    _, batches = load_all([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], nobos)
    docs = documents(batches)
    assert all(d[0][0] != tok.bos_token_id and d[0][-1] == tok.eos_token_id for d in docs)
    assert encode_prompt(nobos, "sort b a =") == tok("sort b a =", add_special_tokens=False).input_ids


def chat_reference(tok, messages):
    """Hand-built rendering of the preset's template: <s> then <|role|>content</s> per turn."""
    ids, targets = [tok.bos_token_id], [IGNORE]
    for m in messages:
        role = tok.convert_tokens_to_ids(f"<|{m['role']}|>")
        body = tok(m["content"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        ids += [role] + body
        targets += [IGNORE] + (body if m["role"] == "assistant" else [IGNORE] * len(body))
    return ids, targets


def random_conversation(rng):
    msgs = [{"role": "system", "content": words(rng)}] if rng.random() < 0.5 else []
    for _ in range(rng.randint(1, 3)):
        msgs.append({"role": "user", "content": words(rng)})
        msgs.append({"role": "assistant", "content": words(rng)})
    if rng.random() < 0.3:
        msgs.append({"role": "user", "content": words(rng)})  # ends on a user turn: no final target
    return msgs


@pytest.mark.parametrize("template", ["preset", "generation"])
def test_chat_loss_only_on_assistant_turns(tok, tmp_path, template):
    chat_tok = tok if template == "preset" else with_template(tok, GENERATION_TEMPLATE)
    rng = random.Random(15)
    convs = [random_conversation(rng) for _ in range(20)]
    dl, batches = load_all(write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in convs]), chat_tok,
                           seq_len=256)
    assert dl.formats == ["chat"]
    expected = []
    for c in convs:
        ids, targets = chat_reference(tok, c)
        expected.append((ids, shifted(ids, targets)))
    assert_same_documents(documents(batches), expected)


def test_chat_masking_with_text_role_markers(tok):
    """Role markers that are plain text: the supervised tokens decode to exactly each answer + newline."""
    t = with_template(tok, TEXT_TEMPLATE)
    rng = random.Random(16)
    for _ in range(10):
        msgs = random_conversation(rng)
        ids, mask = encode_chat(t, msgs)
        assert ids == t(t.apply_chat_template(msgs, tokenize=False), add_special_tokens=False).input_ids
        runs, cur = [], []
        for i, m in zip(ids, mask, strict=True):
            if m:
                cur.append(i)
            elif cur:
                runs.append(cur)
                cur = []
        if cur:
            runs.append(cur)
        answers = [" " + m["content"] + "\n" for m in msgs if m["role"] == "assistant"]
        assert [t.decode(r) for r in runs] == answers


def test_chat_gets_eos_when_the_template_writes_none(tok, tmp_path):
    t = with_template(tok, TEXT_TEMPLATE)
    convs = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
             [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]]
    _, batches = load_all(write_jsonl(tmp_path / "c.jsonl", [{"messages": c} for c in convs]), t, shuffle=False)
    docs = {tuple(d[0]): d[1] for d in documents(batches)}
    for c in convs:
        ids = t(t.apply_chat_template(c, tokenize=False), add_special_tokens=False).input_ids + [t.eos_token_id]
        labels = docs[tuple(ids)]
        # EOS ends every document; it is a target only after a final assistant turn
        assert (labels[-2] == t.eos_token_id) == (c[-1]["role"] == "assistant")


def test_chat_template_that_rewrites_history_is_refused(tok, tmp_path):
    hiding = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}<|assistant|>...{% else %}"
              "{{ '<|' + m['role'] + '|>' }}{{ m['content'] }}{% endif %}{{ eos_token }}{% endfor %}"
              "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}])
    with pytest.raises(SlidejaxError, match=rf"{path}:1: .*renders earlier turns differently"):
        list(DataLoader(path, with_template(tok, hiding), seq_len=64, micro_batch_size=1, micro_batches_per_step=1))


def test_mixed_formats_in_one_loader(tok, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "one two"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "p", "completion": "q"}])
    c = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "x"},
                                                         {"role": "assistant", "content": "y"}]}])
    dl, batches = load_all([a, b, c], tok)
    assert dl.formats == ["text", "prompt_completion", "chat"]
    assert len(documents(batches)) == 3
    forced = DataLoader(a, tok, seq_len=32, micro_batch_size=1, micro_batches_per_step=1, format="txt")
    assert forced.formats == ["txt"]  # forced: the JSON line is read as plain text
    ids = next(forced).input_ids[0, 0]
    assert tok.decode(ids[1:ids.tolist().index(tok.eos_token_id)]) == '{"text": "one two"}'


# ----------------------------------------------------------------------------------------------
# Packing, order, resumption


def token_file(tmp_path, n_docs, rng, lo=2, hi=40, name="docs.jsonl"):
    """Pre-tokenized documents of random lengths; the first two ids make each one unique."""
    rows = []
    for k in range(n_docs):
        body = rng.integers(8, 290, int(rng.integers(lo, hi))).tolist()
        rows.append({"input_ids": [k // 200 + 3, k % 200 + 10] + body})
    return write_jsonl(tmp_path / name, rows), rows


def test_packing_covers_each_document_once_and_fills_rows(tmp_path):
    rng = np.random.default_rng(21)
    path, rows = token_file(tmp_path, 300, rng)
    dl, batches = load_all(path, None, seq_len=96, micro_batch_size=4, micro_batches_per_step=3)
    docs = documents(batches)
    assert sorted(tuple(d[0]) for d in docs) == sorted(tuple(r["input_ids"]) for r in rows)
    fill = sum(int(np.count_nonzero(b.segment_ids)) for b in batches[:-1]) / sum(b.input_ids.size for b in batches[:-1])
    assert fill > 0.95, fill  # first fit over the lookahead leaves little padding
    assert all(b.input_ids.shape == (3, 4, 96) for b in batches)
    assert dl.tokens_per_step == 3 * 4 * 96 and dl.steps == len(batches)
    assert dl.count_steps() == len(batches) and dl.steps == len(batches)  # counting leaves the loader alone
    with pytest.raises(StopIteration):
        next(dl)


def test_count_steps_leaves_out_batches_without_a_supervised_token(tok, tmp_path):
    """Training skips a batch whose labels are all -100 (prompts that fill the row, so no
    completion token fits); the step count a schedule is built on must skip it too."""
    rng = random.Random()
    short = [{"prompt": words(rng, 1, 3), "completion": " " + words(rng, 1, 3)} for _ in range(8)]
    long = [{"prompt": words(rng, 60, 80), "completion": " " + words(rng)} for _ in range(4)]
    path = write_jsonl(tmp_path / "pc.jsonl", short + long)
    dl = DataLoader(path, tok, seq_len=32, micro_batch_size=2, micro_batches_per_step=2, shuffle=False,
                    num_epochs=1, on_overlong="truncate")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the truncation warning
        batches = list(dl)
    trained = sum(bool(np.any(b.labels != IGNORE)) for b in batches)
    assert trained < len(batches)  # the data does have a batch that training skips
    assert dl.count_steps() == trained


def test_packing_is_oldest_first_then_first_fit(tmp_path):
    rng = np.random.default_rng(27)
    lengths = [6, 12, 10, 4, 16, 3]
    rows = [{"input_ids": rng.integers(1, 200, n).tolist()} for n in lengths]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    b = next(DataLoader(path, None, seq_len=16, micro_batch_size=4, micro_batches_per_step=1, shuffle=False,
                        num_epochs=1))
    # hand-packed: [6 + 10 (exact fit)], [12 + 4], [16], [3 + padding]
    want = [[0, 2], [1, 3], [4], [5]]
    for r, docs in enumerate(want):
        np.testing.assert_array_equal(b.input_ids[0, r, :sum(lengths[d] for d in docs)],
                                      np.concatenate([rows[d]["input_ids"] for d in docs]))
        assert b.segment_ids[0, r].max() == len(docs)
    assert np.count_nonzero(b.segment_ids) == sum(lengths)


def order(batches):
    return [tuple(d[0][:2]) for d in documents(batches)]


def test_order_is_seeded_and_reshuffled_each_epoch(tmp_path):
    rng = np.random.default_rng(22)
    path, _ = token_file(tmp_path, 60, rng)
    kw = dict(seq_len=64, micro_batch_size=2, micro_batches_per_step=2, num_epochs=2)
    a, b, c = (list(DataLoader(path, None, seed=s, **kw)) for s in (5, 5, 6))
    for x, y in zip(a, b, strict=True):
        for f in ("input_ids", "labels", "segment_ids", "positions"):
            np.testing.assert_array_equal(getattr(x, f), getattr(y, f))
    assert order(a) != order(c)
    assert sorted(order(a)) == sorted(order(c)) and len(set(order(a))) == 60  # each document twice


def test_epoch_order_is_the_seed_plus_epoch_permutation(tmp_path):
    """Documents that fill a row exactly are packed one per row, so rows show the stream order."""
    rng = np.random.default_rng(26)
    n, s = 23, 16
    path = write_jsonl(tmp_path / "full.jsonl", [{"input_ids": [k + 1] + rng.integers(1, 99, s - 1).tolist()}
                                                  for k in range(n)])
    dl = DataLoader(path, None, seq_len=s, micro_batch_size=3, micro_batches_per_step=2, seed=7, num_epochs=3)
    batches = list(dl)
    firsts = [k - 1 for b in batches for k in b.input_ids.reshape(-1, s)[:, 0] if k != 0]
    want = np.concatenate([np.random.default_rng(7 + e).permutation(n) for e in range(3)])
    assert firsts == want.tolist() and dl.epoch == 2
    # the last step holds the remaining 69 - 66 = 3 rows; its other rows are empty
    assert len(batches) == 12 and np.count_nonzero(batches[-1].segment_ids.max(axis=-1)) == 3
    assert dl.count_steps() == 12
    with pytest.raises(SlidejaxError, match="count_steps needs a loader with num_epochs set"):
        DataLoader(path, None, seq_len=s, micro_batch_size=3, micro_batches_per_step=2).count_steps()
    plain = DataLoader(path, None, seq_len=s, micro_batch_size=3, micro_batches_per_step=2, shuffle=False)
    assert [k - 1 for k in next(plain).input_ids.reshape(-1, s)[:, 0]] == list(range(6))


@pytest.mark.parametrize("k", [1, 4, 9])
def test_resume_gives_identical_batches(tmp_path, k):
    rng = np.random.default_rng(23)
    path, _ = token_file(tmp_path, 70, rng, hi=60)
    kw = dict(seq_len=80, micro_batch_size=2, micro_batches_per_step=2, seed=3)
    straight = DataLoader(path, None, **kw)
    want = [next(straight) for _ in range(k + 8)]  # crosses into later epochs
    first = DataLoader(path, None, **kw)
    for _ in range(k):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = DataLoader(path, None, **kw)
    resumed.load_state_dict(state)
    assert resumed.documents_seen == first.documents_seen and resumed.steps == k
    for w in want[k:]:
        got = next(resumed)
        for f in ("input_ids", "labels", "segment_ids", "positions"):
            np.testing.assert_array_equal(getattr(got, f), getattr(w, f))
    assert resumed.epoch == straight.epoch > 0


@pytest.mark.filterwarnings("ignore:.*truncated to seq_len")
def test_resume_with_text_data_and_an_epoch_limit(tok, tmp_path):
    rng = random.Random(24)
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": words(rng), "completion": words(rng)} for _ in range(90)])
    kw = dict(seq_len=48, micro_batch_size=2, micro_batches_per_step=2, num_epochs=2)
    straight = DataLoader(path, tok, **kw)
    want = list(straight)
    assert straight.documents_truncated > 0  # some documents are truncated: their count must survive resumption
    first = DataLoader(path, tok, **kw)
    for _ in range(5):
        next(first)
    resumed = DataLoader(path, tok, **kw)
    resumed.load_state_dict(first.state_dict())
    rest = list(resumed)
    assert len(rest) == len(want) - 5
    for got, w in zip(rest, want[5:], strict=True):
        np.testing.assert_array_equal(got.input_ids, w.input_ids)
        np.testing.assert_array_equal(got.labels, w.labels)
    assert (resumed.documents_seen, resumed.documents_truncated, resumed.steps) == (
        straight.documents_seen, straight.documents_truncated, straight.steps)


def test_state_from_other_data_is_refused(tmp_path):
    rng = np.random.default_rng(25)
    a, _ = token_file(tmp_path, 30, rng, name="a.jsonl")
    b, _ = token_file(tmp_path, 31, rng, name="b.jsonl")
    kw = dict(seq_len=64, micro_batch_size=2, micro_batches_per_step=1)
    state = DataLoader(a, None, **kw).state_dict()
    with pytest.raises(SlidejaxError, match=r"b\.jsonl: differs from the data the state was saved with"):
        DataLoader(b, None, **kw).load_state_dict(state)
    with pytest.raises(SlidejaxError, match="seed=0, shuffle=True; this loader has seed=1"):
        DataLoader(a, None, seed=1, **kw).load_state_dict(state)


def test_eval_loader_is_one_pass_in_file_order(tok):
    path = preset_path("tiny") / "eval.jsonl"
    ev = eval_loader(path, tok, seq_len=128, micro_batch_size=4)
    batches = list(ev)
    docs = documents(batches)
    assert len(docs) == ev.num_documents == ev.documents_seen == 200
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert docs[0][0] == encode_prompt(tok, rows[0]["prompt"]) + tok(
        rows[0]["completion"], add_special_tokens=False).input_ids + [tok.eos_token_id]
    # the final step is padded with empty rows rather than dropping documents
    assert batches[-1].num_targets > 0 and batches[-1].segment_ids.max(axis=-1).min() == 0
    ev.rewind()  # the same loader serves every evaluation
    again = list(ev)
    assert len(again) == len(batches) and ev.documents_seen == 200
    for x, y in zip(again, batches, strict=True):
        np.testing.assert_array_equal(x.labels, y.labels)


def test_preset_train_data_loads(tok):
    dl = DataLoader(preset_path("tiny") / "train.jsonl", tok, seq_len=128, micro_batch_size=4,
                    micro_batches_per_step=2)
    b = next(dl)
    assert dl.formats == ["prompt_completion"] and dl.num_documents == 8000
    assert b.num_targets == int(np.sum(b.labels != IGNORE)) > 100
    assert np.count_nonzero(b.segment_ids) / b.segment_ids.size > 0.9


class CountingTokenizer:
    """The preset tokenizer, counting the texts it is asked to tokenize."""

    def __init__(self, tok):
        self.tok, self.texts = tok, 0

    def __call__(self, texts, **kw):
        self.texts += len(texts) if isinstance(texts, list) else 1
        return self.tok(texts, **kw)

    def __len__(self):
        return len(self.tok)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_documents_are_tokenized_lazily(tok):
    """Streaming: a step tokenizes about a lookahead's worth of documents, not the dataset."""
    from slidejax.data import PACK_LOOKAHEAD
    counting = CountingTokenizer(tok)
    dl = DataLoader(preset_path("tiny") / "train.jsonl", counting, seq_len=128, micro_batch_size=2,
                    micro_batches_per_step=1)
    assert counting.texts <= 2  # indexing validates every record without tokenizing any
    b = next(dl)
    docs = int(b.segment_ids.max(axis=-1).sum())
    # prompt + completion per document, for at most the lookahead plus one refill
    assert 2 * docs <= counting.texts <= 2 * (PACK_LOOKAHEAD + docs) + 2 < 2 * dl.num_documents / 10
    assert len(dl._pool) <= PACK_LOOKAHEAD


# ----------------------------------------------------------------------------------------------
# Over-long documents


def test_overlong_documents_are_truncated_and_counted(tmp_path):
    rng = np.random.default_rng(31)
    rows = [{"input_ids": rng.integers(1, 200, n).tolist()} for n in (10, 70, 20, 300, 5, 64)]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    with pytest.warns(UserWarning, match=r"long\.jsonl:\d: document of \d+ tokens truncated to seq_len=64"):
        dl, batches = load_all(path, None, seq_len=64, shuffle=False)
    assert dl.documents_truncated == 2 and dl.documents_seen == 6
    got = {tuple(d[0][:3]): d for d in documents(batches)}
    for r in rows:
        ids = r["input_ids"][:64]
        doc_ids, labels = got[tuple(ids[:3])]
        assert doc_ids == ids and labels == ids[1:] + [IGNORE]


def test_overlong_documents_can_be_refused(tok, tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": "short"}, {"text": "many words " * 40}])
    dl = DataLoader(path, tok, seq_len=32, micro_batch_size=1, micro_batches_per_step=1, on_overlong="error")
    with pytest.raises(SlidejaxError, match=rf"^{path}:2: document has \d+ tokens, more than seq_len=32"):
        list(dl)


# ----------------------------------------------------------------------------------------------
# Bad input: one clear line each


def bad(tmp_path, text, name="bad.jsonl"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("content, message", [
    ('{"text": "a"}\n{"text": "b"\n', r"bad\.jsonl:2: invalid JSON"),
    ('{"text": "a"}\n\n{"txt": "b"}\n', r"bad\.jsonl:3: missing field 'text'"),
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', r"bad\.jsonl:2: missing field 'completion'"),
    ('{"text": 5}\n', r"bad\.jsonl:1: field 'text' must be a string, got int"),
    ('[1, 2]\n', r"bad\.jsonl:1: expected a JSON object, got list"),
    ('{"foo": 1}\n', r"bad\.jsonl:1: cannot tell the data format.*found 'foo'"),
    ('{"messages": "hi"}\n', r"bad\.jsonl:1: field 'messages' must be a non-empty list"),
    ('{"messages": [{"role": "user"}]}\n', r"bad\.jsonl:1: missing field 'messages'\[0\]\.content"),
    ('{"messages": [{"role": "user", "content": [1]}]}\n', r"bad\.jsonl:1: field 'messages'\[0\]\.content must be a string"),
    ('{"input_ids": [1, "2"]}\n', r"bad\.jsonl:1: field 'input_ids'\[1\] is '2', expected an integer"),
    ('{"input_ids": [1, true]}\n', r"bad\.jsonl:1: field 'input_ids'\[1\] is True, expected an integer"),
    ('{"input_ids": [1, 99999]}\n', r"bad\.jsonl:1: field 'input_ids'\[1\] = 99999 is outside the vocabulary"),
    ('{"input_ids": []}\n', r"bad\.jsonl:1: field 'input_ids' must be a non-empty list"),
    ('{"input_ids": [1, 2], "labels": [1]}\n', r"bad\.jsonl:1: field 'labels' has 1 entries, 'input_ids' has 2"),
    ('{"input_ids": [1, 2], "labels": [1, -5]}\n', r"bad\.jsonl:1: field 'labels'\[1\] = -5 is outside"),
    ('{"input_ids": [1, 2], "labels": [1, 3]}\n', r"bad\.jsonl:1: field 'labels'\[1\] = 3 must be -100 or equal input_ids\[1\] = 2"),
    ('\n\n', r"bad\.jsonl: no documents \(empty data file\)"),
    ('[\n  {"text": "a"}\n]\n', r"bad\.jsonl:1: looks like one JSON array; slidejax reads JSON Lines"),
])
def test_bad_jsonl_is_named_in_one_line(tok, tmp_path, content, message):
    path = bad(tmp_path, content)
    with pytest.raises(SlidejaxError, match=message) as e:
        DataLoader(path, tok, seq_len=16, micro_batch_size=1, micro_batches_per_step=1)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_bad_files_and_settings(tok, tmp_path):
    kw = dict(seq_len=16, micro_batch_size=1, micro_batches_per_step=1)
    good = write_jsonl(tmp_path / "g.jsonl", [{"text": "x"}])
    cases = [
        (lambda: DataLoader(tmp_path / "missing.jsonl", tok, **kw), r"missing\.jsonl: data file not found"),
        (lambda: DataLoader(bad(tmp_path, " \n\n", "e.txt"), tok, **kw), r"e\.txt: no documents"),
        (lambda: DataLoader(bad(tmp_path, "x", "d.csv"), tok, **kw), r"d\.csv: unknown data file type '\.csv'"),
        (lambda: DataLoader(tmp_path, tok, **kw), "not a regular file"),
        (lambda: DataLoader([], tok, **kw), "no data files given"),
        (lambda: DataLoader(good, None, **kw), "a tokenizer is needed for text data"),
        (lambda: DataLoader(good, tok, seq_len=0, micro_batch_size=1, micro_batches_per_step=1),
         "seq_len must be a positive integer, got 0"),
        (lambda: DataLoader(good, tok, on_overlong="drop", **kw), "on_overlong must be 'truncate' or 'error'"),
        (lambda: DataLoader(good, tok, format="csv", **kw), "unknown data format 'csv'"),
        (lambda: DataLoader(good, tok, seed=-1, **kw), "seed must be a non-negative integer"),
    ]
    p = tmp_path / "u.txt"
    p.write_bytes(b"fine\n\n\xff\xfe broken\n")
    cases.append((lambda: DataLoader(p, tok, **kw), r"u\.txt:3: not valid UTF-8"))
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    cases.append((lambda: DataLoader(chat, with_template(tok, None), **kw), "the tokenizer has no chat template"))
    for make, message in cases:
        with pytest.raises(SlidejaxError, match=message) as e:
            make()
        assert "\n" not in str(e.value)


def test_no_warnings_on_clean_data(tok, tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": words(random.Random(41), 1, 5)} for _ in range(20)])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        load_all(path, tok)
