"""The memory plan: will a training configuration fit on the GPU, per rank, before booking it.

    spec = EstimateSpec(model=PRESETS["arctic_480b"], world_size=256, ep_size=128, zero_stage=2,
                        micro_batch_size=1, seq_len=4096, activation_checkpointing="full")
    plan = estimate(spec)          # plan.total_gb, plan.fits, plan.max_micro_batch, plan.to_json()

Three parts, each from the code that really runs:
  - the rank's shard: built on the meta device through floe.parallel's own set-up (DeepSpeed's
    groups, apply_expert_parallel) on torch's fake process group of the full world size,
    so `experts` and the parameter counts are what rank r of N would hold (`dry_run`);
  - model states: the optimizer groups training builds (floe.optim.param_groups, then
    split_moe_param_groups), partitioned by DeepSpeed 0.19.8's rules (`state_bytes`);
    the optimizer step's temporaries are measured by running torch's AdamW on fake tensors;
  - activations: one and two blocks (two and three with a quantized base) of the real model
    (embedding, head and loss included) run forward and backward under FakeTensorMode
    (moe/plan/fake_run.py), their peak live bytes
    measured with PeakMemoryTracker and extrapolated linearly to all layers and to other
    micro-batch sizes.

All *_gb figures are GiB (2**30 bytes).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

from floe.config import ModelConfig
from floe.lora import LoRAConfig, apply_lora
from floe.plan.tensor_memory import GIB, PeakMemoryTracker
from floe.model import CHECKPOINTING, apply_activation_checkpointing
from floe.parallel import fake_process_group
from floe.quantize import quantized_weights

PRECISIONS = ("fp32", "bf16")
EXPERT_KERNELS = ("reference", "triton")
# DeepSpeed's engine flattens stage-0 gradients for the all-reduce in buffers of this many
# elements (runtime/engine.py, allreduce_gradients(bucket_size=MEMORY_OPT_ALLREDUCE_SIZE)).
DS_STAGE0_ALLREDUCE_ELEMENTS = 500_000_000
# ZeRO-1/2 pad each flat group to a multiple of 2 x its partition count (stage_1_and_2.py,
# nccl_start_alignment_factor = 2).
DS_ALIGNMENT = 2


@dataclass
class EstimateSpec:
    """What the estimate needs; tools/estimate.py fills it from the training config."""

    model: ModelConfig
    world_size: int
    ep_size: int = 1
    zero_stage: int = 0
    micro_batch_size: int = 1
    seq_len: int = 4096
    precision: str = "bf16"  # fp32 | bf16 (bf16 weights, fp32 master weights and gradient accumulation)
    activation_checkpointing: str = "none"
    kernels: str = "triton"  # the expert kernel whose saved tensors count: reference | triton
    device: str = "cuda"  # the device the run trains on: cuda (optimizer uses foreach) | cpu
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    overlap_comm: bool = True
    gpu_mem_gb: float = 80.0
    reserve_gb: float = 0.0  # held back for what no tensor counts: CUDA context, NCCL, fragmentation
    routing: str = "worst"  # worst: this rank's experts full to capacity | balanced: T*k/E each
    rank: int = 0
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # adapters (rank 0: none) and lora.quantize_base

    def errors(self) -> list[str]:
        from floe.plan.fake_run import ROUTING_PLANS
        from floe.parallel import parallel_errors

        errors = parallel_errors(self.model, self.world_size, self.ep_size, self.zero_stage)
        checks = [
            (self.precision in PRECISIONS, f"train.precision must be one of {PRECISIONS}, got {self.precision!r}"),
            (self.activation_checkpointing in CHECKPOINTING, "train.activation_checkpointing must be one of "
             f"{CHECKPOINTING}, got {self.activation_checkpointing!r}"),
            (self.kernels in EXPERT_KERNELS, f"train.kernels must be one of {EXPERT_KERNELS} (auto is resolved by "
             f"the device), got {self.kernels!r}"),
            (self.routing in ROUTING_PLANS, f"+routing must be one of {ROUTING_PLANS}, got {self.routing!r}"),
            (self.micro_batch_size >= 1, f"train.micro_batch_size must be >= 1, got {self.micro_batch_size}"),
            (1 <= self.seq_len <= self.model.max_seq_len, f"data.seq_len ({self.seq_len}) must be in "
             f"1..model.max_seq_len ({self.model.max_seq_len})"),
            (0 <= self.rank < self.world_size, f"+rank ({self.rank}) must be in 0..{self.world_size - 1}"),
            (self.gpu_mem_gb > 0, f"+gpu_mem_gb must be > 0, got {self.gpu_mem_gb}"),
        ]
        return errors + [msg for ok, msg in checks if not ok]


# ----------------------------------------------------------------------------- the rank's shard


def build_shard(model_cfg: ModelConfig, ep_size: int, lora: LoRAConfig | None = None) -> tuple[nn.Module, object]:
    """This rank's model on the meta device, sharded by floe.parallel as training shards it, with
    training's LoRA adapters and quantized base (floe.run.trainer.adapt_base) when `lora` has a rank.
    Needs a process group (fake_process_group) when ep_size > 1. Returns (model, groups)."""
    from floe.model import ArcticForCausalLM
    from floe.parallel import apply_deepspeed_moe, apply_expert_parallel, build_parallel_groups
    from floe.quantize import apply_quantize_base

    with torch.device("meta"):
        model = ArcticForCausalLM(model_cfg)
    groups = None
    if ep_size > 1:
        groups = build_parallel_groups(ep_size)
        apply_expert_parallel(model, groups)
    if lora is not None and lora.enabled:  # the order of build_engine: shard, load, adapt, markers
        apply_lora(model, lora)
        apply_quantize_base(model, lora.quantize_base, lora.targets)
    if groups is not None:
        apply_deepspeed_moe(model)  # the markers that put experts in their own optimizer groups
    return model, groups


def held_experts(model: nn.Module) -> list[int]:
    """Global ids of the experts this rank's shard holds (the same in every layer)."""
    from floe.layer import MoELayer

    experts = next(m for m in model.modules() if isinstance(m, MoELayer)).experts
    return list(range(experts.first_expert, experts.first_expert + experts.num_local_experts))


def _is_expert(p: torch.Tensor, expert_ids: set[int]) -> bool:
    return id(p) in expert_ids


def param_counts(model: nn.Module) -> dict:
    """Parameters held: dense (replicated on every rank) and experts (this rank's shard)."""
    from floe.layer import GroupedExperts

    # the experts' stacked weights and their adapters (a quantized weight is a buffer: counted below)
    expert = {id(p) for m in model.modules() if isinstance(m, GroupedExperts) for p in m.expert_tensors().values()}
    dense = sum(p.numel() for p in model.parameters() if id(p) not in expert)
    experts = sum(p.numel() for p in model.parameters() if id(p) in expert)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    quantized = quantized_weights(model)
    q_experts = sum(math.prod(q.shape) for n, q in quantized.items() if ".experts." in n)
    q_dense = sum(math.prod(q.shape) for n, q in quantized.items() if ".experts." not in n)
    dense, experts = dense + q_dense, experts + q_experts
    return {"params_per_rank": dense + experts, "dense_params": dense, "expert_params": experts,
            "trainable_params": trainable, "frozen_params": dense + experts - trainable,
            "quantized_params": q_dense + q_experts}


def dry_run(model_cfg: ModelConfig, world_size: int, ep_size: int, rank: int, lora: LoRAConfig | None = None) -> dict:
    """Rank `rank` of `world_size`: its experts (global ids), parameter counts and groups."""
    from floe.parallel import expected_layout

    with fake_process_group(world_size, rank) if ep_size > 1 else contextlib.nullcontext():
        model, groups = build_shard(model_cfg, ep_size, lora)
        ep_ranks, edp_ranks = (groups.ep_ranks, groups.edp_ranks) if groups else ((rank,), tuple(range(world_size)))
    if groups is None:
        ep_ranks, edp_ranks = expected_layout(world_size, 1, rank)
    return {"rank": rank, "experts": held_experts(model), "ep_group": list(ep_ranks),
            "expert_data_parallel_group": list(edp_ranks), **param_counts(model)}


# ----------------------------------------------------------------------------- model states


@dataclass
class GroupState:
    """One optimizer param group as DeepSpeed holds it on this rank."""

    name: str
    numel: int  # parameters of the group held on this rank
    partitions: int  # ranks the group's optimizer state is partitioned over (ZeRO-1/2)
    aligned: int  # the flat buffer's length after DeepSpeed's padding
    partition: int  # elements of the flat buffer this rank owns


def optimizer_groups(model: nn.Module, spec: EstimateSpec) -> list[GroupState]:
    """The groups training hands DeepSpeed (floe.optim.param_groups, split_moe_param_groups):
    dense groups partitioned over all ranks, expert groups over world_size / ep_size."""
    from floe.optim import param_groups
    from floe.parallel import split_moe_param_groups

    out = []
    for g in split_moe_param_groups(param_groups(model, 0.1)):
        numel = sum(p.numel() for p in g["params"])
        parts = spec.world_size // spec.ep_size if g.get("moe") else spec.world_size
        parts = parts if spec.zero_stage > 0 else 1
        aligned = math.ceil(numel / (DS_ALIGNMENT * parts)) * DS_ALIGNMENT * parts if spec.zero_stage > 0 else numel
        out.append(GroupState(g["name"], numel, parts, aligned, aligned // parts))
    return out


def state_bytes(spec: EstimateSpec, model: nn.Module, groups: list[GroupState]) -> dict[str, int]:
    """Bytes per rank of weights, gradients, fp32 master weights, Adam moments and the
    gradient-reduction buckets, by DeepSpeed 0.19.8's rules for the optimizer it picks
    (runtime/engine.py _do_optimizer_sanity_check):
      fp32, stage 0: torch's AdamW on the module: fp32 weights, grads, two moments; no master;
      bf16, stage 0: FP16_Optimizer in bf16 mode (fp16/fused_optimizer.py): bf16 flat weights (the
        module's parameters are views of it), bf16 gradients, an fp32 flat master copy and fp32
        moments of every trainable element (nothing partitioned);
      bf16, stage 1: BF16_Optimizer (bf16_optimizer.py): bf16 flat weights, fp32 gradients of
        the WHOLE flat group (fp32_groups_gradients_flat), fp32 master and moments of the partition;
      stage 1/2 otherwise: DeepSpeedZeroOptimizer (stage_1_and_2.py): flat weights in the model
        dtype, fp32 master partition (cloned even for fp32 weights), fp32 moments of the
        partition; stage 2 gradients: the owned partition (grads_in_partition in the model
        dtype, or the fp32 compact partition buffer under bf16 + fp32 accumulation); stage 1
        keeps whole gradients until the boundary; the ipg reduce bucket(s) of
        reduce_bucket_size elements, two with overlap_comm. The all-gather after the step
        writes into the flat weights (all_gather_into_tensor): no extra buffer.
    Frozen parameters (model.freeze_moe, a LoRA base) hold weights only; a quantized base
    (lora.quantize_base) holds its integer buffers (floe.quantize), counted in `weights`.
    """
    p_bytes = 2 if spec.precision == "bf16" else 4
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    quantized = sum(q.nbytes() for q in quantized_weights(model).values())
    numel = sum(g.numel for g in groups)
    aligned = sum(g.aligned for g in groups)
    part = sum(g.partition for g in groups)
    out = {"weights": (aligned + frozen) * p_bytes + quantized, "grads": 0, "master": 0, "adam": 8 * part,
           "buckets": 0}
    if spec.zero_stage == 0:
        out["grads"] = p_bytes * numel  # bf16 at ZeRO-0 accumulates in bf16 (moe/parallel/deepspeed_setup.py)
        if spec.precision == "bf16":
            out["master"] = 4 * numel  # FP16_Optimizer in bf16 mode: one fp32 flat copy per group
        return out
    out["master"] = 4 * part
    if spec.zero_stage == 1 and spec.precision == "bf16":
        out["grads"] = 4 * aligned
        return out
    bucket = spec.reduce_bucket_size * (2 if spec.overlap_comm else 1)
    if spec.zero_stage == 1:
        out["grads"] = numel * p_bytes
        out["buckets"] = bucket * p_bytes
    else:
        out["grads"] = part * (4 if spec.precision == "bf16" else p_bytes)
        out["buckets"] = bucket * p_bytes
    return out


def transient_bytes(spec: EstimateSpec, model: nn.Module, groups: list[GroupState]) -> dict[str, int]:
    """Bytes that live only outside forward/backward, on top of the states:
      step: AdamW's temporaries, measured by running torch.optim.AdamW (foreach on CUDA, as its
        default) on fake tensors of the shapes it steps; at ZeRO-2 with gradients in the
        model dtype DeepSpeed also makes one flat fp32 copy of a group's partition gradient;
      reduce: at stage 0 the engine flattens the gradients of each group for its all-reduce."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    largest = max(groups, key=lambda g: g.partition)
    bf16_stage0 = spec.zero_stage == 0 and spec.precision == "bf16"
    if bf16_stage0:  # the inner AdamW steps each group's flat fp32 master
        shapes = [(g.numel,) for g in groups]
    elif spec.zero_stage == 0:
        shapes = [tuple(p.shape) for p in model.parameters() if p.requires_grad]
    else:
        shapes = [(largest.partition,)]
    with FakeTensorMode():
        params = [nn.Parameter(torch.empty(s)) for s in shapes]
        for p in params:
            p.grad = torch.empty_like(p)
        opt = torch.optim.AdamW(params, lr=1e-3, foreach=spec.device == "cuda")
        opt.step()  # creates the moments: counted as states, not here
        with PeakMemoryTracker() as mem:
            opt.step()
    step = mem.peak_bytes
    if spec.zero_stage == 2 and spec.precision == "fp32":
        step += 4 * largest.partition
    if bf16_stage0:
        # FP16_Optimizer.step flattens every group's bf16 gradients into fp32 (all groups live
        # until the update), through an fp32 copy of each gradient of the group being flattened.
        step += 4 * sum(g.numel for g in groups) + 4 * largest.numel
    reduce = 0
    if spec.zero_stage == 0:
        grad_bytes = 2 if spec.precision == "bf16" else 4
        reduce = grad_bytes * min(max(g.numel for g in groups), DS_STAGE0_ALLREDUCE_ELEMENTS)
    return {"step": step, "reduce": reduce}


# ----------------------------------------------------------------------------- activations


def measure_activations(spec: EstimateSpec, num_layers: int, micro_batch: int) -> int:
    """Peak bytes of everything a forward + backward of `num_layers` blocks allocates besides
    the weights and the gradients (each gradient is dropped as soon as it is accumulated, as
    ZeRO-2 moves it to its bucket), measured on fake tensors. Needs the (fake) process group
    when spec.ep_size > 1."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from floe.plan.fake_run import RoutingOracle, expert_kernel_footprint

    model, groups = build_shard(spec.model.replace(num_layers=num_layers), spec.ep_size, spec.lora)
    experts = held_experts(model)
    fake = FakeTensorMode(allow_non_fake_inputs=True)  # the meta parameters become fake ones
    if spec.precision == "bf16":
        model.to(torch.bfloat16)  # DeepSpeed's bf16 mode casts the module (still on the meta device here)
    with fake:
        model.to_empty(device="cpu")
        apply_activation_checkpointing(model, spec.activation_checkpointing)  # training's own code
        for p in model.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
        oracle = RoutingOracle(fake, spec.routing, spec.ep_size, groups.ep_rank if groups else 0,
                               experts[0], len(experts))
        b, s = micro_batch, spec.seq_len
        with oracle, expert_kernel_footprint(spec.kernels), PeakMemoryTracker() as mem:
            ids = torch.zeros(b, s, dtype=torch.long)
            # A packed row: the training path with position ids (document mask) and a padding mask.
            out = model(ids, position_ids=torch.arange(s).expand(b, s), labels=ids,
                        attention_mask=torch.ones(b, s, dtype=torch.long))
            (out.lm_loss_sum + out.aux_loss).backward()
    return mem.peak_bytes


@dataclass
class Estimate:
    spec: dict
    rank: int
    experts: list[int]
    params_per_rank: int
    dense_params: int
    expert_params: int
    trainable_params: int
    quantized_params: int  # of the frozen base, stored as lora.quantize_base says
    weights_gb: float
    quantized_base_gb: float  # part of weights_gb: the quantized base's buffers
    grads_gb: float
    master_gb: float
    adam_gb: float
    optimizer_gb: float  # master + adam
    buffers_gb: float  # gradient-reduction buckets (live during backward)
    activations_gb: float  # peak of forward + backward at the configured micro-batch
    activations_per_layer_gb: float
    step_extra_gb: float  # optimizer-step temporaries (after backward)
    reduce_extra_gb: float  # stage-0 flattened gradients for the all-reduce (after backward)
    reserve_gb: float
    total_gb: float
    gpu_mem_gb: float
    fits: bool
    max_micro_batch: int
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def _lora_notes(spec: EstimateSpec, model: nn.Module) -> list[str]:
    if not spec.lora.enabled:
        return []
    lora, p_bytes = spec.lora, 2 if spec.precision == "bf16" else 4
    full = [*(["the router"] if lora.train_router else []), *(["the embedding and lm_head"] if lora.train_embeddings
                                                              else [])]
    notes = [f"lora: rank {lora.rank} on {', '.join(lora.targets)}; base {lora.quantize_base}; only the adapters"
             f"{''.join(' and ' + f for f in full)} have gradients and optimizer state"]
    if lora.quantize_base != "none":
        owners: dict[str, int] = {}
        for name, q in quantized_weights(model).items():
            owner = name.rsplit(".", 2 if name.endswith(".weight") else 1)[0]
            owners[owner] = owners.get(owner, 0) + math.prod(q.shape)
        largest = max(owners.values()) * p_bytes / GIB
        notes.append(f"dequantized on the fly: at most one module's weights at a time ({largest:.2f} GiB, the "
                     "largest), inside the activations")
    return notes


def estimate(spec: EstimateSpec) -> Estimate:
    """The memory plan for rank spec.rank (see module doc)."""
    errors = spec.errors()
    if errors:
        raise ValueError("invalid estimate config:\n  " + "\n  ".join(errors))
    with fake_process_group(spec.world_size, spec.rank) if spec.ep_size > 1 else contextlib.nullcontext():
        model, _ = build_shard(spec.model, spec.ep_size, spec.lora)
        groups = optimizer_groups(model, spec)
        states = state_bytes(spec, model, groups)
        extra = transient_bytes(spec, model, groups)
        mbs = (spec.micro_batch_size, spec.micro_batch_size + 1)
        # Measured at n and n + 1 blocks, extrapolated linearly. A quantized base's one dequantized module
        # moves the peak: with one block it falls in that block's backward, from two on in the same place
        # every time; so 2 and 3 there (measured on a 32-expert nf4 model: 68 MB from 1 to 2 blocks, then
        # 20 MB per block; 1 and 2 overstated Arctic's nf4 plan by ~0.27 GiB a layer).
        n = 2 if spec.lora.quantize_base != "none" else 1
        act = {(k, mb): measure_activations(spec, k, mb) for k in (n, n + 1) for mb in mbs}
    layers = spec.model.num_layers

    def per_layer(mb_index: int) -> int:
        return act[n + 1, mbs[mb_index]] - act[n, mbs[mb_index]]

    def activations(mb_index: int) -> int:
        return act[n, mbs[mb_index]] + (layers - n) * per_layer(mb_index)

    a0, a1 = activations(0), activations(1)
    persistent = states["weights"] + states["grads"] + states["master"] + states["adam"]
    reserve = spec.reserve_gb * GIB

    def total(act_bytes: float) -> float:
        return persistent + max(act_bytes + states["buckets"], extra["step"], extra["reduce"]) + reserve

    budget = spec.gpu_mem_gb * GIB
    per_mb = max(a1 - a0, 1)
    # activations(mb) = a0 + (mb - mb0) * per_mb: the largest mb whose total fits.
    room = budget - persistent - states["buckets"] - reserve
    max_mb = 0
    if room >= max(extra["step"], extra["reduce"]) - states["buckets"] and room > 0:
        max_mb = max(0, int((room - a0) // per_mb) + spec.micro_batch_size)
    counts = param_counts(model)
    gb = lambda x: x / GIB  # noqa: E731
    return Estimate(
        spec={k: v for k, v in asdict(spec).items() if k != "model"} | {"model": asdict(spec.model)},
        rank=spec.rank, experts=held_experts(model), params_per_rank=counts["params_per_rank"],
        dense_params=counts["dense_params"], expert_params=counts["expert_params"],
        trainable_params=counts["trainable_params"], quantized_params=counts["quantized_params"],
        weights_gb=gb(states["weights"]), grads_gb=gb(states["grads"]),
        quantized_base_gb=gb(sum(q.nbytes() for q in quantized_weights(model).values())),
        master_gb=gb(states["master"]), adam_gb=gb(states["adam"]),
        optimizer_gb=gb(states["master"] + states["adam"]), buffers_gb=gb(states["buckets"]),
        activations_gb=gb(a0), activations_per_layer_gb=gb(per_layer(0)),
        step_extra_gb=gb(extra["step"]), reduce_extra_gb=gb(extra["reduce"]), reserve_gb=spec.reserve_gb,
        total_gb=gb(total(a0)), gpu_mem_gb=spec.gpu_mem_gb, fits=total(a0) <= budget, max_micro_batch=max_mb,
        notes=[f"routing plan: {spec.routing}", f"expert kernel footprint: {spec.kernels}", *_lora_notes(spec, model)],
    )
