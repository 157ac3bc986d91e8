"""Expert parallelism and DeepSpeed ZeRO for floe, applied to a single-device model from outside.

On every rank (moe/run/trainer.py does exactly this):
    env = read_launch_env()
    validate_parallel(model_cfg, env.world_size, ep_size, zero_stage, ...)   # before any collective
    init_distributed(device)
    with torch.device("meta"):
        model = ArcticForCausalLM(model_cfg)                 # shapes only
    engine = build_engine(model, parallel_cfg, optim_cfg, seed=..., device=..., ...)
        # groups -> shard GroupedExperts + all-to-all dispatcher -> materialise + keyed init
        # -> DeepSpeed MoE markers -> param groups -> deepspeed.initialize -> engine checks
    ... engine(**batch); engine.backward(loss); engine.micro_step() / grad_norm = engine.step()
    teardown()                                                # if init_distributed created the group

Without DeepSpeed (tests, benchmarks): build_parallel_groups(ep_size), then
apply_expert_parallel(model, groups) shards each MoE layer's experts and installs the
all-to-all dispatcher.
"""
from floe.parallel.quiet import quiet_libraries

quiet_libraries()  # before anything below imports DeepSpeed

from floe.parallel.dispatch import (
    AllToAllDispatcher,
    all_to_all,
    apply_expert_parallel,
    expert_parallel_layers,
    full_state_dict,
)
from floe.parallel.deepspeed_setup import (
    PRECISIONS,
    apply_deepspeed_moe,
    build_deepspeed_config,
    check_engine,
    resolve_precision,
    split_moe_param_groups,
)
from floe.parallel.engine import Engine, build_engine
from floe.parallel.optimizer_state import ADAM_STATE
from floe.parallel.lifecycle import TESTED_DEEPSPEED, check_deepspeed_version, fake_process_group, init_distributed, teardown
from floe.parallel.grad_norm import clip_grad_norm_, global_grad_norm, is_expert_param
from floe.parallel.groups import (
    LaunchEnv,
    build_parallel_groups,
    ParallelConfig,
    ParallelGroups,
    default_backend,
    expected_layout,
    parallel_errors,
    read_launch_env,
    validate_parallel,
)

__all__ = [
    "AllToAllDispatcher", "all_to_all", "apply_expert_parallel", "expert_parallel_layers", "full_state_dict",
    "ADAM_STATE", "PRECISIONS", "TESTED_DEEPSPEED", "Engine", "apply_deepspeed_moe", "build_deepspeed_config", "build_engine",
    "build_parallel_groups", "check_deepspeed_version", "check_engine", "fake_process_group", "init_distributed",
    "resolve_precision", "split_moe_param_groups", "teardown",
    "clip_grad_norm_", "global_grad_norm", "is_expert_param",
    "LaunchEnv", "ParallelConfig", "ParallelGroups", "default_backend", "expected_layout", "parallel_errors",
    "read_launch_env", "validate_parallel",
]
