"""What DeepSpeed must be told about floe's model before and right after `deepspeed.initialize`:
the MoE markers (why: moe/parallel/engine.py's docstring), the per-expert-group optimizer groups, the
DeepSpeed config (ZeRO stage, precision, accumulation), and the few places where floe takes over a
reduction or a step DeepSpeed would do wastefully or wrongly. Every private DeepSpeed touch says why
and the version it was checked on (TESTED_DEEPSPEED)."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from floe.parallel.dispatch import expert_parallel_layers
from floe.parallel.grad_norm import is_expert_param
from floe.parallel.groups import ParallelConfig
from floe.parallel.lifecycle import check_deepspeed_version

def apply_deepspeed_moe(model: nn.Module) -> nn.Module:
    """Make deepspeed.initialize recognise every expert-parallel MoE layer of `model` (in place).

    Call once the model is materialised on its device, right before deepspeed.initialize:
    the markers live on the Parameter objects, which Module.to_empty replaces.
    """
    check_deepspeed_version()
    from deepspeed.moe.layer import MoE

    class _DeepSpeedSeesMoE(MoE):
        """A parameter-free child of each expert-parallel MoELayer that is an instance of
        DeepSpeed's MoE, so the engine sets has_moe_layers and handles the parameters marked
        `allreduce=False, group_name=...` as experts. It never runs (forward raises).

        Private DeepSpeed contract (checked on 0.19.8): the engine finds MoE layers only by
        isinstance and reads these attributes: num_experts (logged, checkpoint metadata),
        expert_group_name, ep_size, and num_local_experts, which drives DeepSpeed's own
        per-expert checkpoint files: 0, as floe saves experts by global id itself.
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
            pass  # the groups exist already (build_parallel_groups)

        def forward(self, *args, **kwargs):
            raise RuntimeError("_DeepSpeedSeesMoE only marks a MoELayer for DeepSpeed; it never runs")

    for _, layer in expert_parallel_layers(model):
        groups = layer.dispatcher.groups
        for param in layer.experts.expert_tensors().values():  # reduced over the expert-data-parallel group
            param.allreduce = False
            param.group_name = groups.group_name
        layer.deepspeed_moe_marker = _DeepSpeedSeesMoE(layer.config.num_experts, groups.ep_size, groups.group_name)
    return model


def split_moe_param_groups(groups: list[dict]) -> list[dict]:
    """Move expert parameters into DeepSpeed's per-expert-group optimizer groups (`moe: True`,
    name = group_name), keeping each group's other settings. Every group needs a "name".
    Without expert parameters the groups come back unchanged."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    if not any(is_expert_param(p) for g in groups for p in g["params"]):
        return groups
    split = split_params_into_different_moe_groups_for_optimizer([dict(g) for g in groups])
    return [g for g in split if g["params"]]


def check_engine(engine, model: nn.Module) -> None:
    """Stop a run whose engine did not see the experts as MoE (markers set too early or lost)."""
    layers = expert_parallel_layers(model)
    if layers and not engine.has_moe_layers:
        raise RuntimeError("DeepSpeed did not recognise floe's expert-parallel MoE layers, so it would treat the "
                           "expert shards as data-parallel: call floe.parallel.apply_deepspeed_moe(model) after "
                           "apply_expert_parallel and before deepspeed.initialize")
    unmarked = [f"{name}.experts.{w}" for name, layer in layers for w, p in layer.experts.expert_tensors().items()
                if not is_expert_param(p)]
    if unmarked:  # the engine broadcast them from rank 0 and would average them over all ranks
        raise RuntimeError(f"expert parameters {unmarked[:3]} lost DeepSpeed's MoE markers (replaced after "
                           "apply_deepspeed_moe, e.g. by Module.to_empty or .to()): call apply_deepspeed_moe last, "
                           "right before deepspeed.initialize")


PRECISIONS = ("fp32", "bf16")


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """train.precision: fp32 | bf16, or auto = bf16 on CUDA and fp32 elsewhere (the default)."""
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision must be one of ('auto', 'fp32', 'bf16'), got {precision!r}")
    return precision


def floe_clips(parallel: ParallelConfig, precision: str) -> bool:
    """Whether floe clips and takes the gradient norm itself: ZeRO-0 in fp32, the one path where
    DeepSpeed computes no norm and would average the experts' (see the module docstring). In bf16
    at ZeRO-0 DeepSpeed's bf16 optimizer takes the norm with the experts summed correctly."""
    return parallel.zero_stage == 0 and precision == "fp32"


def build_deepspeed_config(parallel: ParallelConfig, *, global_batch_size: int, micro_batch_size: int,
                           dp_size: int, grad_clip: float, device: torch.device | str = "cpu",
                           precision: str = "auto") -> dict:
    """DeepSpeed config dict: ZeRO stage 0/1/2, fp32 or bf16 (train.precision, on any device),
    gradient accumulation = global batch / (micro batch x data-parallel size). The values were
    checked by parallel_errors before any collective.

    bf16 is DeepSpeed's mixed precision: bf16 weights and activations, fp32 master weights and
    Adam moments. Gradients are accumulated across micro-batches in fp32 at ZeRO 1/2
    (data_types.grad_accum_dtype). DeepSpeed 0.19.8 has no bf16-weights + fp32-accumulation
    optimizer at ZeRO-0 (deepspeed.initialize raises NotImplementedError for that mix), so at
    ZeRO-0 the gradients accumulate in bf16 and its bf16 optimizer wrapper (fp32 master weights)
    steps: exact with one micro-batch per step, and the reason to prefer ZeRO 1/2 with
    gradient accumulation in bf16."""
    on_gpu = torch.device(device).type == "cuda"
    precision = resolve_precision(precision, device)
    assert global_batch_size % (micro_batch_size * dp_size) == 0 and parallel.zero_stage in (0, 1, 2)
    config = {
        "train_batch_size": global_batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": global_batch_size // (micro_batch_size * dp_size),
        "gradient_clipping": 0.0 if floe_clips(parallel, precision) else float(grad_clip),
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": parallel.zero_stage},
    }
    if parallel.zero_stage > 0:
        config["zero_optimization"].update({
            "reduce_scatter": True,  # DeepSpeed's MoE path requires it
            "reduce_bucket_size": int(parallel.reduce_bucket_size),
            "allgather_bucket_size": int(parallel.allgather_bucket_size),
            "overlap_comm": on_gpu if parallel.overlap_comm is None else bool(parallel.overlap_comm),
            "contiguous_gradients": bool(parallel.contiguous_gradients),
        })
    if precision == "bf16" and parallel.zero_stage > 0:
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def single_rank_parallel(parallel: ParallelConfig, precision: str) -> ParallelConfig:
    """ZeRO-1/2 on one process in fp32 is ZeRO-0: there is one partition, holding everything, so
    DeepSpeed's stage-1/2 optimizer would only add copies (gradients into its buckets and a flat
    fp32 partition, a second fp32 copy of every weight, copied back after each step). The update is
    the same; floe's checkpoints store the optimizer state per parameter whatever the stage.
    In bf16 the stage stays (DeepSpeed's optimizers differ there: fp32 gradient accumulation at 1/2)."""
    if parallel.zero_stage == 0 or dist.get_world_size() > 1 or precision != "fp32":
        return parallel
    import dataclasses
    import logging

    logging.getLogger("floe").info("parallel.zero_stage=%d on one process in fp32 runs as stage 0 (one partition: "
                                   "the same update without DeepSpeed's partition copies)", parallel.zero_stage)
    return dataclasses.replace(parallel, zero_stage=0)


def skip_single_rank_allreduce(ds) -> None:
    """On one process at ZeRO-0, keep DeepSpeed from "all-reducing" the gradients with itself.

    Its stage-0 reduction (engine.allreduce_gradients -> buffered_allreduce_fallback) flattens every
    gradient into one buffer, all-reduces it, divides by the data-parallel size and copies it back:
    two full copies of the gradients per step that change nothing when the world has one rank.
    Private DeepSpeed state (checked on 0.19.8): `enable_backward_allreduce` is the flag its own
    pipeline engine clears to take over the reduction; backward() consults it before reducing.
    """
    if dist.get_world_size() == 1 and ds.zero_optimization_stage() == 0:
        ds.enable_backward_allreduce = False


def skip_single_rank_expert_allreduce(ds) -> None:
    """At ZeRO-0, keep DeepSpeed from "all-reducing" expert gradients over a one-rank group.

    With ep_size = world size every expert lives on one rank: its expert-data-parallel group has
    one member. DeepSpeed's stage-0 reduction (engine._reduce_expert_gradients) still flattens those
    gradients into one buffer (a transient copy of all local expert gradients), all-reduces it with
    itself, scales it by 1/dp_size (its convention: expert gradients are averaged over the whole
    data-parallel group) and copies it back. The scaling is the only effect, and floe applies it in
    place, bit for bit: the same multiply by 1 / dp_size (predivide_factor is 1), in the gradients'
    dtype.
    Any other setting (pre-scaling, a communication dtype other than the gradients') or a group of
    several ranks goes through DeepSpeed's own reduction.
    Private DeepSpeed state (checked on 0.19.8): `_reduce_expert_gradients(expert_grads,
    elements_per_buffer)` and allreduce_bucket's post-scaling.
    """
    if ds.zero_optimization_stage() != 0 or not ds.has_moe_layers:
        return
    if not (ds.gradient_average and ds.postscale_gradients() and ds.gradient_predivide_factor() == 1.0):
        return
    from deepspeed.utils import groups as ds_groups

    reduce_in_deepspeed = ds._reduce_expert_gradients

    def reduce_expert_gradients(expert_grads: dict, elements_per_buffer: int) -> None:
        dp_size = dist.get_world_size(ds_groups._get_data_parallel_group())
        shared = {}
        for name, grads in expert_grads.items():
            alone = dist.get_world_size(ds_groups._get_expert_data_parallel_group(name)) == 1
            if alone and all(g.dtype == ds.communication_data_type and not g.is_sparse for g in grads):
                if dp_size != 1:
                    torch._foreach_mul_(list(grads), 1.0 / dp_size)  # DeepSpeed's predivide_factor / dp_size
            else:
                shared[name] = grads
        if shared:
            reduce_in_deepspeed(shared, elements_per_buffer)

    ds._reduce_expert_gradients = reduce_expert_gradients


def _gate_optimizer_step(optimizer: torch.optim.Optimizer) -> None:
    """Give a plain torch optimizer DeepSpeed's overflow contract: while `optimizer.overflow` is
    True its step() does nothing. Private DeepSpeed behaviour (checked on 0.19.8): the engine
    reads `optimizer.overflow` after calling step() to count the step as skipped and to hold
    the learning-rate schedule; at ZeRO-0 in fp32 `ds.optimizer` is the client optimizer itself.
    The optimizer becomes an instance of a subclass of its own class (isinstance checks, torch's
    step hooks and the scheduler's wrapping of the bound step keep working)."""
    base = type(optimizer)

    class Gated(base):
        def step(self, *args, **kwargs):
            if self.overflow:
                return None
            return super().step(*args, **kwargs)

    Gated.__name__ = Gated.__qualname__ = f"Gated{base.__name__}"
    optimizer.__class__ = Gated
    optimizer.overflow = False
