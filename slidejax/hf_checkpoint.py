"""Hugging Face checkpoints in and out: config.json + (sharded) safetensors + tokenizer files.

Reading validates every tensor's presence, shape and dtype from the safetensors headers alone
(no tensor data is touched) before any large allocation, then streams tensors one at a time into
the host model's fp32 master buffers, so a checkpoint is never held in memory whole.
Writing produces the same layout transformers writes: sharded `model-0000k-of-0000n.safetensors`
with `model.safetensors.index.json`, config.json and the tokenizer files copied across.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from slidejax.config import ModelConfig
from slidejax.errors import SlidejaxError, writable_dir
from slidejax.host_memory import HostModel

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}
_DTYPE_NAMES = {np.dtype(np.float32): "float32", np.dtype(ml_dtypes.bfloat16): "bfloat16",
                np.dtype(np.float16): "float16"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "generation_config.json", "chat_template.jinja", "chat_template.json")


def read_safetensors_header(file: Path) -> dict[str, dict[str, Any]]:
    """Tensor name -> {dtype, shape, data_offsets} from a safetensors file, checking it is whole."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SlidejaxError(f"{file}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise SlidejaxError(f"{file}: truncated safetensors file (header cut off)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            header = None
    if not isinstance(header, dict):
        raise SlidejaxError(f"{file}: not a safetensors file (unreadable header)")
    header.pop("__metadata__", None)
    for name, info in header.items():
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            count = int(np.prod([int(x) for x in info["shape"]], dtype=np.int64))
            itemsize = np.dtype(_ST_DTYPES[info["dtype"]]).itemsize if info["dtype"] in _ST_DTYPES else None
        except (KeyError, TypeError, ValueError):
            raise SlidejaxError(f"{file}: not a safetensors file (bad header entry for tensor {name!r})") from None
        if itemsize is not None and end - begin != count * itemsize:
            raise SlidejaxError(f"{file}: tensor {name!r} holds {end - begin} bytes, its shape and dtype need "
                                f"{count * itemsize}")
        if 8 + n + end > size:
            raise SlidejaxError(f"{file}: truncated safetensors file (tensor {name!r} is cut off)")
    return header


class CheckpointReader:
    """Index of a HF model folder's tensors: name -> (file, dtype, shape), validated up front."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise SlidejaxError(f"{self.path}: no such model folder")
        index_file = self.path / "model.safetensors.index.json"
        if (self.path / "model.safetensors").exists():
            # As transformers reads a folder: a lone model.safetensors first (before an index
            # beside it), and other *.safetensors files (adapters, consolidated.safetensors) are
            # not this model's weights.
            files = ["model.safetensors"]
        elif index_file.exists():
            try:
                weight_map = json.loads(index_file.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise SlidejaxError(f"{index_file}: invalid index (no weight_map)") from None
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
            if not files:
                raise SlidejaxError(f"{self.path}: no *.safetensors weights in the model folder")
        self.tensors: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
        for name in files:
            file = self.path / name
            if not file.exists():
                raise SlidejaxError(f"{index_file}: shard {name} is missing")
            for tname, info in read_safetensors_header(file).items():
                self.tensors[tname] = (file, info["dtype"], tuple(info["shape"]))

    def check(self, expected: dict[str, tuple[int, ...]], optional: set[str] = frozenset()) -> None:
        """Raise a one-line error for the first missing, misshapen or unsupported tensor."""
        for name, shape in expected.items():
            if name not in self.tensors:
                if name in optional:
                    continue
                raise SlidejaxError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
            file, dtype, got = self.tensors[name]
            if got != tuple(shape):
                raise SlidejaxError(f"{file}: tensor {name!r} has shape {list(got)}, expected {list(shape)}")
            if dtype not in _ST_DTYPES:
                raise SlidejaxError(f"{file}: tensor {name!r} has unsupported dtype {dtype}")

    def read(self, name: str) -> np.ndarray:
        file = self.tensors[name][0]
        with safe_open(str(file), framework="np") as f:
            return f.get_tensor(name)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape for a model of this architecture (no allocation)."""
    from slidejax.model import layer_template

    _, layer = layer_template(cfg)
    vh = (cfg.vocab_size, cfg.hidden_size)
    out = {"model.embed_tokens.weight": vh}
    for i in range(cfg.num_layers):
        out.update({f"model.layers.{i}.{n}": s for n, (s, _) in layer.items()})
    out["model.norm.weight"] = (cfg.hidden_size,)
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = vh
    return out


def open_checkpoint(path: str | Path, cfg: ModelConfig) -> CheckpointReader:
    """Index a HF folder and check every tensor the architecture needs (headers only)."""
    reader = CheckpointReader(path)
    reader.check(expected_shapes(cfg))
    return reader


def load_into(host: HostModel, path: str | Path, reader: CheckpointReader | None = None) -> None:
    """Fill `host`'s master weights from a HF folder, one tensor at a time."""
    reader = reader or open_checkpoint(path, host.cfg)
    # A tied checkpoint may also store lm_head.weight; hf_names() skips it: the embedding is kept.
    for hf, parts in host.hf_names():
        host.write_tensor(parts, reader.read(hf).astype(np.float32))


def _parse_size(size: int | str) -> int:
    """Bytes from an int or a size string as transformers takes it ("5GB", "500MiB", "20KB")."""
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for suffix, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10),
                         ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1), ("", 1)):
        if s.endswith(suffix):
            try:
                n = int(float(s[: len(s) - len(suffix)]) * mult)
            except ValueError:
                break
            if n > 0:
                return n
            break
    raise SlidejaxError(f"max_shard_size {size!r} is not a positive size (e.g. 5GB, 500MiB)")


_WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")


def save_pretrained(host: HostModel, path: str | Path, *, dtype: str = "bfloat16",
                    max_shard_size: int | str = "5GB", tokenizer_dir: str | Path | None = None) -> Path:
    """Write a HF folder transformers loads: config.json, sharded safetensors + index, tokenizer."""
    path = writable_dir(path)
    np_dtype = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float16": np.float16}.get(dtype)
    if np_dtype is None:
        raise SlidejaxError(f"export dtype {dtype!r} is not one of bfloat16, float32, float16")
    limit = _parse_size(max_shard_size)

    shards: list[list[tuple[str, Any]]] = [[]]
    sizes = [0]
    for hf, parts in host.hf_names():
        nbytes = int(np.prod(host.hf_shape(parts))) * np.dtype(np_dtype).itemsize
        if sizes[-1] and sizes[-1] + nbytes > limit:
            shards.append([])
            sizes.append(0)
        shards[-1].append((hf, parts))
        sizes[-1] += nbytes

    weight_map: dict[str, str] = {}
    n = len(shards)
    for k, shard in enumerate(shards):
        fname = "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        tensors = {hf: np.ascontiguousarray(host.read_tensor(parts).astype(np_dtype)) for hf, parts in shard}
        tmp = path / (fname + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path / fname)
        weight_map.update({hf: fname for hf in tensors})
        del tensors
    if n > 1:
        index = {"metadata": {"total_size": int(sum(sizes))}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    else:
        (path / "model.safetensors.index.json").unlink(missing_ok=True)
    # Weight files of an earlier export to this folder would be read in place of (transformers
    # prefers a lone model.safetensors to the index) or next to (a glob) the new ones.
    for stale in path.glob("model*.safetensors"):
        if _WEIGHT_FILE.fullmatch(stale.name) and stale.name not in weight_map.values():
            stale.unlink()

    config = host.cfg.to_hf_dict()
    config["torch_dtype"] = dtype
    config["dtype"] = dtype
    (path / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, path)
    return path


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    src, dst = Path(src), Path(dst)
    copied = []
    if src.resolve() == dst.resolve():
        return copied
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied
