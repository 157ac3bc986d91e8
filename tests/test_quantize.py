"""floe.quantize against torchao's own (de)quantization, and a quantized model against the same model
holding the dequantized weights as ordinary frozen parameters (reference and Triton kernels, 2 ranks)."""
import copy
import shutil
import gc
import os
import subprocess
import sys
import weakref

import pytest
import torch

from floe.config import PRESETS
from floe.model import ArcticForCausalLM
from floe.quantize import (QuantizedWeight, apply_quantize_base, dequantize_base_, quantize_base_errors,
                           quantized_weights)
from floe.testing.distributed import run_distributed
from tests import REPO

torchao = pytest.importorskip("torchao")
from torchao.quantization import quant_primitives as qp  # noqa: E402
from torchao.quantization import to_nf4  # noqa: E402

TARGETS = ("attention", "dense_mlp", "experts")


@pytest.mark.parametrize("shape,scaler_block", [((3, 64, 128), 128), ((32, 64), 32), ((2, 48, 64), 16)])
def test_nf4_dequantize_equals_torchao(shape, scaler_block):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.02
    got = QuantizedWeight(w, "nf4").dequantize()
    w_EOI = w.reshape(-1, *shape[-2:])
    ref = torch.stack([to_nf4(w_EOI[e].contiguous(), 64, scaler_block).get_original_weight()
                       for e in range(w_EOI.shape[0])]).reshape(shape)
    assert torch.equal(got, ref)
    # NF4 is lossy: within half a code step of the largest level gap (0.28 of a block's absmax)
    assert (got - w).abs().max() <= 0.16 * w.abs().max()


def test_int8_dequantize_equals_torchao():
    torch.manual_seed(1)
    w = torch.randn(4, 24, 40)
    got = QuantizedWeight(w, "int8").dequantize()
    for e in range(4):
        block = (1, 40)
        scale, zero = qp.choose_qparams_affine(w[e], qp.MappingType.SYMMETRIC, block, torch.int8,
                                               scale_dtype=torch.float32)
        q = qp.quantize_affine(w[e], block, scale, zero, torch.int8)
        assert torch.equal(got[e], qp.dequantize_affine(q, block, scale, zero, torch.int8))
    # per-output-row absmax: every row's error within half a step of its own scale
    step = w.abs().amax(-1, keepdim=True) / 127
    assert ((got - w).abs() <= 0.51 * step).all()


def test_dequantize_to_bf16_is_the_fp32_result_rounded():
    w = torch.randn(2, 64, 64)
    q = QuantizedWeight(w, "nf4")
    assert torch.equal(q.dequantize(torch.bfloat16), q.dequantize().to(torch.bfloat16))


def frozen_tiny(seed=1):
    model = ArcticForCausalLM(PRESETS["tiny"])
    model.reset_parameters(seed=seed)
    for block in model.layers:
        for m in (block.attn, block.mlp, block.moe.experts):
            m.requires_grad_(False)
    return model


def quantized_and_reference(kind, targets=TARGETS):
    """(model with a quantized base, the same model holding the dequantized base as frozen parameters)."""
    q = frozen_tiny()
    apply_quantize_base(q, kind, targets)
    ref = dequantize_base_(copy.deepcopy(q))
    return q, ref


def batch(seed=0, b=2, s=24):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1024, (b, s), generator=g)
    pos = torch.cat([torch.arange(10), torch.arange(s - 10)]).expand(b, s)  # two packed examples a row
    return ids, pos


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("checkpointing", ["none", "full"])
def test_quantized_model_equals_dequantized_weights(kind, checkpointing):
    from floe.model import apply_activation_checkpointing

    q, ref = quantized_and_reference(kind)
    for m in (q, ref):
        apply_activation_checkpointing(m, checkpointing)
    assert not any(".experts.w" in n or "_proj" in n or ".mlp." in n for n, _ in q.named_parameters())
    ids, pos = batch()
    outs = [m(ids, position_ids=pos, labels=ids) for m in (q, ref)]
    assert torch.equal(outs[0].logits, outs[1].logits)
    for o in outs:
        o.loss.backward()
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in (q, ref)]
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 11  # norms, embedding, router, head
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_only_targeted_weights_are_quantized():
    q = frozen_tiny()
    names = apply_quantize_base(q, "nf4", ["experts"])
    assert sorted(names) == [f"layers.{i}.moe.experts.{w}" for i in range(2) for w in ("w1", "w2", "w3")]
    assert sorted(quantized_weights(q)) == sorted(names)
    assert q.layers[0].attn.q_proj.weight.dtype == torch.float32  # still a parameter
    assert "experts 0..7 of 8, w1 (8, 64, 64)" in repr(q)  # printing a QLoRA model works


def test_no_dequantized_weight_lives_between_forward_and_backward():
    q, _ = quantized_and_reference("nf4")
    experts, seen = q.layers[0].moe.experts, []
    experts.register_forward_hook(lambda m, a, o: seen.append(weakref.ref(m.w1)), prepend=True)
    q.layers[0].moe.gate.weight.requires_grad_(True)
    ids, pos = batch()
    out = q(ids, position_ids=pos, labels=ids)
    gc.collect()
    assert seen[-1]() is None  # backward will dequantize it again
    out.loss.backward()
    assert q.layers[0].moe.gate.weight.grad.abs().sum() > 0
    # Called outside the model's forward, the same module keeps the weight its backward needs:
    x = torch.randn(6, 64, requires_grad=True)
    y = experts(x, torch.tensor([2, 0, 1, 0, 3, 0, 0, 0]))
    gc.collect()
    assert seen[-1]() is not None
    y.sum().backward()


def test_buffers_are_integers_a_bf16_cast_leaves_alone():
    q, _ = quantized_and_reference("nf4")
    before = {n: b.clone() for n, b in q.named_buffers()}
    assert before and all(not b.is_floating_point() for b in before.values())
    q.to(torch.bfloat16)
    assert all(torch.equal(b, before[n]) for n, b in q.named_buffers())
    ids, pos = batch()
    with torch.no_grad():
        logits = q(ids, position_ids=pos).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_quantized_base_is_smaller():
    q = frozen_tiny()
    full = {n: p.numel() * 4 for n, p in q.named_parameters() if not p.requires_grad}
    stored = {n: w.nbytes() for n, w in apply_quantize_base(q, "nf4", TARGETS).items()}
    assert stored.keys() == full.keys()
    assert sum(stored.values()) / sum(full.values()) < 0.14  # 4.2 bits of 32


def test_refusals_name_the_key():
    model = ArcticForCausalLM(PRESETS["tiny"])  # nothing frozen
    errors = quantize_base_errors(model, "nf4", ["experts", "lm_head"])
    assert any("unknown target 'lm_head'" in e for e in errors)
    errors = quantize_base_errors(model, "nf4", ["experts"])
    assert errors and all("is trainable" in e for e in errors)
    assert "lora.quantize_base must be one of" in quantize_base_errors(model, "nf8", ["experts"])[0]
    odd = ArcticForCausalLM(PRESETS["tiny"].replace(hidden_size=40, dense_ffn=40, expert_ffn=33))
    odd.requires_grad_(False)
    assert any("not a multiple of the NF4 block" in e for e in quantize_base_errors(odd, "nf4", ["experts"]))
    with pytest.raises(ValueError, match="is trainable"):
        apply_quantize_base(model, "int8", ["attention"])


TRITON_SCRIPT = """
import torch
from floe.model import apply_kernel_backend
from tests.test_quantize import batch, quantized_and_reference
q, ref = quantized_and_reference("nf4")
ids, pos = batch()
out = {}
for backend in ("triton", "reference"):
    for name, m in (("q", q), ("ref", ref)):
        apply_kernel_backend(m, backend)
        m.zero_grad(set_to_none=True)
        o = m(ids, position_ids=pos, labels=ids)
        o.loss.backward()
        out[backend, name] = (o.logits, [p.grad for p in m.parameters() if p.requires_grad])
assert torch.equal(out["triton", "q"][0], out["triton", "ref"][0])
assert all(torch.equal(a, b) for a, b in zip(out["triton", "q"][1], out["triton", "ref"][1]))
torch.testing.assert_close(out["triton", "q"][0], out["reference", "q"][0], rtol=1e-4, atol=1e-5)
for a, b in zip(out["triton", "q"][1], out["reference", "q"][1]):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
print("ok")
"""


@pytest.mark.slow  # the Triton interpreter, in a fresh process
def test_triton_path_dequantizes_then_runs_the_same_grouped_gemm():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    if torch.cuda.is_available():
        env.pop("TRITON_INTERPRET")
    proc = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def _sharded_worker(rank, world_size):
    from floe.parallel import apply_expert_parallel, build_parallel_groups, init_distributed

    init_distributed(torch.device("cpu"), timeout_s=60)
    model = ArcticForCausalLM(PRESETS["tiny"])
    apply_expert_parallel(model, build_parallel_groups(world_size))
    model.reset_parameters(seed=1)  # keyed init: this rank's rows of the 1-process experts
    for block in model.layers:
        for m in (block.attn, block.mlp, block.moe.experts):
            m.requires_grad_(False)
    apply_quantize_base(model, "nf4", TARGETS)  # after sharding: each rank quantizes its own experts
    ids, pos = batch(seed=rank)
    out = model(ids, position_ids=pos, labels=ids)
    out.loss.backward()  # the backward's all-to-all re-dequantizes this rank's experts
    return {"buffers": {n: b for n, b in model.named_buffers() if ".experts." in n},
            "loss": out.lm_loss_sum.detach()}


@pytest.mark.slow  # spawns processes
def test_expert_parallel_shards_quantize_as_slices_of_one_process():
    results = run_distributed(_sharded_worker, 2, timeout=120)
    q, _ = quantized_and_reference("nf4")
    half = PRESETS["tiny"].num_experts // 2
    full = {n: b for n, b in q.named_buffers() if ".experts." in n}
    for r in range(2):
        got = results[r]["buffers"]
        assert got.keys() == full.keys()
        for name, buf in full.items():
            assert torch.equal(got[name], buf[r * half:(r + 1) * half]), (r, name)
    for r in range(2):  # each rank's own rows through the all-to-all: the 1-process loss of those rows
        q.zero_grad(set_to_none=True)
        ids, pos = batch(seed=r)
        out = q(ids, position_ids=pos, labels=ids)
        torch.testing.assert_close(results[r]["loss"], out.lm_loss_sum.detach())


# ---- QLoRA runs end to end (launch/train.py with lora.quantize_base) --------------------------------------

from launch.train import train  # noqa: E402
from tests.test_console import SMALL, launch  # noqa: E402
from tests.test_parallel_train import checkpoint_params  # noqa: E402
from tests.test_train import make_cfg, read_metrics  # noqa: E402

QLORA = ["lora=default", "lora.rank=4", *SMALL]


def test_qlora_loss_tracks_the_unquantized_lora_run(tmp_path):
    """The same LoRA run on an fp32, an int8 and an NF4 base (fresh init, seed 0), 8 steps: every step's loss
    within the quantization's own effect (measured: int8 <= 0.0012, nf4 <= 0.0057 of ~6.9 over 12 steps),
    never equal (the base really is quantized), int8 closer than nf4."""
    losses = {}
    for kind in ("none", "int8", "nf4"):
        train(make_cfg(tmp_path / kind, *QLORA, "lora.dropout=0.0", f"lora.quantize_base={kind}", "train.max_steps=8"))
        losses[kind] = [m["loss"] for m in read_metrics(tmp_path / kind)]
    gap = {k: max(abs(a - b) for a, b in zip(losses[k], losses["none"])) for k in ("int8", "nf4")}
    assert 0 < gap["int8"] < gap["nf4"] < 0.015, gap
    assert gap["int8"] < 0.004, gap


def test_qlora_resume_with_dropout_is_bit_exact(tmp_path):
    args = [*QLORA, "lora.dropout=0.1", "lora.quantize_base=nf4", "train.max_steps=4", "train.save_every=2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(make_cfg(straight, *args))
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    (resumed / "checkpoints" / "latest").write_text("step_00000002")
    assert train(make_cfg(resumed, *args))["step"] == 4
    a, b = read_metrics(straight), read_metrics(resumed)
    assert [(m["loss"], m["grad_norm"]) for m in a] == [(m["loss"], m["grad_norm"]) for m in b]
    for kind in ("model", "optim"):  # adapters and their Adam moments, bit for bit; no quantized base saved
        sa, sb = checkpoint_params(straight, 4, kind), checkpoint_params(resumed, 4, kind)
        assert set(sa) == set(sb) and sa and all(".lora." in n for n in sa)
        assert all(torch.equal(t, sb[n]) for n, t in sa.items())


@pytest.mark.parametrize("overrides, message", [
    (["lora.quantize_base=nf4"], "lora.quantize_base=nf4 needs adapters to train (lora.rank > 0)"),
    (["lora=default", "lora.quantize_base=fp4"], "lora.quantize_base must be one of none, int8, nf4"),
    (["lora=default", "lora.quantize_base=nf4", "model.hidden_size=40", "model.dense_ffn=40", "model.expert_ffn=33"],
     "not a multiple of the NF4 block"),
])
def test_bad_quantize_base_is_one_clean_error(tmp_path, overrides, message):
    proc = launch(f"run.dir={tmp_path / 'run'}", *overrides, *SMALL)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def _qlora_worker(rank, world_size, run_dir, overrides):
    """Train through the Trainer and return what the engine holds afterwards."""
    from floe.data import build_dataset
    from floe.parallel import init_distributed, teardown
    from floe.run.trainer import Trainer
    from launch.train import parse_config

    c = parse_config(make_cfg(run_dir, *overrides))
    _, dataset = build_dataset(c.data, seed=c.train.seed)
    init_distributed(torch.device("cpu"))
    try:
        trainer = Trainer(c, {}, dataset, torch.device("cpu"))
        trainer.fit()
        model = trainer.engine.model
        return {"buffers": dict(model.named_buffers()), "metrics": read_metrics(run_dir) if rank == 0 else None,
                "trainable_dtypes": sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})}
    finally:
        teardown()


@pytest.mark.slow  # spawns processes
def test_qlora_under_deepspeed_bf16_and_expert_parallel(tmp_path):
    """2 processes at ep 2 / ZeRO-2 in bf16 against 1 process: DeepSpeed casts the adapters to bf16 but
    leaves the quantized base as it was quantized (integer buffers, never broadcast over the expert shards:
    each rank keeps its own experts' blocks), and the losses agree."""
    args = [*QLORA, "lora.dropout=0.0", "lora.quantize_base=nf4", "train.precision=bf16", "parallel.zero_stage=2",
            "train.max_steps=3"]
    one, = run_distributed(_qlora_worker, 1, args=(str(tmp_path / "one"), args), timeout=300)
    two = run_distributed(_qlora_worker, 2, args=(str(tmp_path / "two"), [*args, "parallel.ep_size=2"]), timeout=300)
    fresh = frozen_tiny(seed=0)  # the base both runs built (fresh init, train.seed=0), quantized here
    apply_quantize_base(fresh, "nf4", TARGETS)
    expected = dict(fresh.named_buffers())
    assert set(one["buffers"]) == set(two[0]["buffers"]) == set(expected)
    half = PRESETS["tiny"].num_experts // 2
    for name, buf in expected.items():
        assert torch.equal(one["buffers"][name], buf), name
        for r in range(2):
            want = buf[r * half:(r + 1) * half] if ".experts." in name else buf
            assert torch.equal(two[r]["buffers"][name], want), (r, name)
    assert one["trainable_dtypes"] == two[0]["trainable_dtypes"] == ["torch.bfloat16"]
    for a, b in zip(one["metrics"], two[0]["metrics"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-2), (a, b)


def test_arctic_qlora_recipe_requires_init_from(tmp_path):
    proc = launch(f"run.dir={tmp_path / 'run'}", "+experiment=arctic_qlora", "log.wandb=disabled")
    assert proc.returncode == 2 and "train.init_from is required" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_merged_export_of_a_qlora_model_dequantizes_the_base(kind):
    """merged_state_dict (what the merged export writes): the plain model's names, the dequantized base
    plus each adapter's scaling * B A; with B still zero, exactly the dequantized base. The model keeps
    its quantized base and still runs."""
    from floe.lora import LoRAConfig, adapters, apply_lora, merge_lora, merged_state_dict

    model = ArcticForCausalLM(PRESETS["tiny"])
    model.reset_parameters(seed=1)
    plain_names = set(model.state_dict())
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0), seed=0)
    apply_quantize_base(model, kind, TARGETS)
    base = {n: q.dequantize() for n, q in quantized_weights(model).items()}
    merged = merged_state_dict(model)
    assert set(merged) == plain_names
    assert all(torch.equal(merged[n], w) for n, w in base.items())
    with torch.no_grad():
        for _, a in adapters(model):
            for name, p in a.named_parameters():
                if "B" in name.split(".")[-1]:
                    p.normal_()
    merged = merged_state_dict(model)
    q_proj, experts = model.layers[0].attn.q_proj.lora, model.layers[1].moe.experts.lora
    torch.testing.assert_close(merged["layers.0.attn.q_proj.weight"], base["layers.0.attn.q_proj.weight"]
                               + q_proj.delta())
    torch.testing.assert_close(merged["layers.1.moe.experts.w2"], base["layers.1.moe.experts.w2"] + experts.delta("w2"))
    ids, pos = batch()
    with torch.no_grad():  # the merged weights in a plain model compute what the QLoRA model computes
        plain = ArcticForCausalLM(PRESETS["tiny"])
        plain.load_state_dict(merged)
        torch.testing.assert_close(plain(ids, position_ids=pos).logits, model(ids, position_ids=pos).logits,
                                   rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="the base is quantized"):
        merge_lora(model)


def test_merged_export_of_a_qlora_run_is_the_dequantized_base_plus_the_adapters(tmp_path):
    from floe.lora import adapters
    from tools.export import export, load_checkpoint_model, resolve_checkpoint
    from tools.generate import load_model_for_inference

    run = tmp_path / "run"
    train(make_cfg(run, *QLORA, "lora.dropout=0.0", "lora.quantize_base=nf4", "train.max_steps=2"))
    export(str(run), str(tmp_path / "hf"))
    exported = load_model_for_inference(str(tmp_path / "hf"))[0].state_dict()
    trained, _ = load_checkpoint_model(*resolve_checkpoint(str(run)))
    base = frozen_tiny(seed=0)  # the run's base: fresh init of train.seed=0
    delta = {f"{name.rsplit('.', 1)[0]}.{w}": a.delta(w) for name, a in adapters(trained) if ".experts." in name
             for w in ("w1", "w3", "w2")}
    assert len(delta) == 6
    for name, d in delta.items():
        weight = dict(base.named_parameters())[name]
        dequantized = QuantizedWeight(weight, "nf4").dequantize()
        torch.testing.assert_close(exported[name], dequantized + d, rtol=0, atol=1e-7)
        assert d.abs().max() > 0 and (exported[name] - (weight + d)).abs().max() > 1e-4  # not the fp32 base
    ids, pos = batch()
    with torch.no_grad():
        # dropless: the exported config's drop policy is Arctic's ("position"), the run's "probs"
        torch.testing.assert_close(
            load_model_for_inference(str(tmp_path / "hf"))[0](ids, position_ids=pos, dropless=True).logits,
            trained.eval()(ids, position_ids=pos, dropless=True).logits, rtol=1e-4, atol=1e-5)
