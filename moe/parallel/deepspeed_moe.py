"""Everything floe tells DeepSpeed about its expert-parallel MoE, in one file.

DeepSpeed's engine switches its MoE handling on only when `deepspeed.initialize` finds a
module that is an instance of its own `deepspeed.moe.layer.MoE` (engine.py,
`_configure_distributed_model`: `has_moe_layers`). Without it the engine treats floe's
expert shards as ordinary data-parallel parameters: ZeRO-1/2 and the stage-0 reducer
average DIFFERENT experts' gradients over all ranks, and the optimizer param groups are
not split per expert group, silently. (Its initial broadcast already goes by
`is_moe_param`; that part works either way once the parameters carry the markers.)
`apply_deepspeed_moe` is the one place that fixes this (see `_DeepSpeedSeesMoE`).

What DeepSpeed then does, for the record (0.19.8; 0.15.4 fixed the expert-gradient scaling):
  - expert gradients: summed over the expert-data-parallel group and divided by the FULL
    data-parallel size, like dense gradients, so the update does not depend on ep_size;
  - ZeRO-1/2: one optimizer group per expert group name, partitioned over its
    expert-data-parallel group; the gradient norm covers dense and expert gradients
    together (each expert element counted once);
  - initial weights: dense from rank 0, each expert shard from rank 0 of its group.
One gap: ZeRO stage 0 in fp32 clips with `runtime.utils.clip_grad_norm_`, which averages
each rank's local norm instead of summing the experts over the expert-parallel group;
`apply_deepspeed_moe` replaces that one engine method (see `clip_grad_norm_`).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn

MIN_DEEPSPEED = "0.15.4"  # first release where ZeRO scales expert gradients by the data-parallel size


def check_deepspeed_version(version: str | None = None) -> None:
    """Raise ImportError unless DeepSpeed >= 0.15.4 is installed."""
    from packaging.version import Version

    if version is None:
        try:
            import deepspeed
        except ImportError as e:
            raise ImportError(f"floe needs deepspeed>={MIN_DEEPSPEED} for ZeRO and expert parallelism: "
                              f"pip install 'deepspeed>={MIN_DEEPSPEED}' ({e})") from None
        version = deepspeed.__version__
    if Version(version) < Version(MIN_DEEPSPEED):
        raise ImportError(
            f"deepspeed {version} is too old: floe needs deepspeed>={MIN_DEEPSPEED}; earlier releases divide "
            "expert gradients by the expert-data-parallel size instead of the data-parallel size, so the "
            "update would change with parallel.ep_size. pip install -U 'deepspeed>=" + MIN_DEEPSPEED + "'")


def _deepspeed_moe_class():
    check_deepspeed_version()
    from deepspeed.moe.layer import MoE

    return MoE


def apply_deepspeed_moe(model: nn.Module) -> nn.Module:
    """Make deepspeed.initialize recognise every ExpertParallelMoE in `model` (in place).

    Call after apply_expert_parallel, once the model is materialised on its device, right
    before deepspeed.initialize (the expert markers live on the Parameter objects, which
    Module.to_empty replaces). Then call `fix_engine(engine)` on the engine it returns.
    """
    from moe.parallel.dispatch import expert_parallel_layers

    MoE = _deepspeed_moe_class()

    # ---- the one place: DeepSpeed's engine looks for isinstance(module, deepspeed.moe.layer.MoE) ----
    class _DeepSpeedSeesMoE(MoE):
        """A parameter-free child of each ExpertParallelMoE that is an instance of DeepSpeed's
        MoE, so the engine sets has_moe_layers and handles the parameters marked
        `allreduce=False, group_name=...` as experts. It never runs (forward raises).

        Attributes the engine reads: num_experts (logged, saved as checkpoint metadata),
        expert_group_name, and num_local_experts, which drives DeepSpeed's own per-expert
        checkpoint files: 0, because DeepSpeed knows those files only for its own layer
        layout; floe saves expert shards by global expert id itself.
        """

        def __init__(self, num_experts: int, ep_size: int, group_name: str):
            nn.Module.__init__(self)  # not MoE.__init__: that builds DeepSpeed's own gate and experts
            self.num_experts = num_experts
            self.ep_size = ep_size
            self.expert_group_name = group_name
            self.num_local_experts = 0
            self.use_residual = False
            self.enable_expert_tensor_parallelism = False

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            pass  # the groups exist already (moe.parallel.groups.build_parallel_groups)

        def forward(self, *args, **kwargs):
            raise RuntimeError("_DeepSpeedSeesMoE only marks an ExpertParallelMoE for DeepSpeed; it never runs")
    # ---- end of the one place ----

    for _, layer in expert_parallel_layers(model):
        layer.mark_expert_params()
        layer.deepspeed_moe_marker = _DeepSpeedSeesMoE(layer.config.num_experts, layer.ep_size, layer.group_name)
    return model


def split_moe_param_groups(param_groups: list[dict]) -> list[dict]:
    """Move expert parameters (allreduce=False) into DeepSpeed's per-expert-group optimizer
    groups (`moe: True`, name = group_name), keeping each group's other settings. Every
    group needs a "name". Without expert parameters the groups come back unchanged."""
    from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer

    if not any(is_moe_param(p) for g in param_groups for p in g["params"]):
        return param_groups
    groups = split_params_into_different_moe_groups_for_optimizer([dict(g) for g in param_groups])
    return [g for g in groups if g["params"]]


def is_expert_param(p: torch.Tensor) -> bool:
    return getattr(p, "allreduce", True) is False


@torch.no_grad()
def global_grad_norm(parameters, ep_group=None) -> torch.Tensor:
    """L2 norm of dense and expert gradients together, after the data-parallel reduction.

    Dense gradients are identical on every rank; each expert lives on one rank of each
    expert-parallel group, so the experts' squared norms are summed over `ep_group`.
    Returns a CPU fp32 scalar (the same on every rank). Collective over ep_group.
    """
    params = [p for p in parameters if p.grad is not None]
    device = params[0].grad.device if params else torch.device("cpu")
    dense_sq = torch.zeros((), dtype=torch.float32, device=device)
    expert_sq = torch.zeros((), dtype=torch.float32, device=device)
    for p in params:  # accumulated on the device: no host sync inside the loop
        sq = p.grad.detach().float().pow(2).sum()
        if is_expert_param(p):
            expert_sq += sq
        else:
            dense_sq += sq
    if ep_group is not None and dist.get_world_size(ep_group) > 1:
        dist.all_reduce(expert_sq, group=ep_group)
    return (dense_sq + expert_sq).sqrt().cpu()  # NOTE: one host sync


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float, ep_group=None) -> torch.Tensor:
    """Clip by global_grad_norm (stage 0, fp32), with DeepSpeed's formula:
    coef = min(1, max_norm / (norm + 1e-6))."""
    params = [p for p in parameters if p.grad is not None]
    total = global_grad_norm(params, ep_group)
    coef = min(1.0, max_norm / (total.item() + 1e-6))
    if coef < 1.0:
        for p in params:
            p.grad.mul_(coef)
    return total


def fix_engine(engine, ep_group=None) -> None:
    """Patch the one engine path that gets expert parallelism wrong (see module docstring):
    stage-0 fp32 clipping. Call right after deepspeed.initialize. Also checks that the
    engine did see the expert-parallel layers (apply_deepspeed_moe before initialize)."""
    from moe.parallel.dispatch import expert_parallel_layers

    layers = expert_parallel_layers(engine.module)
    if layers and not engine.has_moe_layers:
        raise RuntimeError("DeepSpeed did not recognise floe's expert-parallel MoE layers, so it would treat the "
                           "expert shards as data-parallel: call moe.parallel.apply_deepspeed_moe(model) after "
                           "apply_expert_parallel and before deepspeed.initialize")
    unmarked = [f"{name}.{w}" for name, layer in layers for w in ("w1", "w3", "w2")
                if not is_expert_param(getattr(layer, w))]
    if unmarked:  # the engine broadcast them from rank 0 and would average them over all ranks
        raise RuntimeError(f"expert parameters {unmarked[:3]} lost DeepSpeed's MoE markers (replaced after "
                           "apply_deepspeed_moe, e.g. by Module.to_empty or .to()): call apply_deepspeed_moe last, "
                           "right before deepspeed.initialize")
    if ep_group is None or dist.get_world_size(ep_group) == 1:
        return
    if engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled():
        return  # ZeRO-1/2 (and the mixed-precision optimizers) compute the global norm themselves
    module = engine.module

    def clip_fp32_gradients():
        clip_grad_norm_(module.parameters(), engine.gradient_clipping(), ep_group)

    engine.clip_fp32_gradients = clip_fp32_gradients


def build_deepspeed_config(
    *,
    zero_stage: int,
    global_batch_size: int,
    micro_batch_size: int,
    dp_size: int,
    grad_clip: float,
    device: torch.device | str = "cpu",
    reduce_bucket_size: int = 50_000_000,
    allgather_bucket_size: int = 50_000_000,
    overlap_comm: bool | None = None,
    contiguous_gradients: bool = True,
    steps_per_print: int = 10**9,
) -> dict:
    """DeepSpeed config dict from plain values: ZeRO stage 0/1/2, bf16 on GPU and fp32 on CPU,
    gradient accumulation = global batch / (micro batch x data-parallel size)."""
    device = torch.device(device)
    if zero_stage not in (0, 1, 2):
        raise ValueError(f"parallel.zero_stage must be 0, 1 or 2, got {zero_stage!r}")
    per_step = micro_batch_size * dp_size
    if global_batch_size % per_step:
        raise ValueError(f"train.global_batch_size ({global_batch_size}) must be a multiple of "
                         f"train.micro_batch_size ({micro_batch_size}) x data-parallel size ({dp_size})")
    on_gpu = device.type == "cuda"
    config = {
        "train_batch_size": global_batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": global_batch_size // per_step,
        "gradient_clipping": float(grad_clip),
        "bf16": {"enabled": on_gpu},
        "fp16": {"enabled": False},
        "steps_per_print": steps_per_print,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if zero_stage > 0:
        config["zero_optimization"] = {
            "stage": zero_stage,
            "reduce_scatter": True,  # DeepSpeed's MoE path requires it
            "reduce_bucket_size": int(reduce_bucket_size),
            "allgather_bucket_size": int(allgather_bucket_size),
            "overlap_comm": on_gpu if overlap_comm is None else bool(overlap_comm),
            "contiguous_gradients": bool(contiguous_gradients),
        }
    else:
        config["zero_optimization"] = {"stage": 0}
    if on_gpu:
        # bf16 weights with fp32 master copies and fp32 gradient accumulation across micro-batches.
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    assert math.isfinite(config["gradient_clipping"])
    return config
