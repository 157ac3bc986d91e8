import math

import pytest

from floe.config import PRESETS
from floe.model import ArcticForCausalLM
from floe.optim import OptimConfig, lr_lambda, param_groups


def test_warmup_then_cosine_hand_computed():
    f = lr_lambda(total_steps=100, warmup_ratio=0.1, min_lr_ratio=0.1)
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])  # linear warmup over 10 steps
    assert f(10) == pytest.approx(1.0)
    # halfway through the 90 decay steps the cosine is at the midpoint of [0.1, 1.0]
    assert f(55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(100) == pytest.approx(0.1) and f(1000) == pytest.approx(0.1)


def test_no_warmup():
    f = lr_lambda(total_steps=10, warmup_ratio=0.0, min_lr_ratio=0.0)
    assert f(0) == pytest.approx(1.0) and f(10) == pytest.approx(0.0)


def test_norms_do_not_decay_matrices_and_experts_do():
    model = ArcticForCausalLM(PRESETS["tiny"])
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all("norm" in names[id(p)] for p in no_decay["params"])
    decayed = {names[id(p)] for p in decay["params"]}
    assert {"layers.0.moe.experts.w1", "layers.0.moe.gate.weight", "lm_head.weight"} <= decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_frozen_moe_is_left_out():
    model = ArcticForCausalLM(PRESETS["tiny"].replace(freeze_moe=True))
    grouped = {id(p) for g in param_groups(model, 0.1) for p in g["params"]}
    assert all(id(p) not in grouped for n, p in model.named_parameters() if ".moe." in n)


def test_validation_names_keys():
    with pytest.raises(ValueError) as err:
        OptimConfig(lr=-1e-3, warmup_ratio=1.5, min_lr_ratio=2, grad_clip=-1)
    for key in ("optim.lr", "optim.warmup_ratio", "optim.min_lr_ratio", "optim.grad_clip"):
        assert key in str(err.value)
