"""Atomic, resumable training checkpoints around a DeepSpeed engine.

Layout under <run.dir>/checkpoints/:
    step_00000040/   one complete checkpoint (DeepSpeed's model/optimizer files, floe's state)
    latest           the name of the newest complete checkpoint
Every rank writes into a hidden temporary directory; only once all ranks are done does
rank 0 rename it into place and then replace `latest`. A crash at any point leaves
`latest` naming the previous complete checkpoint, so resume never sees a half-written one.
"""
from __future__ import annotations

import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist

from moe.parallel.expert_checkpoint import load_model_state, save_expert_shards

LATEST = "latest"


def _tag(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(ckpt_dir: str) -> str | None:
    """Path of the newest complete checkpoint under ckpt_dir, or None."""
    pointer = os.path.join(ckpt_dir, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        tag = f.read().strip()
    path = os.path.join(ckpt_dir, tag)
    if not os.path.isdir(path):
        raise ValueError(f"{pointer} names checkpoint {tag!r}, but {path} does not exist")
    return path


def save(engine, ckpt_dir: str, step: int, client_state: dict, keep_last: int = 2) -> str:
    """Write checkpoint `step` atomically (collective: every rank must call it)."""
    rank = dist.get_rank()
    tag, tmp_tag = _tag(step), f".tmp-{_tag(step)}"
    tmp_path, final_path = os.path.join(ckpt_dir, tmp_tag), os.path.join(ckpt_dir, tag)
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        shutil.rmtree(tmp_path, ignore_errors=True)  # left by a crash during an earlier save
    dist.barrier()
    engine.save_checkpoint(ckpt_dir, tag=tmp_tag, client_state=client_state, save_latest=False)
    save_expert_shards(engine.module, tmp_path)  # experts by global id (DeepSpeed saves rank 0's shard only)
    torch.save(rng_state(), os.path.join(tmp_path, f"rng_rank{rank}.pt"))
    dist.barrier()  # every rank's files are on disk
    if rank == 0:
        shutil.rmtree(final_path, ignore_errors=True)
        os.rename(tmp_path, final_path)
        pointer_tmp = os.path.join(ckpt_dir, LATEST + ".tmp")
        with open(pointer_tmp, "w") as f:
            f.write(tag)
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer_tmp, os.path.join(ckpt_dir, LATEST))
        _prune(ckpt_dir, keep_last)
    dist.barrier()
    return final_path


def _prune(ckpt_dir: str, keep_last: int) -> None:
    if keep_last <= 0:
        return
    tags = sorted(t for t in os.listdir(ckpt_dir) if t.startswith("step_"))
    for tag in tags[:-keep_last]:
        shutil.rmtree(os.path.join(ckpt_dir, tag), ignore_errors=True)


def load(engine, path: str) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG from `path`; returns the client state."""
    ckpt_dir, tag = os.path.split(path.rstrip("/"))
    load_path, client_state = engine.load_checkpoint(
        ckpt_dir, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True,
        custom_load_fn=lambda src, dst: load_model_state(dst, src, path))  # dense + experts by global id
    if load_path is None:
        raise ValueError(f"could not load checkpoint {path}: DeepSpeed found no model states there")
    rng_file = os.path.join(path, f"rng_rank{dist.get_rank()}.pt")
    if os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state
