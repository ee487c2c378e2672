"""The model, data and process set-up both PyTorch baselines share.

The model is Hugging Face ``LlamaForCausalLM`` with the shapes of :mod:`bench.common`, built on the
``meta`` device (no memory, no init kernels), materialised where the baseline wants it and filled
from one seeded pool of normal values: seconds for billions of parameters, the same values on any
device.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench import common  # noqa: E402
from bench.common import ModelShape  # noqa: E402

# AdamW hyper-parameters of every baseline (and what slidejax should be run with to match).
ADAMW = dict(lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
# A pool length that is no multiple of any hidden size, so weight rows do not repeat in lockstep.
_POOL = (1 << 22) + 17


def llama_on_meta(shape: ModelShape, layers: int, dtype: torch.dtype) -> torch.nn.Module:
    """``LlamaForCausalLM`` of ``layers`` decoder layers on the meta device, SDPA attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape.hf_config_kwargs(layers))
    config._attn_implementation = "sdpa"
    if config.rope_parameters["rope_theta"] != shape.rope_theta:
        raise SystemExit(f"transformers ignored rope_theta: {config.rope_parameters}")
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def materialize_(model: torch.nn.Module, device: torch.device | str, seed: int) -> None:
    """Allocates a meta model's storage on ``device`` and fills it with random weights.

    Matrices get N(0, 0.02) values from a seeded pool (generated on the CPU, so every device gets
    the same numbers); RMSNorm weights get 1. The rotary embedding's buffers, which were computed
    on meta, are rebuilt in fp32. Works on FSDP2's DTensor parameters too (fills the local shard).
    """
    model.to_empty(device=device)
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(model.config).to(device)
    fill_random_(model, seed)


@torch.no_grad()
def fill_random_(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Fills every parameter in place: 1 for vectors (norm weights), pool values for matrices."""
    gen = torch.Generator().manual_seed(seed)
    pool_cpu = torch.randn(_POOL, generator=gen) * std
    pools: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
    for i, param in enumerate(model.parameters()):
        local = param.to_local() if hasattr(param, "to_local") else param
        if local.numel() == 0:
            continue
        if local.dim() == 1:
            local.fill_(1.0)
            continue
        key = (local.device, local.dtype)
        if key not in pools:
            pools[key] = pool_cpu.to(device=local.device, dtype=local.dtype)
        pool = pools[key]
        flat = local.view(-1)
        offset = (i * 104729) % _POOL  # a different phase for each tensor
        pos = 0
        while pos < flat.numel():
            n = min(flat.numel() - pos, _POOL - offset)
            flat[pos : pos + n].copy_(pool[offset : offset + n])
            pos += n
            offset = 0


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer in backward (HF's per-layer gradient checkpointing).

    Non-reentrant checkpointing: the variant PyTorch recommends, and the one that works with
    FSDP2's and ZeRO-3's parameter hooks when every parameter is trained.
    """
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()


def accumulate_clip_step(model, optimizer, batches, clip: float):
    """A plain PyTorch training step: accumulate the micro-batches' gradients, clip, step."""

    def step() -> float:
        loss = None
        for ids in batches:
            loss = model(input_ids=ids, labels=ids).loss
            (loss / len(batches)).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def time_torch_steps(step, device: torch.device, sampler: Any, warmup: int, steps: int) -> tuple[list[float], list[float]]:
    """(step times, losses): the GPU peaks reset after set-up, each timed step ended by a sync."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sampler.reset_gpu()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    losses: list[float] = []
    times = common.time_steps(lambda: losses.append(step()), warmup, steps, sync)
    return times, losses


def random_batches(
    vocab: int, micro_batches: int, batch: int, seq_len: int, seed: int, device: torch.device | str
) -> torch.Tensor:
    """Random token ids, shape (micro_batches, batch, seq_len), the same for every system."""
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, vocab, (micro_batches, batch, seq_len), generator=gen)
    return ids.to(device)


def single_process_env() -> None:
    """Environment of rank 0 of a one-process job, so no launcher is needed."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def pick_device(tiny: bool) -> torch.device:
    """The GPU; the CPU only for a --tiny check (an 8B-shaped run on the CPU would never end)."""
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    if not tiny:
        raise SystemExit("no CUDA GPU visible to torch: run on the GPU machine, or pass --tiny")
    return torch.device("cpu")


def first_line(exc: BaseException) -> str:
    """An exception as one short line, for result notes."""
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
