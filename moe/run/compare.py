"""Compare training runs: one table row per run (final and best metrics, the config keys that
differ between the runs) and plots.

    python tools/compare.py runs/tiny/a runs/tiny/b            # any run dirs
    python tools/compare.py 'runs/multirun/*' --out cmp        # a sweep; globs are expanded here too

Reads from each run dir
    metrics.jsonl      required; one JSON object per logged step. A torn last line (a run killed
                       mid-write) is dropped with a warning; a bad line elsewhere is an error.
                       Keys used when present: loss, eval_loss, eval_loss/<source>, balance_loss,
                       balance_uniform (or its older name balance_floor), dropped_frac,
                       dropped_loss_frac, expert_load_cv, router_load_cv_max, dead_experts,
                       tokens_per_s, mfu
    config.yaml        the resolved config the trainer wrote; its keys that differ between the
                       runs (flattened, e.g. optim.lr) become columns (run.dir/run.name excepted)
    exact_match.json   optional, from tools/evaluate.py: {"exact_match": x, "per_source": {s: x}}
                       (also accepted: "exact_match/<s>" keys, or "exact_match": {"overall": x, s: x})
    expert_load.jsonl  optional; lines {"step": N, "tokens_per_expert": [[layer 0 counts], ...]}
Writes to OUT (default: <the runs' common parent>/compare), after removing what an earlier
comparison wrote there (so no stale plot of another run stays)
    compare.csv               the full table; "(final)" is the last logged value, "(best)" the lowest
                              (highest for tokens_per_s, mfu, exact_match); "balance / uniform" is the
                              final balance loss over its value under uniform routing (num_layers)
    compare.md                the compact table (also printed): the config keys that differ between
                              the runs and the headline metrics (HEADLINE); --full prints every column
    loss.png                  loss (solid) and eval loss (dashed, a marker at each evaluation) per run
    balance.png               balance loss per run with its uniform-routing value (dotted)
    sources.png               held-out loss and exact match per data source, one bar per run (when present)
    expert_load_<run>.png     share of each layer's tokens per expert at the last logged step, and the
                              busiest expert's share (x num_experts: 1 = uniform) per layer over the steps

From Python (e.g. at the end of a -m sweep): table = compare_runs(run_dirs, out_dir);
print(to_markdown(table, full=False)).
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import logging
import math
import os
import re
import sys
from pathlib import Path

import yaml

log = logging.getLogger("floe.compare")
LOWER_IS_BETTER = ("loss", "eval_loss", "balance_loss", "dropped_frac", "dropped_loss_frac", "expert_load_cv",
                   "router_load_cv_max", "router_max_over_mean", "dead_experts")
HIGHER_IS_BETTER = ("tokens_per_s", "mfu")
UNIFORM_KEYS = ("balance_uniform", "balance_floor")  # the value of balance_loss under uniform routing
NOT_COMPARED = ("run.dir", "run.name")  # differ between any two runs by construction
# The compact table's metric columns (compare.md and the printed table); the CSV has every column.
HEADLINE = ("steps", "loss (final)", "loss (best)", "eval_loss (final)", "eval_loss (best)", "balance / uniform",
            "dropped_frac (final)", "tokens_per_s (final)", "exact_match")
OUTPUTS = ("compare.md", "compare.csv", "loss.png", "balance.png", "sources.png", "expert_load_*.png")  # what compare_runs writes


# ---------------------------------------------------------------------------- reading
def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSONL log; a torn last line is dropped with a warning, any other bad line raises."""
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    out = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if i == len(lines):
                log.warning("%s:%d: torn last line dropped (%s)", path, i, e)
                break
            raise ValueError(f"{path}:{i}: not a JSON object ({e})") from None
        out.append(record)
    return out


def flatten(d: dict, prefix: str = "") -> dict:
    """{'optim': {'lr': 1}} -> {'optim.lr': 1}; lists stay values."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def read_exact_match(run_dir: Path) -> dict[str, float]:
    """{'exact_match': x, 'exact_match/<source>': x} from run_dir/exact_match.json, {} when absent."""
    path = run_dir / "exact_match.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    out = {}
    overall = data.get("exact_match")
    if isinstance(overall, dict):
        out.update({f"exact_match/{s}": v for s, v in overall.items() if s not in ("overall", "all")})
        overall = overall.get("overall", overall.get("all"))
    if overall is not None:
        out["exact_match"] = overall
    out.update({f"exact_match/{s}": v for s, v in (data.get("per_source") or {}).items()})
    out.update({k: v for k, v in data.items() if k.startswith("exact_match/")})
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float))}


class Run:
    """What one run dir holds, read once."""

    def __init__(self, path: Path):
        self.path = path
        self.name = path.name
        self.metrics = read_jsonl(path / "metrics.jsonl")
        if not self.metrics:
            raise ValueError(f"{path / 'metrics.jsonl'}: no metrics logged yet")
        cfg_path = path / "config.yaml"
        if cfg_path.is_file():
            self.config = flatten(yaml.safe_load(cfg_path.read_text()) or {})
        else:
            log.warning("%s: no config.yaml; its config columns stay empty", path)
            self.config = {}
        self.exact_match = read_exact_match(path)
        load = path / "expert_load.jsonl"
        self.expert_load = read_jsonl(load) if load.is_file() else []

    def final(self, key: str) -> float | None:
        """The last logged value of a metric, non-finite included (a run that ended in nan shows nan)."""
        values = [r[key] for r in self.metrics if isinstance(r.get(key), (int, float))]
        return float(values[-1]) if values else None

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of a metric over the log, finite values only."""
        pairs = [(r.get("step", i), r[key]) for i, r in enumerate(self.metrics)
                 if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        return [p[0] for p in pairs], [float(p[1]) for p in pairs]

    def uniform_balance(self) -> float | None:
        """balance_loss under uniform routing: logged (either name), else model.num_layers from the config."""
        for key in UNIFORM_KEYS:
            _, values = self.series(key)
            if values:
                return values[-1]
        layers = self.config.get("model.num_layers")
        return float(layers) if isinstance(layers, (int, float)) else None


# ---------------------------------------------------------------------------- the table
def metric_keys(runs: list[Run]) -> list[str]:
    """The compared metrics present in any run, in a fixed order (eval sources sorted)."""
    present = {k for run in runs for r in run.metrics for k in r}
    sources = sorted(k for k in present if k.startswith("eval_loss/"))
    order = ["loss", "eval_loss", *sources, "balance_loss", "dropped_frac", "dropped_loss_frac", "expert_load_cv",
             "router_load_cv_max", "dead_experts", "tokens_per_s", "mfu"]
    return [k for k in order if k in present]


def differing_config(runs: list[Run]) -> list[str]:
    """Flattened config keys whose value is not the same in every run (a missing key counts as a value)."""
    keys = sorted({k for run in runs for k in run.config})
    missing = object()
    return [k for k in keys if k not in NOT_COMPARED and
            len({json.dumps(run.config.get(k, missing), default=repr, sort_keys=True) for run in runs}) > 1]


def summarize(run: Run, keys: list[str], config_keys: list[str], em_keys: list[str]) -> dict:
    row = {"run": run.name}
    row.update({k: run.config.get(k) for k in config_keys})
    row["steps"] = run.metrics[-1].get("step")
    for key in keys:
        _, values = run.series(key)
        best = max if key in HIGHER_IS_BETTER else min
        final = run.final(key)
        row[f"{key} (final)"] = final
        row[f"{key} (best)"] = best(values) if values else None  # over finite values
        if key == "balance_loss":
            uniform = run.uniform_balance()
            row["balance uniform"] = uniform
            row["balance / uniform"] = final / uniform if final is not None and uniform else None
    row.update({k: run.exact_match.get(k) for k in em_keys})
    return row


def build_table(runs: list[Run]) -> list[dict]:
    """One row per run, every row with the same columns (None where a run lacks a value)."""
    keys, config_keys = metric_keys(runs), differing_config(runs)
    em = {k for run in runs for k in run.exact_match}
    em_keys = (["exact_match"] if "exact_match" in em else []) + sorted(em - {"exact_match"})
    return [summarize(run, keys, config_keys, em_keys) for run in runs]


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def compact_columns(table: list[dict]) -> list[str]:
    """run, the config columns (they differ between the runs by construction) and the HEADLINE metrics."""
    cols = list(table[0])
    config = cols[1:cols.index("steps")] if "steps" in cols else []
    return ["run", *config, *[c for c in HEADLINE if c in cols]]


def short_names(names: list[str]) -> list[str]:
    """Run names (a sweep's: its overrides, "a=1,b=2") without the overrides every run shares."""
    parts = [re.split(r",(?=[\w.+~]+=)", n) for n in names]  # split at the comma that starts an override
    common = set.intersection(*(set(p) for p in parts)) if len(parts) > 1 else set()
    short = [",".join(x for x in p if x not in common) or n for p, n in zip(parts, names, strict=True)]
    return short if len(set(short)) == len(short) else names


def to_markdown(table: list[dict], full: bool = True) -> str:
    """The table as a GitHub markdown table; full=False: compact_columns only."""
    if not table:
        return ""
    cols = list(table[0]) if full else compact_columns(table)
    names = [row["run"] for row in table] if full else short_names([row["run"] for row in table])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row, name in zip(table, names, strict=True):
        cells = [name if c == "run" else _cell(row[c]) for c in cols]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(table: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(table[0]))
        for row in table:
            w.writerow(["" if row[c] is None else (json.dumps(row[c]) if isinstance(row[c], (list, dict))
                                                   else row[c]) for c in row])


# ---------------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def _curve(ax, steps: list[int], values: list[float], style: str, **kw) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.plot(steps, values, style, marker=kw.pop("marker", "o" if len(values) == 1 else None), **kw)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps


def plot_losses(runs: list[Run], path: Path) -> str:
    """Training loss per run, and its eval loss: a dashed curve with a marker at each evaluation
    (one marker when the run evaluated once, at the end). The title says which it drew."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    evals = 0
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        _curve(ax, *run.series("loss"), "-", color=color, label=f"{run.name} loss")
        steps, values = run.series("eval_loss")
        if values:
            evals = max(evals, len(values))
            _curve(ax, steps, values, "--", marker="o", color=color, markersize=5, label=f"{run.name} eval loss")
    title = "training loss (solid)"
    if evals > 1:
        title += " and held-out eval loss (dashed, o = an evaluation)"
    elif evals == 1:
        title += " and held-out eval loss (o: evaluated once; train.eval_every=N for a curve)"
    ax.set(xlabel="step", ylabel="loss")
    _set_title(ax, title)
    _save_curves(plt, fig, ax, path)
    return title


def source_values(runs: list[Run]) -> tuple[list[str], dict[str, list], dict[str, list]]:
    """(sources, {run: final eval_loss/<source> per source}, {run: exact_match/<source> per source});
    None where a run lacks the value. Sources: every eval_loss/<s> or exact_match/<s> any run has."""
    keys = {k for run in runs for r in run.metrics for k in r if k.startswith("eval_loss/")}
    sources = sorted({k.split("/", 1)[1] for k in keys} |
                     {k.split("/", 1)[1] for run in runs for k in run.exact_match if "/" in k})
    loss = {run.name: [run.final(f"eval_loss/{s}") for s in sources] for run in runs}
    exact = {run.name: [run.exact_match.get(f"exact_match/{s}") for s in sources] for run in runs}
    return sources, loss, exact


def plot_sources(runs: list[Run], path: Path) -> bool:
    """Held-out loss (left) and exact match (right, when tools/evaluate.py ran) per data source, one bar
    per run: which mix (or setting) serves which source. False (no file) when no run has per-source values."""
    sources, loss, exact = source_values(runs)
    if not sources:
        return False
    panels = [("held-out loss (final eval_loss/<source>)", loss)]
    if any(v is not None for vals in exact.values() for v in vals):
        panels.append(("exact match (tools/evaluate.py)", exact))
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels) + 2, 4.5), squeeze=False)
    width = 0.8 / len(runs)
    labels = short_names([run.name for run in runs])  # without the overrides every run shares
    for ax, (title, values) in zip(axes[0], panels):
        for i, (run, label) in enumerate(zip(runs, labels)):
            ax.bar([j + i * width for j in range(len(sources))],
                   [float("nan") if v is None else v for v in values[run.name]], width, label=label)
        ax.set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(sources))], sources)
        ax.grid(alpha=0.3, axis="y")
        _set_title(ax, title)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _set_title(ax, title: str, fontsize: int = 10) -> None:
    """A title wrapped to the axes' width, so it is never clipped."""
    import textwrap

    width_px = ax.get_window_extent().width
    chars = max(20, int(width_px / (0.6 * fontsize * ax.figure.dpi / 72)))
    ax.set_title(textwrap.fill(title, chars), fontsize=fontsize)


def _save_curves(plt, fig, ax, path: Path) -> None:
    """Grid, legend, layout, PNG at 100 dpi, and the figure closed (the curve plots' common end)."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_balance(runs: list[Run], path: Path) -> bool:
    """Balance loss curves with each run's uniform-routing value; False when no run logs it."""
    if not any(run.series("balance_loss")[1] for run in runs):
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        _curve(ax, *run.series("balance_loss"), "-", color=color, label=f"{run.name} balance loss")
        uniform = run.uniform_balance()
        if uniform is not None:
            ax.axhline(uniform, color=color, linestyle=":", label=f"{run.name} uniform routing ({uniform:g})")
    ax.set(xlabel="step", ylabel="balance loss (sum over layers)")
    _set_title(ax, "balance loss (solid) and its value under uniform routing (dotted)")
    _save_curves(plt, fig, ax, path)
    return True


def plot_expert_load(run: Run, path: Path) -> bool:
    """Left: heatmap (layer x expert) of the share of each layer's tokens per expert at the last logged
    step. Right: per layer, the busiest expert's share x num_experts over the logged steps (1 = uniform)."""
    if not run.expert_load:
        return False
    loads = [_shares(run, r) for r in run.expert_load]
    shares, last = loads[-1], run.expert_load[-1]
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    num_layers, num_experts = len(shares), len(shares[0])
    fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(max(5.5, 0.35 * num_experts + 3) + 5.5,
                                                  max(4.0, 0.3 * num_layers + 2.5)),
                                   gridspec_kw={"width_ratios": [max(5.5, 0.35 * num_experts + 3), 5.5]})
    im = ax.imshow(shares, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="share of the layer's tokens")
    for a in (ax, ax_t):
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="expert", ylabel="layer")
    steps = [r.get("step", i) for i, r in enumerate(run.expert_load)]
    for layer in range(num_layers):
        points = [(step, max(s[layer]) * len(s[layer])) for step, s in zip(steps, loads, strict=True) if layer < len(s)]
        ax_t.plot(*zip(*points, strict=True), marker="o" if len(points) == 1 else None, label=f"layer {layer}")
    ax_t.axhline(1.0, color="gray", linestyle=":", label="uniform")
    ax_t.set(xlabel="step", ylabel="busiest expert's share x num_experts")
    ax_t.grid(alpha=0.3)
    ax_t.legend(fontsize=7, ncol=max(1, num_layers // 8))
    fig.tight_layout()
    _set_title(ax, f"{run.name}: tokens per expert at step {last.get('step', '?')} (uniform = 1/{num_experts})")
    _set_title(ax_t, "imbalance over training (1 = uniform)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _shares(run: Run, record: dict) -> list[list[float]]:
    counts = record.get("tokens_per_expert")
    if not counts or not all(isinstance(r, list) and r and len(r) == len(counts[0]) for r in counts):
        raise ValueError(f"{run.path / 'expert_load.jsonl'}: step {record.get('step', '?')} needs tokens_per_expert "
                         "as [[counts of layer 0], [counts of layer 1], ...] of equal lengths")
    return [[c / max(sum(layer), 1) for c in layer] for layer in counts]


# ---------------------------------------------------------------------------- entry points
def expand_run_dirs(args: list[str]) -> list[Path]:
    """Run dirs from paths and globs. A glob match that is no run dir (a file, a dir without
    metrics.jsonl, e.g. a previous compare output) is skipped with a warning; an explicit one is an error."""
    out, problems = [], []
    for arg in args:
        explicit = not glob.has_magic(arg)
        matches = [arg] if explicit else sorted(glob.glob(os.path.expanduser(arg)))
        if not matches:
            problems.append(f"{arg}: no such run dir")
        for m in matches:
            p = Path(m)
            if (p / "metrics.jsonl").is_file():
                out.append(p)
            elif explicit:
                problems.append(f"{p}: not a run dir (no metrics.jsonl)")
            else:
                log.warning("%s: skipped, not a run dir (no metrics.jsonl)", p)
    if problems:
        raise ValueError("\n".join(problems))
    if not out:
        raise ValueError(f"no run dirs among {args}")
    return out


def _unique_names(runs: list[Run]) -> None:
    names = [r.name for r in runs]
    if len(set(names)) < len(names):  # e.g. runs/a/0 and runs/b/0: use the path below the common parent
        root = os.path.commonpath([str(r.path.resolve()) for r in runs])
        for r in runs:
            r.name = os.path.relpath(r.path.resolve(), root)


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", name)[:120]


def compare_runs(run_dirs: list[str | Path], out_dir: str | Path | None = None) -> list[dict]:
    """Read the runs, write compare.md, compare.csv and the plots to out_dir; return the table.

    out_dir None: <the runs' common parent>/compare. Each table row is a dict with the same keys:
    "run", the differing config keys, "steps", "<metric> (final)", "<metric> (best)", "balance
    uniform", "balance / uniform", "exact_match[/<source>]" (None where a run has no value).
    """
    runs = [Run(Path(d)) for d in run_dirs]
    if not runs:
        raise ValueError("compare_runs: no run dirs given")
    _unique_names(runs)
    if out_dir is None:
        out_dir = Path(os.path.commonpath([str(r.path.resolve().parent) for r in runs])) / "compare"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for pattern in OUTPUTS:  # an earlier comparison's files (e.g. the heatmap of a run not compared now)
        for old in out.glob(pattern):
            old.unlink()
    table = build_table(runs)
    (out / "compare.md").write_text(to_markdown(table, full=False))
    write_csv(table, out / "compare.csv")
    plot_losses(runs, out / "loss.png")
    plot_balance(runs, out / "balance.png")
    plot_sources(runs, out / "sources.png")
    for run in runs:
        if not plot_expert_load(run, out / f"expert_load_{_file_name(run.name)}.png"):
            log.info("%s: no expert_load.jsonl, no expert-load heatmap", run.path)
    log.info("compare: wrote %s", out)
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run dirs or globs (e.g. 'runs/multirun/*')")
    ap.add_argument("--out", default=None, help="output dir (default: <common parent of the runs>/compare)")
    ap.add_argument("--full", action="store_true", help="print every column (compare.csv always has them)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        table = compare_runs(expand_run_dirs(args.runs), args.out)
    except ValueError as e:
        print(f"compare: error: {e}", file=sys.stderr)
        return 2
    print(to_markdown(table, full=args.full), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
