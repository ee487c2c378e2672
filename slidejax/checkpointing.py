"""Training checkpoints with orbax-checkpoint: the full state, written in the background, atomic.

A run directory holds ``checkpoints/<step>/``, one orbax checkpoint per saved step, with three
items:

``params``
    The fp32 master weights as a nested tree under Hugging Face names
    (``{"model": {"layers": {"0": {"self_attn": {"q_proj": {"weight": ...}}}}}, ...}``, so the
    on-disk parameter names are exactly the safetensors names). It loads as plain arrays with
    orbax alone, no slidejax needed::

        import orbax.checkpoint as ocp
        params = ocp.PyTreeCheckpointer().restore("runs/<name>/checkpoints/<step>/params")
        params["model"]["layers"]["0"]["mlp"]["up_proj"]["weight"]   # numpy float32 [I, H]

``optimizer``
    The host optimizer's state per unit (``embed.0``, ``layers.0`` .. ``norm``, ``lm_head.0``),
    the step count included (it is the learning-rate schedule's position).

``meta``
    JSON: the step, the data loader's position, the trainer's RNG state, the training
    configuration, the model's ``config.json`` and a format version.

Saving is asynchronous: `Checkpointer.save` snapshots the arrays (a host memory copy, in orbax's
blocking part) and returns; the write runs in the background while training continues. When the
host RAM budget has no room for that copy, ``snapshot=False`` writes straight from the live
buffers and waits, so training is held for the write instead. Orbax writes each checkpoint into
a temporary directory and renames it into place only when complete, so a save interrupted at
any point (an exception, a kill, a power cut) leaves the previous checkpoints intact and
loadable; keep-last-N deletes old checkpoints only after a new one is committed.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from slidejax.errors import SlidejaxError

FORMAT_VERSION = 1
CHECKPOINTS = "checkpoints"
ITEMS = ("params", "optimizer", "meta")

# orbax logs routine progress at WARNING/INFO through absl; keep a user's console to our messages.
logging.getLogger("absl").setLevel(logging.ERROR)


def _ocp() -> Any:
    import orbax.checkpoint as ocp

    return ocp


# ----------------------------------------------------------------------------------------------
# Trees: any pytree <-> nested dicts with string keys (what orbax stores and restores as is)


def _key_str(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def nest(tree: Any) -> dict[str, Any]:
    """A pytree as nested dicts keyed by its path components (dict keys, namedtuple fields, list
    indices), leaves as numpy arrays. Restores without any target structure."""
    out: dict[str, Any] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [_key_str(k) for k in path] or ["value"]
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = np.asarray(leaf)
    return out


def unnest(nested: dict[str, Any], like: Any, where: str = "checkpoint") -> Any:
    """Inverse of `nest`: the leaves of `nested` in the structure of `like` (dtype and shape
    checked against `like`'s leaves)."""
    leaves = []
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    for path, ref in paths:
        keys = [_key_str(k) for k in path] or ["value"]
        node: Any = nested
        for k in keys:
            if not isinstance(node, dict) or k not in node:
                raise SlidejaxError(f"{where}: missing entry {'/'.join(keys)} (saved by a different model or optimizer)")
            node = node[k]
        value = np.asarray(node)
        ref = np.asarray(ref)
        if value.shape != ref.shape:
            raise SlidejaxError(f"{where}: {'/'.join(keys)} has shape {list(value.shape)}, expected "
                                f"{list(ref.shape)} (saved by a different model or optimizer)")
        leaves.append(value.astype(ref.dtype, copy=False))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def params_tree(host: Any) -> dict[str, Any]:
    """The master weights as a nested tree under HF names (layer tensors are views of the masters;
    vocabulary matrices, stored in row blocks, are assembled copies)."""
    out: dict[str, Any] = {}
    for hf, parts in host.hf_names():
        *path, leaf = hf.split(".")
        node = out
        for k in path:
            node = node.setdefault(k, {})
        node[leaf] = host.read_tensor(parts)
    return out


def load_params_tree(host: Any, tree: dict[str, Any], where: str = "checkpoint") -> None:
    """Write a `params_tree`-shaped tree into the host masters (shapes checked first)."""
    found = []
    for hf, parts in host.hf_names():
        node: Any = tree
        for k in hf.split("."):
            if not isinstance(node, dict) or k not in node:
                raise SlidejaxError(f"{where}: parameter {hf} is missing (saved by a different model)")
            node = node[k]
        value = np.asarray(node)
        if value.shape != host.hf_shape(parts):
            raise SlidejaxError(f"{where}: parameter {hf} has shape {list(value.shape)}, the model "
                                f"{list(host.hf_shape(parts))} (saved by a different model)")
        found.append((parts, value))
    for parts, value in found:
        host.write_tensor(parts, value.astype(np.float32, copy=False))


def optimizer_tree(engine_state: dict[str, Any]) -> dict[str, Any]:
    """The per-unit optimizer states of `SlidingEngine.state_dict()`, nested for orbax."""
    return {name: nest(unit["opt"]) for name, unit in engine_state["units"].items() if unit["opt"] is not None
            and jax.tree_util.tree_leaves(unit["opt"])}


# ----------------------------------------------------------------------------------------------
# Finding checkpoints


def _is_step_dir(path: Path) -> bool:
    return path.is_dir() and path.name.isdigit() and (path / "meta").is_dir()


def find_checkpoint(path: str | os.PathLike) -> tuple[Path, int]:
    """(checkpoints directory, step) for a run directory (its latest checkpoint), a checkpoints
    directory (its latest) or one checkpoint's directory. The directory is resolved ('.', '..',
    links): its name and parents say which run it belongs to (`run_of`)."""
    given = Path(path)
    if not given.exists():
        raise SlidejaxError(f"{given}: no such run or checkpoint directory")
    path = given.resolve()
    if _is_step_dir(path):
        return path.parent, int(path.name)
    folder = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    steps = sorted(int(p.name) for p in folder.iterdir() if _is_step_dir(p)) if folder.is_dir() else []
    if not steps:
        raise SlidejaxError(f"{given}: no slidejax checkpoint here (expected a run directory, its "
                            f"'{CHECKPOINTS}' directory or a checkpoint step directory)")
    return folder, steps[-1]


ABANDONED = "abandoned-"  # prefix of a set-aside continuation's folder, inside the checkpoints directory


def run_of(folder: str | os.PathLike) -> Path:
    """The run directory of a checkpoints folder: its parent, or for a set-aside continuation
    (``<run>/checkpoints/abandoned-<time>``, see `set_aside_later`) the run that holds it."""
    folder = Path(folder)
    if folder.name.startswith(ABANDONED) and folder.parent.name == CHECKPOINTS:
        return folder.parent.parent
    return folder.parent


def set_aside_later(folder: str | os.PathLike, step: int) -> tuple[list[int], Path | None]:
    """A run resumed from checkpoint `step` of its checkpoints directory `folder` abandons the
    continuation after it: move that continuation's checkpoints (the steps after `step`) out of
    the way of the new ones, intact, into ``folder/abandoned-<time>/``, so that neither a later
    ``resume latest`` nor ``keep_last`` takes them for the new continuation's. Nothing happens
    for a folder that is not a run's checkpoints directory. Returns (the steps moved, where to).

    Renames within `folder` (one filesystem: nothing is copied), latest first; if one fails, those
    already moved are put back and a SlidejaxError says why and where any left over is."""
    folder = Path(folder)
    if folder.name != CHECKPOINTS:
        return [], None
    later = sorted(int(p.name) for p in folder.iterdir() if _is_step_dir(p) and int(p.name) > step)
    if not later:
        return [], None
    dest = folder / f"{ABANDONED}{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while dest.exists():
        n += 1
        dest = dest.with_name(f"{dest.name.split('.')[0]}.{n}")
    moved: list[int] = []
    try:
        dest.mkdir()
        for s in reversed(later):
            os.rename(folder / str(s), dest / str(s))
            moved.append(s)
    except OSError as e:
        stuck = []
        for s in moved:
            try:
                os.rename(dest / str(s), folder / str(s))
            except OSError:
                stuck.append(s)
        try:
            dest.rmdir()  # only if empty
        except OSError:
            pass
        left = f"; steps {', '.join(map(str, stuck))} are in {dest}" if stuck else ""
        raise SlidejaxError(f"{folder}: cannot set aside the checkpoints after step {step} (steps "
                            f"{', '.join(map(str, later))}) ({e.strerror or e}){left}") from None
    return later, dest


# ----------------------------------------------------------------------------------------------
# The checkpointer


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


class Checkpointer:
    """Saves and restores training checkpoints in ``directory/<step>`` (orbax CheckpointManager).

    Args:
      directory: the checkpoints directory (``<run>/checkpoints``).
      keep_last: how many checkpoints to keep (older ones are deleted once a newer one is
        committed); 0 keeps all.
      snapshot: copy the arrays at `save` and write in the background (True), or write from the
        caller's arrays and wait (False: no extra host memory, training held for the write).
      read_only: only read (export, info): nothing is created or deleted.
    """

    def __init__(self, directory: str | os.PathLike, *, keep_last: int = 2, snapshot: bool = True,
                 read_only: bool = False):
        ocp = _ocp()
        self.directory = Path(directory).absolute()
        self.snapshot = snapshot
        self._pending: int | None = None
        local = _this_process_only()
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        for item in ("params", "optimizer"):
            handler = ocp.PyTreeCheckpointHandler(type_handler_registry=_type_registry(copy=snapshot), **local)
            registry.add(item, ocp.args.PyTreeSave, handler)
            registry.add(item, ocp.args.PyTreeRestore, handler)
        meta = ocp.JsonCheckpointHandler(**local)
        registry.add("meta", ocp.args.JsonSave, meta)
        registry.add("meta", ocp.args.JsonRestore, meta)
        create = not read_only
        if local and create:  # orbax creates the root only with a barrier over all processes
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise SlidejaxError(f"{self.directory}: cannot create the checkpoints directory "
                                    f"({e.strerror or e})") from None
            create = False
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep_last or None, enable_async_checkpointing=True, create=create,
            read_only=read_only, **local)
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)
        except OSError as e:
            raise SlidejaxError(f"{self.directory}: cannot open the checkpoints directory ({e.strerror or e})") from None

    # -- queries

    def steps(self) -> list[int]:
        """Committed checkpoints' steps, oldest first."""
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def latest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def path(self, step: int) -> Path:
        return self.directory / str(step)

    # -- saving

    def save(self, step: int, params: dict[str, Any], optimizer: dict[str, Any], meta: dict[str, Any],
             *, wait: bool = False) -> Path:
        """Start saving checkpoint `step` and return its path. The arrays may change as soon as
        this returns (they were snapshotted), unless ``snapshot=False``, which waits for the write.
        A previous save still writing is waited for first (and its failure raised). An existing
        checkpoint of the same step (from before a resume to an earlier step) is replaced."""
        ocp = _ocp()
        self.wait()
        if step in self.manager.all_steps():
            # Left by a timeline abandoned when a run resumed from an earlier checkpoint.
            self.manager.delete(step)
        if self.snapshot and not _numpy_handler_copies():
            params, optimizer = jax.tree.map(np.copy, (params, optimizer))  # an orbax that does not copy
        args = ocp.args.Composite(params=ocp.args.PyTreeSave(params), optimizer=ocp.args.PyTreeSave(optimizer),
                                  meta=ocp.args.JsonSave(dict(meta, format=FORMAT_VERSION, step=step)))
        try:
            self.manager.save(step, args=args, force=True)
        except Exception as e:  # noqa: BLE001 - any failure of the write is reported in one line
            raise SlidejaxError(f"saving checkpoint {self.path(step)} failed ({_first_line(e)}); "
                                "the previous checkpoints are intact") from None
        self._pending = step
        if wait or not self.snapshot:
            self.wait()
        return self.path(step)

    def wait(self) -> None:
        """Block until the save in progress is committed; raise a SlidejaxError if it failed."""
        step, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            where = self.path(step) if step is not None else self.directory
            raise SlidejaxError(f"saving checkpoint {where} failed ({_first_line(e)}); "
                                "the previous checkpoints are intact") from None

    # -- restoring

    def read_meta(self, step: int) -> dict[str, Any]:
        """The ``meta`` item of checkpoint `step` (cheap: no arrays are read)."""
        ocp = _ocp()
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001
            raise SlidejaxError(f"{self.path(step)}: unreadable checkpoint ({_first_line(e)})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
            got = meta.get("format") if isinstance(meta, dict) else None
            raise SlidejaxError(f"{self.path(step)}: checkpoint format {got!r} is not {FORMAT_VERSION} "
                                "(written by another version of slidejax?)")
        return meta

    def restore(self, step: int, items: tuple[str, ...] = ITEMS) -> dict[str, Any]:
        """The requested items of checkpoint `step` as plain nested dicts of numpy arrays."""
        ocp = _ocp()
        args = {}
        for item in items:
            args[item] = ocp.args.JsonRestore() if item == "meta" else ocp.args.PyTreeRestore()
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:  # noqa: BLE001
            raise SlidejaxError(f"{self.path(step)}: unreadable checkpoint ({_first_line(e)})") from None
        return {k: (jax.tree.map(np.asarray, out[k]) if k != "meta" else out[k]) for k in items}

    def close(self) -> None:
        """Wait for the save in progress, then release orbax's resources."""
        try:
            self.wait()
        finally:
            self.manager.close()


def _this_process_only() -> dict[str, Any]:
    """With several jax processes, orbax options that make a checkpointer this process's alone
    (it writes everything and waits at no cross-process barrier): the Trainer gathers the state
    and process 0 writes it, every process reads it. Empty with one process."""
    if jax.process_count() == 1:
        return {}
    me = jax.process_index()
    return {"multiprocessing_options": _ocp().options.MultiprocessingOptions(primary_host=me, active_processes={me})}


def _numpy_handler_copies() -> bool:
    """Whether this orbax's NumpyHandler can deep-copy arrays in the blocking part of a save."""
    import inspect

    return "deepcopy_host_arrays" in inspect.signature(_ocp().type_handlers.NumpyHandler).parameters


def _type_registry(copy: bool) -> Any:
    """orbax's array handlers, with numpy arrays deep-copied in the blocking part of a save
    (`copy`, orbax's default) or written from the caller's memory."""
    ocp = _ocp()
    th = ocp.type_handlers
    numpy = th.NumpyHandler(deepcopy_host_arrays=copy) if _numpy_handler_copies() else th.NumpyHandler()
    return th.create_type_handler_registry(
        (int, th.ScalarHandler()),
        (float, th.ScalarHandler()),
        (np.number, th.ScalarHandler()),
        (np.ndarray, numpy),
    )


def load_params(path: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """(ModelConfig, params tree) of a run or checkpoint directory: the masters as numpy arrays
    under HF names (what `export` writes out)."""
    from slidejax.config import ModelConfig

    folder, step = find_checkpoint(path)
    ckpt = Checkpointer(folder, read_only=True)
    try:
        meta = ckpt.read_meta(step)
        cfg = ModelConfig.from_hf_dict(meta["model_config"], source=str(ckpt.path(step)))
        params = ckpt.restore(step, items=("params",))["params"]
    finally:
        ckpt.close()
    return cfg, params


__all__ = [
    "Checkpointer",
    "FORMAT_VERSION",
    "find_checkpoint",
    "load_params",
    "load_params_tree",
    "nest",
    "optimizer_tree",
    "params_tree",
    "unnest",
]

