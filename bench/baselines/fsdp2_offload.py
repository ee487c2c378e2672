"""Baseline: PyTorch FSDP2 with CPU offload on one GPU.

Hugging Face ``LlamaForCausalLM`` with ``fully_shard`` on every decoder layer and on the root,
``CPUOffloadPolicy`` (fp32 sharded parameters, gradients and optimizer state in pinned CPU memory)
and ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``, per-layer activation
checkpointing, and torch's AdamW stepping on the CPU parameters (fused CPU kernel when it accepts
FSDP2's DTensors, else foreach). A one-process group; gradient accumulation over micro-batches of
``B x seq_len`` tokens makes up ``--tokens-per-step``.

    python3 bench/baselines/fsdp2_offload.py --layers 16 --tokens-per-step 16384 --out fsdp2.json

``--tiny`` runs a tiny model through the same code on the CPU (gloo) where no GPU is visible.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench import common  # noqa: E402
from bench.baselines import hf_llama  # noqa: E402

SYSTEM = "fsdp2-cpu-offload"


def _policies(pin_memory: bool) -> dict[str, Any]:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    return dict(
        mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
        offload_policy=CPUOffloadPolicy(pin_memory=pin_memory),
    )


def shard_model(model: torch.nn.Module, mesh, pin_memory: bool) -> None:
    """``fully_shard`` each decoder layer, then the root (embedding, final norm, lm_head)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, **_policies(pin_memory))
    fully_shard(model, mesh=mesh, **_policies(pin_memory))


def _probe_layer(mesh, pin_memory: bool, device: torch.device) -> torch.nn.Module:
    """A small FSDP2-offloaded linear layer with gradients from one backward (fixed values)."""
    from torch.distributed.fsdp import fully_shard

    gen = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(32, 48, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(48, 32, generator=gen) * 0.1)
    fully_shard(layer, mesh=mesh, **_policies(pin_memory))
    x = torch.randn(4, 32, generator=gen).to(device)
    layer(x).float().square().mean().backward()
    return layer


def fused_adamw_works(mesh, pin_memory: bool, device: torch.device) -> str | None:
    """Whether torch's fused CPU AdamW steps FSDP2's offloaded DTensors correctly.

    Steps two identical FSDP2-offloaded probe layers, one with foreach and one with fused
    AdamW, and compares. Returns None if fused works, else the reason it does not.
    """
    ref, probe = _probe_layer(mesh, pin_memory, device), _probe_layer(mesh, pin_memory, device)
    torch.optim.AdamW(ref.parameters(), foreach=True, **hf_llama.ADAMW).step()
    try:
        torch.optim.AdamW(probe.parameters(), fused=True, **hf_llama.ADAMW).step()
    except Exception as exc:
        return hf_llama.first_line(exc)
    a, b = ref.weight.to_local(), probe.weight.to_local()
    if a.device.type != "cpu" or not torch.allclose(a, b, rtol=1e-5, atol=1e-7):
        return f"fused AdamW disagrees with foreach (shard on {b.device})"
    return None


def make_optimizer(
    model: torch.nn.Module, fused_error: str | None
) -> tuple[torch.optim.Optimizer, str]:
    """torch AdamW on the CPU shards: fused unless ``fused_error`` (from the probe); a note."""
    if fused_error is None:
        return torch.optim.AdamW(model.parameters(), fused=True, **hf_llama.ADAMW), "fused CPU AdamW"
    note = f"foreach CPU AdamW (fused failed: {fused_error})"
    print("NOTE:", note, flush=True)
    return torch.optim.AdamW(model.parameters(), foreach=True, **hf_llama.ADAMW), note


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.runner_parser(__doc__.splitlines()[0])
    p.add_argument("--micro-batch-tokens", type=int, default=16384,
                   help="tokens per micro-batch at most (the rest is gradient accumulation)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (0: off)")
    args = p.parse_args(argv)
    common.check_runner_args(args)
    shape = common.model_shape(args)
    batch, accum = common.micro_batching(args.tokens_per_step, args.seq_len, args.micro_batch_tokens)
    device = hf_llama.pick_device(args.tiny)
    notes = [f"micro-batch {batch}x{args.seq_len}, {accum} accumulation steps",
             f"clip {args.clip}" if args.clip else "no clipping"]

    from torch.distributed.device_mesh import init_device_mesh

    hf_llama.single_process_env()
    # gloo beside NCCL: gradient clipping reduces the norm of CPU-resident DTensors.
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (1,))
    print(f"torch {torch.__version__}, device {device}, backend {backend}", flush=True)

    pin_memory = device.type == "cuda"  # CPU-only torch cannot pin
    fused_error = fused_adamw_works(mesh, pin_memory, device)  # before measuring anything
    with common.PeakSampler() as sampler:
        model = hf_llama.llama_on_meta(shape, args.layers, torch.float32)
        hf_llama.enable_checkpointing(model)
        shard_model(model, mesh, pin_memory)
        hf_llama.materialize_(model, "cpu", args.seed)
        # The rotary buffers are not FSDP-managed: they live where the compute is.
        model.model.rotary_emb.to(device)
        batches = hf_llama.random_batches(shape.vocab, accum, batch, args.seq_len, args.seed, device)
        optimizer, opt_note = make_optimizer(model, fused_error)
        notes.append(opt_note)
        if args.gpu_budget:
            notes.append(f"--gpu-budget {args.gpu_budget} ignored")
        step = hf_llama.accumulate_clip_step(model, optimizer, batches, args.clip)
        times, losses = hf_llama.time_torch_steps(step, device, sampler, args.warmup, args.steps)
    peaks = sampler.peaks()
    peaks["peak_gpu_allocator_bytes"] = common.torch_allocator_peak_bytes()
    result = common.make_result(
        system=SYSTEM, shape=shape, layers=args.layers, seq_len=args.seq_len,
        tokens_per_step=args.tokens_per_step, step_times=times, peaks=peaks,
        notes="; ".join(notes), micro_batch=batch, grad_accum=accum, losses=losses,
        versions={"torch": torch.__version__},
    )
    dist.destroy_process_group()
    common.write_result(args.out, result)
    common.print_result(result)
    return result


if __name__ == "__main__":
    main()
