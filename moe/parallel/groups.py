"""Launch environment, config validation and process groups for expert parallelism.

Layout (DeepSpeed's `deepspeed.utils.groups`, "E + D"): with world size W and ep_size P,
  expert-parallel groups      = blocks of P consecutive ranks  [0..P-1], [P..2P-1], ...
  expert-data-parallel groups = strided by P                   [0, P, 2P, ...], [1, P+1, ...], ...
  data-parallel group         = every rank (dense parameters, the router included)
Rank r of an expert-parallel group owns experts [r*L, (r+1)*L), L = num_experts / P. The
groups are created THROUGH DeepSpeed's groups module, so ZeRO finds them under its own
name (f"ep_size_{P}") and reduces each expert's gradient over exactly these ranks.

Order at start-up, on every rank: read the environment -> validate_parallel (raises
ValueError; no process group exists yet, so a bad launch fails fast everywhere and
nothing hangs) -> init_distributed -> build_parallel_groups.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from moe.config import ModelConfig

ZERO_STAGES = (0, 1, 2)


@dataclass(frozen=True)
class LaunchEnv:
    """What torchrun (or srun + torchrun) tells each process."""

    rank: int
    world_size: int
    local_rank: int


def read_launch_env(environ=None) -> LaunchEnv:
    """RANK / WORLD_SIZE / LOCAL_RANK from the environment; a single process without them."""
    env = os.environ if environ is None else environ
    try:
        rank = int(env.get("RANK", 0))
        world_size = int(env.get("WORLD_SIZE", 1))
        local_rank = int(env.get("LOCAL_RANK", rank))
    except ValueError as e:
        raise ValueError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers (set by torchrun): {e}") from None
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad launch environment: RANK={rank} WORLD_SIZE={world_size} (need 0 <= RANK < WORLD_SIZE)")
    return LaunchEnv(rank, world_size, local_rank)


def validate_parallel(
    model_cfg: ModelConfig,
    world_size: int,
    ep_size,
    zero_stage,
    global_batch_size: int | None = None,
    micro_batch_size: int | None = None,
) -> None:
    """Raise ValueError naming every config key that cannot work at this world size.

    Pure arithmetic on config values: call it on every rank BEFORE any process group
    exists, so each rank fails the same way and no rank waits in a collective.
    """
    errors = parallel_errors(model_cfg, world_size, ep_size, zero_stage, global_batch_size, micro_batch_size)
    if errors:
        raise ValueError("invalid parallel config:\n  " + "\n  ".join(errors))


def parallel_errors(model_cfg: ModelConfig, world_size: int, ep_size, zero_stage,
                    global_batch_size: int | None = None, micro_batch_size: int | None = None) -> list[str]:
    """The messages validate_parallel would raise (for a caller that collects all problems)."""
    errors = []
    ep_ok = isinstance(ep_size, int) and not isinstance(ep_size, bool) and ep_size >= 1
    if not ep_ok:
        errors.append(f"parallel.ep_size must be a positive integer, got {ep_size!r}")
    else:
        if world_size % ep_size:
            errors.append(f"parallel.ep_size ({ep_size}) must divide the world size ({world_size} processes): "
                          "expert-parallel groups are blocks of ep_size consecutive ranks")
        if model_cfg.num_experts % ep_size:
            errors.append(f"parallel.ep_size ({ep_size}) must divide model.num_experts ({model_cfg.num_experts}): "
                          "every rank of an expert-parallel group owns the same number of experts")
    if zero_stage == 3:
        errors.append("parallel.zero_stage=3 is not supported: ZeRO-3 shards every parameter over all ranks, "
                      "but floe's expert shards are already split by expert parallelism and must stay whole on "
                      "their rank (DeepSpeed rejects MoE with stage 3 too); use 0, 1 or 2")
    elif zero_stage not in ZERO_STAGES or isinstance(zero_stage, bool):
        errors.append(f"parallel.zero_stage must be one of {ZERO_STAGES}, got {zero_stage!r}")
    if global_batch_size is not None and micro_batch_size is not None and ep_ok and world_size % ep_size == 0:
        if not (isinstance(micro_batch_size, int) and micro_batch_size >= 1):
            errors.append(f"train.micro_batch_size must be a positive integer, got {micro_batch_size!r}")
        elif not (isinstance(global_batch_size, int) and global_batch_size >= 1):
            errors.append(f"train.global_batch_size must be a positive integer, got {global_batch_size!r}")
        elif global_batch_size % (micro_batch_size * world_size):
            errors.append(
                f"train.global_batch_size ({global_batch_size}) must be a multiple of train.micro_batch_size "
                f"({micro_batch_size}) x data-parallel size ({world_size} processes) = "
                f"{micro_batch_size * world_size}, so every rank runs the same number of micro-batches")
    return errors


def default_backend(device: torch.device) -> str:
    """NCCL for CUDA devices, gloo otherwise: the only difference between the two paths."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(device: torch.device, timeout_s: float = 600.0) -> None:
    """Initialise torch.distributed from torchrun's env:// variables (no-op if done), and
    let DeepSpeed's comm layer wrap the same default group."""
    import deepspeed

    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=default_backend(device), timeout=timedelta(seconds=timeout_s))
    deepspeed.init_distributed(dist_backend=dist.get_backend(), timeout=timedelta(seconds=timeout_s))


@dataclass
class ParallelGroups:
    """This rank's view of the expert-parallel layout."""

    ep_size: int
    ep_rank: int
    ep_group: object  # torch ProcessGroup: the ranks an all-to-all exchanges tokens with
    edp_group: object  # torch ProcessGroup: the ranks holding the same experts (grad reduction)
    group_name: str  # DeepSpeed's name for both groups, also put on every expert parameter
    ep_ranks: tuple[int, ...]
    edp_ranks: tuple[int, ...]


def expected_layout(world_size: int, ep_size: int, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(expert-parallel ranks, expert-data-parallel ranks) of `rank`: consecutive and strided."""
    start = rank // ep_size * ep_size
    return tuple(range(start, start + ep_size)), tuple(range(rank % ep_size, world_size, ep_size))


def build_parallel_groups(ep_size: int) -> ParallelGroups:
    """Create (once) DeepSpeed's expert and expert-data-parallel groups for ep_size; collective."""
    from deepspeed.utils import groups as ds_groups

    group_name = f"ep_size_{ep_size}"
    if group_name not in ds_groups._get_expert_parallel_group_dict():
        # Every rank creates every group in the same order (new_group is collective).
        ds_groups._create_expert_and_data_parallel(ep_size)
    ep_ranks = tuple(ds_groups._get_expert_parallel_group_ranks(group_name))
    edp_ranks = tuple(ds_groups._get_expert_data_parallel_group_ranks(group_name))
    expected = expected_layout(dist.get_world_size(), ep_size, dist.get_rank())
    assert (ep_ranks, edp_ranks) == expected, f"DeepSpeed's layout {ep_ranks, edp_ranks} != expected {expected}"
    ep_group = ds_groups._get_expert_parallel_group(group_name)
    return ParallelGroups(
        ep_size=ep_size,
        ep_rank=dist.get_rank(group=ep_group),
        ep_group=ep_group,
        edp_group=ds_groups._get_expert_data_parallel_group(group_name),
        group_name=group_name,
        ep_ranks=ep_ranks,
        edp_ranks=edp_ranks,
    )
