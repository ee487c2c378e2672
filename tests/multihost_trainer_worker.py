"""One process of a two-process `Trainer` run (a subprocess of tests/test_multihost_trainer.py),
and the recipe its one-process reference also runs.

    python multihost_trainer_worker.py PORT PROCESS_ID OUT_DIR DATA SEED

Trains the tiny preset (fp32) for two steps through the Python API, then exports a Hugging Face
folder to OUT_DIR/hf (every process calls `export`; process 0 writes).
"""

from __future__ import annotations

import sys


def train_and_export(out: str, data: str, seed: int) -> None:
    import slidejax
    from slidejax.trainer import TrainConfig, Trainer

    config = TrainConfig.load(model="tiny", data=[data], steps=4, seq_len=64, micro_batch_size=4,
                              tokens_per_step=512, compute_dtype="float32", lr=3e-3, warmup=1.0,
                              eps=1e-6,  # as test_multihost_trainer.ADAM_EPS says why
                              save_every=0, progress=False, seed=seed, output_dir=out, run_name="r")
    trainer = Trainer(slidejax.load_pretrained("tiny", dtype="float32"), config=config)
    trainer.fit(until_step=2)  # stops early (saving), the schedule still that of 4 steps
    trainer.export(f"{out}/hf", dtype="float32")
    trainer.close()


def main() -> None:
    port, index, out, data, seed = sys.argv[1:6]
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_default_matmul_precision", "highest")
    from slidejax import distributed

    distributed.initialize(f"localhost:{port}", num_processes=2, process_id=int(index))
    train_and_export(out, data, int(seed))


if __name__ == "__main__":
    main()
