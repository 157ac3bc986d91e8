"""Launch environment, parallel config, its validation and the expert-parallel layout.

Everything here is arithmetic on the launch's numbers, but build_parallel_groups, which creates the
groups (collective, through DeepSpeed's groups module).

Layout (DeepSpeed's `deepspeed.utils.groups`, "E + D"): with world size W and ep_size P,
  expert-parallel groups      = blocks of P consecutive ranks  [0..P-1], [P..2P-1], ...
  expert-data-parallel groups = strided by P                   [0, P, 2P, ...], [1, P+1, ...], ...
  data-parallel group         = every rank (dense parameters, the router included)
Rank r of an expert-parallel group owns experts [r*L, (r+1)*L), L = num_experts / P. The
groups are created THROUGH DeepSpeed's groups module, so ZeRO finds them under its own
name (f"ep_size_{P}") and reduces each expert's gradient over exactly these ranks.

Order at start-up, on every rank: read the environment -> validate_parallel (raises
ValueError; no process group exists yet, so a bad launch fails fast everywhere and
nothing hangs) -> lifecycle.init_distributed -> build_parallel_groups.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from floe.config import ModelConfig
from floe.errors import batch_errors

ZERO_STAGES = (0, 1, 2)


@dataclass
class ParallelConfig:
    """parallel.* keys; checked against the launch by parallel_errors."""

    ep_size: int = 1  # ranks sharing one copy of the experts; each owns num_experts / ep_size
    zero_stage: int = 0  # 0, 1 or 2
    reduce_bucket_size: int = 500_000_000  # elements per ZeRO gradient-reduction bucket
    allgather_bucket_size: int = 500_000_000  # elements per ZeRO parameter all-gather bucket
    overlap_comm: bool | None = None  # None: on for CUDA, off on CPU
    contiguous_gradients: bool = True
    async_dispatch: bool = True  # expert-parallel all-to-all in flight during attention

    def __post_init__(self):
        from floe.errors import field_type_errors

        errors = field_type_errors(self, "parallel")  # values against the launch: parallel_errors
        if not errors:
            for name in ("reduce_bucket_size", "allgather_bucket_size"):
                if getattr(self, name) < 1:
                    errors.append(f"parallel.{name} must be >= 1, got {getattr(self, name)!r}")
            errors += zero_stage_errors(self.zero_stage)
            if self.zero_stage == 2 and not self.contiguous_gradients:  # DeepSpeed asserts it for MoE models
                errors.append("parallel.contiguous_gradients=false is not supported at parallel.zero_stage=2: "
                              "DeepSpeed's ZeRO-2 needs contiguous gradients with MoE experts")
        if errors:
            raise ValueError("invalid parallel config:\n  " + "\n  ".join(errors))


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


def zero_stage_errors(zero_stage) -> list[str]:
    """parallel.zero_stage: 0, 1 or 2 (the one place this rule lives)."""
    if zero_stage == 3:
        return ["parallel.zero_stage=3 is not supported: ZeRO-3 shards every parameter over all ranks, "
                "but floe's expert shards are already split by expert parallelism and must stay whole on "
                "their rank (DeepSpeed rejects MoE with stage 3 too); use 0, 1 or 2"]
    if zero_stage not in ZERO_STAGES or isinstance(zero_stage, bool):
        return [f"parallel.zero_stage must be one of {ZERO_STAGES}, got {zero_stage!r}"]
    return []


def parallel_errors(model_cfg: ModelConfig | None, world_size: int, ep_size, zero_stage,
                    global_batch_size: int | None = None, micro_batch_size: int | None = None) -> list[str]:
    """The messages validate_parallel would raise (for a caller that collects all problems); without
    `model_cfg` (it did not build) the rules that need it are skipped."""
    errors = []
    ep_ok = isinstance(ep_size, int) and not isinstance(ep_size, bool) and ep_size >= 1
    if not ep_ok:
        errors.append(f"parallel.ep_size must be a positive integer, got {ep_size!r}")
    else:
        if world_size % ep_size:
            errors.append(f"parallel.ep_size ({ep_size}) must divide the world size ({world_size} processes): "
                          "expert-parallel groups are blocks of ep_size consecutive ranks")
        if model_cfg is not None and model_cfg.num_experts % ep_size:
            errors.append(f"parallel.ep_size ({ep_size}) must divide model.num_experts ({model_cfg.num_experts}): "
                          "every rank of an expert-parallel group owns the same number of experts")
    errors += zero_stage_errors(zero_stage)
    if global_batch_size is not None and micro_batch_size is not None and ep_ok and world_size % ep_size == 0:
        errors += batch_errors(global_batch_size, micro_batch_size, world_size)
    return errors


def default_backend(device: torch.device) -> str:
    """NCCL for CUDA devices, gloo otherwise: the only difference between the two paths."""
    return "nccl" if device.type == "cuda" else "gloo"


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
    """Create (once) the expert and expert-data-parallel groups for ep_size; collective.

    Created THROUGH DeepSpeed's groups module, so ZeRO finds them under its own name
    (f"ep_size_{ep_size}") and reduces each expert's gradient over exactly these ranks.
    """
    # Private DeepSpeed API (checked on 0.19.8): deepspeed.utils.groups has no public way to
    # create or look up expert groups by name outside its own MoE layer; these are the calls
    # its MoE layer makes (set_deepspeed_parallelism).
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
    return ParallelGroups(ep_size=ep_size, ep_rank=dist.get_rank(group=ep_group), ep_group=ep_group,
                          edp_group=ds_groups._get_expert_data_parallel_group(group_name), group_name=group_name,
                          ep_ranks=ep_ranks, edp_ranks=edp_ranks)
