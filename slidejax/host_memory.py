"""Host memory: where the whole model's training state lives between its visits to the GPU.

Each unit of the model (the embedding, every decoder layer, the final norm, the lm_head) is kept
as ONE flat fp32 buffer of master weights, so that
- the host optimizer runs one fused pass over it (and its moments) per step;
- its GPU copy (bf16, or fp32 in exactness mode) is one contiguous pinned buffer that crosses PCIe
  in a single transfer at full speed;
- gradients come back as one flat buffer in the same order.
Parameters that take weight decay come first, so decay is a prefix `[0, decay_split)` of the
buffer and no per-element mask is ever read.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from slidejax.errors import SlidejaxError

if TYPE_CHECKING:
    from slidejax.config import ModelConfig

_ALIGN = 64


def aligned_empty(n: int, dtype: Any) -> np.ndarray:
    """A 1-D numpy array of n elements whose data is 64-byte aligned (zero-copy to XLA:CPU)."""
    dtype = np.dtype(dtype)
    raw = np.empty(n * dtype.itemsize + _ALIGN, dtype=np.uint8)
    offset = (-raw.ctypes.data) % _ALIGN
    return raw[offset: offset + n * dtype.itemsize].view(dtype)


@dataclasses.dataclass(frozen=True)
class FlatLayout:
    """Where each named parameter of a unit lives in its flat buffer.

    `names` are in buffer order; decayed parameters (matrices) first, then the rest (norms,
    biases), so `decay_split` separates them.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    size: int
    decay_split: int

    @classmethod
    def build(cls, shapes: dict[str, tuple[int, ...]], decayed: Iterable[str]) -> "FlatLayout":
        decayed = set(decayed)
        order = sorted(shapes, key=lambda n: (n not in decayed, n))
        offsets, off, split = [], 0, 0
        for n in order:
            offsets.append(off)
            off += int(np.prod(shapes[n], dtype=np.int64))
            if n in decayed:
                split = off
        return cls(tuple(order), tuple(tuple(shapes[n]) for n in order), tuple(offsets), off, split)

    def views(self, flat: Any) -> dict[str, Any]:
        """Named views (numpy) or slices (jax, inside jit) of a flat buffer."""
        out = {}
        for n, s, o in zip(self.names, self.shapes, self.offsets):
            size = int(np.prod(s, dtype=np.int64))
            out[n] = flat[o: o + size].reshape(s)
        return out

    def flatten(self, tree: dict[str, Any]) -> Any:
        """Concatenate named arrays (jax, inside jit) in buffer order."""
        return jnp.concatenate([jnp.ravel(tree[n]) for n in self.names])

    def fill(self, flat: np.ndarray, name: str, value: np.ndarray) -> None:
        """Write one parameter's values into a numpy flat buffer (casting as needed)."""
        i = self.names.index(name)
        size = int(np.prod(self.shapes[i], dtype=np.int64))
        flat[self.offsets[i]: self.offsets[i] + size] = np.asarray(value).reshape(-1)


def numpy_dtype(dtype: Any) -> np.dtype:
    """numpy dtype for a jax/numpy dtype name (bf16 via ml_dtypes)."""
    if dtype in ("bfloat16", jnp.bfloat16) or np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16):
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def memory_sharding(device: jax.Device, kind: str) -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(device, memory_kind=kind)


def host_memory_kind(device: jax.Device) -> str:
    """'pinned_host' where the device has it (GPU and CPU backends do), else its default memory."""
    kinds = {m.kind for m in device.addressable_memories()}
    return "pinned_host" if "pinned_host" in kinds else device.default_memory().kind


def host_view(array: jax.Array) -> np.ndarray:
    """A numpy view of a single-device jax array that lives in host memory, without a copy.

    Waits until the array is ready. On an accelerator, `np.asarray` of a pinned-host array copies
    it into a new buffer (hundreds of MB per layer gradient, on the host optimizer's time); the
    view reads the pinned buffer the download wrote. The view does not keep `array` alive: the
    caller must hold it while the view is in use. Arrays on several devices are copied.
    """
    array.block_until_ready()
    devices = array.devices()
    if (array.sharding.memory_kind != "pinned_host" or len(devices) != 1
            or next(iter(devices)).platform == "cpu"):  # XLA:CPU arrays are viewed by np.asarray
        return np.asarray(array)
    return _buffer_view(array).reshape(array.shape)


def _buffer_view(array: jax.Array) -> np.ndarray:
    """A flat, writable numpy view of a ready single-device array's buffer (through its pointer:
    it does not keep `array` alive)."""
    dtype = np.dtype(array.dtype)
    raw = (ctypes.c_uint8 * (array.size * dtype.itemsize)).from_address(array.unsafe_buffer_pointer())
    return np.frombuffer(raw, dtype=np.uint8).view(dtype)


@functools.partial(jax.jit, static_argnums=2)
def _piece(array: jax.Array, start: jax.Array, size: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(array, start, size)


def pull_to_host(array: jax.Array, out: np.ndarray, chunk: int = 1 << 24) -> np.ndarray:
    """Copy a flat device array into the host array `out`, `chunk` elements at a time.

    Why not `out[...] = np.asarray(array)`: jax caches an array's numpy value on it for as long as
    the array lives, so a resident unit's master would keep a second full-size host copy until
    its next update. The pieces' copies die with the pieces. One compile per size (the last piece
    overlaps the one before instead of being shorter)."""
    n = array.shape[0]
    size = min(n, chunk)
    for start in range(0, n, size):
        start = min(start, n - size)
        out[start:start + size] = np.asarray(_piece(array, start, size))
    return out


def released_master(size: int) -> np.ndarray:
    """What a `Unit` holds while its master lives only on the device: `size` read-only NaNs that
    take no memory (reading it unsynced shows NaN, not stale weights; writing it fails)."""
    return np.broadcast_to(np.float32(np.nan), (size,))


def is_released(master: np.ndarray) -> bool:
    return not master.flags.writeable and master.strides == (0,)


class PinnedBuffer:
    """A buffer in the device's pinned host memory with a writable numpy view of it.

    The host optimizer writes new bf16 weights straight into `.host` (no conversion pass, no
    copy); `.array` is the jax array that `device_put` uploads at full PCIe speed. Writing is safe
    because jax never writes to or frees this buffer while we hold `.array`, and the engine only
    writes between the upload that read the old values completing and the next upload.
    """

    def __init__(self, shape: int | tuple[int, ...], dtype: Any, device: jax.Device):
        dtype = numpy_dtype(dtype)
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        sharding = memory_sharding(device, host_memory_kind(device))
        # Shaped at allocation: a jax op (even a reshape) cannot run on pinned host memory.
        self._wrap(jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)())

    @classmethod
    def adopt(cls, array: jax.Array) -> "PinnedBuffer":
        """Wrap a single-device array that already lives in pinned host memory (a download) as a
        buffer the host may write in place. Nothing else may read `array` afterwards."""
        buf = cls.__new__(cls)
        buf._wrap(array)
        return buf

    def _wrap(self, array: jax.Array) -> None:
        array.block_until_ready()
        self.array = array
        self.host = _buffer_view(array)  # kept alive through .array

    def __len__(self) -> int:
        return self.host.shape[0]  # elements (host is the flat view)


@dataclasses.dataclass
class Unit:
    """One streamed unit of the model: its layout and fp32 master weights in host memory.

    Vocabulary matrices (embedding, lm_head) are cut into row blocks no larger than a decoder
    layer, each its own unit with `rows = (first, end)`, so GPU buffers are sized by decoder
    layers, never by the vocabulary.
    """

    name: str
    layout: FlatLayout
    master: np.ndarray
    rows: tuple[int, int] | None = None

    def params(self) -> dict[str, np.ndarray]:
        return self.layout.views(self.master)


def vocab_chunks(cfg: "ModelConfig") -> list[tuple[int, int]]:
    """Row ranges of the vocabulary matrices: balanced blocks of at most one layer's parameters."""
    per_layer = max(cfg.layer_params, cfg.hidden_size)
    n = max(1, -(-cfg.vocab_size * cfg.hidden_size // per_layer))
    bounds = [round(i * cfg.vocab_size / n) for i in range(n + 1)]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


class HostModel:
    """The whole model's fp32 master weights as flat units in host memory.

    Units, in forward order: "embed.0".., "layers.0" .. "layers.{L-1}", "norm", and "lm_head.0"..
    unless the embeddings are tied (then the head reads the "embed.*" units).
    """

    def __init__(self, cfg: "ModelConfig"):
        from slidejax.model import layer_template

        self.cfg = cfg
        self.chunks = vocab_chunks(cfg)
        _, layer_shapes = layer_template(cfg)
        layer_layout = FlatLayout.build({n: s for n, (s, _) in layer_shapes.items()},
                                        [n for n, (_, d) in layer_shapes.items() if d])
        self.units: dict[str, Unit] = {}

        def matrix(prefix: str) -> None:
            for c, (a, b) in enumerate(self.chunks):
                lay = FlatLayout.build({"weight": (b - a, cfg.hidden_size)}, ["weight"])
                self.units[f"{prefix}.{c}"] = Unit(f"{prefix}.{c}", lay, aligned_empty(lay.size, np.float32), (a, b))

        matrix("embed")
        for i in range(cfg.num_layers):
            self.units[f"layers.{i}"] = Unit(f"layers.{i}", layer_layout, aligned_empty(layer_layout.size, np.float32))
        norm = FlatLayout.build({"weight": (cfg.hidden_size,)}, [])
        self.units["norm"] = Unit("norm", norm, aligned_empty(norm.size, np.float32))
        if not cfg.tie_word_embeddings:
            matrix("lm_head")

    @property
    def embed_units(self) -> list[Unit]:
        return [self.units[f"embed.{c}"] for c in range(len(self.chunks))]

    @property
    def head_units(self) -> list[Unit]:
        prefix = "embed" if self.cfg.tie_word_embeddings else "lm_head"
        return [self.units[f"{prefix}.{c}"] for c in range(len(self.chunks))]

    def layer_unit(self, i: int) -> Unit:
        return self.units[f"layers.{i}"]

    def hf_names(self) -> Iterator[tuple[str, list[tuple[Unit, str]]]]:
        """(Hugging Face tensor name, [(unit, parameter name), ...]) for every tensor.

        A vocabulary matrix maps to several row-block units, in row order.
        """
        yield "model.embed_tokens.weight", [(u, "weight") for u in self.embed_units]
        for i in range(self.cfg.num_layers):
            unit = self.layer_unit(i)
            for n in unit.layout.names:
                yield f"model.layers.{i}.{n}", [(unit, n)]
        yield "model.norm.weight", [(self.units["norm"], "weight")]
        if not self.cfg.tie_word_embeddings:
            yield "lm_head.weight", [(u, "weight") for u in self.head_units]

    def hf_shape(self, parts: list[tuple[Unit, str]]) -> tuple[int, ...]:
        unit, name = parts[0]
        shape = unit.layout.shapes[unit.layout.names.index(name)]
        if unit.rows is None:
            return shape
        return (self.cfg.vocab_size,) + tuple(shape[1:])

    def read_tensor(self, parts: list[tuple[Unit, str]]) -> np.ndarray:
        """A whole HF tensor (fp32) assembled from its units (copies only for chunked matrices)."""
        arrays = [u.params()[n] for u, n in parts]
        return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)

    def write_tensor(self, parts: list[tuple[Unit, str]], value: np.ndarray) -> None:
        for unit, name in parts:
            v = value if unit.rows is None else value[unit.rows[0]: unit.rows[1]]
            unit.layout.fill(unit.master, name, v)

    def tree(self) -> dict[str, Any]:
        """{"embed", "layers": [{name: array}], "norm", "lm_head"?} as numpy fp32.

        Layer entries are views of the master buffers; vocabulary matrices are assembled copies.
        """
        t: dict[str, Any] = {
            "embed": self.read_tensor([(u, "weight") for u in self.embed_units]),
            "layers": [self.layer_unit(i).params() for i in range(self.cfg.num_layers)],
            "norm": self.units["norm"].params()["weight"],
        }
        if not self.cfg.tie_word_embeddings:
            t["lm_head"] = self.read_tensor([(u, "weight") for u in self.head_units])
        return t

    def load_tree(self, tree: dict[str, Any]) -> None:
        """Copy a tree shaped like `tree()` into the master buffers (every array's shape checked:
        a transposed matrix has the right size too)."""

        def array(value: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
            a = np.asarray(value, np.float32)
            if a.shape != tuple(shape):
                raise SlidejaxError(f"load_tree: {name} has shape {list(a.shape)}, the model needs {list(shape)}")
            return a

        vocab = (self.cfg.vocab_size, self.cfg.hidden_size)
        self.write_tensor([(u, "weight") for u in self.embed_units], array(tree["embed"], vocab, "embed"))
        if not self.cfg.tie_word_embeddings:
            self.write_tensor([(u, "weight") for u in self.head_units], array(tree["lm_head"], vocab, "lm_head"))
        self.units["norm"].master[:] = array(tree["norm"], (self.cfg.hidden_size,), "norm").reshape(-1)
        if len(tree["layers"]) != self.cfg.num_layers:
            raise SlidejaxError(f"load_tree: {len(tree['layers'])} layers, the model has {self.cfg.num_layers}")
        for i, src in enumerate(tree["layers"]):
            unit = self.layer_unit(i)
            for n, shape in zip(unit.layout.names, unit.layout.shapes):
                unit.layout.fill(unit.master, n, array(src[n], shape, f"layers[{i}].{n}"))

    @property
    def nbytes(self) -> int:
        """Bytes of the masters held here (not those released to the device, see `released_master`)."""
        return sum(u.master.nbytes for u in self.units.values() if not is_released(u.master))


# ----------------------------------------------------------------------------------------------
# How much host memory a run holds, and XLA's pool of pinned memory

PINNED_POOL_ENV = "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"
_PINNED_POOL_DEFAULT_GB = 64  # XLA's default cap when device memory is not preallocated


def plan_host_memory(cfg: "ModelConfig", micro_batch: tuple[int, int], micro_batches: int = 1, *,
                     compute_dtype: Any = "bfloat16", moment_dtype: Any = np.float32,
                     resident_layers: int = 0, prefetch: int = 2,
                     gpu_update_layers: int = 0, speculated_params: int = 0) -> dict[str, int]:
    """Host bytes a one-process sliding engine holds for steps of `micro_batches` micro-batches of
    `micro_batch` = (rows, seq_len) tokens, split into what XLA's pinned pool must hold and the
    rest. Upper bounds: every boundary activation is counted as offloaded.

    - masters: fp32 weights of every unit but the resident ones, whose masters live on the
      device and are copied to the host only from a `sync` (checkpoint, export, `params()`) to
      the next step;
    - gpu_updated_state (pinned): master, optimizer state, upload copy and pending gradient of
      the `gpu_update_layers` streamed layers updated on the device;
    - optimizer: the host optimizer's state of every unit it updates (AdamW's two moments);
    - upload_copies (pinned): compute-dtype copies of the streamed units (the untied embedding is
      gathered from its master on the host and has none);
    - gradients (pinned): downloaded gradients beyond the copies: a unit's copy is released
      when its gradient is downloaded and its update writes the next copy into the gradient's
      buffer, so only the units whose copies are still being uploaded (the window) hold both;
    - activations (pinned): layer-input checkpoints and the head's boundaries, all micro-batches;
    - embedding_rows: the embedding's row-sparse gradient (two reused fp32 buffers);
    - speculation: the second master and moments of the engine's `speculative_units`
      (`speculated_params` parameters), and (pinned) two more compute-dtype copies: the one the
      speculative update writes, and the copy in use, kept until the step commits or redoes.
    """
    rows, seq = micro_batch
    cd = numpy_dtype(compute_dtype).itemsize
    L, H, V = cfg.num_layers, cfg.hidden_size, cfg.vocab_size
    r = max(0, min(int(resident_layers), L))
    g = 0 if r == L else max(0, min(int(gpu_update_layers), L - r))
    streamed = 0 if r == L else (L - r - g) * cfg.layer_params + H + V * H  # layers, norm, head blocks
    moment = numpy_dtype(moment_dtype).itemsize
    host_updated = 0 if r == L else streamed + (0 if cfg.tie_word_embeddings else V * H)
    tokens = micro_batches * rows * seq
    unit = max(cfg.layer_params, max((b - a for a, b in vocab_chunks(cfg)), default=0) * H)
    plan = {
        "masters": 4 * (cfg.num_params - (cfg.num_params if r == L else r * cfg.layer_params)),
        "optimizer": 2 * moment * host_updated,
        "gpu_updated_state": g * cfg.layer_params * (4 + 2 * moment + 2 * cd),
        "upload_copies": cd * streamed,
        "gradients": 0 if r == L else cd * (prefetch + 1) * unit,
        "activations": (L + 4) * tokens * H * cd,
        "embedding_rows": 0 if r == L else 2 * 4 * min(tokens, V) * H,
        "speculation": (4 + 2 * moment) * speculated_params,
        "speculation_copies": 2 * cd * speculated_params,
    }
    plan["pinned"] = (plan["upload_copies"] + plan["gradients"] + plan["activations"] + plan["gpu_updated_state"]
                      + plan["speculation_copies"])
    plan["total"] = sum(v for k, v in plan.items() if k != "pinned")
    return plan


def pinned_pool_bytes() -> int:
    """The cap on XLA's pool of pinned host memory on GPU: `XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB`
    (read once, when the backend starts), else XLA's default of 64 GiB."""
    value = os.environ.get(PINNED_POOL_ENV, "")
    gb = int(value) if value.strip().isdigit() else _PINNED_POOL_DEFAULT_GB
    return gb << 30


def pinned_pool_gb(pinned_bytes: int, slack: float = 0.15) -> int:
    """The pinned pool, in whole GiB, for `pinned_bytes` in use: plus `slack` and 1 GiB for
    fragmentation."""
    return -(-int(pinned_bytes * (1 + slack) + (1 << 30)) >> 30)


def size_pinned_pool(pinned_bytes: int) -> int:
    """Cap XLA's pinned pool at `pinned_pool_gb(pinned_bytes)` and return the cap in bytes. Must
    run before the GPU backend starts; a value already in the environment is kept.

    Why: XLA grows its pinned pool (a best-fit allocator over `cudaHostAlloc` regions) by
    doubling each new region, and pinned pages are resident, so without a cap the pool can hold
    up to twice what is in use. With the cap, the last region is cut to the cap.
    """
    os.environ.setdefault(PINNED_POOL_ENV, str(pinned_pool_gb(pinned_bytes)))
    return pinned_pool_bytes()
