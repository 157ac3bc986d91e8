"""Export of a trained run as a Hugging Face directory: weights against the trained model,
tokenizer against floe's SentencePiece ids (through transformers.AutoTokenizer), chat template
against floe.data.template.render."""
import json

import pytest
import torch
from safetensors.torch import load_file

from floe.config import PRESETS
from floe.data import synthetic
from floe.data.formats import parse_record
from floe.data.template import render
from floe.data.tokenizer import Tokenizer, hf_tokenizer_json
from floe.hf import expert_key, from_hf, save_hf, to_hf
from floe.model import ArcticForCausalLM
from tests.test_train import make_cfg
from tools.export import export, load_checkpoint_model, resolve_checkpoint

TRICKY = ["", " ", "  ", "   x", "\n", "\n\n  \n", "a  b", "trailing  ", "\t tab", "héllo wörld 😀 中文 ☃",
          "12345.678", "<|im_start|>user\nhi<|im_end|>\n", "x<|im_end|>y<|im_start|>", "<s></s><unk>x",
          "\u2581 literal", "\x00\x01\x7f", "```python\ndef f():\n    return 1\n```", "a\u2581\u2581b  \u3000c"]


def embedded_texts(n=150):
    """Contents and whole rendered conversations of the embedded sources."""
    texts = []
    for source in ("math", "identity", "code", "general"):
        for record in synthetic.generate(source, n, seed=1):
            example = parse_record(record)
            texts += [content for _, content in example] + [render(example)]
    return texts


def test_names_round_trip():
    cfg = PRESETS["tiny"]
    torch.manual_seed(0)
    state = ArcticForCausalLM(cfg).state_dict()
    hf = to_hf(state, cfg)
    w2 = hf["model.layers.1.block_sparse_moe.experts.5.w2.weight"]
    assert torch.equal(w2, state[expert_key(1, "w2")][5]) and w2.shape == (cfg.hidden_size, cfg.expert_ffn)
    assert torch.equal(hf["model.layers.0.post_attention_layernorm.weight"], state["layers.0.norm_moe.weight"])
    assert torch.equal(hf["model.layers.0.residual_layernorm.weight"], state["layers.0.norm_res.weight"])
    assert len(hf) == len(state) - 3 * cfg.num_layers + 3 * cfg.num_layers * cfg.num_experts
    back = from_hf(hf, cfg)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    del hf["model.layers.0.block_sparse_moe.experts.3.w1.weight"]
    with pytest.raises(ValueError, match=r"missing \['model.layers.0.block_sparse_moe.experts.3.w1.weight'\]"):
        from_hf(hf, cfg)


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tok")
    from floe.hf import CHAT_TEMPLATE

    Tokenizer().save_hf(out, CHAT_TEMPLATE, model_max_length=512)
    return AutoTokenizer.from_pretrained(str(out))


def test_auto_tokenizer_gives_floes_ids(hf_tokenizer):
    tok = Tokenizer()
    texts = embedded_texts() + TRICKY
    mismatched = [t for t in texts if hf_tokenizer(t)["input_ids"] != tok.encode(t)]
    assert not mismatched, mismatched[:3]
    ids = tok.encode("<|im_start|>assistant\nThe answer is 42.<|im_end|>\n")
    assert ids[0] == tok.im_start[0] and tok.im_end[0] in ids  # markers are single tokens, no BOS added
    assert hf_tokenizer.decode(ids) == tok.decode(ids)
    # eos is the end of a turn (what floe trains the model to emit and generation stops at); pad is <pad>
    assert (hf_tokenizer.eos_token, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id) == \
        ("<|im_end|>", tok.im_end[0], tok.pad_id)
    assert hf_tokenizer.bos_token is None  # floe adds no BOS
    # the chat markers are special tokens: decoding without them leaves the conversation's text
    assert hf_tokenizer.decode(ids, skip_special_tokens=True) == "assistant\nThe answer is 42.\n"
    assert {"<|im_start|>", "<|im_end|>"} <= set(hf_tokenizer.all_special_tokens)
    # the one documented difference: the pad token spelled in a text is matched whole by transformers
    assert hf_tokenizer("a<pad>b")["input_ids"] == tok.encode("a") + [tok.pad_id] + tok.encode("b")


def test_chat_template_renders_floes_training_text(hf_tokenizer):
    for source in ("math", "identity", "code", "general"):
        for record in synthetic.generate(source, 20, seed=2):
            example = parse_record(record)
            assert hf_tokenizer.apply_chat_template(record["messages"], tokenize=False) == render(example)
    prompt = [{"role": "user", "content": "Hi"}]
    assert hf_tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == \
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(Exception, match="not narrator"):
        hf_tokenizer.apply_chat_template([{"role": "narrator", "content": "x"}], tokenize=False)


def test_chat_template_tools_and_generation_mask_match_floes_labels(hf_tokenizer):
    """apply_chat_template's text, tools rendering and {% generation %} mask (TRL's assistant_only_loss)
    against floe's encode_examples, for chat records with tools, tool calls, tool turns and content parts.
    floe encodes each turn's content by itself, so the ids of a whole rendered string may merge across
    a content/marker boundary differently; the text and the trained text are the same."""
    from floe.data.template import encode_examples
    from tests.test_layouts import CASES

    tok = Tokenizer()
    records = [m or r for r, m in CASES.values()] + [r for r in synthetic.generate("general", 5, seed=3)]
    assert any(r.get("tools") for r in records)
    for record in records:
        out = hf_tokenizer.apply_chat_template(record["messages"], tools=record.get("tools"), tokenize=True,
                                               return_dict=True, return_assistant_tokens_mask=True)
        example = parse_record(record)
        ids, trained = encode_examples(tok, [example]).example(0)
        assert hf_tokenizer.decode(out["input_ids"]) == render(example) == tok.decode(ids.tolist())
        hf_trained = [i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
        hf_turns = hf_tokenizer.decode(hf_trained).split("<|im_end|>")
        floe_turns = tok.decode(ids[trained].tolist()).split("<|im_end|>")
        assert len(hf_turns) == len(floe_turns) == 1 + sum(r == "assistant" for r, _ in example)
        for hf_turn, floe_turn in zip(hf_turns, floe_turns, strict=True):
            # transformers marks a token that straddles the span start ("\n" of the header merged with
            # the content's first characters); floe's per-turn encoding never straddles
            assert hf_turn.endswith(floe_turn) and hf_turn[:len(hf_turn) - len(floe_turn)] in ("", "\n"), hf_turn


def test_exported_files_are_readable_by_the_group(tmp_path):
    """model.safetensors (safetensors writes 0600) and checkpoint shards get the umask's mode (0644 under 022)."""
    import os
    import stat

    from floe.run.checkpoint import _save

    old = os.umask(0o022)
    try:
        cfg = PRESETS["tiny"]
        save_hf(ArcticForCausalLM(cfg).state_dict(), cfg, str(tmp_path / "hf"), Tokenizer())
        _save({"w": torch.zeros(2)}, str(tmp_path / "shard.safetensors"))
    finally:
        os.umask(old)
    for path in [*(tmp_path / "hf").iterdir(), tmp_path / "shard.safetensors"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_exported_tokenizer_loads_without_a_remote_code_question(tmp_path, monkeypatch):
    """An export's config.json names Arctic's remote code (auto_map, for the model), and transformers 5
    reads config.json before the tokenizer files: AutoTokenizer with trust_remote_code=False, as the
    README and tools/export.py say, loads floe's tokenizer without asking (input() is never called) and
    without the network; unset, transformers asks (what this test pins, so a change there shows up)."""
    import builtins

    import transformers
    from transformers import AutoTokenizer

    cfg = PRESETS["tiny"]
    out = tmp_path / "hf"
    save_hf(ArcticForCausalLM(cfg).state_dict(), cfg, str(out), Tokenizer())
    assert "AutoConfig" in json.loads((out / "config.json").read_text())["auto_map"]
    asked = []
    monkeypatch.setattr(builtins, "input", lambda prompt="": asked.append(prompt) or "n")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = AutoTokenizer.from_pretrained(str(out), trust_remote_code=False)
    assert not asked
    text = "<|im_start|>user\nhi<|im_end|>\n"
    assert hf(text)["input_ids"] == Tokenizer().encode(text) and hf.eos_token == "<|im_end|>"
    # tokenizer_config.json names the class, so transformers 4 (class first) never reads config.json
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    if int(transformers.__version__.split(".")[0]) >= 5:
        AutoTokenizer.from_pretrained(str(out))  # answered "n": still floe's tokenizer, after one question
        assert len(asked) == 1 and "custom code" in asked[0]


def test_dummy_prefix_tokenizer_and_refusal(tmp_path):
    """A Llama-style SentencePiece model (dummy prefix ▁) also keeps its ids; unigram is refused."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    texts = embedded_texts(40)
    for model_type, dummy in (("bpe", True), ("unigram", False)):
        path = tmp_path / f"{model_type}.model"
        spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(path)[:-6], vocab_size=400,
                                       model_type=model_type, byte_fallback=True, add_dummy_prefix=dummy,
                                       normalization_rule_name="identity", remove_extra_whitespaces=False,
                                       minloglevel=2, user_defined_symbols=["<|im_start|>", "<|im_end|>"])
    tok = Tokenizer(tmp_path / "bpe.model")
    tok.save_hf(tmp_path / "bpe_hf")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "bpe_hf"))
    assert tok.piece(tok.encode("Hi there")[0]).startswith("\u2581")  # the dummy prefix is there
    # SentencePiece prepends its ▁ once per encode() call, Hugging Face once per stretch of text
    # between added tokens: the same for any text without chat markers (floe encodes each turn's
    # content by itself, so its own training ids also carry one ▁ per stretch).
    # (the pad token, here <unk> as the model has no <pad>, is matched whole by transformers: see save_hf)
    plain = [t for t in texts + TRICKY if "<|im_" not in t and tok.piece(tok.pad_id) not in t]
    mismatched = [t for t in plain if hf(t)["input_ids"] != tok.encode(t)]
    assert len(plain) > 100 and not mismatched, mismatched[:3]
    with pytest.raises(ValueError, match=r"unigram.model: .*model_type is not BPE"):
        hf_tokenizer_json(tmp_path / "unigram.model")


def test_export_of_a_trained_run(tmp_path):
    from launch.train import train
    from transformers import AutoTokenizer

    run = tmp_path / "run"
    train(make_cfg(run, "train.max_steps=2", "train.global_batch_size=8", "train.micro_batch_size=8"))
    files = export(str(run), str(tmp_path / "out"))
    assert "model.safetensors" in files and "tokenizer.json" in files
    model, _ = load_checkpoint_model(*resolve_checkpoint(str(run)))
    exported = from_hf(load_file(tmp_path / "out" / "model.safetensors"), model.config)
    trained = model.state_dict()
    assert all(torch.equal(exported[k], trained[k]) for k in trained)
    fresh = ArcticForCausalLM(model.config)
    fresh.reset_parameters(seed=0)  # the run's seed: step 2's weights differ from the initial ones
    assert not torch.equal(fresh.state_dict()[expert_key(0, "w1")], trained[expert_key(0, "w1")])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    tok = Tokenizer()
    assert config["model_type"] == "arctic" and config["num_local_experts"] == 8
    assert config["intermediate_size"] == 64 and config["hidden_size"] == 64  # residual MLP = hidden
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == \
        (tok.sp.bos_id(), tok.im_end[0], tok.pad_id)
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tok.im_end[0]
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert hf_tok("The answer is 42.")["input_ids"] == tok.encode("The answer is 42.")


def test_sharded_export_index(tmp_path):
    cfg = PRESETS["tiny"]
    state = ArcticForCausalLM(cfg).state_dict()
    files = save_hf(state, cfg, str(tmp_path), Tokenizer(), dtype="bfloat16", max_shard_bytes=2**17)
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in files
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    merged = {}
    for f in shards:
        part = load_file(tmp_path / f)
        assert sum(t.numel() * 2 for t in part.values()) <= 2**17
        assert all(index["weight_map"][n] == f for n in part)
        merged.update(part)
    assert merged.keys() == to_hf(state, cfg).keys() and all(t.dtype == torch.bfloat16 for t in merged.values())
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in merged.values())


def test_export_refuses_an_inexpressible_run_before_writing(tmp_path):
    from launch.train import train

    run = tmp_path / "run"
    train(make_cfg(run, "train.max_steps=1", "train.global_batch_size=8", "train.micro_batch_size=8",
                   "model.dense_ffn=128"))
    with pytest.raises(ValueError, match=r"model.dense_ffn = 128 != model.hidden_size = 64"):
        export(str(run), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no complete checkpoint"):
        resolve_checkpoint(str(tmp_path))
    with pytest.raises(ValueError, match="no such run or checkpoint directory"):
        resolve_checkpoint(str(tmp_path / "nope"))


def test_balancing_bias_refused_on_export_unless_dropped(tmp_path):
    from launch.train import train

    run = tmp_path / "run"
    train(make_cfg(run, "train.max_steps=3", "train.global_batch_size=8", "train.micro_batch_size=8",
                   "model.balance_bias_rate=0.01"))
    with pytest.raises(ValueError, match=r"model.balance_bias_rate = 0.01: .*--drop-expert-bias"):
        export(str(run), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    export(str(run), str(tmp_path / "out"), drop_expert_bias=True)
    model, _ = load_checkpoint_model(*resolve_checkpoint(str(run)))
    trained = model.state_dict()
    # 3 sign steps of 0.01: an odd multiple of 0.01 unless a load sat exactly at the mean; the export leaves it out
    assert sum(trained[f"layers.{i}.moe.expert_bias"].abs().sum() for i in range(model.config.num_layers)) > 0
    exported = from_hf(load_file(tmp_path / "out" / "model.safetensors"), model.config.replace(balance_bias_rate=0.0))
    assert set(trained) - set(exported) == {f"layers.{i}.moe.expert_bias" for i in range(model.config.num_layers)}
    assert all(torch.equal(exported[k], trained[k]) for k in exported)


# ---- LoRA runs: merged export, PEFT adapter export, generate -------------------------------------------------

LORA_RUN = ["lora=default", "lora.rank=4", "lora.dropout=0.0", "train.global_batch_size=8", "train.micro_batch_size=8",
            "data.num_examples=200", "data.seq_len=64"]
IDS = torch.tensor([[5, 17, 3, 88, 42, 9, 61, 2, 33, 70, 14, 7], [1, 90, 23, 23, 57, 8, 40, 11, 76, 5, 29, 64]])


def _hf_base(out_dir, seed):
    model = ArcticForCausalLM(PRESETS["tiny"])
    model.reset_parameters(seed=seed)
    save_hf(model.state_dict(), model.config, str(out_dir), Tokenizer())
    return out_dir


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A LoRA run from an Arctic base, adapters on everything and the router, embedding and lm_head
    trained in full, lr high enough that every B has left zero after 3 steps."""
    from launch.train import train

    tmp = tmp_path_factory.mktemp("lora")
    base = _hf_base(tmp / "base", seed=4)
    run = tmp / "run"
    train(make_cfg(run, *LORA_RUN, f"train.init_from={base}", "lora.train_router=true",
                   "lora.train_embeddings=true", "optim.lr=3e-2",
                   "optim.warmup_ratio=0", "train.max_steps=3"))
    return run, base


def test_lora_merged_export_equals_the_unmerged_model(lora_run, tmp_path):
    from floe.lora import adapters, disable_adapters
    from tools.generate import load_model_for_inference, reply

    run, base = lora_run
    files = export(str(run), str(tmp_path / "out"))
    assert "model.safetensors" in files
    model, _ = load_checkpoint_model(*resolve_checkpoint(str(run)))
    assert adapters(model) and all(torch.count_nonzero(p) for n, p in model.named_parameters() if n.endswith("B"))
    merged = ArcticForCausalLM(model.config)
    merged.load_state_dict(from_hf(load_file(tmp_path / "out" / "model.safetensors"), model.config), strict=True)
    with torch.no_grad():
        got = merged(IDS, dropless=True).logits
        torch.testing.assert_close(got, model(IDS, dropless=True).logits, atol=1e-5, rtol=1e-5)
        with disable_adapters(model):
            assert (got - model(IDS, dropless=True).logits).abs().max() > 1e-3  # the adapters moved it
    # generate and evaluate load a LoRA run through the same reader: the adapted model, in eval mode
    inference, tokenizer = load_model_for_inference(str(run))
    assert adapters(inference) and not inference.training
    assert isinstance(reply(inference, tokenizer, ["What is 2+3?"], max_new_tokens=4)[0], str)


def test_lora_adapter_export_loads_in_peft(lora_run, tmp_path):
    """PeftModel.from_pretrained on the independent Arctic reference holding the base: floe's logits."""
    from peft import LoraConfig, PeftModel

    from floe.testing.arctic_reference import ArcticReference

    run, base = lora_run
    files = export(str(run), str(tmp_path / "adapter"), adapter=True)
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.1.block_sparse_moe.experts.7.w2.lora_B.weight" in saved
    assert "base_model.model.model.layers.0.block_sparse_moe.gate.weight" in saved  # lora.train_router
    assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= saved.keys()
    ref = ArcticReference(json.loads((base / "config.json").read_text()))
    ref.load_state_dict(load_file(base / "model.safetensors"), strict=True)
    with torch.no_grad():
        before = ref(IDS)
    # the file's config as PEFT reads it, minus the causal-LM wrapper (it needs a transformers model's
    # generation methods, which the reference does not have)
    config = LoraConfig.from_pretrained(str(tmp_path / "adapter"))
    assert config.task_type == "CAUSAL_LM" and config.r == 4
    config.task_type = None
    peft_model = PeftModel.from_pretrained(ref, str(tmp_path / "adapter"), config=config)
    model, _ = load_checkpoint_model(*resolve_checkpoint(str(run)))
    with torch.no_grad():
        got = peft_model.base_model.model(IDS)
        torch.testing.assert_close(got, model(IDS, dropless=True).logits, atol=2e-5, rtol=1e-4)
        assert (got - before).abs().max() > 1e-3


def test_lr0_lora_export_is_the_base_bit_for_bit(tmp_path):
    from launch.train import train

    base = _hf_base(tmp_path / "base", seed=6)
    run = tmp_path / "run"
    train(make_cfg(run, *LORA_RUN, f"train.init_from={base}", "optim.lr=0", "train.max_steps=1"))
    export(str(run), str(tmp_path / "out"))
    got, expected = load_file(tmp_path / "out" / "model.safetensors"), load_file(base / "model.safetensors")
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_adapter_export_of_a_full_run_is_a_clean_error(tmp_path):
    import os
    import subprocess
    import sys

    from launch.train import train

    run = tmp_path / "run"
    train(make_cfg(run, "train.max_steps=1", "train.global_batch_size=8", "train.micro_batch_size=8",
                   "data.num_examples=200", "data.seq_len=64"))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "tools/export.py", str(run), "--adapter", "--out", str(tmp_path / "a")],
                          cwd=repo, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not a LoRA run" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "a").exists()
