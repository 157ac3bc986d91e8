"""`train.init_from`: a floe run started from a Hugging Face Arctic directory written by
tools/export.py. References: the exported model evaluated directly (the safetensors file read
in memory with from_hf, a plain forward per micro-batch), the exported tensors themselves, and an
uninterrupted run (for resume)."""
from __future__ import annotations

import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from launch.train import parse_config, train
from floe.config import PRESETS
from floe.data import DataConfig, StepLoader, build_dataset
from floe.hf import from_hf, read_hf_config
from floe.model import ArcticForCausalLM
from floe.testing.distributed import run_distributed
from tests.test_parallel_train import checkpoint_params
from tests.test_train import make_cfg, read_metrics
from tools.export import export

# The data every run here uses; dropless, so a loss does not depend on how the batch is split.
DATA = ["data.seq_len=64", "data.num_examples=200"]
BATCH = ["train.global_batch_size=4", "train.micro_batch_size=2"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny dropless run trained 3 steps, exported as a Hugging Face Arctic directory."""
    root = tmp_path_factory.mktemp("init_from")
    train(make_cfg(root / "source", "model.capacity_factor=null", "train.max_steps=3", *DATA, *BATCH))
    out = str(root / "exported")
    export(str(root / "source"), out)
    return out


def exported_model(hf_dir):
    """The exported model, read independently of load_hf_weights: whole file, from_hf, load_state_dict."""
    config = read_hf_config(hf_dir)
    model = ArcticForCausalLM(config)
    model.load_state_dict(from_hf(load_file(os.path.join(hf_dir, "model.safetensors")), config))
    return model


@torch.no_grad()
def direct_losses(hf_dir, steps):
    """The loss of each of the first `steps` global batches of the runs below, by a plain forward."""
    model = exported_model(hf_dir)
    data = DataConfig(name="synthetic", seq_len=64, num_examples=200, eval_fraction=0.05,
                      tokenizer=os.path.join(hf_dir, "tokenizer.model"))
    _, dataset = build_dataset(data, seed=0)
    loader = StepLoader(dataset, global_batch_size=4, micro_batch_size=2, dp_rank=0, dp_size=1, seed=0)
    losses = []
    for _ in range(steps):
        tokens = loader.global_loss_tokens()
        lm_sum = sum(model(**mb).lm_loss_sum.double() for mb in loader.next_step())
        losses.append(float(lm_sum) / tokens)
    return losses


def test_config_and_tokenizer_come_from_the_directory(exported, tmp_path):
    c = parse_config(make_cfg(tmp_path, f"train.init_from={exported}", "model.capacity_factor=2.0", *DATA))
    assert c.model.capacity_factor == 2.0 and c.model.hidden_size == 64  # training-only fields may differ
    assert c.data.tokenizer == os.path.join(exported, "tokenizer.model")
    with pytest.raises(ValueError, match=r"model.hidden_size=32 contradicts .*config.json \(64\)"):
        parse_config(make_cfg(tmp_path, f"train.init_from={exported}", "model.hidden_size=32", *DATA))
    other = tmp_path / "other.model"
    other.write_bytes(open(c.data.tokenizer, "rb").read() + b"x")
    with pytest.raises(ValueError, match="data.tokenizer=.*differs from train.init_from's"):
        parse_config(make_cfg(tmp_path, f"train.init_from={exported}", f"data.tokenizer={other}", *DATA))
    bare = tmp_path / "bare"  # no tokenizer.model: data.tokenizer (here floe's embedded one) stays
    shutil.copytree(exported, bare, ignore=shutil.ignore_patterns("tokenizer.model"))
    assert parse_config(make_cfg(tmp_path, f"train.init_from={bare}", *DATA)).data.tokenizer is None


def test_first_losses_equal_the_exported_model_and_lr_0_keeps_weights(exported, tmp_path):
    run = tmp_path / "run"
    train(make_cfg(run, f"train.init_from={exported}", "optim.lr=0", "train.max_steps=2", *DATA, *BATCH))
    got = [m["loss"] for m in read_metrics(run)]
    want = direct_losses(exported, 2)
    assert got == pytest.approx(want, rel=1e-6, abs=0)
    assert got[0] != got[1]  # two different batches, so the check is not vacuous
    state, reference = checkpoint_params(run, 2), exported_model(exported).state_dict()
    assert state.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(state[name], tensor), name  # lr 0: exactly as loaded


def test_resume_uses_its_own_checkpoint_not_init_from(exported, tmp_path):
    args = ["optim.lr=1e-3", "train.max_steps=4", "train.save_every=2", *DATA, *BATCH]
    straight = tmp_path / "straight"
    train(make_cfg(straight, f"train.init_from={exported}", *args))
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    (resumed / "checkpoints" / "latest").write_text("step_00000002")
    zeroed = tmp_path / "zeroed"  # same config and tokenizer, different weights
    shutil.copytree(exported, zeroed)
    weights = load_file(zeroed / "model.safetensors")
    save_file({k: torch.zeros_like(v) for k, v in weights.items()}, zeroed / "model.safetensors")
    train(make_cfg(resumed, f"train.init_from={zeroed}", *args))
    a, b = read_metrics(straight), read_metrics(resumed)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    assert [m["loss"] for m in a] == [m["loss"] for m in b]


def _ep2_worker(rank, world_size, run_dir, exported):
    from tests.test_parallel_train import _compose

    return train(_compose(run_dir, [f"train.init_from={exported}", "optim.lr=0", "train.max_steps=1",
                                    "train.global_batch_size=4", "train.micro_batch_size=2",
                                    "data.num_examples=200", "parallel.ep_size=2", "parallel.zero_stage=2"]))


@pytest.mark.slow
def test_first_loss_on_two_processes_ep2(exported, tmp_path):
    results = run_distributed(_ep2_worker, world_size=2, args=(str(tmp_path / "run"), exported), timeout=180)
    want = direct_losses(exported, 1)[0]
    for record in results:
        assert record["loss"] == pytest.approx(want, rel=1e-6, abs=0)


TINY_RECIPE = [*DATA, "train.global_batch_size=4", "train.micro_batch_size=1", "train.max_steps=2",
               "parallel.ep_size=1", "log.wandb=disabled"]


def test_arctic_sft_refuses_without_init_from(tmp_path):
    for experiment in ("arctic_sft", "arctic_sft_frozen_moe"):
        with pytest.raises(ValueError, match=r"train.init_from is required"):
            train(make_cfg(tmp_path, f"+experiment={experiment}", *TINY_RECIPE))
        assert not torch.distributed.is_initialized()
        assert not os.path.exists(tmp_path / "config.yaml")  # refused before any work


def test_arctic_sft_recipes_run_from_an_export(exported, tmp_path):
    reference = exported_model(exported).state_dict()
    for experiment, frozen in (("arctic_sft", False), ("arctic_sft_frozen_moe", True)):
        run = tmp_path / experiment
        cfg = make_cfg(run, f"+experiment={experiment}", f"train.init_from={exported}", *TINY_RECIPE)
        assert (cfg.optim.lr, cfg.train.epochs, cfg.parallel.zero_stage) == (2e-5, 2, 2)
        last = train(cfg)
        assert last["step"] == 2 and math.isfinite(last["loss"])
        state = checkpoint_params(run, 2)
        moe_names = {n for n in reference if ".moe." in n}
        for name, tensor in reference.items():
            assert torch.equal(state[name], tensor) == (frozen and name in moe_names), name
        # The optimizer holds Adam state for exactly the trainable parameters: none of the MoE's if frozen.
        optim = checkpoint_params(run, 2, "optim")
        trainable = {n for n in reference if not (frozen and n in moe_names)}
        for key in ("exp_avg", "exp_avg_sq"):
            assert {k[:-len(key) - 1] for k in optim if k.endswith("." + key)} == trainable




# ---- a QLoRA base loaded block by block (floe.run.init_from.load_quantized) ---------------------------------

def write_hf_weights(hf_dir, config, seed=3):
    """model.safetensors of a fresh model (what load_hf_weights reads; the config is the caller's)."""
    from floe.hf import to_hf

    model = ArcticForCausalLM(config)
    model.reset_parameters(seed=seed)
    os.makedirs(hf_dir, exist_ok=True)
    save_file({k: v.contiguous() for k, v in to_hf(model.state_dict(), config).items()},
              os.path.join(hf_dir, "model.safetensors"))


def qlora_loads(hf_dir, config, kind, tracked=False):
    """(model, peak bytes) of today's whole-model load then adapt_base, and of load_quantized."""
    from floe.hf import load_hf_weights
    from floe.lora import LoRAConfig
    from floe.plan.tensor_memory import PeakMemoryTracker
    from floe.run.init_from import load_quantized
    from floe.run.trainer import adapt_base

    lora = LoRAConfig(rank=4, dropout=0.0, quantize_base=kind, train_router=True)
    out = []
    for streamed in (False, True):
        with torch.device("meta"):
            model = ArcticForCausalLM(config)
        with PeakMemoryTracker("cpu") as tracker:
            if streamed:
                load_quantized(model, hf_dir, "cpu", lora, seed=5)
            else:
                load_hf_weights(model, hf_dir, "cpu")
                adapt_base(model, lora, seed=5)
        out.append((model, tracker.peak_bytes))
    return out


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_qlora_load_block_by_block_is_bit_identical_to_load_then_quantize(tmp_path, kind):
    from tests.test_quantize import batch

    config = PRESETS["tiny"].replace(num_layers=3)
    write_hf_weights(tmp_path, config)
    (whole, _), (streamed, _) = qlora_loads(str(tmp_path), config, kind)
    def layout(model):  # the modules (adapters, quantized weights) in order, with their hooks
        return [(n, type(m).__name__, len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()]
    assert layout(streamed) == layout(whole)
    for get in (lambda m: m.named_parameters(), lambda m: m.named_buffers()):
        got, want = dict(get(streamed)), dict(get(whole))
        assert list(got) == list(want)
        for name, t in want.items():
            assert t.dtype == got[name].dtype and torch.equal(t, got[name]), name
            assert t.requires_grad == got[name].requires_grad, name
    assert any(".lora." in n for n, _ in streamed.named_parameters()) and any("_quantized." in n for n in dict(streamed.named_buffers()))
    ids, pos = batch()
    assert torch.equal(streamed(ids, position_ids=pos).logits, whole(ids, position_ids=pos).logits)  # same hooks


def test_qlora_load_holds_one_unquantized_block_at_a_time(tmp_path):
    """Peak bytes allocated during the load (PeakMemoryTracker) of a 6-block model. Today's path holds the
    whole fp32 model at once (peak >= its size). Block by block, the peak is bounded by what can be live
    at the worst moment: the fp32 rest (embeddings, norm, lm_head), every block's quantized buffers and
    adapters, one block's fp32 weights, and the transients of quantizing its largest weight (at most twice
    that weight); it is below the fp32 model minus two blocks. Measured: 1.76 MB streamed, bound 2.07 MB,
    fp32 model 3.49 MB, a block 0.49 MB; quantizing only after the last block is read peaks at 3.89 MB."""
    config = PRESETS["tiny"].replace(num_layers=6)
    write_hf_weights(tmp_path, config)
    (_, whole_peak), (model, peak) = qlora_loads(str(tmp_path), config, "nf4")
    fp32 = ArcticForCausalLM(config)

    def nbytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)
    full = nbytes(fp32.parameters())
    block = nbytes(fp32.layers[0].parameters())
    rest = full - config.num_layers * block
    kept = nbytes(model.layers.buffers()) + nbytes(model.layers.parameters())  # quantized + adapters + router/norms
    largest = max(nbytes([p]) for p in fp32.layers[0].parameters())
    bound = rest + kept + block + 2 * largest
    assert whole_peak >= full
    assert peak <= bound < full - 2 * block, (peak, bound, full, block)


def test_qlora_run_from_init_from_loads_block_by_block(tmp_path, monkeypatch):
    """launch/train.py with lora.quantize_base and train.init_from takes load_quantized (no adapt hook after
    it: a second apply_lora would refuse), its model is today's load-then-quantize result, and it trains."""
    from floe.hf import load_hf_weights
    from floe.lora import LoRAConfig
    from floe.run import init_from
    from floe.run.trainer import adapt_base
    from tests.test_lora_train import LORA, _hf_base

    _hf_base(tmp_path / "base", seed=1)
    loaded = {}

    def spy(model, *args):
        report = real(model, *args)
        loaded.update({n: t.detach().clone() for n, t in (*model.named_parameters(), *model.named_buffers())})
        return report
    real = init_from.load_quantized
    monkeypatch.setattr(init_from, "load_quantized", spy)
    record = train(make_cfg(tmp_path / "run", *LORA, "lora.quantize_base=int8", "train.max_steps=1",
                            f"train.init_from={tmp_path / 'base'}"))
    assert record["step"] == 1 and loaded
    with torch.device("meta"):
        want = ArcticForCausalLM(read_hf_config(str(tmp_path / "base")))
    load_hf_weights(want, str(tmp_path / "base"))
    adapt_base(want, LoRAConfig(rank=4, dropout=0.1, quantize_base="int8"), seed=0)
    want = {n: t for n, t in (*want.named_parameters(), *want.named_buffers())}
    assert loaded.keys() == want.keys()
    assert all(torch.equal(loaded[n], t) for n, t in want.items())


def test_tokens_the_directory_redefines_are_named_in_a_warning(tmp_path, caplog):
    """Snowflake's arctic-instruct gives ids 31998/31999 other texts in tokenizer_config.json's
    added_tokens_decoder than tokenizer.model has; floe tokenises with tokenizer.model alone, so it says so
    (the added tokens that agree with tokenizer.model, like its own chat markers, are not named)."""
    import json
    import logging

    from floe.data import DataConfig
    from floe.data.tokenizer import Tokenizer
    from floe.hf import save_hf
    from floe.run.init_from import init_data_config, redefined_tokens

    hf = tmp_path / "hf"
    save_hf(ArcticForCausalLM(PRESETS["tiny"]).state_dict(), PRESETS["tiny"], str(hf), Tokenizer())
    tok = Tokenizer()
    config = json.loads((hf / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {str(tok.im_start[0]): {"content": "<|im_start|>", "special": True},
                                      "1000": {"content": "<|im_sep|>", "special": True}}
    (hf / "tokenizer_config.json").write_text(json.dumps(config))
    assert redefined_tokens(str(hf), str(hf / "tokenizer.model")) == [(1000, "<|im_sep|>", tok.piece(1000))]
    with caplog.at_level(logging.WARNING, logger="floe"):
        data = init_data_config(DataConfig(), str(hf))
    assert data.tokenizer == str(hf / "tokenizer.model")
    assert "gives 1 id(s) another text" in caplog.text and "1000: '<|im_sep|>'" in caplog.text
    caplog.clear()
    del config["added_tokens_decoder"]
    (hf / "tokenizer_config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="floe"):
        init_data_config(DataConfig(), str(hf))
    assert "another text" not in caplog.text
