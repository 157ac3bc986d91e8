"""Silence, at the source, what every run printed and no user can act on. The one place for it:
moe/parallel/__init__.py calls `quiet_libraries()` before anything imports DeepSpeed.

  - DeepSpeed's accelerator auto-detection warns "Setting accelerator to CPU. If you have GPU ..."
    on every rank of every CPU run. floe picks the device itself (train.device), so on a machine
    without CUDA it names DeepSpeed's accelerator too (DS_ACCELERATOR=cpu, DeepSpeed's own
    override; a value the user set wins). DeepSpeed's "DeepSpeed" logger stays at WARNING, so its
    INFO chatter (accelerator choice, config dumps) stays off.
  - torch 2.13 deprecates `torch.distributed.all_gather_into_tensor`, which DeepSpeed's ZeRO-1/2
    partitioning calls on gloo: one FutureWarning per rank per run (checked on 0.19.8).
"""
from __future__ import annotations

import logging
import os
import warnings

import torch


def quiet_libraries() -> None:
    """Idempotent; call before `import deepspeed` (DeepSpeed detects its accelerator at import)."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
