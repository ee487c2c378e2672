"""Training data: files -> token documents -> packed, label-shifted batches for the engine.

Formats, detected per file from its extension and first record (or forced with ``format=``):

- ``txt``: a ``.txt`` file; one document per blank-line-separated block, so a document may span
  several lines (paragraphs, code) and documents are separated by an empty line. A block's text is
  used as is, without its final newline.
- ``text``: JSONL with a string ``text`` field; loss on every token.
- ``prompt_completion``: JSONL with string ``prompt`` and ``completion``; prompt and completion
  are tokenized separately (the prompt exactly as at inference, see ``encode_prompt``) and the
  loss covers the completion and the closing EOS only.
- ``chat``: JSONL with ``messages``, a list of ``{"role", "content"}``; rendered with the
  tokenizer's chat template, loss on the assistant turns only (see ``encode_chat``).
- ``tokens``: JSONL with ``input_ids`` (ints) and optional ``labels`` (same length, Hugging Face
  convention: aligned with ``input_ids``, each entry -100 = no loss or equal to its input id; the
  shift happens here). Used as is, no BOS/EOS added, for exact reproducibility.

Other than ``tokens``, every document gets EOS appended, and BOS prepended when the tokenizer
adds one by convention (its ``add_special_tokens=True`` output starts with BOS); chat documents
get whatever the template writes, plus EOS only if the template wrote none.

Documents are packed several to a row of ``seq_len`` tokens (first fit over a bounded lookahead
of pending documents, never split); a document longer than ``seq_len`` is truncated with a
counted warning, or refused with ``on_overlong="error"``. Each row carries segment ids (1, 2, ..
per document, 0 on padding) and per-document positions, and labels are already shifted, so
neither attention nor loss crosses a document boundary.

Files are indexed in one streaming pass (byte offset and line number of each record, with every
record's JSON and fields validated) and documents are read and tokenized only when packed, so
memory holds the index and the lookahead, never the tokenized dataset.
"""

from __future__ import annotations

import copy
import json
import os
import re
import warnings
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slidejax.errors import SlidejaxError

FORMATS = ("txt", "text", "prompt_completion", "chat", "tokens")
IGNORE = -100
# Pending documents the packer may choose from when filling a row: enough to fill rows tightly,
# few enough that the lookahead's tokens are a trivial amount of memory.
PACK_LOOKAHEAD = 128
_STATE_VERSION = 1
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


@dataclass(frozen=True)
class Batch:
    """One optimizer step: M micro-batches of B rows of S tokens (all ``np.int32 [M, B, S]``).

    ``labels[..., t]`` is the token at ``t + 1`` of the same document, or -100 (no loss) at each
    document's last token, on padding and on unsupervised (prompt / non-assistant) tokens.
    ``segment_ids`` numbers the documents of a row 1, 2, .. (0 = padding); ``positions`` restart
    at 0 in each document (0 on padding).
    """

    input_ids: np.ndarray
    labels: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray

    @property
    def num_targets(self) -> int:
        """Supervised tokens in the step: the denominator of the step's token-mean loss."""
        return int(np.count_nonzero(self.labels != IGNORE))


@dataclass(frozen=True)
class _Doc:
    """A tokenized document: ``targets`` is aligned with ``ids`` (-100 = not a loss target)."""

    ids: np.ndarray
    targets: np.ndarray
    where: str  # "file:line", for messages
    gid: int = -1  # global document id (its place in the concatenated files), for resumption


# ----------------------------------------------------------------------------------------------
# Indexing and validation (one streaming pass per file, before anything large is allocated)


@dataclass
class _FileIndex:
    path: Path
    format: str
    offsets: array  # byte offset of each record
    lengths: array  # byte length of each record
    lines: array  # 1-based line number where each record starts
    size: int

    def __len__(self) -> int:
        return len(self.offsets)


def _detect_jsonl_format(row: dict, where: str) -> str:
    if "messages" in row:
        return "chat"
    if "input_ids" in row:
        return "tokens"
    if "prompt" in row or "completion" in row:
        return "prompt_completion"
    if "text" in row:
        return "text"
    keys = ", ".join(map(repr, row)) or "none"
    raise SlidejaxError(
        f"{where}: cannot tell the data format: expected a 'text', 'prompt'/'completion', 'messages' "
        f"or 'input_ids' field (found {keys})"
    )


def _is_int(x: Any) -> bool:
    return type(x) is int  # bool is an int subclass; JSON true/false are not token ids


def _check_int_list(value: Any, field: str, where: str, vocab_size: int | None, allow_ignore: bool) -> None:
    if not isinstance(value, list) or not value:
        raise SlidejaxError(f"{where}: field '{field}' must be a non-empty list of integers")
    for k, x in enumerate(value):
        if not _is_int(x):
            raise SlidejaxError(f"{where}: field '{field}'[{k}] is {x!r}, expected an integer")
        if allow_ignore and x == IGNORE:
            continue
        if x < 0 or (vocab_size is not None and x >= vocab_size):
            bound = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
            extra = " or -100" if allow_ignore else ""
            raise SlidejaxError(f"{where}: field '{field}'[{k}] = {x} is outside the vocabulary {bound}{extra}")


def _validate_record(row: Any, fmt: str, where: str, vocab_size: int | None) -> None:
    """Check one JSONL record's fields and types; raise a one-line SlidejaxError naming the field."""
    if not isinstance(row, dict):
        raise SlidejaxError(f"{where}: expected a JSON object, got {type(row).__name__}")
    required = {"text": ("text",), "prompt_completion": ("prompt", "completion"), "chat": ("messages",),
                "tokens": ("input_ids",)}[fmt]
    for field in required:
        if field not in row:
            raise SlidejaxError(f"{where}: missing field '{field}' (format {fmt})")
    if fmt in ("text", "prompt_completion"):
        for field in required:
            if not isinstance(row[field], str):
                raise SlidejaxError(f"{where}: field '{field}' must be a string, got {type(row[field]).__name__}")
    elif fmt == "chat":
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise SlidejaxError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
        for k, m in enumerate(messages):
            if not isinstance(m, dict):
                raise SlidejaxError(f"{where}: field 'messages'[{k}] must be an object with 'role' and 'content'")
            for field in ("role", "content"):
                if field not in m:
                    raise SlidejaxError(f"{where}: missing field 'messages'[{k}].{field}")
                if not isinstance(m[field], str):
                    raise SlidejaxError(
                        f"{where}: field 'messages'[{k}].{field} must be a string, got {type(m[field]).__name__}")
    else:
        _check_int_list(row["input_ids"], "input_ids", where, vocab_size, allow_ignore=False)
        if "labels" in row:
            _check_int_list(row["labels"], "labels", where, vocab_size, allow_ignore=True)
            if len(row["labels"]) != len(row["input_ids"]):
                raise SlidejaxError(
                    f"{where}: field 'labels' has {len(row['labels'])} entries, 'input_ids' has {len(row['input_ids'])}")
            # Labels only mask: a target is always the document's own next token (the Batch contract).
            for k, (x, y) in enumerate(zip(row["labels"], row["input_ids"], strict=True)):
                if x != IGNORE and x != y:
                    raise SlidejaxError(f"{where}: field 'labels'[{k}] = {x} must be -100 or equal input_ids[{k}] = {y}")


def _index_jsonl(path: Path, fmt: str | None, vocab_size: int | None) -> _FileIndex:
    offsets, lengths, lines = array("q"), array("q"), array("q")
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            n = len(raw)
            if raw.strip():
                where = f"{path}:{lineno}"
                try:
                    row = json.loads(raw)
                except UnicodeDecodeError:
                    raise SlidejaxError(f"{where}: not valid UTF-8") from None
                except json.JSONDecodeError as e:
                    if not offsets and raw.lstrip().startswith(b"["):
                        raise SlidejaxError(f"{where}: looks like one JSON array; slidejax reads JSON Lines "
                                            "(one JSON object per line)") from None
                    raise SlidejaxError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
                if fmt is None:
                    if not isinstance(row, dict):
                        raise SlidejaxError(f"{where}: expected a JSON object, got {type(row).__name__}")
                    fmt = _detect_jsonl_format(row, where)
                _validate_record(row, fmt, where, vocab_size)
                offsets.append(offset)
                lengths.append(n)
                lines.append(lineno)
            offset += n
    return _FileIndex(path, fmt or "text", offsets, lengths, lines, offset)


def _index_txt(path: Path) -> _FileIndex:
    offsets, lengths, lines = array("q"), array("q"), array("q")
    offset, start, end = 0, -1, 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                offset, raw = 3, raw[3:]  # a UTF-8 byte-order mark is not text
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                raise SlidejaxError(f"{path}:{lineno}: not valid UTF-8") from None
            if raw.strip():
                if start < 0:
                    start = offset
                    lines.append(lineno)
                end = offset + len(raw)
            elif start >= 0:
                offsets.append(start)
                lengths.append(end - start)
                start = -1
            offset += len(raw)
    if start >= 0:
        offsets.append(start)
        lengths.append(end - start)
    return _FileIndex(path, "txt", offsets, lengths, lines, offset)


def _index_file(path: Path, fmt: str | None, vocab_size: int | None) -> _FileIndex:
    """Index one file in a single streaming pass, validating every record."""
    if not path.exists():
        raise SlidejaxError(f"{path}: data file not found")
    if not path.is_file():
        raise SlidejaxError(f"{path}: not a regular file")
    if fmt is None:
        suffix = path.suffix.lower()
        if suffix == ".txt":
            fmt = "txt"
        elif suffix not in (".jsonl", ".json"):
            raise SlidejaxError(f"{path}: unknown data file type {suffix or '(no extension)'!r}; use .txt or .jsonl, "
                                f"or force a format ({', '.join(FORMATS)})")
    index = _index_txt(path) if fmt == "txt" else _index_jsonl(path, fmt, vocab_size)
    if not len(index):
        raise SlidejaxError(f"{path}: no documents (empty data file)")
    return index


# ----------------------------------------------------------------------------------------------
# Tokenization


def _bos_id(tokenizer: Any) -> int | None:
    """BOS id when the tokenizer prepends BOS by convention (Llama-style), else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if probe and probe[0] == bos else None


def _encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a prompt exactly as prompt/completion training sees it: [BOS] + prompt tokens.

    Generation for an evaluation metric starts from these ids, so train and inference agree.
    """
    bos = _bos_id(tokenizer)
    return ([bos] if bos is not None else []) + _encode(tokenizer, [prompt])[0]


def _chat_template(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) and template else None


def encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
    """Render a conversation with the tokenizer's chat template; mark the assistant tokens.

    Templates with ``{% generation %}`` blocks give the mask through transformers'
    ``return_assistant_tokens_mask``. For the others each assistant turn's character span is found
    by rendering incrementally: it starts where ``messages[:i]`` rendered with the generation
    prompt ends and stops where ``messages[:i+1]`` ends (both must be prefixes of the full
    rendering; a template that rewrites earlier turns is refused). The full text is tokenized
    once, and a token is supervised when its character span overlaps an assistant span, so the
    tokenization is exactly the template's, with no re-tokenization at turn boundaries.
    """
    template = _chat_template(tokenizer)
    if template is None:
        raise SlidejaxError("the tokenizer has no chat template (needed for chat data)")
    if _GENERATION_TAG.search(template):
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]

    def render(msgs: list[dict[str, str]], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    full = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = render(messages[:i], True) if i else ""  # up to the assistant header
        upto = render(messages[: i + 1], False)  # through the end of this assistant turn
        if not (full.startswith(head) and full.startswith(upto)):
            raise SlidejaxError(
                f"the chat template renders earlier turns differently once later turns follow (turn {i}); "
                "cannot isolate assistant tokens: use a template with {% generation %} blocks")
        spans.append((len(head), len(upto)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    mask = [any(t_end > s and t_start < e for s, e in spans) for t_start, t_end in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


class _Encoder:
    """Turns validated records of any format into ``_Doc``s with the tokenizer's conventions."""

    def __init__(self, tokenizer: Any, formats: set[str]):
        self.tokenizer = tokenizer
        needs_tokenizer = formats - {"tokens"}
        if tokenizer is None:
            if needs_tokenizer:
                raise SlidejaxError(f"a tokenizer is needed for {', '.join(sorted(needs_tokenizer))} data")
            self.bos = self.eos = None
            self.pad = 0
            return
        self.eos = tokenizer.eos_token_id
        if self.eos is None and needs_tokenizer:
            raise SlidejaxError("the tokenizer has no eos_token; set one (documents end with EOS)")
        if "chat" in formats and _chat_template(tokenizer) is None:
            raise SlidejaxError("the tokenizer has no chat template (needed for chat data); set tokenizer.chat_template")
        self.bos = _bos_id(tokenizer) if needs_tokenizer else None
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else (self.eos if self.eos is not None else 0)

    def encode(self, records: list[tuple[str, Any, str]]) -> list[_Doc]:
        """``records``: (format, parsed record, "file:line") triples; returns their documents in order."""
        docs: list[_Doc | None] = [None] * len(records)
        by_format: dict[str, list[int]] = {}
        for k, (fmt, _, _) in enumerate(records):
            by_format.setdefault(fmt, []).append(k)
        for fmt, ks in by_format.items():
            for k, doc in zip(ks, self._encode_format(fmt, [records[k] for k in ks]), strict=True):
                docs[k] = doc
        return docs  # type: ignore[return-value]

    def _encode_format(self, fmt: str, records: list[tuple[str, Any, str]]) -> list[_Doc]:
        head = [self.bos] if self.bos is not None else []
        if fmt in ("txt", "text"):
            texts = [rec if fmt == "txt" else rec["text"] for _, rec, _ in records]
            return [self._doc(head + ids + [self.eos], None, where)
                    for ids, (_, _, where) in zip(_encode(self.tokenizer, texts), records, strict=True)]
        if fmt == "prompt_completion":
            # One tokenizer call for both halves: per-call overhead dominates on short examples.
            both = _encode(self.tokenizer, [rec[k] for k in ("prompt", "completion") for _, rec, _ in records])
            prompts, completions = both[:len(records)], both[len(records):]
            docs = []
            for p, c, (_, _, where) in zip(prompts, completions, records, strict=True):
                n_prompt = len(head) + len(p)
                ids = head + p + c + [self.eos]
                docs.append(self._doc(ids, [False] * n_prompt + [True] * (len(c) + 1), where))
            return docs
        if fmt == "chat":
            return [self._chat_doc(rec["messages"], where) for _, rec, where in records]
        return [_Doc(np.asarray(rec["input_ids"], np.int32),
                     np.asarray(rec.get("labels", rec["input_ids"]), np.int32), where) for _, rec, where in records]

    def _chat_doc(self, messages: list[dict[str, str]], where: str) -> _Doc:
        try:
            ids, mask = encode_chat(self.tokenizer, messages)
        except SlidejaxError as e:
            raise SlidejaxError(f"{where}: {e}") from None
        except Exception as e:  # the template's own raise_exception() or a Jinja error
            raise SlidejaxError(f"{where}: chat template failed: {type(e).__name__}: {e}".replace("\n", " ")) from None
        if self.eos not in ids:
            ids, mask = ids + [self.eos], mask + [messages[-1]["role"] == "assistant"]
        return self._doc(ids, mask, where)

    @staticmethod
    def _doc(ids: list[int], supervised: list[bool] | None, where: str) -> _Doc:
        ids_a = np.asarray(ids, np.int32)
        targets = ids_a if supervised is None else np.where(np.asarray(supervised, bool), ids_a, IGNORE)
        return _Doc(ids_a, targets.astype(np.int32), where)


# ----------------------------------------------------------------------------------------------
# Packing


def _pack_row(pool: list[_Doc], seq_len: int) -> list[_Doc]:
    """Take one row's documents from ``pool`` (removed in place): the oldest, then first fit.

    Starting with the oldest pending document guarantees every document is placed within a
    bounded delay; filling the rest first-fit keeps padding small. Documents are never split.
    """
    row = [pool.pop(0)]
    space = seq_len - min(len(row[0].ids), seq_len)
    k = 0
    while k < len(pool) and space > 0:
        n = len(pool[k].ids)
        if n <= space:
            row.append(pool.pop(k))
            space -= n
        else:
            k += 1
    return row


def _write_row(docs: list[_Doc], seq_len: int, ids: np.ndarray, labels: np.ndarray, segments: np.ndarray,
               positions: np.ndarray) -> None:
    """Lay ``docs`` (each at most ``seq_len`` tokens) side by side into one row's arrays (prefilled
    with padding: labels -100, segment ids and positions 0)."""
    o = 0
    for seg, doc in enumerate(docs, 1):
        n = len(doc.ids)
        ids[o:o + n] = doc.ids
        # Shifted: position t is trained to predict token t+1. The document's last position keeps
        # the row's prefilled -100, so no loss reaches into the next document.
        labels[o:o + n - 1] = doc.targets[1:]
        segments[o:o + n] = seg
        positions[o:o + n] = np.arange(n, dtype=np.int32)
        o += n


# ----------------------------------------------------------------------------------------------
# The loader


def _as_paths(path_or_paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(path_or_paths, (str, os.PathLike)):
        return [Path(path_or_paths)]
    paths = [Path(p) for p in path_or_paths]
    if not paths:
        raise SlidejaxError("no data files given")
    return paths


def _positive(name: str, value: Any) -> int:
    if not _is_int(value) or value < 1:
        raise SlidejaxError(f"{name} must be a positive integer, got {value!r}")
    return value


class DataLoader:
    """Packed, shuffled, resumable batches from one or more data files.

    Iterating yields ``Batch``es of ``micro_batches_per_step`` x ``micro_batch_size`` rows of
    ``seq_len`` tokens, forever (``num_epochs=None``) or until ``num_epochs`` passes are used up
    (the last step is padded with empty rows rather than dropping documents). The document order
    is a permutation drawn from ``seed + epoch`` for each pass (file order with
    ``shuffle=False``). ``state_dict()`` after any step, loaded into a new loader over the same
    files, continues with exactly the batches the first would have produced.
    """

    def __init__(
        self,
        path_or_paths: str | os.PathLike | Sequence[str | os.PathLike],
        tokenizer: Any,
        *,
        seq_len: int,
        micro_batch_size: int,
        micro_batches_per_step: int,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        on_overlong: str = "truncate",
        format: str | None = None,
    ):
        self.seq_len = _positive("seq_len", seq_len)
        self.micro_batch_size = _positive("micro_batch_size", micro_batch_size)
        self.micro_batches_per_step = _positive("micro_batches_per_step", micro_batches_per_step)
        if num_epochs is not None:
            _positive("num_epochs", num_epochs)
        if not _is_int(seed) or seed < 0:
            raise SlidejaxError(f"seed must be a non-negative integer, got {seed!r}")
        if on_overlong not in ("truncate", "error"):
            raise SlidejaxError(f"on_overlong must be 'truncate' or 'error', got {on_overlong!r}")
        if format is not None and format not in FORMATS:
            raise SlidejaxError(f"unknown data format {format!r}; known: {', '.join(FORMATS)}")
        self.seed, self.shuffle, self.num_epochs, self.on_overlong = seed, bool(shuffle), num_epochs, on_overlong

        vocab_size = len(tokenizer) if tokenizer is not None else None
        self._files = [_index_file(p, format, vocab_size) for p in _as_paths(path_or_paths)]
        self._encoder = _Encoder(tokenizer, {f.format for f in self._files})
        self._starts = np.cumsum([0] + [len(f) for f in self._files])
        self._handles: dict[int, Any] = {}

        self.rewind()
        self._warned = False

    def rewind(self) -> None:
        """Back to the start of the first pass, counters zeroed (e.g. to run an eval loader again)."""
        self.documents_seen = 0
        self.documents_truncated = 0
        self.steps = 0
        self._epoch, self._pos = 0, 0
        self._perm = self._permutation(0)
        self._pool: list[_Doc] = []  # the packing lookahead, oldest first

    # -- public properties

    @property
    def num_documents(self) -> int:
        """Documents in one pass over all files."""
        return int(self._starts[-1])

    @property
    def tokens_per_step(self) -> int:
        """Token slots per step (M x B x S), padding included."""
        return self.micro_batches_per_step * self.micro_batch_size * self.seq_len

    @property
    def epoch(self) -> int:
        """The pass (0-based) documents are being read from; some of the previous pass's may still
        be waiting in the packing lookahead."""
        return self._epoch

    @property
    def epochs_read(self) -> float:
        """Passes over the data that the batches yielded so far cover: documents placed in rows
        over documents per pass (fractional, as transformers logs its epoch)."""
        return self.documents_seen / max(1, len(self._perm))

    @property
    def formats(self) -> list[str]:
        """The detected (or forced) format of each file, in order."""
        return [f.format for f in self._files]

    # -- iteration

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        rows = self._next_rows()
        if not rows:
            raise StopIteration
        m, b, s = self.micro_batches_per_step, self.micro_batch_size, self.seq_len
        arrays = [np.zeros((m * b, s), np.int32) for _ in range(4)]
        ids, labels, segments, positions = arrays
        ids.fill(self._encoder.pad)
        labels.fill(IGNORE)
        for r, docs in enumerate(rows):
            _write_row(docs, s, ids[r], labels[r], segments[r], positions[r])
        return Batch(*(a.reshape(m, b, s) for a in arrays))

    def _next_rows(self) -> list[list[_Doc]]:
        """The next step's rows (fewer than M x B only at the very end; none once exhausted)."""
        rows = []
        for _ in range(self.micro_batches_per_step * self.micro_batch_size):
            self._refill()
            if not self._pool:
                break
            rows.append([self._place(d) for d in _pack_row(self._pool, self.seq_len)])
        if rows:
            self.steps += 1
        return rows

    def count_steps(self) -> int:
        """Steps a fresh run of this loader yields in its ``num_epochs`` passes (e.g. for an LR
        schedule), not counting batches without a supervised token (which training skips).
        Exact, and as costly as reading and tokenizing the data that many times."""
        if self.num_epochs is None:
            raise SlidejaxError("count_steps needs a loader with num_epochs set (it would run forever)")
        fresh = copy.copy(self)  # shares the file index and encoder, which are read-only
        fresh._handles = {}
        fresh.rewind()
        fresh._warned = True  # this loader warns about truncation when it trains, not the count
        row = [np.zeros(self.seq_len, np.int32) for _ in range(4)]  # ids, labels, segments, positions

        def supervised(rows: list[list[_Doc]]) -> bool:
            for docs in rows:
                row[1].fill(IGNORE)
                _write_row(docs, self.seq_len, *row)
                if np.any(row[1] != IGNORE):
                    return True
            return False

        try:
            n = 0
            while rows := fresh._next_rows():
                n += supervised(rows)
            return n
        finally:
            fresh.close()

    def _refill(self) -> None:
        """Top the lookahead up to PACK_LOOKAHEAD documents once it has fallen to half (batched reads)."""
        if len(self._pool) <= PACK_LOOKAHEAD // 2:
            self._pool.extend(self._read(self._draw(PACK_LOOKAHEAD - len(self._pool))))

    def _draw(self, n: int) -> list[int]:
        """Next ``n`` (or fewer, at the end of the last epoch) global document ids of the stream."""
        out: list[int] = []
        while len(out) < n:
            if self._pos == len(self._perm):
                if self.num_epochs is not None and self._epoch + 1 >= self.num_epochs:
                    break
                self._epoch, self._pos = self._epoch + 1, 0
                self._perm = self._permutation(self._epoch)
            take = self._perm[self._pos:self._pos + n - len(out)]
            out.extend(int(i) for i in take)
            self._pos += len(take)
        return out

    def _permutation(self, epoch: int) -> np.ndarray:
        n = self.num_documents
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        return np.random.default_rng(self.seed + epoch).permutation(n)

    def _read(self, global_ids: list[int]) -> list[_Doc]:
        """Read, parse and tokenize documents by global id (seeking into the indexed files)."""
        records = []
        for g in global_ids:
            fi = int(np.searchsorted(self._starts, g, side="right")) - 1
            f, j = self._files[fi], g - int(self._starts[fi])
            handle = self._handles.get(fi)
            if handle is None:
                handle = self._handles[fi] = open(f.path, "rb")
            handle.seek(f.offsets[j])
            raw = handle.read(f.lengths[j])
            where = f"{f.path}:{f.lines[j]}"
            if f.format == "txt":
                rec: Any = raw.decode("utf-8").rstrip("\r\n")
            else:
                rec = json.loads(raw)
            records.append((f.format, rec, where))
        docs = [_Doc(d.ids, d.targets, d.where, g) for d, g in zip(self._encoder.encode(records), global_ids, strict=True)]
        for d in docs:
            if len(d.ids) > self.seq_len and self.on_overlong == "error":
                raise SlidejaxError(f"{d.where}: document has {len(d.ids)} tokens, more than seq_len={self.seq_len} "
                                    "(on_overlong='error'; raise seq_len or allow truncation)")
        return docs

    def _place(self, doc: _Doc) -> _Doc:
        """Count a document entering a row, truncating it to seq_len if needed."""
        self.documents_seen += 1
        if len(doc.ids) <= self.seq_len:
            return doc
        self.documents_truncated += 1
        if not self._warned:
            self._warned = True
            warnings.warn(f"{doc.where}: document of {len(doc.ids)} tokens truncated to seq_len={self.seq_len}; "
                          "further truncations are counted in DataLoader.documents_truncated", stacklevel=2)
        return _Doc(doc.ids[:self.seq_len], doc.targets[:self.seq_len], doc.where, doc.gid)

    # -- resumption

    def _fingerprint(self) -> list[dict]:
        return [{"path": str(f.path), "format": f.format, "documents": len(f), "bytes": f.size} for f in self._files]

    def state_dict(self) -> dict:
        """The data position (JSON-serialisable): epoch, cursor, pending documents, counters."""
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "files": self._fingerprint(),
            "epoch": self._epoch,
            "position": self._pos,
            "pending": [d.gid for d in self._pool],
            "documents_seen": self.documents_seen,
            "documents_truncated": self.documents_truncated,
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (from ``state_dict`` of a loader over the same files and seed)."""
        try:
            version, files = state["version"], state["files"]
            seed, shuffle, epoch, pos, pending = (state["seed"], state["shuffle"], state["epoch"],
                                                  state["position"], state["pending"])
            counters = (state["documents_seen"], state["documents_truncated"], state["steps"])
        except (KeyError, TypeError) as e:
            raise SlidejaxError(f"data state is malformed (missing {e})") from None
        if version != _STATE_VERSION:
            raise SlidejaxError(f"data state version {version} is not supported (expected {_STATE_VERSION})")
        mine = self._fingerprint()
        if len(files) != len(mine):
            raise SlidejaxError(f"data state was saved for {len(files)} data file(s), this loader has {len(mine)}")
        for saved, now in zip(files, mine, strict=True):
            for key in ("format", "documents", "bytes"):
                if saved.get(key) != now[key]:
                    raise SlidejaxError(f"{now['path']}: differs from the data the state was saved with "
                                        f"({key} {now[key]} now, {saved.get(key)} then)")
        if seed != self.seed or bool(shuffle) != self.shuffle:
            raise SlidejaxError(f"data state was saved with seed={seed}, shuffle={shuffle}; "
                                f"this loader has seed={self.seed}, shuffle={self.shuffle}")
        if not (0 <= pos <= self.num_documents) or any(not 0 <= g < self.num_documents for g in pending):
            raise SlidejaxError("data state is malformed (position outside the dataset)")
        self._epoch, self._pos = int(epoch), int(pos)
        self._perm = self._permutation(self._epoch)
        self._pool = self._read([int(g) for g in pending])
        self.documents_seen, self.documents_truncated, self.steps = (int(c) for c in counters)

    # -- housekeeping

    def close(self) -> None:
        """Close the open data files (reopened on demand)."""
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        files = ", ".join(f"{f.path.name} ({f.format}, {len(f)} docs)" for f in self._files)
        return (f"DataLoader([{files}], seq_len={self.seq_len}, micro_batch_size={self.micro_batch_size}, "
                f"micro_batches_per_step={self.micro_batches_per_step}, shuffle={self.shuffle}, seed={self.seed})")


def eval_loader(
    path_or_paths: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer: Any,
    *,
    seq_len: int,
    micro_batch_size: int,
    micro_batches_per_step: int = 1,
    on_overlong: str = "truncate",
    format: str | None = None,
) -> DataLoader:
    """A loader for eval loss: file order, one pass, every document exactly once."""
    return DataLoader(path_or_paths, tokenizer, seq_len=seq_len, micro_batch_size=micro_batch_size,
                      micro_batches_per_step=micro_batches_per_step, shuffle=False, num_epochs=1,
                      on_overlong=on_overlong, format=format)


__all__ = ["Batch", "DataLoader", "eval_loader", "encode_prompt", "encode_chat", "FORMATS", "IGNORE"]
