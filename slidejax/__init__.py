"""slidejax: fine-tune language models larger than GPU memory with the GPU as a sliding window."""

from slidejax.errors import SlidejaxError

__all__ = ["SlidejaxError"]
