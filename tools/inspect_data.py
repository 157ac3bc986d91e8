"""Show what the model will see: a few packed rows, decoded, with the trained tokens marked.

    python tools/inspect_data.py                                   # data=synthetic
    python tools/inspect_data.py data=jsonl data.paths=[my.jsonl] data.strict=false --rows 2

Takes the same `data=...`, `data.<key>=...` and `train.seed=...` overrides as launch/train.py
(the data group's yaml from conf/data/ first, then the overrides), so every record layout and
file kind training reads (README, Data). A bad override or data file prints one `floe:` message
and exits 2, as training does. Trained tokens (labels
!= -100) are shown between ⟦ and ⟧; each packed example starts on a `── example` line.
The last line of output is one JSON object: examples, skipped (by reason), rows, tokens,
loss_tokens, pad_fraction (and a few more).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from floe.data import DataConfig, build_dataset  # noqa: E402
from floe.errors import ConfigError  # noqa: E402
from launch.errors import config_errors  # noqa: E402


def data_config_from_overrides(overrides: list[str]) -> tuple[DataConfig, int]:
    """DataConfig and seed from Hydra-style overrides, without Hydra (tools stay light)."""
    option, values, seed = "synthetic", {}, 0
    for o in overrides:
        key, sep, raw = o.partition("=")
        if not sep:
            raise ConfigError(f"expected key=value, got {o!r}")
        value = yaml.safe_load(raw) if raw else None
        if key == "data":
            option = str(value)
        elif key.startswith("data."):
            values[key[5:]] = value
        elif key == "train.seed":
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"train.seed must be an integer, got {raw!r}")
            seed = value
        else:
            raise ConfigError(f"unknown override {key!r}: only data=..., data.<key>=... and train.seed=...")
    path = REPO / "conf" / "data" / f"{option}.yaml"
    if not path.is_file():
        options = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise ConfigError(f"data={option}: no such data option (options: {options})")
    base = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(values) - set(DataConfig.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"unknown data keys: {', '.join('data.' + k for k in unknown)}")
    try:
        return DataConfig(**{**base, **values}), seed
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None


def show_row(tok, ds, r: int, out=None) -> None:
    """Print row r: one block per packed example, trained spans between ⟦ ⟧."""
    out = out or sys.stdout
    b = ds.batch([r])
    ids, labels, pos = (b[k][0].tolist() for k in ("input_ids", "labels", "position_ids"))
    n = int(ds.lengths[r])
    starts = [i for i in range(n) if pos[i] == 0] + [n]
    seg = int(ds.seg_offsets[r])
    print(f"═══ row {r}: {len(starts) - 1} examples, {n} tokens + {ds.seq_len - n} padding", file=out)
    for k, (a, z) in enumerate(zip(starts, starts[1:], strict=False)):
        source = ds.source_names[int(ds.seg_source[seg + k])]
        trained = sum(1 for t in range(a, z) if labels[t] != -100)
        print(f"── example {int(ds.seg_example[seg + k])} ({source}; {z - a} tokens, {trained} trained)", file=out)
        text, i = [], a
        while i < z:  # group runs of trained / untrained tokens, decode each run
            j = i
            while j < z and (labels[j] != -100) == (labels[i] != -100):
                j += 1
            piece = tok.decode(ids[i:j])
            text.append(f"⟦{piece}⟧" if labels[i] != -100 else piece)
            i = j
        print("".join(text), file=out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="data=<option>, data.<key>=<value>, train.seed=<n>")
    ap.add_argument("--rows", type=int, default=3, help="how many rows to show (0: only the statistics)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    with config_errors():
        cfg, seed = data_config_from_overrides(args.overrides)
        try:
            tok, ds = build_dataset(cfg, seed)
        except (ValueError, FileNotFoundError) as e:  # a data file, line or key: bad input (as in training)
            raise ConfigError(str(e)) from e
    for r in range(min(args.rows, ds.num_rows)):
        show_row(tok, ds, r)
    s = ds.stats
    print(json.dumps({"examples": s["examples"], "skipped": s["skipped"], "rows": s["rows"], "tokens": s["tokens"],
                      "loss_tokens": s["loss_tokens"], "pad_fraction": s["pad_fraction"],
                      "truncated": s["truncated"], "seq_len": ds.seq_len, "sources": s["sources"]}))


if __name__ == "__main__":
    main()
