"""Benchmarks: slidejax against the offloading systems fine-tuners use (see bench/README.md)."""
