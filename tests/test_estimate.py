"""The memory plan (moe/plan/memory_plan.py, tools/estimate.py) against independent numbers:
hand-computed state bytes, a real run's tracked activations, and the expert layout rule."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from floe.config import PRESETS
from floe.plan.memory_plan import EstimateSpec, build_shard, fake_process_group, measure_activations, optimizer_groups, \
    state_bytes
from floe.plan.tensor_memory import PeakMemoryTracker

TINY = PRESETS["tiny"]
# tiny by hand: vocab 1024, hidden 64, 2 layers, 4 heads of 16, 2 kv heads, dense ffn 64, 8 experts of 64
SHAPE = dict(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, dense_ffn=64,
             expert_ffn=64, num_experts=8)
assert {k: getattr(TINY, k) for k in SHAPE} == SHAPE, "the tiny preset changed: redo the hand counts below"
EMBED = HEAD = 1024 * 64
PER_LAYER_DENSE = (64 * 64 * 2 + 32 * 64 * 2) + 3 * 64 * 64 + 8 * 64  # attention, dense MLP, router
NORMS = 2 * 3 * 64 + 64  # three per block, the final one
EXPERTS_PER_LAYER = 8 * 3 * 64 * 64

REPO = Path(__file__).resolve().parents[1]


def _states(world_size, ep_size, zero_stage, precision, overlap=False, bucket=1000):
    spec = EstimateSpec(TINY, world_size=world_size, ep_size=ep_size, zero_stage=zero_stage, precision=precision,
                        reduce_bucket_size=bucket, overlap_comm=overlap)
    with fake_process_group(world_size, 0) if ep_size > 1 else _nothing():
        model, _ = build_shard(TINY, ep_size)
        return state_bytes(spec, model, optimizer_groups(model, spec))


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _aligned(numel, parts):
    return math.ceil(numel / (2 * parts)) * 2 * parts  # DeepSpeed pads each flat group to 2 x partitions


def test_state_bytes_stage0_fp32_by_hand():
    n = EMBED + HEAD + 2 * (PER_LAYER_DENSE + EXPERTS_PER_LAYER) + NORMS
    assert n == 378304
    s = _states(1, 1, 0, "fp32")
    assert s == {"weights": 4 * n, "grads": 4 * n, "master": 0, "adam": 8 * n, "buckets": 0}


def test_state_bytes_stage0_ep2_fp32_by_hand():
    dense = EMBED + HEAD + 2 * PER_LAYER_DENSE + NORMS
    experts = 2 * EXPERTS_PER_LAYER // 2  # 4 of 8 experts per rank
    s = _states(4, 2, 0, "fp32")
    assert s == {"weights": 4 * (dense + experts), "grads": 4 * (dense + experts), "master": 0,
                 "adam": 8 * (dense + experts), "buckets": 0}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_state_bytes_stage2_ep2_by_hand(precision):
    world, ep = 6, 2  # dense over 6 ranks, experts over 3 (padding in the norm group: 448 -> 456)
    decay = EMBED + HEAD + 2 * PER_LAYER_DENSE
    no_decay = NORMS
    experts = 2 * EXPERTS_PER_LAYER // 2
    flat = [_aligned(decay, world), _aligned(no_decay, world), _aligned(experts, world // ep)]
    assert flat[1] == 456
    part = flat[0] // world + flat[1] // world + flat[2] // (world // ep)
    width = 2 if precision == "bf16" else 4
    s = _states(world, ep, 2, precision, overlap=True, bucket=1000)
    assert s == {"weights": width * sum(flat), "master": 4 * part, "adam": 8 * part,
                 # bf16 + fp32 accumulation: the fp32 partition buffer; fp32: grads_in_partition
                 "grads": 4 * part, "buckets": 2 * 1000 * width}


def test_state_bytes_stage2_ep1_and_bf16_stage1_by_hand():
    n = 378304
    s = _states(4, 1, 2, "fp32", overlap=False, bucket=500)
    dense = [_aligned(n - NORMS, 4), _aligned(NORMS, 4)]
    part = sum(dense) // 4
    assert s == {"weights": 4 * sum(dense), "grads": 4 * part, "master": 4 * part, "adam": 8 * part,
                 "buckets": 4 * 500}
    s1 = _states(4, 1, 1, "bf16")  # BF16_Optimizer: fp32 gradients of the whole flat group, no bucket
    assert s1 == {"weights": 2 * sum(dense), "grads": 4 * sum(dense), "master": 4 * part, "adam": 8 * part,
                  "buckets": 0}


def test_state_bytes_stage0_bf16_by_hand():
    """bf16 at ZeRO-0 (DeepSpeed's FP16_Optimizer in bf16 mode): bf16 weights and gradients, an fp32
    master copy and fp32 moments of every element; the step flattens the gradients to fp32."""
    n = EMBED + HEAD + 2 * (PER_LAYER_DENSE + EXPERTS_PER_LAYER) + NORMS
    s = _states(1, 1, 0, "bf16")
    assert s == {"weights": 2 * n, "grads": 2 * n, "master": 4 * n, "adam": 8 * n, "buckets": 0}
    from floe.plan.memory_plan import transient_bytes

    spec = EstimateSpec(TINY, world_size=1, precision="bf16", zero_stage=0, device="cpu")
    model, _ = build_shard(TINY, 1)
    groups = optimizer_groups(model, spec)
    largest = max(g.numel for g in groups)
    extra = transient_bytes(spec, model, groups)
    assert extra["reduce"] == 2 * largest  # the engine's all-reduce flattens bf16 gradients
    assert extra["step"] >= 4 * n + 4 * largest  # fp32 flat gradients of every group + one group's copies


def _real_activations(num_layers, batch, seq, checkpointing="none"):
    """A real forward + backward of the real model with real routing, tracked the same way."""
    from floe.model import ArcticForCausalLM, apply_activation_checkpointing

    torch.manual_seed(0)
    model = ArcticForCausalLM(TINY.replace(num_layers=num_layers))
    apply_activation_checkpointing(model, checkpointing)
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    ids = torch.randint(0, TINY.vocab_size, (batch, seq))
    with PeakMemoryTracker() as mem:
        out = model(ids, position_ids=torch.arange(seq).expand(batch, seq), labels=ids,
                    attention_mask=torch.ones(batch, seq, dtype=torch.long))
        (out.lm_loss_sum + out.aux_loss).backward()
    return mem.peak_bytes


@pytest.mark.parametrize("num_layers,batch,checkpointing",
                         [(1, 4, "none"), (2, 2, "none"), (2, 4, "full"), (2, 4, "selective")])
def test_fake_activations_match_a_real_run(num_layers, batch, checkpointing):
    spec = EstimateSpec(TINY, world_size=1, precision="fp32", kernels="reference", device="cpu",
                        seq_len=128, routing="balanced", activation_checkpointing=checkpointing)
    fake = measure_activations(spec, num_layers, batch)
    real = _real_activations(num_layers, batch, 128, checkpointing)
    assert abs(fake - real) <= 0.15 * real, (fake, real)


def test_full_checkpointing_keeps_the_block_input_and_what_came_over_the_network():
    """Under train.activation_checkpointing=full a block keeps its input, the rows its experts
    received and the rows the combine brought back (neither can be recomputed without repeating
    the all-to-all), and the routing plan; nothing else D- or F-wide."""
    spec = EstimateSpec(TINY, world_size=1, precision="fp32", kernels="reference", device="cpu", seq_len=128,
                        routing="balanced", activation_checkpointing="full")
    per_layer = measure_activations(spec, 3, 2) - measure_activations(spec, 2, 2)
    tokens, d = 2 * 128, TINY.hidden_size
    rows = tokens * TINY.top_k  # balanced routing at capacity 1.25 drops nothing
    must = 4 * (tokens * d + rows * d + rows * d)  # block input, received rows, combined rows (fp32)
    routing = per_layer - must  # probabilities [T, E], choices and weights [T, k], row indices [A]
    assert 0 < routing < 4 * tokens * d // 2, (per_layer, must)


def test_worst_routing_holds_more_than_balanced_under_expert_parallelism():
    spec = EstimateSpec(TINY, world_size=4, ep_size=2, precision="fp32", kernels="reference", device="cpu",
                        seq_len=128)
    with fake_process_group(4, 1):
        worst = measure_activations(spec, 1, 2)
        balanced = measure_activations(spec.__class__(**{**spec.__dict__, "routing": "balanced"}), 1, 2)
    assert worst > balanced


@pytest.mark.parametrize("preset,ep_size,rank", [("arctic_480b", 128, 37), ("tiny", 8, 203), ("tiny", 2, 255)])
def test_rank_dry_run_holds_the_layout_rules_experts(preset, ep_size, rank, capsys):
    from tools.estimate import main

    cfg = PRESETS[preset]
    main(["--dry-run", "--json", f"model={preset}", f"parallel.ep_size={ep_size}", "+world_size=256",
          f"+rank={rank}"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # The rule (moe/parallel/groups.py): expert-parallel groups are blocks of ep_size consecutive
    # ranks; position p in the block owns experts [p*E/ep, (p+1)*E/ep).
    local = cfg.num_experts // ep_size
    position = rank % ep_size
    assert out["experts"] == list(range(position * local, (position + 1) * local))
    total, _ = cfg.num_params()
    expert_params = cfg.num_layers * local * 3 * cfg.hidden_size * cfg.expert_ffn
    dense = total - cfg.num_layers * cfg.num_experts * 3 * cfg.hidden_size * cfg.expert_ffn
    assert out["params_per_rank"] == dense + expert_params
    assert out["expert_params"] == expert_params


def test_tool_json_has_the_documented_keys(capsys):
    from tools.estimate import main

    main(["--json", "model=tiny", "train.device=cpu", "data.seq_len=64", "train.micro_batch_size=2",
          "+world_size=1", "+gpu_mem_gb=1"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("params_per_rank", "weights_gb", "grads_gb", "optimizer_gb", "activations_gb", "buffers_gb",
                "total_gb", "gpu_mem_gb", "fits", "max_micro_batch", "experts"):
        assert key in out, key
    assert out["fits"] is True and out["max_micro_batch"] >= 2
    parts = out["weights_gb"] + out["grads_gb"] + out["optimizer_gb"] + max(
        out["activations_gb"] + out["buffers_gb"], out["step_extra_gb"], out["reduce_extra_gb"])
    assert out["total_gb"] == pytest.approx(parts)


def test_tool_names_a_bad_key(capsys):
    from tools.estimate import main

    for args, key in ((["model=tiny", "+routing=sometimes"], r"\+routing"),
                      (["model=tiny", "parallel.ep_size=3", "+world_size=6"], "parallel.ep_size"),
                      (["model=tiny", "--measure"], "add train.device=cpu")):
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2 and re.search(key, capsys.readouterr().err)


@pytest.mark.parametrize("args, message", [
    (["model=nope"], "Could not find 'model/nope'"),
    (["trian.max_steps=5"], "Could not override 'trian.max_steps'"),
    (["data.seq_len=abc"], "data.seq_len must be an integer"),
    (["model=tiny", "+world_size=3", "parallel.ep_size=2"], "invalid estimate config"),
])
def test_tool_config_errors_exit_2_without_a_traceback(args, message, capsys):
    """Hydra's errors and floe's both print one floe: message and exit 2."""
    from tools.estimate import main

    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("floe: ") and message in err and len(err.splitlines()) <= 4


def test_tool_run_as_the_readme_does_fails_like_training():
    out = subprocess.run([sys.executable, "tools/estimate.py", "model=nope"], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 2 and out.stderr.startswith("floe: ") and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.splitlines()) == 1 and out.stdout == ""


@pytest.mark.slow  # spawns a training process
def test_measure_trains_with_the_estimators_own_keys(capsys):
    """--measure with +gpu_mem_gb/+world_size (keys training does not know) trains real steps again."""
    from tools.estimate import main

    assert main(["model=tiny", "train.device=cpu", "train.max_steps=1", "train.global_batch_size=2",
                 "train.micro_batch_size=2", "data.seq_len=64", "data.num_examples=40", "data.eval_fraction=0",
                 "+gpu_mem_gb=8", "+world_size=1", "--measure", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 < out["measured_peak_gb"] and out["gpu_mem_gb"] == 8
    assert 0.5 < out["total_gb"] / out["measured_peak_gb"] < 3
    for args, named in ((["model=tiny", "+routing=sometimes"], "+routing"),
                        (["model=tiny", "parallel.ep_size=3", "+world_size=6"], "parallel.ep_size")):
        with pytest.raises(SystemExit) as stop:  # a tool's config error: one line naming the key, exit 2
            main(args)
        assert stop.value.code == 2 and named in capsys.readouterr().err


def _plan_over_measured(overrides: list[str], run_dir) -> float:
    """tools/estimate.py's plan for a launch config over the peak of real training steps of it
    (tools/gpu_check_steps.py measure_steps: the op-level tracker on a CPU, the CUDA allocator on a GPU)."""
    from tools.gpu_check_steps import measure_steps, memory_plan

    measured = measure_steps(overrides, str(run_dir), steps=1)
    return memory_plan(overrides).total_gb / measured["peak_gib"]


def test_plan_within_15_percent_of_tracked_training_tiny(tmp_path):
    """The CPU twin of the GPU test below: the whole plan (states, buffers, activations) against real
    training steps of the same config, counted op by op."""
    from tools.bench_estimate import CASES, COMMON

    _, overrides = CASES["tiny-ep1-z0"]
    ratio = _plan_over_measured([*COMMON, *overrides], tmp_path)
    assert 0.85 <= ratio <= 1.15, ratio


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_plan_within_15_percent_of_cuda_peak_small(tmp_path):
    """model=small, bf16, 4096-token rows, Triton experts, FlexAttention (tools/gpu_check.py's small step):
    the plan against torch.cuda.max_memory_allocated."""
    from tools.gpu_check_steps import small_step_overrides

    ratio = _plan_over_measured(small_step_overrides(rehearse=False), tmp_path)
    assert 0.85 <= ratio <= 1.15, ratio


@pytest.mark.parametrize("kind", ["none", "int8", "nf4"])
def test_lora_and_qlora_state_bytes_by_hand(kind):
    """A LoRA shard (rank 4 on every target): gradients, masters and moments of the adapters only; the
    frozen base as fp32 weights or as its quantized buffers, counted by hand (nf4: half a byte per weight,
    one int8 scale per 64-weight block, one fp32 factor per group of blocks, an fp32 mean and the 16-level
    code book per matrix; int8: a byte per weight and an fp32 scale per row)."""
    from floe.lora import LoRAConfig

    lora = LoRAConfig(rank=4, alpha=8.0, quantize_base=kind)
    spec = EstimateSpec(TINY, world_size=1, precision="fp32", lora=lora, device="cpu", kernels="reference")
    model, _ = build_shard(TINY, 1, lora)
    s = state_bytes(spec, model, optimizer_groups(model, spec))
    r, d, kv = 4, 64, 32
    matrices = [(d, d), (kv, d), (kv, d), (d, d), (64, d), (64, d), (d, 64)]  # q k v o, dense w1 w3 w2 (out, in)
    experts = [(8, 64, d), (8, 64, d), (8, d, 64)]  # w1 w3 w2 stacked
    adapters = 2 * (sum(r * (o + i) for o, i in matrices) + sum(e * r * (o + i) for e, o, i in experts))
    base = 2 * (sum(o * i for o, i in matrices) + sum(e * o * i for e, o, i in experts))
    other_frozen = EMBED + HEAD + NORMS + 2 * 8 * 64  # embedding, head, norms, routers: never quantized

    def nf4(n_matrices, o, i):
        blocks = o * i // 64
        return n_matrices * (o * i // 2 + blocks + 4 * (blocks // math.gcd(blocks, 256)) + 4 + 4 * 16)

    def int8(n_matrices, o, i):
        return n_matrices * (o * i + 4 * o)

    per = {"nf4": nf4, "int8": int8}.get(kind)
    quantized = 0 if per is None else 2 * (sum(per(1, o, i) for o, i in matrices) + sum(per(e, o, i) for e, o, i in experts))
    frozen_params = other_frozen + (base if kind == "none" else 0)
    assert s == {"weights": 4 * (adapters + frozen_params) + quantized, "grads": 4 * adapters, "master": 0,
                 "adam": 8 * adapters, "buckets": 0}


@pytest.mark.parametrize("quantize_base", ["none", "nf4"])
def test_activations_extrapolate_to_a_direct_measurement_of_every_layer(quantize_base):
    """The plan's activations (measured on two depths, extrapolated linearly) against the same measurement
    of the whole 5-layer model. A quantized base's dequantized module moves the one-block peak (68 MB from
    one block to two, then 20 MB per block on a 32-expert nf4 model), which 1-and-2 extrapolated as if
    every layer added it; the plan measures 2 and 3 there."""
    from floe.lora import LoRAConfig
    from floe.plan.memory_plan import estimate

    model = TINY.replace(num_layers=5, vocab_size=256, hidden_size=128, dense_ffn=128, expert_ffn=512,
                         num_experts=16, capacity_factor=1.0)
    spec = EstimateSpec(model, world_size=1, precision="fp32", kernels="reference", device="cpu", seq_len=256,
                        activation_checkpointing="full", routing="balanced",
                        lora=LoRAConfig(rank=4, quantize_base=quantize_base))
    planned = estimate(spec).activations_gb * 2**30
    direct = measure_activations(spec, 5, 1)
    assert planned == pytest.approx(direct, rel=0.01), (planned, direct)
