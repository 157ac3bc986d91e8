"""LoRA runs end to end: launch/train.py with lora.*, their checkpoints, resume, and 2 processes vs 1."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from floe.errors import ConfigError
from launch.train import train
from tests.test_console import SMALL, launch
from tests.test_parallel_train import checkpoint_params
from tests.test_train import make_cfg, read_metrics

LORA = ["lora=default", "lora.rank=4", "lora.dropout=0.1", *SMALL]


def _size(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def test_resume_with_adapter_dropout_is_bit_exact_and_holds_adapters_only(tmp_path):
    """Adapter dropout draws from torch's RNG inside training: the resumed run must see the same masks."""
    straight = tmp_path / "straight"
    train(make_cfg(straight, *LORA, "train.max_steps=4", "train.save_every=2"))
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    (resumed / "checkpoints" / "latest").write_text("step_00000002")
    assert train(make_cfg(resumed, *LORA, "train.max_steps=4", "train.save_every=2"))["step"] == 4
    a, b = read_metrics(straight), read_metrics(resumed)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    assert [(m["loss"], m["grad_norm"]) for m in a] == [(m["loss"], m["grad_norm"]) for m in b]
    for kind in ("model", "optim"):
        sa, sb = checkpoint_params(straight, 4, kind), checkpoint_params(resumed, 4, kind)
        assert set(sa) == set(sb) and sa
        assert all(".lora." in name for name in sa), sorted(sa)[:5]  # adapters and their state only
        for name, tensor in sa.items():
            assert torch.equal(tensor, sb[name]), name
    # without dropout the second step's loss differs (the first equals: B is still zero): masks were drawn
    plain = tmp_path / "plain"
    train(make_cfg(plain, *LORA, "lora.dropout=0.0", "train.max_steps=2"))
    assert read_metrics(plain)[0]["loss"] == a[0]["loss"] and read_metrics(plain)[1]["loss"] != a[1]["loss"]


def test_lora_checkpoint_is_a_small_fraction_of_a_full_one(tmp_path):
    train(make_cfg(tmp_path / "full", *SMALL, "train.max_steps=1"))
    train(make_cfg(tmp_path / "lora", *LORA, "train.max_steps=1"))
    full = _size(tmp_path / "full" / "checkpoints" / "step_00000001")
    lora = _size(tmp_path / "lora" / "checkpoints" / "step_00000001")
    assert lora < full / 5, (lora, full)


def _hf_base(out_dir, seed):
    from floe.config import PRESETS
    from floe.data.tokenizer import Tokenizer
    from floe.hf import save_hf
    from floe.model import ArcticForCausalLM

    model = ArcticForCausalLM(PRESETS["tiny"])
    model.reset_parameters(seed=seed)
    save_hf(model.state_dict(), model.config, str(out_dir), Tokenizer())
    return model


def _back_to(run, step):
    """Simulate a crash after `step`: its checkpoint is the latest, the later ones are gone."""
    ckpt = run / "checkpoints"
    for tag in os.listdir(ckpt):
        if tag.startswith("step_") and int(tag[5:]) > step:
            shutil.rmtree(ckpt / tag)
    (ckpt / "latest").write_text(f"step_{step:08d}")


def test_resume_refuses_adapters_onto_another_base(tmp_path):
    base = tmp_path / "base"
    _hf_base(base, seed=1)
    run = tmp_path / "run"
    args = [*LORA, "train.max_steps=3", "train.save_every=1", "train.keep_last=0"]
    train(make_cfg(run, *args, f"train.init_from={base}"))
    _back_to(run, 1)
    moved = tmp_path / "moved"
    shutil.copytree(base, moved)  # the same content elsewhere: the fingerprint decides, not the path
    assert train(make_cfg(run, *args, f"train.init_from={moved}"))["step"] == 3
    _back_to(run, 2)
    _hf_base(moved, seed=2)  # same shapes and names, other weights
    with pytest.raises(ConfigError, match="adapters were trained on train.init_from=.*this run's base is"):
        train(make_cfg(run, *args, f"train.init_from={moved}"))


@pytest.mark.parametrize("override, key", [
    ("lora.rank=-1", "lora.rank"), ("lora.alpha=0", "lora.alpha"), ("lora.targets=[attention,lm_head]", "lora.targets"),
    ("lora.dropout=1.5", "lora.dropout"), ("model.freeze_moe=true", "model.freeze_moe"),
])
def test_bad_lora_config_is_one_clean_error(tmp_path, override, key):
    proc = launch(f"run.dir={tmp_path / 'run'}", "lora=default", override, *SMALL)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert key in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_arctic_lora_recipe_requires_init_from(tmp_path):
    proc = launch(f"run.dir={tmp_path / 'run'}", "+experiment=arctic_lora", "log.wandb=disabled")
    assert proc.returncode == 2 and "train.init_from is required" in proc.stderr, proc.stderr[-2000:]


# ---- 2 processes (expert parallelism 2, ZeRO-2) against 1 -------------------------------------------------------

PARALLEL = ["model.capacity_factor=null", "lora=default", "lora.rank=4", "lora.dropout=0.0", "lora.alpha=16",
            "optim.lr=1e-2", "train.global_batch_size=8", "train.micro_batch_size=2", "train.max_steps=3",
            "train.save_every=1", "train.keep_last=0", "data.num_examples=400", "data.seq_len=64",
            "log.wandb=disabled", "run.name=test"]


def _checked_lora_worker(rank, world_size, run_dir, base_dir, overrides):
    """Train; then, on this rank's engine: the frozen base still equals the files it was loaded from, bit for
    bit, and DeepSpeed's optimizer holds (partitions of) the adapters only."""
    from safetensors.torch import load_file

    from floe.hf import from_hf
    from floe.layer import expert_tensors
    from floe.quantize import quantized_weights
    from floe.run import trainer
    from tests.test_parallel_train import _compose

    fit, seen = trainer.Trainer.fit, {}

    def checked_fit(self):
        record = fit(self)
        model = self.engine.model
        files = from_hf(load_file(os.path.join(base_dir, "model.safetensors")), model.config)
        experts = expert_tensors(model)
        frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
        seen["base_equal"] = all(
            torch.equal(p, files[n][experts[n][0]:experts[n][0] + p.shape[0]] if n in experts else files[n])
            for n, p in frozen.items())
        seen["frozen"] = len(frozen)
        seen["quantized"] = sorted({n.split(".")[-2] for n in quantized_weights(model)})  # e.g. experts, q_proj
        seen["frozen_with_grad"] = [n for n, p in frozen.items() if p.grad is not None]
        seen["optimizer_numel"] = self.engine.optimizer_numel()
        seen["trainable_numel"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        seen["total_numel"] = sum(p.numel() for p in model.parameters())
        return record

    trainer.Trainer.fit = checked_fit
    from launch.train import train as train_
    train_(_compose(run_dir, [f"train.init_from={base_dir}", *overrides]))
    return seen


@pytest.fixture(scope="module")
def lora_base_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("base")
    _hf_base(base, seed=5)
    return str(base)


@pytest.mark.slow
@pytest.mark.parametrize("base", ["none", "nf4"])
def test_two_processes_ep2_zero2_equal_one_process(tmp_path, lora_base_dir, base):
    """nf4: QLoRA's block-by-block load (floe.run.init_from.load_quantized) on each rank quantizes its own
    experts' slice; the ranks together compute what one process does."""
    from floe.testing.distributed import run_distributed
    from tests.test_parallel_train import metrics

    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    common = [*PARALLEL, f"lora.quantize_base={base}"]
    [seen1] = run_distributed(_checked_lora_worker, 1, args=(one, lora_base_dir, common), timeout=120)
    seen2 = run_distributed(_checked_lora_worker, 2, args=(two, lora_base_dir, [
        *common, "parallel.ep_size=2", "parallel.zero_stage=2"]), timeout=180)
    for seen in (seen1, *seen2):
        assert seen["base_equal"] and seen["frozen"] > 0 and not seen["frozen_with_grad"], seen
        assert ("experts" in seen["quantized"]) == (base != "none"), seen
        assert seen["trainable_numel"] < 0.3 * seen["total_numel"], seen
    assert seen1["optimizer_numel"] == seen1["trainable_numel"]  # ZeRO-0: the adapters themselves
    for seen in seen2:  # ZeRO-2: this rank's partition of the adapters (dense halved, its 4 experts' whole)
        assert 0 < seen["optimizer_numel"] < seen["trainable_numel"], seen
    for step in (1, 2, 3):
        got, ref = checkpoint_params(two, step), checkpoint_params(one, step)
        assert set(got) == set(ref) and all(".lora." in n for n in ref)
        assert any(n.endswith("experts.lora.w2_B") for n in ref)
        # Adam's moments are the gradients' running statistics: equal within fp32 summation order
        moments, moments_ref = checkpoint_params(two, step, "optim"), checkpoint_params(one, step, "optim")
        assert set(moments) == set(moments_ref)
        for name in moments_ref:
            scale = moments_ref[name].abs().max().item()
            torch.testing.assert_close(moments[name], moments_ref[name], rtol=0, atol=1e-4 * scale + 1e-12, msg=name)
        # the weights within 1% of one step (Adam turns a gradient near its eps into a step of any sign:
        # 1e-6 relative noise on a 1e-10 gradient moved one adapter entry by 1e-4)
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=0, atol=2e-4, msg=f"step {step}: {name}")
    for ma, mb in zip(metrics(two), metrics(one)):
        assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-5) and ma["grad_norm"] == pytest.approx(
            mb["grad_norm"], rel=1e-4)
