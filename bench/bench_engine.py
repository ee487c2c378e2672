"""slidejax's runner for the benchmark harness: the sliding engine on Llama-3.1-8B layer shapes.

    python3 bench/bench_engine.py --layers 16 --tokens-per-step 16384 --gpu-memory 24GB --out r.json
    python3 bench/bench_engine.py --layers 16 --tokens-per-step 16384 --resident --out peak.json

`--resident` keeps every unit (weights, AdamW state, activations) on the GPU with the same
compiled layer, head and loss functions and an on-device optax AdamW: the 'peak' the streamed
engine is measured against. Same optimizer settings as the baselines (AdamW lr 1e-5, betas
0.9/0.95, eps 1e-8, weight decay 0.1, clipping at 1.0 unless --clip 0). `--trace FILE` writes a
Chrome/Perfetto timeline of the last timed step.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402


def parse_args():
    p = common.runner_parser(__doc__.splitlines()[0])
    p.add_argument("--gpu-memory", default="unlimited", help="device memory budget, e.g. 24GB, or unlimited")
    p.add_argument("--resident", action="store_true", help="all state on the GPU (the peak reference)")
    p.add_argument("--prefetch", type=int, default=2, help="layers uploaded ahead")
    p.add_argument("--resident-layers", default="0",
                   help="decoder layers kept on the GPU, or auto (as many as the budget fits)")
    p.add_argument("--gpu-update-layers", type=int, default=0,
                   help="streamed layers whose AdamW runs on the GPU, state crossing PCIe (engine's gpu_update_layers)")
    p.add_argument("--speculate", type=int, default=0,
                   help="units updated speculatively during the backward, committed when clipping changes "
                        "nothing (engine's speculative_units)")
    p.add_argument("--host-threads", type=int, default=None, help="host optimizer threads (default: cores - 1)")
    p.add_argument("--devices", type=int, default=1,
                   help="local GPUs for data parallelism (micro-batch rows split across them; "
                        "keep the tokens per GPU fixed to measure scaling)")
    p.add_argument("--micro-batch-tokens", type=int, default=16384, help="tokens per micro-batch (at most)")
    p.add_argument("--clip", type=float, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--moments", default="float32", choices=["float32", "bfloat16"], help="AdamW moment dtype")
    p.add_argument("--trace", type=Path, default=None, help="write a Chrome trace JSON of the last step")
    p.add_argument("--hidden", type=int, default=None, help="override the hidden width (memory tests)")
    p.add_argument("--pinned-pool", default="xla", choices=["xla", "plan"],
                   help="XLA's pinned host pool: its default cap (64 GiB, grown by doubling) or capped at "
                        "the engine's host plan (host_memory.size_pinned_pool)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    common.check_runner_args(args)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # NVML then shows real use
    budget = None if args.gpu_memory in ("unlimited", "none", "0") else args.gpu_memory
    if budget and not args.tiny:
        # Cap XLA's allocator before the backend starts, so the budget is enforced, not just planned.
        from slidejax.engine import limit_device_memory
        limit_device_memory(budget)
    import jax
    import ml_dtypes
    import numpy as np

    from slidejax.config import ModelConfig
    from slidejax.engine import SlidingEngine
    from slidejax.host_memory import HostModel, plan_host_memory, size_pinned_pool, vocab_chunks
    from slidejax.host_optimizer import HostAdamW

    shape = common.model_shape(args)
    hidden = args.hidden or shape.hidden
    cfg = ModelConfig(model_type="llama", vocab_size=shape.vocab, hidden_size=hidden,
                      intermediate_size=shape.intermediate * hidden // shape.hidden,
                      num_layers=args.layers, num_heads=shape.heads * hidden // shape.hidden,
                      num_kv_heads=shape.kv_heads, head_dim=shape.head_dim, rms_norm_eps=shape.norm_eps,
                      rope_theta=shape.rope_theta, max_position_embeddings=131072)
    rows, micro = common.micro_batching(args.tokens_per_step, args.seq_len, args.micro_batch_tokens)
    pinned_pool = None
    if args.pinned_pool == "plan" and not args.resident:
        # Before the backend starts (it reads the cap once). "auto" resident layers are decided
        # after it: planned with none, an upper bound.
        planned_resident = 0 if args.resident_layers == "auto" else int(args.resident_layers)
        # Speculative units: the head's chunks first, then layers (an upper bound: as if none resident).
        candidates = [(b - a) * cfg.hidden_size for a, b in vocab_chunks(cfg)] + [cfg.layer_params] * cfg.num_layers
        pinned_pool = size_pinned_pool(plan_host_memory(
            cfg, (rows, args.seq_len), micro, resident_layers=planned_resident,
            gpu_update_layers=args.gpu_update_layers, moment_dtype=args.moments,
            speculated_params=sum(candidates[: args.speculate]) if args.clip > 0 else 0)["pinned"])
    if args.devices > len(jax.local_devices()):
        raise SystemExit(f"--devices {args.devices}: only {len(jax.local_devices())} local devices")
    rss = {}
    with common.PeakSampler() as sampler:
        t0 = time.perf_counter()
        host = HostModel(cfg)
        rng = np.random.default_rng(args.seed)
        # Random weights, cheaply: one layer and one vocabulary block drawn, the others copies
        # (speed does not depend on the values; set-up time is device time).
        first = host.layer_unit(0)
        first.master[:] = 0.02 * rng.standard_normal(first.master.size, dtype=np.float32)
        for i in range(1, cfg.num_layers):
            host.layer_unit(i).master[:] = first.master
        vocab = host.embed_units + host.head_units
        block = 0.02 * rng.standard_normal(max(u.master.size for u in vocab), dtype=np.float32)
        for u in vocab:
            u.master[:] = block[: u.master.size]
        host.units["norm"].master[:] = 1.0
        moments = ml_dtypes.bfloat16 if args.moments == "bfloat16" else np.float32
        opt = HostAdamW(1e-5, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, moment_dtype=moments,
                        threads=args.host_threads)
        rss["model"] = common.vm_rss_bytes()
        resident = args.resident_layers if args.resident_layers == "auto" else int(args.resident_layers)
        engine = SlidingEngine(host, opt, compute_dtype="bfloat16", prefetch=args.prefetch,
                               resident_layers=args.layers if args.resident else resident,
                               max_grad_norm=args.clip, gpu_memory=budget, trace=args.trace is not None,
                               micro_batch=(rows, args.seq_len), devices=jax.local_devices()[: args.devices],
                               gpu_update_layers=args.gpu_update_layers, speculative_units=args.speculate)
        setup_s = time.perf_counter() - t0
        rss["engine"] = common.vm_rss_bytes()

        seq = args.seq_len

        def batch():
            ids = rng.integers(0, cfg.vocab_size, (micro, rows, seq + 1), dtype=np.int32)
            return {"input_ids": ids[..., :-1], "labels": ids[..., 1:],
                    "segment_ids": np.ones((micro, rows, seq), np.int32)}

        batches = [batch() for _ in range(3)]
        losses, grad_norms = [], []
        state = {"i": 0}

        def step():
            b = batches[state["i"] % 3]
            nxt = batches[(state["i"] + 1) % 3]["input_ids"]
            m = engine.step(b, next_input_ids=nxt)
            losses.append(m.loss)
            grad_norms.append(m.grad_norm)  # against --clip: whether clipping (and so a redo) happened
            state["i"] += 1

        def sync():
            engine.wait_updates()

        for _ in range(args.warmup):
            step()
        sync()
        rss["warm"] = common.vm_rss_bytes()
        rss_map = {"warm": common.resident_map()}
        sampler.reset_gpu()
        # Steps run back to back, as in training: a step's host updates overlap the next step's
        # forward (which waits, unit by unit, only for the update it needs). Step k's time is from
        # step k-1's return to step k's; the last also waits for every update it started, so the
        # times add up to the wall time of the timed steps.
        times = []
        t = time.perf_counter()
        for k in range(args.steps):
            if engine.trace is not None and k == args.steps - 1:
                engine.trace.events.clear()
            step()
            if k == args.steps - 1:
                sync()
            now = time.perf_counter()
            times.append(now - t)
            t = now
        # Measured over set-up, warm-up and the timed steps; the sync after them copies the
        # resident layers' masters back to the host, as a checkpoint or an export does.
        peaks = sampler.peaks()
        rss_map["end"] = common.resident_map()
        engine.sync()
    stats = jax.devices()[0].memory_stats() or {}
    peaks["peak_gpu_allocator_bytes"] = int(stats.get("peak_bytes_in_use", 0))
    if args.trace is not None:
        engine.save_trace(args.trace)
    name = "slidejax-resident" if args.resident else f"slidejax-{args.gpu_memory}"
    notes = (f"micro-batches {micro}x{rows}x{seq}, prefetch {args.prefetch}, clip {args.clip}, "
             f"moments {args.moments}, resident layers {engine.resident_layers}"
             + (" (auto)" if args.resident_layers == "auto" and not args.resident else "")
             + (f", host threads {opt.threads}" if args.host_threads else "")
             + (f", GPU-updated layers {sorted(engine.gpu_updated)}" if engine.gpu_updated else "")
             + (f", speculative units {list(engine._spec)} (unit updates committed "
                f"{engine.speculation['committed']}, redone {engine.speculation['redone']}, skipped "
                f"{engine.speculation['skipped']})" if engine._spec else "")
             + (f", {args.devices} devices" if args.devices > 1 else ""))
    if pinned_pool is not None:
        notes += f", pinned pool capped at {pinned_pool >> 30} GiB"
    plan = engine.plan_memory((rows, seq)) if not args.tiny else {}
    host_plan = engine.plan_host_memory((rows, seq), micro)
    # Where host memory went: RSS after the masters exist, after the engine's set-up, after the
    # warm-up steps; against the plan (pinned = what XLA's pinned pool must hold); and by mapping.
    result = common.make_result(system=name, shape=shape, layers=args.layers, seq_len=seq,
                                tokens_per_step=args.tokens_per_step, step_times=times, peaks=peaks,
                                notes=notes, losses=losses, grad_norms=grad_norms, setup_s=setup_s, planned_gpu_bytes=plan.get("total", 0),
                                hidden=hidden, host_rss_phases=rss, planned_host_bytes=host_plan,
                                host_rss_map=rss_map)
    common.write_result(args.out, result)
    common.print_result(result)


if __name__ == "__main__":
    main()
