"""floe.run.metrics (FLOPs, device peaks, memory, expert-load CV) and the Trainer's step metrics:
mfu, mem_peak_gb, expert_load_cv in metrics.jsonl and the counts in expert_load.jsonl."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from floe.run import metrics
from floe.config import PRESETS
from floe.testing.distributed import run_distributed
from tests import REPO


def test_train_flops_per_token_of_tiny_by_hand():
    # tiny: vocab 1024, hidden 64, 2 layers, 4 heads of 16 (2 KV heads), dense MLP 64, 8 experts
    # of width 64, top-2. Per layer: q 64x64 + o 64x64 + k, v 64x32 each = 12288; dense SwiGLU
    # 3 x 64 x 64 = 12288; router 8 x 64 = 512; two experts 2 x 3 x 64 x 64 = 24576 -> 49664.
    # Two layers 99328 + head 1024 x 64 = 65536 -> 164864 weights a token multiplies through.
    assert metrics.matmul_params(PRESETS["tiny"]) == 164864
    # 6 N + attention 6 x layers 2 x (4 heads x 16) x S: at S = 64, 989184 + 49152
    assert metrics.train_flops_per_token(PRESETS["tiny"], 64) == 6 * 164864 + 6 * 2 * 64 * 64 == 1038336


def test_load_cv_by_hand():
    # layer 0 even: 0; layer 1 all on one of 4 experts: mean 1, std sqrt((9 + 1 + 1 + 1) / 4) = sqrt(3)
    assert metrics.load_cv([[1, 1, 1, 1], [4, 0, 0, 0]]) == pytest.approx(math.sqrt(3) / 2)
    assert metrics.load_cv([[2, 6]]) == pytest.approx(0.5)  # mean 4, std 2
    assert metrics.load_cv([[0, 0]]) == 0.0  # a layer that saw no token


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                       ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA H200", 989e12),
                                       ("Some Future GPU", None)])
def test_gpu_peak_table(monkeypatch, name, peak):
    monkeypatch.delenv(metrics.PEAK_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert metrics.device_peak_flops(torch.device("cuda", 0)) == peak
    monkeypatch.setenv(metrics.PEAK_ENV, "123.5")
    assert metrics.device_peak_flops(torch.device("cuda", 0)) == 123.5e12


def test_cpu_gemm_ceiling_keeps_the_best_of_the_first_launches_then_is_cached(tmp_path, monkeypatch):
    monkeypatch.delenv(metrics.PEAK_ENV, raising=False)
    assert metrics.measure_gemm_flops(torch.float32, n=256, seconds=0.05) > 1e8  # any CPU does 0.1 GFLOP/s
    measured = iter([2e9, 5e9, 3e9, 9e9, 7e9])  # a busy machine measures low now and then
    calls = []

    def fake(dtype=torch.float32):
        calls.append(dtype)
        return next(measured)

    monkeypatch.setattr(metrics, "measure_gemm_flops", fake)
    seen = [metrics.device_peak_flops(torch.device("cpu"), torch.float32, cache_dir=tmp_path) for _ in range(5)]
    assert seen == [2e9, 5e9, 5e9, 5e9, 5e9] and calls == [torch.float32] * metrics.CEILING_SAMPLES
    assert metrics.cpu_peak_flops(torch.bfloat16, cache_dir=tmp_path) == 9e9  # another dtype is another ceiling
    assert len(json.loads((tmp_path / "cpu_peak.json").read_text())) == 2
    key = next(iter(json.loads((tmp_path / "cpu_peak.json").read_text())))
    (tmp_path / "cpu_peak.json").write_text(json.dumps({key: 4e9}))  # an older cache: one sample, kept
    assert metrics.cpu_peak_flops(torch.float32, cache_dir=tmp_path) == 7e9


def test_cpu_mem_peak_sees_a_large_allocation():
    # In a fresh process: the peak RSS must rise to the resident size before + 256 MiB (touched), and
    # not report this (large) parent's peak: getrusage's ru_maxrss survives fork + exec, VmHWM does not.
    parent = torch.ones(128 * 2**20)  # 512 MiB resident here
    code = ("import os, torch; from floe.run.metrics import mem_peak_gb; "
            "rss = int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**30; "
            "x = torch.ones(64 * 2**20); print(rss, mem_peak_gb(torch.device('cpu')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": REPO})
    assert out.returncode == 0, out.stderr
    rss, peak = map(float, out.stdout.split())
    assert 0.24 < peak - rss < 0.3, (rss, peak)
    del parent


# ---------------------------------------------------------------------------- in the Trainer
TRAIN = ["model.capacity_factor=null", "train.global_batch_size=4", "train.micro_batch_size=2",
         "train.max_steps=2", "train.save_every=1", "train.keep_last=0", "data.num_examples=200",
         "data.seq_len=64", "data.eval_fraction=0", "log.wandb=disabled", "log.expert_load_every=1",
         "run.name=test"]


def _train_worker(rank, world_size, run_dir, overrides):
    from hydra import compose, initialize_config_dir

    from launch.train import CONF_DIR, train

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return train(compose("config", overrides=[f"run.dir={run_dir}", *TRAIN, *overrides]))


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def naive_step_load(run_dir, step, source=None):
    """Tokens per expert per layer of optimizer step `step`, counted from the router logits of the
    model in checkpoint step-1 on that step's micro-batches: every real token's top-2 experts
    (source: only the tokens of that data source, by index)."""
    from floe.data import DataConfig, StepLoader, build_dataset
    from tools.export import load_checkpoint_model

    model, _ = load_checkpoint_model(os.path.join(run_dir, "checkpoints", f"step_{step - 1:08d}"), run_dir)
    cfg = model.config
    _, ds = build_dataset(DataConfig(num_examples=200, seq_len=64, eval_fraction=0.0), seed=0)
    loader = StepLoader(ds, global_batch_size=4, micro_batch_size=2, dp_rank=0, dp_size=1, seed=0,
                        with_source_ids=True)
    for _ in range(step - 1):  # the batches of the earlier steps
        loader.next_step()
    logits = []  # the router logits of each layer, recomputed from the MoE's input tokens

    def spy(moe):
        start = moe.start

        def start_and_record(x_TD, *args, **kwargs):
            logits.append(x_TD.float() @ moe.gate.weight.float().t())
            return start(x_TD, *args, **kwargs)
        return start_and_record

    for layer in model.layers:
        layer.moe.start = spy(layer.moe)
    counts = [[0] * cfg.num_experts for _ in range(cfg.num_layers)]
    with torch.no_grad():
        for mb in loader.next_step():
            logits.clear()
            model(input_ids=mb["input_ids"], position_ids=mb["position_ids"], attention_mask=mb["attention_mask"])
            assert len(logits) == cfg.num_layers
            sources = mb["source_ids"].reshape(-1)[mb["attention_mask"].reshape(-1).bool()].tolist()
            for layer, lg in enumerate(logits):
                assert lg.shape[0] == int(mb["attention_mask"].sum())  # real tokens only
                for src, row in zip(sources, lg.float().tolist()):
                    if source is not None and src != source:
                        continue
                    best = sorted(range(cfg.num_experts), key=lambda e: -row[e])[:cfg.top_k]
                    for e in best:
                        counts[layer][e] += 1
    return counts


def test_step_metrics_and_expert_load(tmp_path, monkeypatch):
    run_dir = str(tmp_path / "run")
    # A known peak (1 GFLOP/s) makes mfu checkable from the logged throughput alone.
    run_distributed(_train_worker, 1, args=(run_dir, []), env={metrics.PEAK_ENV: "0.001"}, timeout=240)
    lines = _jsonl(os.path.join(run_dir, "metrics.jsonl"))
    loads = _jsonl(os.path.join(run_dir, "expert_load.jsonl"))
    assert [m["step"] for m in lines] == [1, 2] and [r["step"] for r in loads] == [1, 2]
    flops = metrics.train_flops_per_token(PRESETS["tiny"], 64)
    for m, load in zip(lines, loads):
        assert "tokens_per_expert" not in m  # the full counts live in expert_load.jsonl only
        assert m["mfu"] == pytest.approx(flops * m["tokens_per_s"] / 1e9, rel=1e-9)
        assert 0.05 < m["mem_peak_gb"] < 64
        assert m["expert_load_cv"] == pytest.approx(metrics.load_cv(load["tokens_per_expert"]))
        counts = load["tokens_per_expert"]
        assert len(counts) == 2 and all(len(c) == 8 for c in counts)
        assert all(sum(c) == sum(counts[0]) for c in counts)  # dropless: every layer routes each token twice
    assert loads[1]["tokens_per_expert"] == naive_step_load(run_dir, 2)
    # The guardrails: routed counts (dropless: the kept ones), per layer statistics, per data source.
    from floe.run.router_watch import layer_load_stats

    for m, load in zip(lines, loads):
        assert load["routed_per_expert"] == load["tokens_per_expert"]
        cv, peak = layer_load_stats(torch.tensor(load["routed_per_expert"]))
        assert load["load_cv"] == pytest.approx(cv) and load["max_over_mean"] == pytest.approx(peak)
        assert m["router_load_cv_max"] == pytest.approx(max(cv)) and m["router_max_over_mean"] == pytest.approx(max(peak))
        assert m["dead_experts"] == sum(map(len, load["dead_experts"]))
        per_source = load["routed_per_source"]
        assert list(per_source) == ["math", "identity", "code", "general"]  # the embedded mix, in order
        summed = [[sum(per_source[s][layer][e] for s in per_source) for e in range(8)] for layer in range(2)]
        assert summed == load["routed_per_expert"]
    for index, name in enumerate(loads[1]["routed_per_source"]):
        assert loads[1]["routed_per_source"][name] == naive_step_load(run_dir, 2, source=index), name


def test_wandb_gets_every_metrics_line_and_one_expert_histogram_per_layer(tmp_path, monkeypatch):
    """What wandb is sent equals the files: metrics.jsonl's records, and per layer a histogram whose
    bin e holds expert e's tokens from expert_load.jsonl."""
    import wandb
    from hydra import compose, initialize_config_dir

    from launch.train import CONF_DIR, train

    sent = []

    class Run:  # stands in for wandb's run object (offline mode would need wandb's binary log reader)
        def log(self, data, step):
            sent.append((step, data))

        def finish(self):
            sent.append(("finished", None))

    monkeypatch.setattr(wandb, "init", lambda **kwargs: Run())
    run_dir = tmp_path / "run"
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose("config", overrides=[f"run.dir={run_dir}", "run.name=test", "log.wandb=offline",
                                           "train.max_steps=4", "log.expert_load_every=2", "data.num_examples=200",
                                           "data.seq_len=64", "train.global_batch_size=4",
                                           "train.micro_batch_size=2", "model.capacity_factor=null"])
    train(cfg)
    with open(run_dir / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    with open(run_dir / "expert_load.jsonl") as f:
        loads = [json.loads(line) for line in f]
    assert sent[-1] == ("finished", None)
    records = [(step, data) for step, data in sent[:-1] if "loss" in data]
    assert [data for _, data in records] == lines and [step for step, _ in records] == [1, 2, 3, 4]
    histograms = [(step, data) for step, data in sent[:-1] if "loss" not in data]
    assert [step for step, _ in histograms] == [m["step"] for m in loads] == [2, 4]
    num_layers = PRESETS["tiny"].num_layers
    for (step, data), load in zip(histograms, loads):
        assert sorted(data) == [f"expert_load/layer_{i}" for i in range(num_layers)]
        for i, counts in enumerate(load["tokens_per_expert"]):
            hist = data[f"expert_load/layer_{i}"]
            assert isinstance(hist, wandb.Histogram) and hist.histogram == counts
            assert hist.bins == list(range(len(counts) + 1))
        totals = {sum(counts) for counts in load["tokens_per_expert"]}  # dropless top-2: every layer routes
        assert len(totals) == 1 and 0 < min(totals) <= 2 * 4 * 64 and min(totals) % 2 == 0  # each real token twice
