"""Baseline: DeepSpeed ZeRO-3 with parameters and optimizer offloaded to the CPU.

The configuration every offloading paper compares against: Hugging Face ``LlamaForCausalLM`` in
bf16 with per-layer gradient checkpointing, ZeRO stage 3 with fp16/bf16 parameters and the fp32
optimizer state (master weights, Adam moments, gradients) in pinned CPU memory, and DeepSpeed's
AVX CPU Adam. One process, no ``deepspeed`` launcher. Micro-batches of ``B x seq_len`` tokens with
gradient accumulation make up ``--tokens-per-step``.

    python3 bench/baselines/deepspeed_zero3.py --layers 16 --tokens-per-step 16384 --out ds.json

``--tiny`` runs a tiny model through the same code on the CPU (gloo) where no GPU is visible;
``--dry-run`` skips DeepSpeed entirely (one plain torch step), to check the model and data code.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench import common  # noqa: E402
from bench.baselines import hf_llama  # noqa: E402

SYSTEM = "deepspeed-zero3-offload"
DRY_RUN = "dry run"


def ds_config(hidden: int, micro_batch: int, grad_accum: int, clip: float) -> dict[str, Any]:
    """The DeepSpeed config: ZeRO-3, params + optimizer on pinned CPU memory, bf16.

    Bucket and threshold sizes follow the values Hugging Face's integration derives from the
    hidden size ("auto"), the settings most ZeRO-3 offload users run with.
    """
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum,
        "gradient_clipping": clip,
        "bf16": {"enabled": True},
        "zero_optimization": {
            "stage": 3,
            "offload_param": {"device": "cpu", "pin_memory": True},
            "offload_optimizer": {"device": "cpu", "pin_memory": True},
            "overlap_comm": True,
            "contiguous_gradients": True,
            "sub_group_size": int(1e9),
            "reduce_bucket_size": hidden * hidden,
            "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "stage3_param_persistence_threshold": 10 * hidden,
            "stage3_max_live_parameters": int(1e9),
            "stage3_max_reuse_distance": int(1e9),
            "stage3_gather_16bit_weights_on_model_save": False,
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_cpu_adam() -> str | None:
    """JIT-builds (or loads from the cache) DeepSpeed's CPU Adam; returns why not, or None.

    Done before any measurement so the compiler's memory and time are not counted.
    """
    try:
        from deepspeed.ops.op_builder import CPUAdamBuilder

        t0 = time.perf_counter()
        CPUAdamBuilder().load()
        print(f"DeepSpeed CPU Adam ready in {time.perf_counter() - t0:.1f} s", flush=True)
        return None
    except BaseException as exc:  # the JIT build raises anything from SystemExit to OSError
        if isinstance(exc, KeyboardInterrupt):
            raise
        return hf_llama.first_line(exc)


def make_optimizer(model: torch.nn.Module, cpu_adam_error: str | None) -> tuple[Any, str]:
    """DeepSpeedCPUAdam, or torch's AdamW where CPU Adam could not be built; and a note."""
    if cpu_adam_error is None:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(model.parameters(), adamw_mode=True, **hf_llama.ADAMW), "DeepSpeedCPUAdam"
    if cpu_adam_error == DRY_RUN:
        return torch.optim.AdamW(model.parameters(), foreach=True, **hf_llama.ADAMW), "torch AdamW"
    note = f"DeepSpeedCPUAdam unavailable ({cpu_adam_error}); torch AdamW (foreach) on CPU instead"
    print("NOTE:", note, flush=True)
    return torch.optim.AdamW(model.parameters(), foreach=True, **hf_llama.ADAMW), note


def engine_step_fn(engine, batches):
    """One training step: every micro-batch through the engine; it steps at the boundary."""

    def step() -> float:
        loss = None
        for ids in batches:
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
        return float(loss.detach())

    return step


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.runner_parser(__doc__.splitlines()[0])
    p.add_argument("--micro-batch-tokens", type=int, default=16384,
                   help="tokens per micro-batch at most (the rest is gradient accumulation)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (0: off)")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny model on the CPU, plain torch step, no DeepSpeed")
    args = p.parse_args(argv)
    args.tiny = args.tiny or args.dry_run
    common.check_runner_args(args)
    shape = common.model_shape(args)
    batch, accum = common.micro_batching(args.tokens_per_step, args.seq_len, args.micro_batch_tokens)
    device = torch.device("cpu") if args.dry_run else hf_llama.pick_device(args.tiny)
    notes = [f"micro-batch {batch}x{args.seq_len}, {accum} accumulation steps",
             f"clip {args.clip}" if args.clip else "no clipping"]

    if args.dry_run:
        cpu_adam_error = DRY_RUN
    else:
        hf_llama.single_process_env()
        import deepspeed

        print(f"deepspeed {deepspeed.__version__}, torch {torch.__version__}, device {device}", flush=True)
        cpu_adam_error = build_cpu_adam()
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                   auto_mpi_discovery=False)

    with common.PeakSampler() as sampler:
        # Materialised in bf16 on the GPU (ZeRO-3 would move it there anyway before
        # partitioning it to the CPU); the GPU peak is reset after set-up.
        model = hf_llama.llama_on_meta(shape, args.layers, torch.bfloat16)
        hf_llama.materialize_(model, device, args.seed)
        hf_llama.enable_checkpointing(model)
        batches = hf_llama.random_batches(shape.vocab, accum, batch, args.seq_len, args.seed, device)
        optimizer, opt_note = make_optimizer(model, cpu_adam_error)
        if args.dry_run:
            step = hf_llama.accumulate_clip_step(model, optimizer, batches, args.clip)
            notes.append("dry run: no DeepSpeed")
        else:
            config = ds_config(shape.hidden, batch, accum, args.clip)
            config["zero_force_ds_cpu_optimizer"] = cpu_adam_error is None
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
            del model
            step = engine_step_fn(engine, batches)
        notes.append(opt_note)
        if args.gpu_budget:
            notes.append(f"--gpu-budget {args.gpu_budget} ignored")
        times, losses = hf_llama.time_torch_steps(step, device, sampler, args.warmup, args.steps)
    peaks = sampler.peaks()
    peaks["peak_gpu_allocator_bytes"] = common.torch_allocator_peak_bytes()
    result = common.make_result(
        system=SYSTEM, shape=shape, layers=args.layers, seq_len=args.seq_len,
        tokens_per_step=args.tokens_per_step, step_times=times, peaks=peaks,
        notes="; ".join(notes), micro_batch=batch, grad_accum=accum, losses=losses,
        versions={"torch": torch.__version__,
                  "deepspeed": None if args.dry_run else deepspeed.__version__},
    )
    common.write_result(args.out, result)
    common.print_result(result)
    return result


if __name__ == "__main__":
    main()
