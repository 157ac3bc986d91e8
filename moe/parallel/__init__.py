"""Expert parallelism and DeepSpeed ZeRO for floe, applied to a single-device model from outside.

Fixed order on every rank (launch/train.py):
    env = read_launch_env()
    validate_parallel(model_cfg, env.world_size, ep_size, zero_stage, ...)   # before any collective
    init_distributed(device)
    groups = build_parallel_groups(ep_size)                # DeepSpeed's groups, its names
    model = ArcticForCausalLM(cfg)                          # same seed on every rank
    if ep_size > 1:
        apply_expert_parallel(model, groups)                # each rank keeps its experts
        apply_deepspeed_moe(model)                          # the engine must see them as MoE
    param_groups = split_moe_param_groups(optim.param_groups(model, wd))
    engine, ... = deepspeed.initialize(model=model, model_parameters=param_groups,
                                       config=build_deepspeed_config(...))
    fix_engine(engine, groups.ep_group)
"""
from moe.parallel.deepspeed_moe import (
    MIN_DEEPSPEED,
    apply_deepspeed_moe,
    build_deepspeed_config,
    check_deepspeed_version,
    clip_grad_norm_,
    fix_engine,
    global_grad_norm,
    is_expert_param,
    split_moe_param_groups,
)
from moe.parallel.dispatch import (
    ExpertParallelMoE,
    all_to_all,
    apply_expert_parallel,
    expert_parallel_layers,
    expert_shards,
    full_state_dict,
    load_full_state_dict,
)
from moe.parallel.groups import (
    LaunchEnv,
    ParallelGroups,
    build_parallel_groups,
    default_backend,
    expected_layout,
    init_distributed,
    parallel_errors,
    read_launch_env,
    validate_parallel,
)

__all__ = [
    "MIN_DEEPSPEED", "apply_deepspeed_moe", "build_deepspeed_config", "check_deepspeed_version",
    "clip_grad_norm_", "fix_engine", "global_grad_norm", "is_expert_param", "split_moe_param_groups",
    "ExpertParallelMoE", "all_to_all", "apply_expert_parallel", "expert_parallel_layers", "expert_shards",
    "full_state_dict", "load_full_state_dict",
    "LaunchEnv", "ParallelGroups", "build_parallel_groups", "default_backend", "expected_layout",
    "init_distributed", "parallel_errors", "read_launch_env", "validate_parallel",
]
