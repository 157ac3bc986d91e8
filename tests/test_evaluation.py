"""Held-out evaluation: floe.run.evaluation against a per-row loop, and the Trainer's use of it
(every train.eval_every steps and at the end, without disturbing training, same on 2 processes)."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from floe.config import PRESETS
from floe.data import DataConfig, build_eval_dataset, eval_micro_batches
from floe.run.evaluation import eval_loss_record, eval_loss_sums
from floe.model import ArcticForCausalLM
from floe.testing.distributed import run_distributed

SOURCES = ("math", "identity", "code", "general")
TRAIN = ["model.capacity_factor=1.0", "train.global_batch_size=4", "train.micro_batch_size=2",
         "data.num_examples=200", "data.seq_len=64", "data.eval_fraction=0.1", "log.wandb=disabled",
         "run.name=test"]


@pytest.fixture(scope="module")
def eval_ds():
    return build_eval_dataset(DataConfig(num_examples=200, seq_len=64, eval_fraction=0.1), seed=0)


def naive_per_source(model, ds) -> dict[int, tuple[float, int]]:
    """Each packed example alone (cut out of its row by the position restarts), summed per source."""
    out: dict[int, list] = {}
    for r in range(ds.num_rows):
        n = int(ds.lengths[r])
        starts = np.flatnonzero(ds.position[r, :n] == 0).tolist() + [n]
        for k, (a, z) in enumerate(zip(starts, starts[1:])):
            ids = torch.from_numpy(ds.tokens[r, a:z].astype(np.int64))[None]
            trained = torch.from_numpy(ds.trained[r, a:z].astype(bool))
            with torch.no_grad():
                logits = model(input_ids=ids, dropless=True).logits[0, :-1].float()
            losses = F.cross_entropy(logits, ids[0, 1:], reduction="none")[trained[1:]]
            acc = out.setdefault(int(ds.seg_source[ds.seg_offsets[r] + k]), [0.0, 0])
            acc[0] += losses.double().sum().item()
            acc[1] += int(trained[1:].sum())
    return {s: (v[0], v[1]) for s, v in out.items()}


def test_eval_loss_sums_match_each_example_alone(eval_ds):
    """Packed, batched, split over 2 'ranks' (rows r, r+2, ... with empty filler rows) and summed:
    the per-source sums equal every example run alone; the capacity limit does not apply
    (dropless), the model is back in train mode and unchanged."""
    torch.manual_seed(0)
    model = ArcticForCausalLM(PRESETS["tiny"].replace(capacity_factor=0.5))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n = len(eval_ds.source_names)
    assert n == 4 and eval_ds.num_rows >= 3
    sums = sum(eval_loss_sums(model, eval_micro_batches(eval_ds, 3, dp_rank=r, dp_size=2), n, torch.device("cpu"))
               for r in range(2))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ref = naive_per_source(model, eval_ds)
    assert sorted(ref) == list(range(n))
    for s in range(n):
        assert sums[s, 1].item() == ref[s][1]
        assert sums[s, 0].item() == pytest.approx(ref[s][0], rel=1e-5)
    record = eval_loss_record(sums, eval_ds.source_labels)
    total = sum(v[0] for v in ref.values()) / sum(v[1] for v in ref.values())
    assert record["eval_loss"] == pytest.approx(total, rel=1e-5)
    assert record["eval_tokens"] == sum(v[1] for v in ref.values())
    for s, label in enumerate(eval_ds.source_labels):
        assert record[f"eval_loss/{label}"] == pytest.approx(ref[s][0] / ref[s][1], rel=1e-5)


def test_eval_loss_record_by_hand():
    sums = torch.tensor([[6.0, 3.0], [0.0, 0.0], [2.0, 1.0]], dtype=torch.float64)
    rec = eval_loss_record(sums, ["a", "b", "c"])
    assert rec == {"eval_loss": 2.0, "eval_tokens": 4, "eval_loss/a": 2.0, "eval_loss/c": 2.0}


# ---------------------------------------------------------------------------- in the Trainer
def _compose(run_dir, overrides):
    from hydra import compose, initialize_config_dir

    from launch.train import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose("config", overrides=[f"run.dir={run_dir}", *TRAIN, *overrides])


def _train_worker(rank, world_size, run_dir, overrides, check_train_mode=False):
    from launch.train import train
    from floe.run import trainer

    if check_train_mode:  # every optimizer step starts with the model in train mode
        step = trainer.Trainer.train_step

        def checked(self):
            assert self.engine.model.training and self.engine.training, f"eval mode at step {self.step + 1}"
            return step(self)

        trainer.Trainer.train_step = checked
    return train(_compose(run_dir, overrides))


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_eval_every_does_not_disturb_training(tmp_path):
    """eval_every=2 against eval only at the end: identical training; eval lines at 2 and 4."""
    with_eval, end_only = str(tmp_path / "a"), str(tmp_path / "b")
    run_distributed(_train_worker, 1, args=(with_eval, ["train.max_steps=4", "train.eval_every=2"]),
                    kwargs={"check_train_mode": True}, timeout=240)
    run_distributed(_train_worker, 1, args=(end_only, ["train.max_steps=4"]), timeout=240)
    a, b = metrics(with_eval), metrics(end_only)
    assert [m["step"] for m in a] == [1, 2, 3, 4]
    assert [m["step"] for m in a if "eval_loss" in m] == [2, 4]
    assert [m["step"] for m in b if "eval_loss" in m] == [4]
    for ma, mb in zip(a, b):
        assert (ma["loss"], ma["grad_norm"], ma["balance_loss"]) == (mb["loss"], mb["grad_norm"], mb["balance_loss"])
    last = a[-1]
    assert last["eval_loss"] == b[-1]["eval_loss"]
    assert {k for k in last if k.startswith("eval_loss/")} == {f"eval_loss/{s}" for s in SOURCES}
    assert all(math.isfinite(last[f"eval_loss/{s}"]) for s in SOURCES)
    assert a[1]["eval_loss"] != last["eval_loss"]  # evaluated the model of its own step


def _eval_of(run_dir):
    return {k: v for k, v in metrics(run_dir)[-1].items() if k.startswith("eval_")}


@pytest.mark.slow
def test_eval_on_two_processes_equals_one(tmp_path):
    """2 ranks at ep_size 2 (expert all-to-all inside the eval forward, odd row split) vs 1 rank;
    also the step's expert load (counts summed over ranks)."""
    common = ["train.max_steps=1", "model.capacity_factor=null"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run_distributed(_train_worker, 1, args=(one, common), timeout=240)
    run_distributed(_train_worker, 2, args=(two, [*common, "parallel.ep_size=2"]), timeout=240)
    e1, e2 = _eval_of(one), _eval_of(two)
    assert set(e1) == set(e2) and {f"eval_loss/{s}" for s in SOURCES} <= set(e1)
    assert e1["eval_tokens"] == e2["eval_tokens"]
    for k in e1:
        if k.startswith("eval_loss"):
            assert e2[k] == pytest.approx(e1[k], rel=1e-5), k
    # the expert load of the step, summed over the ranks, is the 1-process count
    load1, load2 = (open(os.path.join(d, "expert_load.jsonl")).read() for d in (one, two))
    assert load1 == load2 and load1.count("\n") == 1


def test_neftune_leaves_evaluation_alone(eval_ds):
    """train.neftune_alpha on a model in training mode: the held-out sums are the noiseless ones and no
    random number is drawn."""
    torch.manual_seed(0)
    model = ArcticForCausalLM(PRESETS["tiny"]).train()
    n = len(eval_ds.source_names)
    clean = eval_loss_sums(model, eval_micro_batches(eval_ds, 3, dp_rank=0, dp_size=1), n, torch.device("cpu"))
    model.neftune_alpha = 5.0
    rng = torch.get_rng_state()
    noisy = eval_loss_sums(model, eval_micro_batches(eval_ds, 3, dp_rank=0, dp_size=1), n, torch.device("cpu"))
    assert torch.equal(noisy, clean) and torch.equal(torch.get_rng_state(), rng)
