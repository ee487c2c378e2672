"""Bad model folders get one clear line, before anything large is allocated.

Every case loads through `slidejax.load_pretrained` and expects a `SlidejaxError` whose message is
one line naming the file / field / tensor at fault. `HostModel` (the fp32 masters, the first large
allocation) is patched to fail if constructed, and a control case shows that a valid folder does
reach it, so "raised before the masters exist" is really checked. The checkpoints are written
header-first as sparse files, so a 246M-parameter model costs no disk or memory.
"""

from __future__ import annotations

import json
import math
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import slidejax
from slidejax.errors import SlidejaxError
from slidejax.host_memory import HostModel

_ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "I64": 8}

# A TinyLlama-like architecture, large enough (246M parameters, ~1 GB of fp32 masters) that
# allocating the masters would show in the memory checks.
BIG = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816,
       "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 4, "rms_norm_eps": 1e-5,
       "rope_theta": 10000.0, "max_position_embeddings": 2048, "tie_word_embeddings": False}
SMALL = dict(BIG, vocab_size=301, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)


class HostModelBuilt(Exception):
    pass


@pytest.fixture(autouse=True)
def no_masters(monkeypatch):
    """Constructing the fp32 masters fails the test (see `test_valid_folder_reaches_the_masters`)."""

    def refuse(self, cfg):
        raise HostModelBuilt(f"HostModel built for {cfg.num_params} parameters")

    monkeypatch.setattr(HostModel, "__init__", refuse)


def llama_tensors(cfg: dict) -> dict[str, tuple[int, ...]]:
    """HF tensor names and shapes of a Llama checkpoint, spelled out as transformers names them."""
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    out = {"model.embed_tokens.weight": (v, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                    p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                    p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                    p + "mlp.down_proj.weight": (h, f)})
    out["model.norm.weight"] = (h,)
    if not cfg.get("tie_word_embeddings"):
        out["lm_head.weight"] = (v, h)
    return out


def write_safetensors(file: Path, tensors: dict[str, tuple[int, ...]], dtype: str = "BF16",
                      dtypes: dict[str, str] | None = None, cut: int = 0) -> None:
    """A safetensors file with the given header; its data is a sparse (unwritten) zero region.

    `cut` drops that many bytes from the end (a truncated download).
    """
    header, off = {}, 0
    for name, shape in tensors.items():
        dt = (dtypes or {}).get(name, dtype)
        n = math.prod(shape) * _ITEMSIZE[dt]
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(8 + len(raw) + off - cut)


def write_folder(path: Path, cfg: dict, tensors: dict[str, tuple[int, ...]] | None = None,
                 shards: int = 1, **kw) -> Path:
    """config.json + weights (one file, or `shards` files with an index)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    tensors = llama_tensors(cfg) if tensors is None else tensors
    if shards == 1:
        write_safetensors(path / "model.safetensors", tensors, **kw)
        return path
    names = list(tensors)
    groups = np.array_split(np.arange(len(names)), shards)
    weight_map = {}
    for k, idx in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(path / fname, {names[i]: tensors[names[i]] for i in idx}, **kw)
        weight_map.update({names[i]: fname for i in idx})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def one_line_error(path: Path | str, *parts: str, dtype: str = "float32") -> str:
    """Load `path`; assert a one-line SlidejaxError containing every string of `parts`."""
    with pytest.raises(SlidejaxError) as e:
        slidejax.load_pretrained(path, dtype=dtype)
    msg = str(e.value)
    assert msg and "\n" not in msg and msg == msg.strip(), repr(msg)
    for p in parts:
        assert p in msg, (p, msg)
    return msg


# --------------------------------------------------------------------------- the control


def test_valid_folder_reaches_the_masters(tmp_path):
    """The folders below are valid but for the one fault each test puts in: this one has none."""
    for cfg, shards in ((BIG, 1), (SMALL, 3)):
        folder = write_folder(tmp_path / f"{cfg['hidden_size']}", cfg, shards=shards)
        with pytest.raises(HostModelBuilt):
            slidejax.load_pretrained(folder, dtype="float32")


# --------------------------------------------------------------------------- folder and config


def test_missing_folder(tmp_path):
    one_line_error(tmp_path / "nowhere", str(tmp_path / "nowhere"), "no such model folder")


def test_missing_config(tmp_path):
    folder = write_folder(tmp_path / "m", SMALL)
    (folder / "config.json").unlink()
    one_line_error(folder, str(folder), "no config.json")


def test_invalid_json_config_names_file_and_line(tmp_path):
    folder = write_folder(tmp_path / "m", SMALL)
    (folder / "config.json").write_text('{\n  "model_type": "llama",\n  "hidden_size": 32,,\n}\n')
    one_line_error(folder, str(folder / "config.json"), "invalid JSON", "line 3")


def test_config_not_an_object(tmp_path):
    folder = write_folder(tmp_path / "m", SMALL)
    (folder / "config.json").write_text("[1, 2]")
    one_line_error(folder, str(folder / "config.json"), "JSON object")


@pytest.mark.parametrize("model_type", ["gpt2", "gemma3", None])
def test_unsupported_model_type_is_named_with_the_supported_ones(tmp_path, model_type):
    cfg = dict(SMALL, model_type=model_type)
    if model_type is None:
        del cfg["model_type"]
    folder = write_folder(tmp_path / "m", cfg)
    one_line_error(folder, str(folder / "config.json"), f"model_type {model_type!r} is not supported",
                   "llama, mistral, qwen2, qwen3")


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
def test_unsupported_rope_type(tmp_path, key):
    folder = write_folder(tmp_path / "m", dict(SMALL, **{key: {"rope_type": "yarn", "factor": 4.0}}))
    one_line_error(folder, str(folder / "config.json"), "rope type 'yarn' is not supported",
                   "default, linear, llama3")


def test_llama3_rope_without_its_fields(tmp_path):
    folder = write_folder(tmp_path / "m", dict(SMALL, rope_scaling={"rope_type": "llama3", "factor": 8.0}))
    one_line_error(folder, "rope type 'llama3' needs field", "low_freq_factor")


@pytest.mark.parametrize("changes, expected", [
    ({"hidden_size": None}, "missing field 'hidden_size'"),
    ({"num_hidden_layers": None}, "missing field 'num_hidden_layers'"),
    ({"vocab_size": "32k"}, "field 'vocab_size' must be a positive integer, got '32k'"),
    ({"intermediate_size": -48}, "field 'intermediate_size' must be a positive integer"),
    ({"num_hidden_layers": 2.5}, "field 'num_hidden_layers' must be a positive integer"),
    ({"hidden_size": True}, "field 'hidden_size' must be a positive integer"),
    ({"rms_norm_eps": "tiny"}, "field 'rms_norm_eps' must be a positive number"),
    ({"rope_theta": 0}, "field 'rope_theta' must be a positive number"),
    ({"num_key_value_heads": 3}, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ({"hidden_size": 30}, "hidden_size 30 is not a multiple of num_attention_heads 4"),
    ({"head_dim": 7}, "head_dim 7 is odd"),
    ({"rope_scaling": ["llama3"]}, "must be an object"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": "eight", "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
     "field 'factor' must be a positive number"),
])
def test_bad_config_fields_are_named(tmp_path, changes, expected):
    cfg = {k: v for k, v in dict(SMALL, **changes).items() if v is not None}
    folder = write_folder(tmp_path / "m", cfg, tensors=llama_tensors(SMALL))
    one_line_error(folder, str(folder / "config.json"), expected)


def test_mistral_window_must_be_an_integer(tmp_path):
    folder = write_folder(tmp_path / "m", dict(SMALL, model_type="mistral", sliding_window="wide"))
    one_line_error(folder, "field 'sliding_window' must be a positive integer")


def test_unknown_compute_dtype_is_refused_before_loading(tmp_path):
    folder = write_folder(tmp_path / "m", BIG)
    one_line_error(folder, "dtype 'float16' is not one of bfloat16, float32", dtype="float16")
    one_line_error("tiny", "dtype 'fp8'", dtype="fp8")


# --------------------------------------------------------------------------- tensors


def test_wrong_shape_is_named(tmp_path):
    tensors = llama_tensors(BIG)
    tensors["model.layers.15.mlp.up_proj.weight"] = (2816, 1000)
    folder = write_folder(tmp_path / "m", BIG, tensors, shards=4)
    one_line_error(folder, "'model.layers.15.mlp.up_proj.weight'", "shape [2816, 1000], expected [2816, 1024]",
                   str(folder / "model-00004-of-00004.safetensors"))


def test_missing_tensor_is_named(tmp_path):
    tensors = llama_tensors(BIG)
    del tensors["model.layers.9.self_attn.k_proj.weight"]
    folder = write_folder(tmp_path / "m", BIG, tensors)
    one_line_error(folder, str(folder), "'model.layers.9.self_attn.k_proj.weight' is missing")


def test_untied_config_without_lm_head(tmp_path):
    folder = write_folder(tmp_path / "m", SMALL, llama_tensors(dict(SMALL, tie_word_embeddings=True)))
    one_line_error(folder, "'lm_head.weight' is missing")


def test_unsupported_tensor_dtype_is_named(tmp_path):
    folder = write_folder(tmp_path / "m", SMALL, dtypes={"model.norm.weight": "I64"})
    one_line_error(folder, "'model.norm.weight'", "unsupported dtype I64")


@pytest.mark.parametrize("cut", [1, 1000])
def test_truncated_safetensors_file_is_named(tmp_path, cut):
    folder = write_folder(tmp_path / "m", SMALL, shards=3, cut=cut)
    one_line_error(folder, str(folder / "model-00001-of-00003.safetensors"), "truncated safetensors file")


@pytest.mark.parametrize("content", [b"", b"\x05\x00", b"\xff" * 64, struct.pack("<Q", 4) + b"[1] ",
                                     struct.pack("<Q", 24) + b'{"w": {"dtype": "F32"}} '],
                         ids=["empty", "short", "huge-header", "list-header", "entry-without-offsets"])
def test_not_a_safetensors_file(tmp_path, content):
    folder = write_folder(tmp_path / "m", SMALL)
    (folder / "model.safetensors").write_bytes(content)
    one_line_error(folder, str(folder / "model.safetensors"))


def test_header_size_disagrees_with_shape(tmp_path):
    folder = write_folder(tmp_path / "m", SMALL)
    file = folder / "model.safetensors"
    raw = file.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8: 8 + n])
    header["model.norm.weight"]["shape"] = [16]  # 32 bf16 values stored, 16 claimed
    new = json.dumps(header).encode().ljust(n)
    assert len(new) == n
    file.write_bytes(raw[:8] + new + raw[8 + n:])
    one_line_error(folder, str(file), "'model.norm.weight' holds 64 bytes")


def test_missing_shard_listed_in_the_index(tmp_path):
    folder = write_folder(tmp_path / "m", SMALL, shards=3)
    (folder / "model-00002-of-00003.safetensors").unlink()
    one_line_error(folder, str(folder / "model.safetensors.index.json"), "model-00002-of-00003.safetensors",
                   "missing")


@pytest.mark.parametrize("index", ["{not json", '{"metadata": {}}', "[]", '{"weight_map": 3}'])
def test_invalid_index(tmp_path, index):
    folder = write_folder(tmp_path / "m", SMALL, shards=2)
    (folder / "model.safetensors.index.json").write_text(index)
    one_line_error(folder, str(folder / "model.safetensors.index.json"), "invalid index")


def test_no_weights_in_folder(tmp_path):
    folder = write_folder(tmp_path / "m", SMALL)
    (folder / "model.safetensors").unlink()
    one_line_error(folder, str(folder), "no *.safetensors")


def test_checks_read_headers_only(tmp_path):
    """With ~1 GB of masters at stake, finding a fault in the last tensor of the last shard
    allocates almost nothing: every header is read, no tensor data."""
    tensors = llama_tensors(BIG)
    tensors["lm_head.weight"] = (32001, 1024)
    folder = write_folder(tmp_path / "m", BIG, tensors, shards=8)
    tracemalloc.start()
    try:
        one_line_error(folder, "'lm_head.weight' has shape [32001, 1024]")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4_000_000, peak


# --------------------------------------------------------------------------- running a model


def test_logits_input_errors():
    from slidejax.presets import preset_path
    from slidejax.config import ModelConfig
    from slidejax.pretrained import Model

    cfg = ModelConfig.from_pretrained(preset_path("tiny"))
    model = Model(cfg, object.__new__(HostModel), "float32")  # the shape checks need no weights
    with pytest.raises(SlidejaxError, match=r"input_ids must be \[batch, seq\] or \[seq\], got shape \[1, 2, 3\]"):
        model.logits(np.ones((1, 2, 3), np.int32))
    with pytest.raises(SlidejaxError, match=r"positions has shape \[10\], input_ids \[1, 10\]: they must match"):
        model.logits(np.ones((1, 10), np.int32), positions=np.arange(10))
    with pytest.raises(SlidejaxError, match=r"segment_ids has shape \[1, 9\], input_ids \[1, 10\]"):
        model.logits(np.ones((1, 10), np.int32), segment_ids=np.ones((1, 9), np.int32))


def test_out_of_range_token_ids(monkeypatch):
    monkeypatch.undo()  # this one needs real masters (the tiny preset's)
    model = slidejax.load_pretrained("tiny", dtype="float32")
    v = model.config.vocab_size
    for bad in ([[1, v]], [[-1, 2]]):
        with pytest.raises(SlidejaxError, match=rf"token id out of range \[0, {v}\)"):
            model.logits(np.array(bad))


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_unsupported_activation(tmp_path, act):
    folder = write_folder(tmp_path / "m", dict(SMALL, hidden_act=act))
    one_line_error(folder, str(folder / "config.json"), f"hidden_act {act!r} is not supported")


def test_attention_dropout_is_announced_as_ignored(tmp_path):
    folder = write_folder(tmp_path / "m", dict(SMALL, attention_dropout=0.1))
    # Announced when config.json is read, and the load goes on (to the HostModel this module stubs).
    with pytest.warns(UserWarning, match="attention_dropout 0.1 is ignored"), pytest.raises(HostModelBuilt):
        slidejax.load_pretrained(folder, dtype="float32")
