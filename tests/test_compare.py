"""floe.run.compare (tools/compare.py) on tiny hand-written run dirs: table values, differing config keys, files, plots."""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import yaml

from floe.run import compare

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(root: Path, name: str, metrics: list[dict], config: dict | None, torn: str | None = None,
             exact_match: dict | None = None, expert_load: list[dict] | None = None) -> Path:
    d = root / name
    d.mkdir(parents=True)
    text = "".join(json.dumps(m) + "\n" for m in metrics)
    (d / "metrics.jsonl").write_text(text + (torn or ""))
    if config is not None:
        (d / "config.yaml").write_text(yaml.safe_dump(config))
    if exact_match is not None:
        (d / "exact_match.json").write_text(json.dumps(exact_match))
    if expert_load is not None:
        (d / "expert_load.jsonl").write_text("".join(json.dumps(r) + "\n" for r in expert_load))
    return d


def config(lr, cf, run_dir, **extra):
    return {"model": {"num_layers": 3, "hidden_size": 32, "capacity_factor": cf}, "optim": {"lr": lr},
            "run": {"dir": run_dir, "name": run_dir}, "train": {"seed": 0, **extra}}


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "multirun"
    a = make_run(root, "a", [
        {"step": 1, "loss": 3.0, "balance_loss": 2.5, "balance_floor": 2.0, "dropped_frac": 0.2, "tokens_per_s": 100.0},
        {"step": 2, "loss": 2.0, "balance_loss": 2.1, "balance_floor": 2.0, "dropped_frac": 0.1, "tokens_per_s": 300.0,
         "eval_loss": 2.2, "eval_loss/math": 2.0, "eval_loss/identity": 2.4},
        {"step": 3, "loss": 2.5, "balance_loss": 2.05, "balance_floor": 2.0, "dropped_frac": 0.15,
         "tokens_per_s": 200.0, "eval_loss": 2.4, "eval_loss/math": 2.6, "eval_loss/identity": 2.2},
    ], config(1e-3, 1.0, "runs/a"), exact_match={"exact_match": 0.5, "per_source": {"math": 0.25, "identity": 0.75}},
        expert_load=[{"step": 2, "tokens_per_expert": [[1, 1, 1, 1], [4, 0, 0, 0]]},
                     {"step": 3, "tokens_per_expert": [[10, 20, 30, 40], [25, 25, 0, 50], [5, 5, 5, 5]]}])
    b = make_run(root, "b", [  # the renamed uniform key, and a torn last line
        {"step": 1, "loss": 4.0, "balance_loss": 3.3, "balance_uniform": 3.0, "mfu": 0.1, "tokens_per_s": 50.0},
        {"step": 2, "loss": 3.5, "balance_loss": 3.1, "balance_uniform": 3.0, "mfu": 0.3, "tokens_per_s": 70.0},
    ], config(2e-3, 1.0, "runs/b"), torn='{"step": 3, "loss": 0.1, "balance_lo')
    c = make_run(root, "c", [  # no uniform key logged: model.num_layers from the config
        {"step": 1, "loss": 5.0, "balance_loss": 3.6},
        {"step": 2, "loss": float("nan"), "balance_loss": 3.3},
    ], config(1e-3, 2.0, "runs/c", extra_key=7))
    (root / "multirun.yaml").write_text("hydra: sweep\n")  # what Hydra leaves beside the runs
    return root, [a, b, c]


def test_table_values_equal_hand_computed(runs, tmp_path, caplog):
    root, dirs = runs
    with caplog.at_level(logging.WARNING, logger="floe.compare"):
        table = compare.compare_runs(dirs, tmp_path / "out")
    assert "b/metrics.jsonl:3: torn last line dropped" in caplog.text
    a, b, c = table
    assert [r["run"] for r in table] == ["a", "b", "c"]
    # differing config keys only (run.dir/run.name excepted), a key present in one run counts
    config_cols = [k for k in a if "." in k and "(" not in k]
    assert config_cols == ["model.capacity_factor", "optim.lr", "train.extra_key"]
    assert (a["optim.lr"], b["optim.lr"], c["model.capacity_factor"], a["train.extra_key"]) == (1e-3, 2e-3, 2.0, None)
    assert a["steps"] == 3 and b["steps"] == 2 and c["steps"] == 2
    assert (a["loss (final)"], a["loss (best)"]) == (2.5, 2.0)
    assert (a["eval_loss (final)"], a["eval_loss (best)"]) == (2.4, 2.2)
    assert (a["eval_loss/math (final)"], a["eval_loss/math (best)"]) == (2.6, 2.0)
    assert (a["eval_loss/identity (final)"], a["eval_loss/identity (best)"]) == (2.2, 2.2)
    assert (a["tokens_per_s (final)"], a["tokens_per_s (best)"]) == (200.0, 300.0)  # best = highest
    assert (a["dropped_frac (final)"], a["dropped_frac (best)"]) == (0.15, 0.1)
    assert a["balance uniform"] == 2.0 and a["balance / uniform"] == pytest.approx(2.05 / 2.0)
    assert b["balance uniform"] == 3.0 and b["balance / uniform"] == pytest.approx(3.1 / 3.0)
    assert c["balance uniform"] == 3.0 and c["balance / uniform"] == pytest.approx(3.3 / 3.0)
    assert (b["loss (final)"], b["loss (best)"]) == (3.5, 3.5)  # the torn step-3 line is not read
    assert (b["mfu (final)"], b["mfu (best)"]) == (0.3, 0.3) and a["mfu (final)"] is None
    assert np.isnan(c["loss (final)"]) and c["loss (best)"] == 5.0  # a nan end shows; best is over finite values
    assert c["eval_loss (final)"] is None
    assert (a["exact_match"], a["exact_match/identity"], a["exact_match/math"]) == (0.5, 0.75, 0.25)
    assert b["exact_match"] is None

    # the files hold the same table
    out = tmp_path / "out"
    assert (out / "compare.md").read_text() == compare.to_markdown(table, full=False)
    compact = (out / "compare.md").read_text().splitlines()[0]
    assert compact == ("| run | model.capacity_factor | optim.lr | train.extra_key | steps | loss (final) | loss (best) | eval_loss (final) "
                       "| eval_loss (best) | balance / uniform | dropped_frac (final) | tokens_per_s (final) | exact_match |")
    assert compare.to_markdown(table).splitlines()[0].count("|") == len(a) + 1  # full: every column
    with open(out / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(a) and len(rows) == 3
    assert float(rows[0]["loss (best)"]) == 2.0 and rows[1]["exact_match"] == "" and rows[2]["optim.lr"] == "0.001"


def assert_png_not_blank(path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    assert path.read_bytes()[:8] == PNG_MAGIC
    pixels = plt.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert float(np.var(pixels[..., :3])) > 1e-3  # not one flat colour
    return pixels


def test_plots_written_and_not_blank(runs, tmp_path):
    _, dirs = runs
    out = tmp_path / "plots"
    compare.compare_runs(dirs, out)
    for name in ("loss.png", "balance.png", "expert_load_a.png"):
        assert_png_not_blank(out / name)
    assert not (out / "expert_load_b.png").exists()  # b logged no expert load
    # the heatmap shows the LAST record: 3 layers, so it differs from a plot of the first (2 layers)
    run = compare.Run(dirs[0])
    run.expert_load = run.expert_load[:1]
    compare.plot_expert_load(run, out / "first.png")
    assert_png_not_blank(out / "first.png")
    assert (out / "first.png").read_bytes() != (out / "expert_load_a.png").read_bytes()


def test_cli_glob_and_bad_input(runs, tmp_path, capsys, caplog):
    root, dirs = runs
    with caplog.at_level(logging.WARNING, logger="floe.compare"):
        assert compare.main([str(root / "*")]) == 0
    assert "multirun.yaml: skipped, not a run dir" in caplog.text
    printed = capsys.readouterr().out
    assert printed == (root / "compare" / "compare.md").read_text()  # default out: <common parent>/compare
    assert compare.main([str(root / "*")]) == 0  # the compare dir itself is now a glob match: skipped
    capsys.readouterr()
    assert compare.main([str(root / "nope")]) == 2
    assert "nope: not a run dir (no metrics.jsonl)" in capsys.readouterr().err
    bad = make_run(tmp_path, "bad", [{"step": 1, "loss": 1.0}], None)
    (bad / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{oops\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(ValueError, match=r"bad/metrics.jsonl:2: not a JSON object"):
        compare.compare_runs([bad], tmp_path / "o")


def test_outputs_of_an_earlier_comparison_do_not_stay(runs, tmp_path):
    _, dirs = runs
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "expert_load_old_run.png").write_bytes(PNG_MAGIC)  # a run of an earlier comparison
    (out / "notes.txt").write_text("mine")                   # not compare's: kept
    compare.compare_runs(dirs, out)
    assert not (out / "expert_load_old_run.png").exists() and (out / "notes.txt").read_text() == "mine"


def test_compact_names_drop_the_overrides_every_run_shares():
    names = ["data.seq_len=64,optim.lr=0.1,train.max_steps=1", "data.seq_len=64,optim.lr=0.1,train.max_steps=2"]
    assert compare.short_names(names) == ["train.max_steps=1", "train.max_steps=2"]
    assert compare.short_names(["data.paths=[a,b],x=1", "data.paths=[a,b],x=2"]) == ["x=1", "x=2"]
    assert compare.short_names(["a", "b"]) == ["a", "b"] and compare.short_names(["x=1"]) == ["x=1"]


def test_loss_title_says_what_is_drawn_and_expert_load_shows_every_step(runs, tmp_path):
    _, dirs = runs
    two = [compare.Run(d) for d in dirs]
    assert "dashed" in compare.plot_losses(two, tmp_path / "l.png")  # run a evaluated at two steps
    for run in two:
        run.metrics = [{k: v for k, v in r.items() if k != "eval_loss"} for r in run.metrics]
    run = two[0]
    run.metrics[-1]["eval_loss"] = 2.0
    assert "evaluated once" in compare.plot_losses(two, tmp_path / "l1.png")
    # the over-training panel: the same last step with another history draws another picture
    compare.plot_expert_load(run, tmp_path / "full.png")
    run.expert_load = run.expert_load[-1:]
    compare.plot_expert_load(run, tmp_path / "last_only.png")
    assert (tmp_path / "full.png").read_bytes() != (tmp_path / "last_only.png").read_bytes()


def test_routing_columns_are_lower_is_better(tmp_path):
    metrics = [{"step": 1, "loss": 3.0, "dropped_loss_frac": 0.2, "expert_load_cv": 0.5, "router_load_cv_max": 0.9,
                "dead_experts": 2},
               {"step": 2, "loss": 2.0, "dropped_loss_frac": 0.05, "expert_load_cv": 0.1, "router_load_cv_max": 0.3,
                "dead_experts": 0},
               {"step": 3, "loss": 2.5, "dropped_loss_frac": 0.1, "expert_load_cv": 0.2, "router_load_cv_max": 0.4,
                "dead_experts": 1}]
    d = make_run(tmp_path / "runs", "a", metrics, config(1e-3, 1.0, "a"))
    row, = compare.compare_runs([d], tmp_path / "out")
    for key, final, best in (("dropped_loss_frac", 0.1, 0.05), ("expert_load_cv", 0.2, 0.1),
                             ("router_load_cv_max", 0.4, 0.3), ("dead_experts", 1, 0)):
        assert (row[f"{key} (final)"], row[f"{key} (best)"]) == (final, best), key


def test_per_source_values_and_plot(runs, tmp_path):
    _, dirs = runs
    loaded = [compare.Run(d) for d in dirs]
    sources, loss, exact = compare.source_values(loaded)
    assert sources == ["identity", "math"]
    assert loss["a"] == [2.2, 2.6] and loss["b"] == [None, None]  # the last logged eval per source
    assert exact["a"] == [0.75, 0.25] and exact["c"] == [None, None]
    compare.compare_runs(dirs, tmp_path / "out")
    assert_png_not_blank(tmp_path / "out" / "sources.png")
    assert not compare.plot_sources(loaded[1:], tmp_path / "none.png")  # b and c have no per-source values
    assert not (tmp_path / "none.png").exists()
