"""Expert weights in checkpoints: every expert exactly once, by global expert id.

DeepSpeed writes the module state dict from data-parallel rank 0 only, so with expert
parallelism its file holds rank 0's expert shard and no other rank's. floe therefore
writes the experts itself, next to DeepSpeed's files:

    <checkpoint>/experts/expert_00005.pt   {"layers.0.moe.experts.w1": [F, D], ...}

one file per global expert id (all layers), written by the ranks at expert-data-parallel
rank 0 (each expert exactly once). Loading takes dense tensors from DeepSpeed's module
state and each rank's experts from these files, whatever ep_size wrote them; a checkpoint
written without expert parallelism (no experts/ dir) holds the full [E, ...] tensors in
the module state, and each rank slices its own rows out of them. The expert tensors that
DeepSpeed's module file holds at ep_size > 1 (rank 0's shard) are ignored.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn

from moe.layer import EXPERT_WEIGHTS, MoELayer
from moe.parallel.dispatch import expert_parallel_layers

EXPERT_DIR = "experts"


def _expert_file(directory: str, global_id: int) -> str:
    return os.path.join(directory, EXPERT_DIR, f"expert_{global_id:05d}.pt")


def expert_tensors(model: nn.Module) -> dict[str, tuple[int, torch.Tensor]]:
    """{state-dict key: (global id of row 0, tensor [experts held here, ...])} for every
    expert weight, expert-parallel or not."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, MoELayer):
            prefix = f"{name}.experts." if name else "experts."
            for w in EXPERT_WEIGHTS:
                out[prefix + w] = (m.experts.first_expert, getattr(m.experts, w))
    return out


@torch.no_grad()
def save_expert_shards(model: nn.Module, directory: str) -> list[str]:
    """Write this rank's experts by global id if it is an expert writer (collective-free).
    A model without expert-parallel layers writes nothing: its module state has them all."""
    layers = [layer for _, layer in expert_parallel_layers(model)]
    if not layers or dist.get_rank(group=layers[0].dispatcher.groups.edp_group) != 0:
        return []
    tensors = expert_tensors(model)
    first = layers[0].experts.first_expert
    paths = []
    os.makedirs(os.path.join(directory, EXPERT_DIR), exist_ok=True)
    for local in range(layers[0].experts.num_local_experts):
        assert all(f == first for f, _ in tensors.values()), "every layer shards experts the same way"
        state = {key: t[local].detach().clone() for key, (_, t) in tensors.items()}
        path = _expert_file(directory, first + local)
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)
        paths.append(path)
    return paths


@torch.no_grad()
def load_model_state(model: nn.Module, module_state: dict[str, torch.Tensor], directory: str) -> None:
    """Load dense tensors from `module_state` (DeepSpeed's) and every expert row this rank
    holds, by global id, from `directory`'s expert files or else from full [E, ...] tensors
    in `module_state`. Strict: every key of the model must be found."""
    experts = expert_tensors(model)
    own = model.state_dict()
    dense = {k: v for k, v in module_state.items() if k not in experts}
    missing, unexpected = [k for k in own if k not in experts and k not in dense], [k for k in dense if k not in own]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint module state does not match the model: missing {missing}, "
                           f"unexpected {unexpected}")
    model.load_state_dict(dense, strict=False)
    has_files = os.path.isdir(os.path.join(directory, EXPERT_DIR))
    cache: dict[int, dict] = {}
    for key, (first, param) in experts.items():
        for local in range(param.shape[0]):
            gid = first + local
            if has_files:
                if gid not in cache:
                    path = _expert_file(directory, gid)
                    if not os.path.isfile(path):
                        raise RuntimeError(f"checkpoint {directory} has no file for expert {gid} ({path})")
                    cache[gid] = torch.load(path, map_location="cpu", weights_only=True)
                row = cache[gid][key]
            else:
                full = module_state[key]
                if full.shape[0] <= gid:
                    raise RuntimeError(f"checkpoint {directory}: {key} holds {full.shape[0]} experts and no "
                                       f"{EXPERT_DIR}/ files; cannot find expert {gid}")
                row = full[gid]
            param[local].copy_(row)
