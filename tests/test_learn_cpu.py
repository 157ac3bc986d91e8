"""+experiment=learn_cpu (the documented CPU learning target): composes, validates, and starts.

The 800-step run itself is measured in BENCHMARKS.md ("Learning target"), not trained in CI.
"""
import json
import os

from launch.train import parse_config, train
from floe.config import PRESETS
from tests.test_train import make_cfg


def test_learn_cpu_composes_to_the_documented_run(tmp_path):
    c = parse_config(make_cfg(tmp_path, "+experiment=learn_cpu"))
    # The figures README/BENCHMARKS quote: tiny made twice as wide and deep, 2.23M parameters.
    assert c.model == PRESETS["tiny"].replace(hidden_size=128, dense_ffn=128, expert_ffn=128, num_layers=4)
    total, active = c.model.num_params()
    assert (round(total / 1e6, 2), round(active / 1e6, 2)) == (2.23, 1.05)
    assert c.data.name == "synthetic" and c.data.sources == ["math", "identity", "code", "general"]
    assert abs(sum(c.data.weights) - 1.0) < 1e-9 and c.data.weights[0] == max(c.data.weights)
    assert c.data.eval_fraction > 0  # held-out questions exist, kept out of training
    assert (c.train.max_steps, c.train.global_batch_size, c.data.seq_len) == (800, 16, 256)


def test_learn_cpu_trains_two_steps(tmp_path):
    run = tmp_path / "run"
    last = train(make_cfg(run, "+experiment=learn_cpu", "train.max_steps=2", "data.num_examples=400"))
    assert last["step"] == 2 and last["balance_uniform"] == 4.0  # the floor is model.num_layers
    lines = [json.loads(x) for x in open(run / "metrics.jsonl")]
    assert [m["step"] for m in lines] == [1, 2]
    assert os.path.isfile(run / "checkpoints" / "step_00000002" / "floe.json")


def test_embedded_products_stay_in_the_times_table():
    """Every product the math source states (word problems and bare "What is a * b?") has factors
    2..12, on both sides of the held-out split: a held-out 2-digit x 2-digit product measured only
    memorisation, never learning (BENCHMARKS.md "Learning target")."""
    from floe.data import synthetic

    records = synthetic.generate("math", 3000, seed=0) + synthetic.generate("math", 300, seed=0, split="eval")
    products = [(int(a), int(b)) for r in records for t in r["messages"] if t["role"] == "assistant"
                for a, op, b in synthetic._FACT.findall(t["content"]) if op == "*"]
    assert len(products) > 300
    assert all(2 <= a <= 12 and 2 <= b <= 12 for a, b in products), max(products)
    held = [r["completion"] for r in synthetic.heldout_records(200, sources=["math"])]
    assert any(" * " in c for c in held)
    assert all(2 <= int(a) <= 12 and 2 <= int(b) <= 12
               for c in held for a, op, b in synthetic._FACT.findall(c) if op == "*")
