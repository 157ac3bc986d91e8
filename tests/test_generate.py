"""floe.generate against recomputing the whole prefix at every step (no cache, no padding, one
prompt at a time); sampling reproducibility; top-p at its limit against greedy."""
import pytest
import torch

from floe.config import PRESETS
from floe.generate import generate, left_align
from floe.model import ArcticForCausalLM

PROMPTS = [[5, 17, 300, 42, 9, 88, 7], [250, 3], [11, 12, 13, 14]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = ArcticForCausalLM(PRESETS["tiny"]).eval()
    m.reset_parameters(seed=3)
    return m


def recompute(model, prompt, n, stop=()):
    """Greedy by running the full sequence through the model for every new token."""
    ids, new = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]), dropless=True).logits[0, -1]
            new.append(int(logits.argmax()))
            ids.append(new[-1])
            if stop and new[-len(stop):] == list(stop):
                return new[:-len(stop)]
    return new


def test_cached_greedy_equals_recomputing_the_prefix(model):
    want = [recompute(model, p, 12) for p in PROMPTS]
    assert generate(model, PROMPTS, 12) == want
    assert len({tuple(w) for w in want}) == 3 and all(len(w) == 12 for w in want)


def test_right_padded_batch_equals_left_padded(model):
    s = max(map(len, PROMPTS))
    ids = torch.zeros(len(PROMPTS), s, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(PROMPTS):
        ids[row, :len(p)], mask[row, :len(p)] = torch.tensor(p), 1
    assert generate(model, ids, 8, attention_mask=mask) == [recompute(model, p, 8) for p in PROMPTS]


def test_left_align_rejects_holes():
    ids = torch.arange(8).view(2, 4)
    aligned, mask = left_align(ids, torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]]))
    assert aligned[0, 2:].tolist() == [0, 1] and aligned[1, 1:].tolist() == [5, 6, 7]
    assert mask.tolist() == [[0, 0, 1, 1], [0, 1, 1, 1]]
    with pytest.raises(ValueError, match="contiguous"):
        left_align(ids, torch.tensor([[1, 0, 1, 0], [1, 1, 1, 1]]))


def test_stops_at_the_stop_sequence(model):
    free = recompute(model, PROMPTS[0], 10)
    stop = free[3:5]  # a pair the model produces; generation must end before it
    got = generate(model, [PROMPTS[0], PROMPTS[1]], 10, stop=stop)
    assert got[0] == recompute(model, PROMPTS[0], 10, stop) == free[:3]
    assert got[1] == recompute(model, PROMPTS[1], 10, stop)


def test_sampling_is_seeded_and_tiny_top_p_is_greedy(model):
    a = generate(model, PROMPTS, 10, temperature=1.0, seed=7)
    assert a == generate(model, PROMPTS, 10, temperature=1.0, seed=7)
    assert a != generate(model, PROMPTS, 10, temperature=1.0, seed=8)
    assert a != generate(model, PROMPTS, 10)  # sampling at temperature 1 is not greedy here
    assert generate(model, PROMPTS, 10, temperature=1.0, top_p=1e-6, seed=9) == generate(model, PROMPTS, 10)


def test_bad_arguments_are_one_message(model):
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1.*temperature.*top_p"):
        generate(model, PROMPTS, 0, temperature=-1.0, top_p=0.0)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1], []], 4)


# ----------------------------------------------------------------------------- tools/evaluate.py

def test_scores_against_hand_made_predictions():
    from tools.evaluate import score, summarize

    assert score(" The answer is 7.\n", "The answer is 7.") == {"exact_match": True, "numeric_match": True}
    assert score("3 + 4 = 7\nThe answer is 7", "The answer is 7.") == {"exact_match": False, "numeric_match": True}
    assert score("The answer is 8.", "The answer is 7.") == {"exact_match": False, "numeric_match": False}
    assert score("no number", "I am floe.") == {"exact_match": False, "numeric_match": None}
    assert score("-2.50 and 1,200", "so 1200") == {"exact_match": False, "numeric_match": True}
    rows = [{"source": "math", "exact_match": True, "numeric_match": True},
            {"source": "math", "exact_match": False, "numeric_match": True},
            {"source": "math", "exact_match": False, "numeric_match": False},
            {"source": "identity", "exact_match": True, "numeric_match": None}]
    s = summarize(rows)
    assert s["exact_match"] == 0.5 and s["per_source"] == {"identity": 1.0, "math": pytest.approx(1 / 3)}
    assert s["numeric_match"] == {"math": pytest.approx(2 / 3)}


def test_eval_records_split_and_bad_lines_named(tmp_path):
    from tools.evaluate import read_eval_records

    good = tmp_path / "qa.jsonl"
    good.write_text('{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, '
                    '{"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}, '
                    '{"role": "assistant", "content": "d"}]}\n\n{"prompt": "p", "completion": "q", "source": "x"}\n')
    items = read_eval_records(str(good))
    assert [it["reference"] for it in items] == ["d", "q"] and [it["source"] for it in items] == ["qa", "x"]
    assert items[0]["turns"] == (("system", "s"), ("user", "a"), ("assistant", "b"), ("user", "c"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "plain"}\n{"prompt": "p", "completion": "q"}\nnot json\n')
    with pytest.raises(ValueError, match=r"(?s)bad.jsonl:1: no assistant turn.*bad.jsonl:3: invalid JSON"):
        read_eval_records(str(bad))
    # the layouts and file kinds training reads: ShareGPT in Parquet, Alpaca in a JSON array
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt",
                                                                                            "value": "b"}]}]),
                   tmp_path / "share.parquet")
    (tmp_path / "alpaca.json").write_text('[{"instruction": "a", "input": "", "output": "b"}, {"instruction": "x"}]')
    assert [(it["turns"], it["reference"]) for it in read_eval_records(str(tmp_path / "share.parquet"))] == \
        [((("user", "a"),), "b")]
    with pytest.raises(ValueError, match=r"alpaca.json: record 2: no known fields"):
        read_eval_records(str(tmp_path / "alpaca.json"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from launch.train import train
    from tests.test_train import make_cfg

    run = tmp_path_factory.mktemp("gen") / "run"
    train(make_cfg(run, "train.max_steps=2", "train.global_batch_size=8", "train.micro_batch_size=8"))
    return run


@pytest.mark.slow
def test_generate_cli_on_a_run_and_its_export(tiny_run, tmp_path, capsys):
    from tools.export import export
    from tools.generate import chat_prompt_ids, load_model_for_inference
    from tools.generate import main as generate_main

    model, tok = load_model_for_inference(str(tiny_run))
    question = "What is 2 + 3?"
    # the reference: the full prefix recomputed each step, decoded by hand
    own = tok.decode(recompute(model, chat_prompt_ids(tok, [("user", question)]), 6, tok.im_end))
    assert generate_main([str(tiny_run), "--prompt", question, "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == own + "\n"
    export(str(tiny_run), str(tmp_path / "hf"))
    assert generate_main([str(tmp_path / "hf"), "--prompt", question, "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == own + "\n"


def test_evaluate_cli_planted_references(model, tmp_path, capsys):
    """On random weights (an HF dir), whose greedy reply is garbage text but a known one."""
    import json

    from floe.data.tokenizer import Tokenizer
    from floe.hf import save_hf
    from tools.evaluate import main as evaluate_main
    from tools.generate import chat_prompt_ids

    tok, hf_dir = Tokenizer(), tmp_path / "hf"
    save_hf(model.state_dict(), model.config, str(hf_dir), tok)
    question = "What is 2 + 3?"
    own = tok.decode(recompute(model, chat_prompt_ids(tok, [("user", question)]), 6, tok.im_end))
    assert own.strip() and own != own.strip() + " not"
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"prompt": question, "completion": f"  {own}\n", "source": "planted"}) + "\n"
                    + json.dumps({"prompt": question, "completion": own + " not", "source": "wrong"}) + "\n")
    out = tmp_path / "pred.jsonl"
    assert evaluate_main([str(hf_dir), "--data", str(data), "--out", str(out), "--max-new-tokens", "6"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["exact_match"] for r in rows] == [True, False] and all(r["prediction"] == own for r in rows)
    assert rows[0]["prompt"] == question and rows[0]["source"] == "planted"
    summary = json.loads((hf_dir / "exact_match.json").read_text())
    assert summary["exact_match"] == 0.5 and summary["per_source"] == {"planted": 1.0, "wrong": 0.0}
    assert "exact_match=0.500 (planted=1.000 wrong=0.000)" in capsys.readouterr().out

    assert evaluate_main([str(hf_dir), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_cli_on_a_run_with_the_embedded_questions(tiny_run, capsys):
    import json

    from floe.run.compare import read_exact_match
    from tools.evaluate import main as evaluate_main

    assert evaluate_main([str(tiny_run), "--num-per-source", "1", "--max-new-tokens", "2"]) == 0
    rows = [json.loads(line) for line in (tiny_run / "eval_predictions.jsonl").read_text().splitlines()]
    assert sorted(r["source"] for r in rows) == ["code", "general", "identity", "math"]
    assert all(r["exact_match"] == (r["prediction"].strip() == r["reference"].strip()) for r in rows)
    read = read_exact_match(tiny_run)
    assert set(read) == {"exact_match", "exact_match/code", "exact_match/general", "exact_match/identity",
                         "exact_match/math"}


def test_neftune_never_touches_generation(model):
    """A model left in training mode with train.neftune_alpha on generates what it generates without."""
    import copy

    noisy = copy.deepcopy(model).train()
    noisy.neftune_alpha = 5.0
    assert generate(noisy, PROMPTS, 8) == generate(model, PROMPTS, 8)
    assert (generate(noisy, PROMPTS, 8, temperature=1.0, seed=4)
            == generate(model, PROMPTS, 8, temperature=1.0, seed=4))
