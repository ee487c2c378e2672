"""The `slidejax` command line: `train`, `export` and `info`.

    slidejax train                                  # the embedded default: tiny preset, its task
    slidejax train --model path/to/hf --data train.jsonl --eval-data eval.jsonl --steps 1000
    slidejax train --config run.toml --lr 1e-5      # TOML settings, flags override them
    slidejax train --resume runs/<name>             # continue a run bit-exactly
    slidejax train --coordinator host0:1234 --num-processes 2 --process-id R ...   # on each host
    slidejax export runs/<name> --hf out/ --dtype bfloat16
    slidejax info [MODEL | RUN]

Bad input (a data file, a setting, a model folder, a checkpoint) ends with one line on stderr
naming the file, field or line at fault, and a non-zero exit; nothing already saved is touched.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

from slidejax.errors import SlidejaxError


def _count_or_auto(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


EXIT_ERROR = 1
EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}

# (group, field, argparse kwargs, help): every TrainConfig setting has a flag of the same name.
_TRAIN_OPTIONS: list[tuple[str, str, dict[str, Any], str]] = [
    ("model and data", "model", dict(metavar="MODEL"),
     "a Hugging Face model folder (config.json, safetensors, tokenizer) or a preset name (tiny); default tiny"),
    ("model and data", "data", dict(nargs="+", metavar="FILE"),
     "training data files: .txt, or .jsonl with text / prompt+completion / messages / input_ids records "
     "(default: the preset's task data)"),
    ("model and data", "eval_data", dict(nargs="+", metavar="FILE"),
     "evaluation data files (prompt/completion files also give greedy exact match)"),
    ("model and data", "format", dict(choices=["txt", "text", "prompt_completion", "chat", "tokens"]),
     "force the data format instead of detecting it"),
    ("model and data", "tokenizer", dict(metavar="FOLDER"), "tokenizer folder, when the model folder has none"),
    ("model and data", "on_overlong", dict(choices=["truncate", "error"]),
     "documents longer than --seq-len: truncate with a counted warning (default) or stop with an error"),
    ("batch", "seq_len", dict(type=int, metavar="N"), "tokens per packed row (default 2048; tiny: 128)"),
    ("batch", "micro_batch_size", dict(type=int, metavar="N"),
     "rows per micro-batch, what the GPU holds at once (default 1; tiny: 8)"),
    ("batch", "tokens_per_step", dict(type=int, metavar="N"),
     "tokens per optimizer step, a multiple of micro-batch size x seq-len (default: one micro-batch; tiny: 2048)"),
    ("length", "steps", dict(type=int, metavar="N"), "optimizer steps (tiny: 64)"),
    ("length", "epochs", dict(type=int, metavar="N"), "passes over the data, instead of --steps (default 1)"),
    ("optimizer", "lr", dict(type=float, metavar="LR"), "peak learning rate (default 2e-5; tiny: 2e-3)"),
    ("optimizer", "schedule", dict(choices=["constant", "linear", "cosine"]),
     "learning-rate schedule after warm-up; linear and cosine decay to 0 (default cosine)"),
    ("optimizer", "warmup", dict(type=float, metavar="W"),
     "linear warm-up: steps if >= 1, else a fraction of the steps (default 0; tiny: 0.1)"),
    ("optimizer", "weight_decay", dict(type=float, metavar="WD"), "AdamW weight decay, matrices only (default 0)"),
    ("optimizer", "b1", dict(type=float), "AdamW beta1 (default 0.9)"),
    ("optimizer", "b2", dict(type=float), "AdamW beta2 (default 0.999)"),
    ("optimizer", "eps", dict(type=float), "AdamW epsilon (default 1e-8)"),
    ("optimizer", "moment_dtype", dict(choices=["float32", "bfloat16"]),
     "AdamW moments in host RAM: float32 (12 bytes/parameter with the master) or bfloat16 (8)"),
    ("optimizer", "max_grad_norm", dict(type=float, metavar="NORM"),
     "clip the global gradient norm to this; 0 = off (default 1.0)"),
    ("optimizer", "seed", dict(type=int), "seed of the data order and the trainer's RNG (default 0)"),
    ("optimizer", "shuffle", dict(action=argparse.BooleanOptionalAction),
     "shuffle the documents each epoch (default); --no-shuffle keeps file order"),
    ("output", "output_dir", dict(metavar="DIR"), "where runs are written (default ./runs)"),
    ("output", "run_name", dict(metavar="NAME"), "the run's folder under --output-dir (default: model-date-time)"),
    ("output", "save_every", dict(type=int, metavar="N"),
     "checkpoint every N steps; 0 = only at the end (default 500; tiny: 32)"),
    ("output", "keep_last", dict(type=int, metavar="N"), "checkpoints kept; 0 = all (default 2)"),
    ("output", "resume", dict(nargs="?", const="latest", metavar="RUN"),
     "continue a run bit-exactly from its latest checkpoint (or a given checkpoint folder); bare --resume "
     "takes --run-name's run, else the newest run in --output-dir. Its saved settings apply; flags override"),
    ("output", "eval_every", dict(type=int, metavar="N"),
     "evaluate every N steps (and at step 0); 0 = only at the end (tiny: 16)"),
    ("output", "task_examples", dict(type=int, metavar="N"),
     "eval prompts scored by greedy exact match (default 64)"),
    ("output", "progress", dict(action=argparse.BooleanOptionalAction), "show the progress bar (default)"),
    ("system", "compute_dtype", dict(choices=["auto", "bfloat16", "float32"]),
     "dtype on the device: auto = bfloat16 on a GPU, float32 on CPU"),
    ("system", "gpu_memory", dict(metavar="SIZE"),
     "GPU memory budget, e.g. 24GB; the run is refused up front if it cannot fit"),
    ("system", "host_memory", dict(metavar="SIZE"),
     "host RAM budget, e.g. 100GB (default: what is available); checked before loading"),
    ("system", "prefetch", dict(type=int, metavar="K"), "layers uploaded ahead of the one computing (default 2)"),
    ("system", "resident_layers", dict(type=_count_or_auto, metavar="N|auto"),
     "decoder layers kept on the GPU with their optimizer state instead of streamed (default auto: "
     "as many as --gpu-memory, or the GPU, fits; none on a CPU without --gpu-memory)"),
    ("system", "devices", dict(type=int, metavar="N"),
     "local accelerators for data parallelism (per process); micro-batch rows are split across them (default 1)"),
    ("system", "trace", dict(metavar="FILE"), "write a Chrome/Perfetto trace of the engine's timeline to FILE"),
]


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    from slidejax.presets import PRESETS

    presets = "; ".join(f"{k}: {v}" for k, v in PRESETS.items())
    parser = argparse.ArgumentParser(
        prog="slidejax",
        description="Fine-tune language models larger than GPU memory: the GPU as a sliding window over "
                    "the layers, all training state in host RAM.",
        epilog="Run 'slidejax <command> --help' for a command's options. Presets: " + presets,
    )
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("slidejax")
    except PackageNotFoundError:
        ver = "unknown"
    parser.add_argument("--version", action="version", version=f"slidejax {ver}")
    sub = parser.add_subparsers(dest="command", metavar="{train,export,info}")

    train = sub.add_parser(
        "train", help="fine-tune a model (no arguments: the embedded tiny demo)",
        description="Fine-tune a model. With no arguments, trains the embedded tiny preset on its letter-sorting "
                    "task (a couple of minutes on a CPU). Settings come from defaults < the preset < --config TOML "
                    "< flags. Writes <output-dir>/<run-name>/: checkpoints/, metrics.jsonl, tensorboard/, "
                    "loss.png, config.toml, model/. Loss = mean over all supervised tokens of a step. Ctrl-C or "
                    "SIGTERM finishes the current step, saves a checkpoint and exits (code 130 / 143).")
    train.add_argument("--config", metavar="FILE.toml",
                       help="TOML file of settings (top-level keys named like these options, e.g. lr = 1e-5)")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for group, field, kwargs, text in _TRAIN_OPTIONS:
        g = groups.get(group) or groups.setdefault(group, train.add_argument_group(group))
        g.add_argument(_flag(field), dest=field, default=None, help=text, **kwargs)
    hosts = train.add_argument_group(
        "several processes", "one process per host, each started with the same settings (or set "
        "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); every process reads the same data "
        "and trains on its share of each batch; process 0 writes the run's files, on a filesystem all "
        "processes see (they all read checkpoints to resume)")
    hosts.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address, for jax.distributed")
    hosts.add_argument("--num-processes", type=int, metavar="P", help="how many processes take part")
    hosts.add_argument("--process-id", type=int, metavar="R", help="this process's index, 0 .. P-1")
    train.set_defaults(func=cmd_train)

    export = sub.add_parser(
        "export", help="write a checkpoint's weights as a Hugging Face folder",
        description="Write the weights of a run (its latest checkpoint) or of one checkpoint folder as a "
                    "Hugging Face folder (config.json, safetensors, tokenizer files) that "
                    "transformers.AutoModelForCausalLM.from_pretrained loads.")
    export.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT",
                        help="a run folder (runs/<name>) or a checkpoint folder (runs/<name>/checkpoints/<step>)")
    export.add_argument("--hf", required=True, metavar="FOLDER", help="the Hugging Face folder to write")
    export.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="dtype of the saved weights (default bfloat16)")
    export.set_defaults(func=cmd_export)

    info = sub.add_parser(
        "info", help="describe a model, preset or run",
        description="For a model folder or preset: its architecture, parameter counts, FLOPs per token and the "
                    "host RAM a run needs. For a run or checkpoint folder: its checkpoints and last metrics.")
    info.add_argument("target", nargs="?", default="tiny", metavar="MODEL_OR_RUN",
                      help="a model folder, a preset name or a run folder (default tiny)")
    info.add_argument("--seq-len", type=int, default=None, metavar="N", help="sequence length for the estimates")
    info.add_argument("--tokens-per-step", type=int, default=None, metavar="N",
                      help="tokens per step for the host RAM estimate")
    info.set_defaults(func=cmd_info)
    return parser


# ----------------------------------------------------------------------------------------------
# train


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {field: getattr(args, field) for _, field, _, _ in _TRAIN_OPTIONS if getattr(args, field) is not None}


def _model_folder(name: str) -> Path:
    """The folder of a model argument: an existing folder, else a preset."""
    from slidejax.presets import PRESETS, preset_path

    path = Path(name)
    if path.exists() or name not in PRESETS:
        if not path.exists():
            known = ", ".join(sorted(PRESETS))
            raise SlidejaxError(f"{name}: no such model folder (and not a preset; presets: {known})")
        return path
    return preset_path(name)


def _join_processes(args: argparse.Namespace) -> bool:
    """Join a multi-process run when asked (flags or the standard JAX_* variables), before
    anything touches jax's backends. Returns whether this process prints (process 0, or alone)."""
    import os

    flags = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in flags) or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        from slidejax import distributed

        distributed.initialize(*flags)
    import jax

    return jax.process_index() == 0


def cmd_train(args: argparse.Namespace) -> int:
    from slidejax.engine import limit_device_memory
    from slidejax.trainer import TrainConfig

    overrides = _overrides(args)
    config = TrainConfig.load(args.config, **overrides)
    # Before jax's backend starts (joining the processes starts it): the budget of the TOML file
    # or the flags caps XLA's allocator. A resumed run's saved budget is planned for, not capped.
    limit_device_memory(config.gpu_memory)
    main = _join_processes(args)
    from slidejax.config import ModelConfig
    from slidejax.metrics import format_bytes
    from slidejax.presets import PRESETS
    from slidejax.trainer import (Trainer, broadcast_text, check_host_memory, check_run_dir,
                                  data_paths, default_run_name, latest_run, load_tokenizer, make_loader,
                                  on_main_process, restore_setup, run_together)

    if config.resume is not None:  # from --resume or the TOML file
        resume = config.resume
        if resume == "latest":
            resume = str(Path(config.output_dir) / config.run_name) if config.run_name else \
                str(latest_run(config.output_dir))
        for key in ("resume", "run_name", "output_dir"):  # the checkpoint's location decides these
            overrides.pop(key, None)
        config, model = restore_setup(resume, None, overrides, toml=args.config)
        if main:
            print(f"resuming {resume}")
        trainer = Trainer(model, None, config)
        trainer.resume(resume)  # checks the model, the data and the checkpoint before anything is written
        return _fit(trainer, main)

    folder = _model_folder(config.model)
    model_cfg = ModelConfig.from_pretrained(folder)
    preset = config.model if config.model in PRESETS and not Path(config.model).exists() else None
    # Everything a user can get wrong is checked before any weights load: data, tokenizer, output.
    tokenizer = load_tokenizer(config.tokenizer or folder)
    train_paths = data_paths(config, "train", preset)
    if train_paths is None:
        raise SlidejaxError("no training data: pass --data FILE (a .txt or .jsonl file)")
    eval_paths = data_paths(config, "eval", preset)
    changes: dict[str, Any] = {"data": train_paths, "eval_data": eval_paths}
    if config.run_name is None:  # made from the clock: process 0's, on every process
        changes["run_name"] = broadcast_text(default_run_name(preset or folder.resolve().name))
    config = config.replace(**changes)
    train = make_loader(config, tokenizer, train_paths, "train")
    evals = make_loader(config, tokenizer, eval_paths, "eval") if eval_paths else None
    if config.on_overlong == "error":
        # Refusing overlong documents means reading them all once now, not failing hours in.
        from slidejax.data import eval_loader

        eval_loader(train_paths, tokenizer, seq_len=config.seq_len, micro_batch_size=config.micro_batch_size,
                    on_overlong="error", format=config.format).count_steps()
    run = Path(config.output_dir) / config.run_name
    existed = run.exists()
    on_main_process(lambda: check_run_dir(run, resuming=False))  # process 0 writes the run

    def load() -> tuple[bool, dict[str, int], Any]:
        snapshot, need = check_host_memory(model_cfg, config)
        from slidejax.pretrained import load_pretrained
        from slidejax.trainer import _resolve_dtype

        return snapshot, need, load_pretrained(preset or str(folder), dtype=_resolve_dtype(config.compute_dtype))

    try:
        snapshot, need, model = run_together(load)  # refused on one process: refused on all
    except BaseException:
        if main and not existed and run.is_dir() and not any(run.iterdir()):
            run.rmdir()  # leave nothing behind for a run that never started
        raise
    trainer = Trainer(model, None, config, tokenizer=tokenizer)
    trainer.set_train_data(train)
    trainer.set_eval_data(evals)
    total_need = sum(v for k, v in need.items() if snapshot or k != "snapshot")
    if not main:
        return _fit(trainer, main)
    print(f"model   {model}")
    print(f"data    {', '.join(train_paths)}: {train.num_documents} documents; "
          f"{config.micro_batches} x {config.micro_batch_size} x {config.seq_len} tokens per step")
    print(f"host    about {format_bytes(total_need)} of RAM"
          + ("" if snapshot else " (no room for checkpoint snapshots: training waits for each save)"))
    print(f"output  {run}")
    return _fit(trainer, main)


def _fit(trainer: Any, main: bool = True) -> int:
    """Train, then (process 0) report; the exit status is the same on every process."""
    summary = trainer.fit()
    trainer.close()
    if not main:
        return EXIT_SIGNAL.get(summary["interrupted"], EXIT_ERROR) if summary.get("interrupted") else 0
    run = summary["run_dir"]
    ev, tr = summary.get("eval"), summary.get("train")
    if summary.get("documents_truncated"):
        print(f"warning: {summary['documents_truncated']} documents were truncated to seq_len="
              f"{trainer.config.seq_len}", file=sys.stderr)
    if summary.get("skipped_steps"):
        print(f"warning: {summary['skipped_steps']} batches without supervised tokens were skipped", file=sys.stderr)
    if tr is not None:
        line = f"step {summary['step']}: loss {tr['loss']:.4f}"
        if ev is not None:
            line += f", eval loss {ev['eval_loss']:.4f}"
            if "exact_match" in ev:
                line += f", exact match {ev['exact_match']:.3f}"
        print(line)
    if summary.get("checkpoint"):
        print(f"checkpoint  {summary['checkpoint']}")
    if summary.get("plot"):
        print(f"loss curve  {summary['plot']}")
    print(f"metrics     {Path(run) / 'metrics.jsonl'} (TensorBoard: tensorboard --logdir {Path(run) / 'tensorboard'})")
    if summary.get("interrupted"):
        sig = summary["interrupted"]
        print(f"{sig}: stopped at step {summary['step']}; continue with: slidejax train --resume {run}",
              file=sys.stderr)
        return EXIT_SIGNAL.get(sig, EXIT_ERROR)
    print(f"export      slidejax export {run} --hf <folder>")
    return 0


# ----------------------------------------------------------------------------------------------
# export


def cmd_export(args: argparse.Namespace) -> int:
    from slidejax.checkpointing import find_checkpoint, load_params, load_params_tree, run_of
    from slidejax.hf_checkpoint import save_pretrained
    from slidejax.host_memory import HostModel

    folder, step = find_checkpoint(args.checkpoint)
    cfg, params = load_params(folder / str(step))
    host = HostModel(cfg)
    load_params_tree(host, params, str(folder / str(step)))
    del params
    run = run_of(folder)
    tokenizer = run / "model"
    out = save_pretrained(host, args.hf, dtype=args.dtype, tokenizer_dir=tokenizer if tokenizer.is_dir() else None)
    print(f"exported step {step} of {run} to {out} ({args.dtype})")
    return 0


# ----------------------------------------------------------------------------------------------
# info


def cmd_info(args: argparse.Namespace) -> int:
    from slidejax.config import ModelConfig
    from slidejax.metrics import flop_params, flops_per_token, format_bytes, read_metrics
    from slidejax.trainer import TrainConfig, host_memory_need

    target = Path(args.target)
    if target.exists() and not (target / "config.json").exists():
        from slidejax.checkpointing import find_checkpoint, run_of

        folder, step = find_checkpoint(target)
        run = run_of(folder)
        steps = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())
        print(f"run          {run}")
        print(f"checkpoints  {', '.join(map(str, steps))} (latest {step})")
        records = read_metrics(run / "metrics.jsonl")
        last = next((r for r in reversed(records) if r.get("kind") == "train"), None)
        ev = next((r for r in reversed(records) if r.get("kind") == "eval"), None)
        if last:
            print(f"last step    {last['step']}: loss {last['loss']:.4f}")
        if ev:
            extra = f", exact match {ev['exact_match']:.3f}" if "exact_match" in ev else ""
            print(f"last eval    step {ev['step']}: loss {ev['eval_loss']:.4f}{extra}")
        return 0
    folder = _model_folder(args.target)
    cfg = ModelConfig.from_pretrained(folder)
    config = TrainConfig.load(model=args.target, seq_len=args.seq_len, tokens_per_step=args.tokens_per_step)
    need = host_memory_need(cfg, config)
    print(f"model        {args.target} ({cfg.model_type}): {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
          f"heads {cfg.num_heads}/{cfg.num_kv_heads} x {cfg.head_dim}, vocab {cfg.vocab_size}, "
          f"tied {cfg.tie_word_embeddings}")
    print(f"parameters   {cfg.num_params:,} ({flop_params(cfg):,} without the embedding lookup)")
    print(f"FLOPs/token  {flops_per_token(cfg, config.seq_len):.4g} at seq_len {config.seq_len} (6N + 6·L·S·h·d)")
    parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in need.items())
    print(f"host RAM     about {format_bytes(sum(need.values()))} for {config.step_tokens} tokens per step ({parts})")
    return 0


# ----------------------------------------------------------------------------------------------
# entry point


def _show_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 bad input, 130/143 stopped by a signal)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    warnings.showwarning = _show_warning  # one line per warning, no source excerpt
    try:
        return int(args.func(args))
    except SlidejaxError as e:
        print(f"error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (OSError, MemoryError) as e:
        what = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"error: {what}{getattr(e, 'strerror', None) or e}", file=sys.stderr)
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
