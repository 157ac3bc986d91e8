"""train.activation_checkpointing: the same numbers as no checkpointing, less memory, and no
second routing or all-to-all in backward (moe/model.py apply_activation_checkpointing)."""
from __future__ import annotations

import pytest
import torch

import floe.layer
from floe.config import PRESETS
from floe.plan.tensor_memory import PeakMemoryTracker
from floe.model import CHECKPOINTING, ArcticForCausalLM, apply_activation_checkpointing
from floe.testing.distributed import run_distributed

MODES = [m for m in CHECKPOINTING if m != "none"]
# Capacity dropping on (1.0): the routing decides which rows survive, so re-routing would show.
CFG = PRESETS["tiny"].replace(capacity_factor=1.0)


def packed_batch(rows=2, seq=96, vocab=CFG.vocab_size, seed=0):
    """Two packed examples per row, padding at the end of the last row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq), generator=g)
    pos = torch.cat([torch.arange(37), torch.arange(seq - 37)]).expand(rows, seq)
    mask = torch.ones(rows, seq, dtype=torch.long)
    mask[-1, seq - 9:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, pos, labels, mask


def build(mode, cfg=CFG, seed=3):
    model = ArcticForCausalLM(cfg)
    model.reset_parameters(seed=seed)
    return apply_activation_checkpointing(model, mode)


def loss_and_grads(model, batch, tracker=None):
    """Forward + backward; each gradient is taken away as soon as it is accumulated (as ZeRO-2
    moves it to its bucket), so a tracked peak is activations, not gradients."""
    grads = {}

    def take(p, name):
        grads[name], p.grad = p.grad, None

    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: take(p, name))
    ids, pos, labels, mask = batch
    with tracker if tracker is not None else torch.enable_grad():
        out = model(ids, position_ids=pos, labels=labels, attention_mask=mask)
        (out.lm_loss_sum + out.aux_loss).backward()
    return out, grads


@pytest.mark.parametrize("mode", MODES)
def test_loss_and_every_gradient_equal_no_checkpointing(mode):
    batch = packed_batch()
    ref_out, ref = loss_and_grads(build("none"), batch)
    out, got = loss_and_grads(build(mode), batch)
    assert torch.equal(out.loss, ref_out.loss)
    assert sum(int(s.dropped) for s in out.router_stats) > 0  # capacity really dropped something
    assert set(got) == set(ref)
    for name in ref:  # recomputation replays the same ops on the same inputs: bit-identical
        assert torch.equal(got[name], ref[name]), name


@pytest.mark.parametrize("mode", CHECKPOINTING)
def test_routing_runs_once_and_the_experts_are_recomputed(mode, monkeypatch):
    calls = {"route": 0, "experts": 0}
    route = floe.layer.router.route

    def counting_route(*args, **kwargs):
        calls["route"] += 1
        return route(*args, **kwargs)

    monkeypatch.setattr(floe.layer.router, "route", counting_route)
    model = build(mode)
    for block in model.layers:
        block.moe.experts.register_forward_pre_hook(lambda *_: calls.__setitem__("experts", calls["experts"] + 1))
    loss_and_grads(model, packed_batch())
    assert calls["route"] == CFG.num_layers  # forward only: backward never routes again
    assert calls["experts"] == CFG.num_layers * (1 if mode == "none" else 2)  # recomputed in backward


def test_peak_activation_memory_drops_with_each_mode():
    batch = packed_batch(rows=4, seq=128)
    peaks = {}
    for mode in CHECKPOINTING:
        tracker = PeakMemoryTracker()
        loss_and_grads(build(mode), batch, tracker)
        peaks[mode] = tracker.peak_bytes
    # Each mode recomputes a superset of the previous one's regions.
    assert peaks["none"] > peaks["moe"] > peaks["selective"] > peaks["full"], peaks
    assert peaks["full"] < 0.75 * peaks["none"], peaks


# ---------------------------------------------------------------- 2 processes, expert parallel


def _ep_worker(rank, world_size, modes):
    import torch.distributed as dist

    from floe.parallel import apply_expert_parallel, build_parallel_groups, full_state_dict, init_distributed

    init_distributed(torch.device("cpu"), timeout_s=60)
    groups = build_parallel_groups(world_size)
    calls = [0]
    all_to_all_single = dist.all_to_all_single

    def counting(*args, **kwargs):
        calls[0] += 1
        return all_to_all_single(*args, **kwargs)

    dist.all_to_all_single = counting  # moe/parallel/dispatch.py looks it up at call time
    results = {}
    for mode in modes:
        model = apply_expert_parallel(build(mode), groups)
        calls[0] = 0
        out, grads = loss_and_grads(model, packed_batch(seed=rank))  # each rank its own tokens
        for name, p in model.named_parameters():
            p.data = grads[name]  # gather expert gradients by global id through the weights' path
        results[mode] = {"loss": out.loss.detach(), "grads": full_state_dict(model), "all_to_all": calls[0]}
    return results


@pytest.mark.slow  # spawns processes
def test_expert_parallel_gradients_and_all_to_all_count_equal_no_checkpointing():
    results = run_distributed(_ep_worker, 2, args=(CHECKPOINTING,), timeout=120)
    for rank, res in enumerate(results):
        ref = res["none"]
        # per layer: counts + rows out and back in forward; rows back and out in backward
        assert ref["all_to_all"] == 5 * CFG.num_layers, ref["all_to_all"]
        for mode in MODES:
            got = res[mode]
            assert got["all_to_all"] == ref["all_to_all"], (rank, mode)
            assert torch.equal(got["loss"], ref["loss"]), (rank, mode)
            for name in ref["grads"]:
                assert torch.equal(got["grads"][name], ref["grads"][name]), (rank, mode, name)


def _train_worker(rank, world_size, run_dir, overrides):
    from tests.test_parallel_train import _train_worker as train_worker

    return train_worker(rank, world_size, run_dir, overrides)


@pytest.mark.slow
@pytest.mark.parametrize("procs,layout", [(1, []), (2, ["parallel.ep_size=2", "parallel.zero_stage=2"])],
                         ids=["1proc", "2proc-ep2-zero2"])
def test_training_run_equals_no_checkpointing(tmp_path, procs, layout):
    """Through train(): the loss curve, the gradient norm of every step and the weights after the
    last step equal the run without checkpointing (fp32)."""
    from tests.test_parallel_train import STEPS, checkpoint_params, metrics

    runs = {}
    for mode in ("none", "full"):
        runs[mode] = str(tmp_path / mode)
        run_distributed(_train_worker, procs, args=(runs[mode], [*layout, "model.capacity_factor=1.0",
                                                                 f"train.activation_checkpointing={mode}"]),
                        timeout=150)
    ref, got = metrics(runs["none"]), metrics(runs["full"])
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for a, b in zip(got, ref):
        for key in ("loss", "balance_loss", "grad_norm", "dropped_frac"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
    want, have = checkpoint_params(runs["none"], STEPS), checkpoint_params(runs["full"], STEPS)
    for name in want:
        assert torch.equal(have[name], want[name]), name


def test_bad_mode_names_the_key():
    with pytest.raises(ValueError, match="train.activation_checkpointing"):
        apply_activation_checkpointing(build("none"), "attention")
    from floe.run.config import TrainConfig

    with pytest.raises(ValueError, match="train.activation_checkpointing"):
        TrainConfig(activation_checkpointing="everything")
