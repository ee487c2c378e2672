"""slidejax: fine-tune language models larger than GPU memory with the GPU as a sliding window.

The public API:

- `load_pretrained(path_or_preset, dtype=...)` -> `Model` (`.config`, `.logits`, `.save_pretrained`)
- `from_config(config_or_folder)` -> a randomly initialised `Model`
- `HostAdamW` (fused host AdamW) / any `optax.GradientTransformation` as the optimizer
- `Trainer`, `TrainConfig`: fit / step / evaluate / save / restore / export
- `SlidingEngine`: the layer-streaming training engine (used by the trainer)
- `SlidejaxError`: the one error type for bad input
"""

from slidejax.config import ModelConfig
from slidejax.engine import SlidingEngine, StepMetrics
from slidejax.errors import SlidejaxError
from slidejax.host_optimizer import HostAdamW, HostOptax
from slidejax.pretrained import Model, from_config, load_pretrained
from slidejax.trainer import TrainConfig, Trainer

__all__ = [
    "HostAdamW",
    "HostOptax",
    "Model",
    "ModelConfig",
    "SlidejaxError",
    "SlidingEngine",
    "StepMetrics",
    "TrainConfig",
    "Trainer",
    "from_config",
    "load_pretrained",
]
