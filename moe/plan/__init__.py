"""The memory plan: a run's per-GPU memory on fake tensors and a fake process group, without the hardware."""
