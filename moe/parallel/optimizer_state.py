"""Optimizer state per parameter, read from and written into DeepSpeed's optimizers, for floe's
checkpoints. Only the Engine (moe/parallel/engine.py) calls these; checkpoint code asks the Engine.

One parameter at a time, by the model's own Parameter objects, whatever the ZeRO stage:
  ZeRO-1/2 and DeepSpeed's bf16 optimizer: DeepSpeed links every optimized parameter to its fragment of
    the flat fp32 partition (`_hp_mapping`); deepspeed.utils.safe_get_full_* rebuild the full tensor by
    an all-reduce over the parameter's own data-parallel group (dense: all ranks; experts: the
    expert-data-parallel group, as DeepSpeed partitions them), safe_set_full_* write this rank's fragment.
  ZeRO-0 in fp32: the model's parameters are the optimizer's own; the torch state is read directly.
"""
from __future__ import annotations

import torch
import torch.nn as nn

ADAM_STATE = ("exp_avg", "exp_avg_sq")


def _base_optimizer(ds) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's wrappers (the one that holds exp_avg / exp_avg_sq)."""
    # DeepSpeed attribute (checked on 0.19.8): the client optimizer, kept as `basic_optimizer` at every
    # stage; ZeRO-1/2 and the bf16 optimizer replace its params with their flat fp32 partitions.
    opt = ds.basic_optimizer
    if not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
        raise NotImplementedError(f"floe's checkpoints store Adam state; the optimizer is {type(opt).__name__}")
    return opt


def _bf16_masters(ds) -> dict[int, torch.Tensor] | None:
    """bf16 at ZeRO-0: {id(model parameter): its fp32 master tensor}, else None.

    Private DeepSpeed state (checked on 0.19.8): at ZeRO-0 in bf16 the engine wraps the client
    optimizer in FP16_UnfusedOptimizer (bf16 mode), which keeps one fp32 master tensor per
    parameter (`fp32_groups[i][j]` for the model's `fp16_groups[i][j]`); the client optimizer steps
    the masters (its state is keyed by them) and the wrapper copies them back into the bf16 weights.
    """
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    opt = ds.optimizer
    if not isinstance(opt, FP16_UnfusedOptimizer):
        return None
    cached = getattr(opt, "_floe_masters", None)
    if cached is None:
        cached = {id(lp): hp for lps, hps in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lps, hps)}
        opt._floe_masters = cached
    return cached


def _linked(ds) -> bool:
    """Whether DeepSpeed holds the fp32 state in flat partitions linked per parameter (ZeRO-1/2, bf16 at ZeRO 1/2)."""
    return ds.basic_optimizer is not ds.optimizer and _bf16_masters(ds) is None


def optimizes(ds, param: nn.Parameter) -> bool:
    """Whether the optimizer updates `param` (False for frozen parameters, e.g. model.freeze_moe)."""
    if _linked(ds):
        return hasattr(param, "_hp_mapping")  # set by DeepSpeed on every parameter it optimizes
    masters = _bf16_masters(ds)
    if masters is not None:
        return id(param) in masters
    return any(param is p for g in _base_optimizer(ds).param_groups for p in g["params"])


def optimized_numel(ds) -> int:
    """Elements of the tensors the torch optimizer steps on this rank (flat partitions under ZeRO-1/2)."""
    return sum(p.numel() for g in _base_optimizer(ds).param_groups for p in g["params"])


def optimizer_step_count(ds) -> int | None:
    """Adam's step count (the same for every state entry), or None before the first update."""
    steps = {int(s["step"]) for s in _base_optimizer(ds).state.values() if "step" in s}
    if len(steps) > 1:
        raise RuntimeError(f"the optimizer's state entries disagree on Adam's step count: {sorted(steps)}")
    return steps.pop() if steps else None


def full_optimizer_state(ds, param: nn.Parameter) -> dict[str, torch.Tensor]:
    """{"fp32", "exp_avg", "exp_avg_sq"}: `param`'s full fp32 master weights and Adam moments.
    Collective over the parameter's data-parallel group under ZeRO-1/2 (every rank of it must call,
    in the same order); call only when optimizes(ds, param) and after the first update."""
    if _linked(ds):
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        out = {"fp32": safe_get_full_fp32_param(param)}
        out.update({k: safe_get_full_optimizer_state(param, k) for k in ADAM_STATE})
        return out
    masters = _bf16_masters(ds)
    master = param if masters is None else masters[id(param)]
    state = _base_optimizer(ds).state[master]
    return {"fp32": master.detach(), **{k: state[k] for k in ADAM_STATE}}


def init_optimizer_state(ds, step: int) -> None:
    """Create Adam's state (zero moments, step count `step`) for every optimized tensor, as torch's
    first update would, so that set_full_optimizer_state can fill it before any update."""
    opt = _base_optimizer(ds)
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state[p]
            for k in ADAM_STATE:
                state.setdefault(k, torch.zeros_like(p, memory_format=torch.preserve_format))
            # torch keeps the count as a float32 scalar tensor (on the parameter's device when fused)
            fused = group.get("fused") or group.get("capturable")
            state["step"] = torch.tensor(float(step), dtype=torch.float32, device=p.device if fused else None)
    link_optimizer_state(ds)


def link_optimizer_state(ds) -> None:
    """Make every parameter's view of the optimizer state current (before full_optimizer_state)."""
    if _linked(ds) and _base_optimizer(ds).state:
        # Private DeepSpeed state (checked on 0.19.8): ZeRO-1/2 link each parameter's fragment to the
        # optimizer state once, right after the FIRST param group's first update
        # (_lazy_init_hp_params_optimizer_state in _optimizer_step), when the other groups (the
        # no-decay group, the expert groups) have no state yet: their fragments stay empty and
        # safe_get_full_optimizer_state fails for them. Linking again once every group has state fixes it.
        ds.optimizer._hp_optimizer_states_linked = False
        ds.optimizer._lazy_init_hp_params_optimizer_state()


@torch.no_grad()
def set_full_optimizer_state(ds, param: nn.Parameter, state: dict[str, torch.Tensor]) -> None:
    """Give `param` its full fp32 master weights and Adam moments (this rank keeps its own partition
    under ZeRO-1/2; no collective). Call init_optimizer_state first."""
    if _linked(ds):
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        safe_set_full_fp32_param(param, state["fp32"].to(param.device, torch.float32))
        for k in ADAM_STATE:
            safe_set_full_optimizer_state(param, state[k].to(param.device, torch.float32), k)
        return
    masters = _bf16_masters(ds)
    master = param if masters is None else masters[id(param)]
    own = _base_optimizer(ds).state[master]
    master.copy_(state["fp32"])
    for k in ADAM_STATE:
        own[k].copy_(state[k])
    if master is not param:
        param.copy_(master)  # the bf16 weights are the rounded masters, as after an update


def nonfinite_state(ds, model: nn.Module) -> list[str]:
    """Names of this rank's non-finite weights, fp32 master partitions and optimizer state tensors."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    opt = _base_optimizer(ds)
    for gi, group in enumerate(opt.param_groups):
        for pi, p in enumerate(group["params"]):
            if _linked(ds) and not torch.isfinite(p).all():
                bad.append(f"fp32 master partition (param group {group.get('name', gi)}, tensor {pi})")
            for k, v in opt.state.get(p, {}).items():
                if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all():
                    bad.append(f"optimizer {k} (param group {group.get('name', gi)}, tensor {pi})")
    return bad  # NOTE: host sync per tensor (only when a checkpoint is written)


def schedule_state(ds) -> dict:
    """The learning-rate schedule's position and DeepSpeed's step counters, as plain numbers."""
    return {"scheduler_last_epoch": int(ds.lr_scheduler.last_epoch), "global_steps": int(ds.global_steps),
            "global_samples": int(ds.global_samples)}


def load_schedule_state(ds, state: dict) -> None:
    """Put the schedule and DeepSpeed's counters where schedule_state found them (any param groups)."""
    sched = ds.lr_scheduler
    sched.last_epoch = int(state["scheduler_last_epoch"])
    # torch.optim.lr_scheduler.LambdaLR internals (torch 2.x): the lr of each group at last_epoch is
    # base_lr * lambda(last_epoch); _step_count/_last_lr are what step() would have left.
    sched._step_count = sched.last_epoch + 1
    lrs = [base * fn(sched.last_epoch) for fn, base in zip(sched.lr_lambdas, sched.base_lrs)]
    for group, lr in zip(sched.optimizer.param_groups, lrs):
        group["lr"] = lr
    sched._last_lr = lrs
    ds.global_steps, ds.global_samples = int(state["global_steps"]), int(state["global_samples"])
