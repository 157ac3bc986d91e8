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


def test_inspect_data_reads_sharegpt_and_alpaca_arrays(tmp_path, capsys):
    share = tmp_path / "share.jsonl"
    share.write_text(json.dumps({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}) + "\n")
    alpaca = tmp_path / "alpaca_data.json"
    alpaca.write_text(json.dumps([{"instruction": "Say hi", "input": "", "output": "hi there"}]))
    inspect_data.main(["data=jsonl", f"data.paths=[{share},{alpaca}]", "data.seq_len=64",
                       f"data.cache_dir={tmp_path}", "--rows", "1"])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1])["examples"] == 2 and "⟦" in out


@pytest.mark.parametrize("tool, args, message", [
    ("inspect_data", ["data.seqlen=3"], "unknown data keys: data.seqlen"),
    ("inspect_data", ["data=nope"], "data=nope: no such data option (options: arctic_mix, jsonl, "),
    ("inspect_data", ["data.format=chatml"], "data.format must be one of auto"),
    ("inspect_data", ["train.seed=abc"], "train.seed must be an integer"),
    ("inspect_data", ["data=jsonl", "data.paths=[/nonexistent.jsonl]"], "data.paths[0]: no file matches"),
    ("train_tokenizer", ["--out", "x.model", "--model-type", "unigram"], "--model-type unigram: floe exports only BPE"),
    ("train_tokenizer", ["--out", "x.model", "--vocab-size", "100"], "--vocab-size 100: at least 262 pieces"),
    ("train_tokenizer", ["--out", "x.model", "--input", "/nonexistent.txt"], "--input: no file /nonexistent.txt"),
])
def test_tools_config_errors_exit_2_with_one_message(tool, args, message, capsys):
    """Refused before any work (train_tokenizer: before training), like launch/train.py: floe: ..., exit 2."""
    with pytest.raises(SystemExit) as e:
        {"inspect_data": inspect_data, "train_tokenizer": train_tokenizer}[tool].main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("floe: ") and message in err, err


def test_train_tokenizer_too_large_a_vocabulary_is_one_message(tmp_path, capsys):
    """SentencePiece's own refusal (more pieces than the corpus has) is the same clean exit, not a traceback."""
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("a b c\n" * 20)
    with pytest.raises(SystemExit) as e:
        train_tokenizer.main(["--input", str(corpus), "--out", str(tmp_path / "x.model"), "--vocab-size", "5000"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("floe: SentencePiece refused the settings") and "5000" in err
    assert not (tmp_path / "x.model").exists()


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
