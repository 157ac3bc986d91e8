"""tools/inspect_data.py, tools/train_tokenizer.py and tools/bench_data.py, run in-process."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))
import bench_data  # noqa: E402
import inspect_data  # noqa: E402
import train_tokenizer  # noqa: E402

from floe.data.tokenizer import DEFAULT_MODEL  # noqa: E402


def test_inspect_data_marks_trained_tokens_and_ends_with_json(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "Say hi", "completion": "hi there"}) + "\n" + "{oops\n"
                    + json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    inspect_data.main(["data=jsonl", f"data.paths=[{path}]", "data.strict=false", "data.seq_len=64",
                       f"data.cache_dir={tmp_path}", "--rows", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert "⟦hi there<|im_end|>⟧" in "\n".join(lines)
    assert "<|im_start|>user\nSay hi<|im_end|>" in "\n".join(lines)  # the prompt is not marked
    stats = json.loads(lines[-1])
    assert stats["examples"] == 1 and stats["rows"] == 1
    assert stats["skipped"] == {"invalid JSON": 1, "no assistant turn": 1}
    assert stats["tokens"] + round(stats["pad_fraction"] * 64) == 64
    assert {"loss_tokens", "pad_fraction"} <= set(stats)


def test_inspect_data_rejects_unknown_keys(tmp_path):
    with pytest.raises(SystemExit, match="unknown data keys: data.seqlen"):
        inspect_data.main(["data.seqlen=3"])


def test_shipped_tokenizer_is_reproducible(tmp_path, capsys):
    out = tmp_path / "sp.model"
    train_tokenizer.main(["--out", str(out)])
    assert json.loads(capsys.readouterr().out)["vocab_size"] == 1024
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    assert digest == hashlib.sha256(DEFAULT_MODEL.read_bytes()).hexdigest(), (
        "moe/data/assets/floe_sp.model no longer matches its recipe (did moe/data/synthetic.py change?): "
        "regenerate it with `python tools/train_tokenizer.py --out moe/data/assets/floe_sp.model`")


def test_bench_data_small_run(capsys):
    bench_data.main(["--seq-len", "512", "--num-examples", "400", "--repeats", "1", "--threads", "1"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["examples"] == 400
    assert result["packing_efficiency"] > 0.9 > result["one_per_row_efficiency"]
    assert result["rows"] * 512 * result["packing_efficiency"] == pytest.approx(result["tokens"], abs=1)
