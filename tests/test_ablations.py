"""The routing and data-mix ablations (conf/experiment/balance_sweep.yaml, mix_ablation.yaml): their
sweeps are defined in the experiment, so `-m +experiment=<name>` alone runs every job."""
import glob
import json
import os

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from launch.train import CONF_DIR, parse_config
from tests.test_console import launch
from tests.test_train import make_cfg


def sweep_jobs(experiment):
    """The override lists of every job Hydra's basic sweeper makes from the experiment's own params."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose("config", overrides=[f"+experiment={experiment}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    overrides = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def test_balance_sweep_is_the_four_balancers_by_two_drop_policies(tmp_path):
    jobs = sweep_jobs("balance_sweep")
    settings = set()
    for job in jobs:
        c = parse_config(make_cfg(tmp_path, "+experiment=balance_sweep", *job))
        m = c.model
        assert m.capacity_factor == 1.0 and m.num_layers == 4 and c.train.max_steps == 120  # learn_cpu, tight
        settings.add((m.balance_coef > 0, m.balance_bias_rate > 0, m.drop_policy))
    assert len(jobs) == 8 and settings == {(loss, bias, policy) for loss in (True, False) for bias in (True, False)
                                           for policy in ("probs", "loss_aware")}


def test_mix_ablation_sweeps_the_source_weights(tmp_path):
    jobs = sweep_jobs("mix_ablation")
    mixes = [parse_config(make_cfg(tmp_path, "+experiment=mix_ablation", *job)).data for job in jobs]
    assert len(mixes) == 4 and len({tuple(d.weights) for d in mixes}) == 4
    assert all(d.sources == ["general", "code", "math", "identity"] and d.eval_fraction > 0 for d in mixes)
    assert all(abs(sum(d.weights) - 1.0) < 1e-9 for d in mixes)
    # The proxies the cookbook used take the same sweep on a cluster.
    c = parse_config(make_cfg(tmp_path, "+experiment=mix_ablation", "model=arctic_2b"))
    assert c.model.num_experts == 128 and 1.8e9 < c.model.num_params()[1] < 2.2e9


@pytest.mark.slow
def test_mix_ablation_runs_every_mix_and_compares_per_source(tmp_path):
    sweep = tmp_path / "sweep"
    proc = launch("-m", "+experiment=mix_ablation", f"hydra.sweep.dir={sweep}", "log.wandb=disabled",
                  "train.max_steps=1", "train.global_batch_size=4", "train.micro_batch_size=4",
                  "data.num_examples=200", "data.seq_len=128", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(d for d in glob.glob(str(sweep / "*")) if os.path.isfile(os.path.join(d, "metrics.jsonl")))
    assert len(runs) == 4
    weights = set()
    for run in runs:
        last = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))][-1]
        assert {f"eval_loss/{s}" for s in ("general", "code", "math", "identity")} <= set(last)
        load = [json.loads(x) for x in open(os.path.join(run, "expert_load.jsonl"))][-1]
        assert set(load["routed_per_source"]) == {"general", "code", "math", "identity"}
        weights.add(tuple(OmegaConf.load(os.path.join(run, "config.yaml")).data.weights))
    assert len(weights) == 4  # four different mixes
    assert "data.weights" in (sweep / "compare" / "compare.md").read_text()  # the compact table names the mixes
    header = (sweep / "compare" / "compare.csv").read_text().splitlines()[0].split(",")
    assert {f"eval_loss/{s} (final)" for s in ("general", "code", "math", "identity")} <= set(header)
