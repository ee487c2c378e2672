"""PyTorch baselines: DeepSpeed ZeRO-3 offload and FSDP2 CPU offload."""
