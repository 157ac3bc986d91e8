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

import contextlib
import math
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

from floe.optim import OptimConfig, build_optimizer, lr_lambda, param_groups
from floe.parallel.dispatch import apply_expert_parallel, expert_parallel_layers
from floe.parallel.grad_norm import clip_grad_norm_, global_grad_norm, is_expert_param
from floe.parallel.groups import ParallelConfig, ParallelGroups, default_backend, expected_layout

TESTED_DEEPSPEED = ("0.19.8", "0.20")  # [lowest tested, first untested): setup.py pins the same range


def check_deepspeed_version(version: str | None = None) -> None:
    """Raise ImportError unless the installed DeepSpeed is in the tested range."""
    from packaging.version import Version

    low, high = TESTED_DEEPSPEED
    pin = f"deepspeed>={low},<{high}"
    if version is None:
        try:
            import deepspeed
        except ImportError as e:
            raise ImportError(f"floe needs {pin} for ZeRO and expert parallelism: pip install '{pin}' ({e})") from None
        version = deepspeed.__version__
    if not Version(low) <= Version(version) < Version(high):
        raise ImportError(f"deepspeed {version} is outside the range floe was tested with ({pin}): floe relies on "
                          f"how that range reduces expert gradients and names its groups. pip install '{pin}'")


def skip_shm_comm_build() -> None:
    """Keep DeepSpeed's comm layer from JIT-compiling its shared-memory all-reduce.

    On a CPU, every DeepSpeed TorchBackend (deepspeed.init_distributed) builds the C++ op
    `deepspeed_shm_comm` with ninja into ~/.cache/torch_extensions. DeepSpeed uses it only under
    its own launcher (it needs LOCAL_SIZE == world size; torchrun does not set LOCAL_SIZE), so under
    floe it is built and never used. The build costs about a minute of CPU and prints compiler
    output, and torch's build lock (a file in that cache) left behind by a process killed mid-build
    makes every later process on the machine wait for it forever: the hang that timed out CI.
    Private DeepSpeed state (checked on 0.19.8): comm/torch.py's build_shm_op returns None when
    the op is marked incompatible in deepspeed.ops.__compatible_ops__, and it is that dict's only
    reader. The dict is filled lazily by a probe that compiles test programs (printing linker
    errors such as "cannot find -laio"); when nothing has probed yet, floe installs the one entry
    it needs instead of running the probe.
    """
    import deepspeed.ops

    probed = vars(deepspeed.ops).get("__compatible_ops__")
    if probed is None:
        vars(deepspeed.ops)["__compatible_ops__"] = {"deepspeed_shm_comm": False}
    else:
        probed["deepspeed_shm_comm"] = False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: torch.device, timeout_s: float = 600.0) -> bool:
    """Join torchrun's process group (env://), or make a group of one for a plain `python`
    launch, and let DeepSpeed's comm layer wrap it. Returns True if this call created it."""
    import deepspeed

    created = not dist.is_initialized()
    if created:
        if "RANK" not in os.environ:  # plain `python launch/train.py`: a group of one
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(_free_port()))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=default_backend(device), timeout=timedelta(seconds=timeout_s))
    skip_shm_comm_build()
    deepspeed.init_distributed(dist_backend=dist.get_backend(), timeout=timedelta(seconds=timeout_s))
    return created


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


def teardown() -> None:
    """Destroy the default process group and forget DeepSpeed's cached groups, so that the
    same process can initialise again (tests do)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    # Private DeepSpeed state (checked on 0.19.8): deepspeed.utils.groups caches process-group
    # handles in module globals and has no reset; after the default group is destroyed they are
    # stale, and a second init would reuse them.
    from deepspeed.utils import groups

    for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                 "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP"):
        getattr(groups, name).clear()
    for name in ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP",
                 "_MODEL_PARALLEL_GROUP", "_TENSOR_MODEL_PARALLEL_GROUP"):
        setattr(groups, name, None)


@contextlib.contextmanager
def fake_process_group(world_size: int, rank: int):
    """torch.distributed's fake process group of `world_size` ranks, seen from `rank` (for the
    memory plan's dry run of one rank of a large layout): groups can be created and collectives
    called, nothing moves. DeepSpeed's comm layer wraps it, as init_distributed does."""
    import deepspeed
    import deepspeed.comm.comm as ds_comm
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group already exists in this process; run the estimate alone")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        skip_shm_comm_build()
        deepspeed.init_distributed(dist_backend="fake")
        yield
    finally:
        teardown()
        # Private DeepSpeed state (checked on 0.19.8): the comm layer keeps its backend object
        # for the fake group; a later real init_distributed must make a fresh one.
        ds_comm.cdb = None


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


class Engine:
    """DeepSpeed's engine (`ds`) with floe's layout around it: call, backward, micro_step, step."""

    def __init__(self, ds, model: nn.Module, groups: ParallelGroups | None, grad_clip: float, clip_here: bool):
        self.ds, self.model, self.groups = ds, model, groups
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
        return self.ds(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def micro_step(self) -> None:
        """After a backward inside the accumulation window: DeepSpeed only counts it."""
        assert not self.ds.is_gradient_accumulation_boundary()
        self.ds.step()
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
        assert self.ds.is_gradient_accumulation_boundary()
        norm = None
        if self.clip_here:
            norm = float(self._clip())  # NOTE: host sync, before the update (the verdict)
            self.ds.optimizer.overflow = skip or not math.isfinite(norm)
        self.ds.step()
        if norm is None:  # ZeRO-1/2 and DeepSpeed's bf16 optimizers compute it (experts included)
            norm = self.ds.get_global_grad_norm()
            if norm is None:
                raise RuntimeError("DeepSpeed computed no gradient norm for this step (its ZeRO norm is disabled)")
        norm = float(norm)  # NOTE: host sync (the norm is logged every step)
        applied = self.ds.was_step_applied()
        if applied and (skip or not math.isfinite(norm)):
            raise FloatingPointError(f"DeepSpeed applied an update with gradient norm {norm} (skip requested: "
                                     f"{skip}); the weights are no longer trustworthy")
        return norm, applied

    @property
    def lr(self) -> float:
        return self.ds.get_lr()[0]

    def _clip(self) -> torch.Tensor:
        ep_group = self.groups.ep_group if self.groups is not None else None
        if self.grad_clip <= 0:
            return global_grad_norm(self.model.parameters(), ep_group)
        return clip_grad_norm_(self.model.parameters(), self.grad_clip, ep_group)


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


# --- Optimizer state per parameter, for floe's checkpoints (moe/run/checkpoint.py) --------------------------
# One parameter at a time, by the model's own Parameter objects, whatever the ZeRO stage:
#   ZeRO-1/2 and DeepSpeed's bf16 optimizer: DeepSpeed links every optimized parameter to its fragment of
#     the flat fp32 partition (`_hp_mapping`); deepspeed.utils.safe_get_full_* rebuild the full tensor by
#     an all-reduce over the parameter's own data-parallel group (dense: all ranks; experts: the
#     expert-data-parallel group, as DeepSpeed partitions them), safe_set_full_* write this rank's fragment.
#   ZeRO-0 in fp32: the model's parameters are the optimizer's own; the torch state is read directly.
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
