"""The one door to DeepSpeed: process groups, MoE recognition, the engine, and its teardown.

`build_engine` applies parallelism to a model (built on the meta device or not) and builds
DeepSpeed's engine in the one order that is correct:

    groups (DeepSpeed's, by name) -> shard GroupedExperts + all-to-all dispatcher
    -> materialise + keyed init -> DeepSpeed MoE markers -> param groups -> deepspeed.initialize
    -> engine checks

Nothing else in floe imports DeepSpeed (tools/bench_* compare against it) or touches its
private state; every such touch below says why and was checked against deepspeed 0.19.8,
the version setup.py pins (TESTED_DEEPSPEED).

Why the markers: DeepSpeed's engine switches its MoE handling on only when
`deepspeed.initialize` finds a module that is an instance of its own `deepspeed.moe.layer.MoE`
(engine.py, `_configure_distributed_model`: `has_moe_layers`). Without it the engine treats
floe's expert shards as ordinary data-parallel parameters: ZeRO-1/2 and the stage-0 reducer
average DIFFERENT experts' gradients over all ranks, and the optimizer param groups are not
split per expert group, silently. What DeepSpeed then does (0.19.8):
  - expert gradients: summed over the expert-data-parallel group and divided by the FULL
    data-parallel size, like dense gradients, so the update does not depend on ep_size;
  - ZeRO-1/2: one optimizer group per expert group name, partitioned over its
    expert-data-parallel group; the gradient norm covers dense and expert gradients
    together (each expert element counted once);
  - initial weights: dense from rank 0, each expert shard from rank 0 of its group.
One gap: at ZeRO stage 0 in fp32 DeepSpeed clips with `runtime.utils.clip_grad_norm_`, which
averages each rank's local norm instead of summing the experts over the expert-parallel
group. floe therefore clips stage-0 fp32 itself (`Engine.step`) and tells DeepSpeed not to.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn

from floe.optim import OptimConfig, build_optimizer, lr_lambda, param_groups
import floe.parallel.optimizer_state as optimizer_state
from floe.parallel.deepspeed_setup import (_gate_optimizer_step, apply_deepspeed_moe, build_deepspeed_config,
                                           check_engine, floe_clips, resolve_precision, single_rank_parallel,
                                           skip_single_rank_allreduce, skip_single_rank_expert_allreduce,
                                           split_moe_param_groups)
from floe.parallel.dispatch import apply_expert_parallel
from floe.parallel.grad_norm import clip_grad_norm_, global_grad_norm
from floe.parallel.groups import ParallelConfig, ParallelGroups, build_parallel_groups
from floe.parallel.lifecycle import check_deepspeed_version

class Engine:
    """The one holder of DeepSpeed's engine: call, backward, micro_step, step, and, for checkpoints,
    the model's tensors and optimizer state by parameter. Nothing outside floe.parallel sees `_ds`."""

    def __init__(self, ds, model: nn.Module, groups: ParallelGroups | None, grad_clip: float, clip_here: bool):
        self._ds, self.model, self.groups = ds, model, groups
        self.grad_clip, self.clip_here = grad_clip, clip_here
        self.grad_accum = ds.gradient_accumulation_steps()
        # Private DeepSpeed behaviour (checked on 0.19.8): at ZeRO-1 in bf16 the engine's optimizer is
        # BF16_Optimizer, which adds every parameter's bf16 .grad into its fp32 accumulator after each
        # backward and relies on a backward prologue to zero the bf16 grads first. Through
        # engine.backward that prologue never runs, so micro-batch i was counted (accum - i) times
        # (the gradient norm came out 2.5x at 4 micro-batches). floe zeroes them after each micro-step.
        from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

        self._clear_bf16_grads = ds.optimizer.clear_lp_grads if isinstance(ds.optimizer, BF16_Optimizer) else None
        assert not clip_here or hasattr(ds.optimizer, "overflow"), "build_engine gates the optimizer it clips for"

    def __call__(self, *args, **kwargs):
        return self._ds(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self._ds.backward(loss)

    def micro_step(self) -> None:
        """After a backward inside the accumulation window: DeepSpeed only counts it."""
        assert not self._ds.is_gradient_accumulation_boundary()
        self._ds.step()
        if self._clear_bf16_grads is not None:  # already in the fp32 accumulator (see __init__)
            self._clear_bf16_grads()

    def step(self, skip: bool = False) -> tuple[float, bool]:
        """Close the accumulation window: clip and update. Returns (the global gradient norm before
        clipping, computed once: by floe at fp32 ZeRO-0, else by DeepSpeed; whether the update was
        applied).

        A step whose gradient norm is not finite is never applied: every DeepSpeed optimizer
        (ZeRO 1/2, its bf16 wrappers) takes the all-reduced norm and skips the update on inf/NaN
        before touching a weight; at fp32 ZeRO-0 floe takes the norm itself, before the update, and
        gates the optimizer the same way. The verdict comes from the global norm, so every rank
        agrees. A skipped step zeroes the gradients and does not advance the learning-rate schedule
        (DeepSpeed counts it in skipped_steps). `skip=True` (e.g. a non-finite loss) forces the
        verdict on the floe-clipped path; elsewhere a non-finite loss has non-finite gradients."""
        assert self._ds.is_gradient_accumulation_boundary()
        norm = None
        if self.clip_here:
            norm = float(self._clip())  # NOTE: host sync, before the update (the verdict)
            self._ds.optimizer.overflow = skip or not math.isfinite(norm)
        self._ds.step()
        if norm is None:  # ZeRO-1/2 and DeepSpeed's bf16 optimizers compute it (experts included)
            norm = self._ds.get_global_grad_norm()
            if norm is None:
                raise RuntimeError("DeepSpeed computed no gradient norm for this step (its ZeRO norm is disabled)")
        norm = float(norm)  # NOTE: host sync (the norm is logged every step)
        applied = self._ds.was_step_applied()
        if applied and (skip or not math.isfinite(norm)):
            raise FloatingPointError(f"DeepSpeed applied an update with gradient norm {norm} (skip requested: "
                                     f"{skip}); the weights are no longer trustworthy")
        return norm, applied

    @property
    def lr(self) -> float:
        return self._ds.get_lr()[0]

    def _clip(self) -> torch.Tensor:
        ep_group = self.groups.ep_group if self.groups is not None else None
        if self.grad_clip <= 0:
            return global_grad_norm(self.model.parameters(), ep_group)
        return clip_grad_norm_(self.model.parameters(), self.grad_clip, ep_group)

    # ---- what checkpoints ask for (moe/run/checkpoint.py); the state itself stays in DeepSpeed --------

    @property
    def training(self) -> bool:
        return self._ds.training

    @property
    def zero_stage(self) -> int:
        return int(self._ds.zero_optimization_stage())

    def optimizes(self, param: nn.Parameter) -> bool:
        """Whether the optimizer updates `param` (False for frozen parameters)."""
        return optimizer_state.optimizes(self._ds, param)

    def optimizer_step_count(self) -> int | None:
        """Adam's step count, or None before the first update. Makes every parameter's view of the
        optimizer state current, so call it before full_optimizer_state."""
        count = optimizer_state.optimizer_step_count(self._ds)
        optimizer_state.link_optimizer_state(self._ds)
        return count

    def full_optimizer_state(self, param: nn.Parameter) -> dict[str, torch.Tensor]:
        """{"fp32", "exp_avg", "exp_avg_sq"} of `param`, full; collective over its data-parallel group
        under ZeRO-1/2 (every rank of it calls, in the same order)."""
        return optimizer_state.full_optimizer_state(self._ds, param)

    def init_optimizer_state(self, step: int) -> None:
        """Zero Adam moments with step count `step` for every optimized tensor (before loading them)."""
        optimizer_state.init_optimizer_state(self._ds, step)

    def set_full_optimizer_state(self, param: nn.Parameter, state: dict[str, torch.Tensor]) -> None:
        """Give `param` its full fp32 master weights and Adam moments (this rank keeps its partition)."""
        optimizer_state.set_full_optimizer_state(self._ds, param, state)

    def optimizer_numel(self) -> int:
        """Elements of the tensors this rank's optimizer updates (its partitions under ZeRO-1/2)."""
        return optimizer_state.optimized_numel(self._ds)

    def nonfinite_state(self) -> list[str]:
        """Names of this rank's non-finite weights, master partitions and optimizer state tensors."""
        return optimizer_state.nonfinite_state(self._ds, self.model)

    def schedule_state(self) -> dict:
        """The learning-rate schedule's position and DeepSpeed's step counters, as plain numbers."""
        return optimizer_state.schedule_state(self._ds)

    def load_schedule_state(self, state: dict) -> None:
        optimizer_state.load_schedule_state(self._ds, state)

    def timing_points(self) -> list[tuple[object, str, str]]:
        """(object, method name, phase) for every method a step-phase profiler should time
        (tools/bench_step.py): DeepSpeed's forward, backward, reduction, norm/clip and optimizer steps.
        Private DeepSpeed method names (checked on 0.19.8); a name missing from an optimizer is skipped."""
        ds, points = self._ds, []
        points += [(ds.module, "forward", "forward"), (ds, "forward", "engine"), (ds, "backward", "backward"),
                   (ds, "allreduce_gradients", "reduce")]
        points += [(ds.optimizer, name, "reduce") for name in
                   ("reduce_ipg_grads", "overlapping_partition_gradients_reduce_epilogue", "reduce_gradients")]
        points.append((self, "_clip", "norm/clip"))
        points += [(ds.optimizer, name, "norm/clip") for name in
                   ("scaled_global_norm", "unscale_and_clip_grads", "get_grad_norm_direct",
                    "complete_grad_norm_calculation_for_cpu_offload")]
        base = getattr(ds.optimizer, "optimizer", ds.optimizer)  # the torch optimizer inside ZeRO's wrapper
        points.append((base, "step", "optimizer"))
        if base is not ds.optimizer:
            points.append((ds.optimizer, "step", "engine"))
        points += [(ds, "step", "engine"), (self, "step", "engine"), (self, "micro_step", "engine")]
        return points


def build_engine(model: nn.Module, parallel: ParallelConfig, optim: OptimConfig, *, seed: int,
                 device: torch.device, global_batch_size: int, micro_batch_size: int, total_steps: int,
                 make_optimizer=None, load_weights=None, adapt=None, precision: str = "auto") -> Engine:
    """Apply parallelism to `model` (an ArcticForCausalLM, best built on the meta device) and
    build the DeepSpeed engine, in the one correct order (module docstring). Collective.

    make_optimizer(param_groups) -> torch optimizer; default AdamW from `optim`.
    load_weights(model): fills the (sharded, possibly meta) model on `device` instead of the keyed
    init from `seed`, e.g. lambda m: floe.hf.load_hf_weights(m, hf_dir, device).
    adapt(model): changes the loaded (sharded) model before DeepSpeed sees it, e.g.
    lambda m: floe.lora.apply_lora(m, lora_cfg, seed): adapters beside the weights, the base frozen
    (DeepSpeed then holds gradients, optimizer state and partitions of the adapters only).
    Call init_distributed first and validate_parallel before that.
    """
    check_deepspeed_version()
    import deepspeed

    groups = build_parallel_groups(parallel.ep_size) if parallel.ep_size > 1 else None
    if groups is not None:  # each rank keeps experts [ep_rank * E/ep, (ep_rank + 1) * E/ep)
        apply_expert_parallel(model, groups, async_dispatch=parallel.async_dispatch)
    if load_weights is None:
        model.to_empty(device=device)
        # Keyed by (seed, name, global expert id): every rank gets the 1-process weights it holds.
        model.reset_parameters(seed=seed)
    else:
        load_weights(model)
    if adapt is not None:
        adapt(model)
    if groups is not None:
        apply_deepspeed_moe(model)  # last before initialize: the markers live on the Parameter objects
    if make_optimizer is None:
        def make_optimizer(groups_):
            return build_optimizer(groups_, optim, device)
    optimizer = make_optimizer(split_moe_param_groups(param_groups(model, optim.weight_decay)))
    parallel = single_rank_parallel(parallel, resolve_precision(precision, device))
    clip_here = floe_clips(parallel, resolve_precision(precision, device))
    if clip_here:  # before the scheduler wraps optimizer.step
        _gate_optimizer_step(optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, optim.warmup_ratio, optim.min_lr_ratio))
    config = build_deepspeed_config(parallel, global_batch_size=global_batch_size, micro_batch_size=micro_batch_size,
                                    dp_size=dist.get_world_size(), grad_clip=optim.grad_clip, device=device,
                                    precision=precision)
    ds, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    check_engine(ds, model)
    skip_single_rank_allreduce(ds)
    skip_single_rank_expert_allreduce(ds)
    return Engine(ds, model, groups, optim.grad_clip, clip_here)
