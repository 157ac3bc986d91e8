"""`train.init_from=<dir>`: start a run from a Hugging Face Arctic directory.

What the directory decides, before any process group exists (launch/train.py, parse_config):
  - the model: `config.json` through floe.hf.read_hf_config; the user's explicit `model.*` values
    are passed as overrides, and one that contradicts an architecture field of the file is a
    ValueError naming the key (training-only fields such as capacity_factor or freeze_moe may differ);
  - the tokenizer: the directory's `tokenizer.model` (SentencePiece; floe's export writes one, and
    Snowflake's Arctic directories carry their Llama-2 one) when `data.tokenizer` is unset. A
    `data.tokenizer` whose content differs from it is a ValueError. A directory without a
    `tokenizer.model` (e.g. tokenizer.json only) keeps `data.tokenizer` (unset: floe's embedded
    tokenizer), with a warning: the ids are then only right if that is the tokenizer the model
    was trained with.
What it decides on every rank, inside build_engine (its load_weights hook), only when the run has
no checkpoint of its own to resume: the weights, each rank reading only the tensors it holds
(floe.hf.load_hf_weights). A run started with init_from resumes from its own checkpoints.
"""
from __future__ import annotations

import dataclasses
import filecmp
import logging
import os

import torch

from floe.config import ModelConfig
from floe.data import DataConfig
from floe.hf import hf_tokenizer_path, load_hf_weights, read_hf_config

log = logging.getLogger("floe")


def init_model_config(init_from: str, overrides: dict) -> ModelConfig:
    """The run's ModelConfig: the directory's config.json, `overrides` (explicit model.* values) checked."""
    return read_hf_config(init_from, overrides)


def init_data_config(data: DataConfig, init_from: str) -> DataConfig:
    """`data` with its tokenizer taken from the directory when it has one (module docstring)."""
    carried = hf_tokenizer_path(init_from)
    if not os.path.isdir(init_from):
        return data  # init_model_config names the missing directory
    if carried is None:
        log.warning("train.init_from=%s has no tokenizer.model: tokenising with %s", init_from,
                    data.tokenizer or "floe's embedded tokenizer")
        return data
    if data.tokenizer is not None and os.path.isfile(data.tokenizer) and not filecmp.cmp(data.tokenizer, carried, shallow=False):
        raise ValueError(f"data.tokenizer={data.tokenizer} differs from train.init_from's {carried} (the "
                         "tokenizer the model was trained with); drop data.tokenizer to use the directory's")
    if redefined := redefined_tokens(init_from, carried):
        shown = ", ".join(f"{i}: {content!r} (tokenizer.model: {piece!r})" for i, content, piece in redefined[:6])
        log.warning("train.init_from=%s: tokenizer_config.json's added_tokens_decoder gives %d id(s) another text "
                    "than tokenizer.model has (%s%s). floe tokenises with tokenizer.model alone, so those texts "
                    "become other ids than transformers gives them (Snowflake's arctic-instruct redefines 31998 and "
                    "31999 this way); check a conversation's ids against AutoTokenizer before a long run",
                    init_from, len(redefined), shown, ", ..." if len(redefined) > 6 else "")
    return dataclasses.replace(data, tokenizer=carried, chat_template=own_chat_template(init_from, data.chat_template))


def redefined_tokens(init_from: str, model_path: str) -> list[tuple[int, str, str]]:
    """(id, text, tokenizer.model's piece) of every added token of the directory's tokenizer_config.json
    whose text is not what the SentencePiece model has at that id (or whose id is beyond it)."""
    import json

    import sentencepiece as spm

    try:
        with open(os.path.join(init_from, "tokenizer_config.json"), encoding="utf-8") as f:
            added = json.load(f).get("added_tokens_decoder") or {}
    except (OSError, ValueError, AttributeError):
        return []
    sp = spm.SentencePieceProcessor(model_file=model_path)
    out = []
    for key, token in added.items():
        content = token.get("content") if isinstance(token, dict) else None
        if not (isinstance(content, str) and str(key).isdigit()):
            continue
        piece = sp.id_to_piece(int(key)) if int(key) < sp.get_piece_size() else ""
        if piece != content:
            out.append((int(key), content, piece))
    return sorted(out)


def own_chat_template(init_from: str, configured: str | None) -> str | None:
    """The directory's tokenizer_config.json when its chat template is not floe's ChatML (so training renders
    conversations as the model was trained to read them); `configured` (data.chat_template) wins."""
    path = os.path.join(init_from, "tokenizer_config.json")
    if configured is not None or not os.path.isfile(path):
        return configured
    from floe.data.chat_template import ChatTemplate
    from floe.data.template import CHAT_TEMPLATE

    try:
        template = ChatTemplate(path)
    except ValueError:
        return None  # no chat_template in it: floe's ChatML
    except Exception as e:  # jinja2's TemplateSyntaxError
        raise ValueError(f"train.init_from: the chat template of {path} does not compile: {e}") from None
    if template.source == CHAT_TEMPLATE:
        return None
    log.info("train.init_from=%s: conversations rendered with its own chat template (%s)", init_from, path)
    return path


def weight_loader(init_from: str, device: torch.device, lora=None, seed: int = 0):
    """build_engine's load_weights hook: fill this rank's (meta, possibly expert-sharded) model. With a
    LoRAConfig whose quantize_base is not "none" the hook is also the adapt hook's work (load_quantized)."""
    def load(model):
        if lora is not None and lora.quantize_base != "none":
            report = load_quantized(model, init_from, device, lora, seed)
        else:
            report = load_hf_weights(model, init_from, device)
        log.info("init_from %s: read %d tensors (%.1f MB) on this rank", init_from, report.tensors_read,
                 report.bytes_read / 1e6)
    return load


def load_quantized(model, init_from: str, device: torch.device, lora, seed: int):
    """A QLoRA run's base, loaded block by block: the meta model gets its adapters (apply_lora), then each
    block is materialised, filled, its adapters initialised and its targeted weights quantized before the
    next one is read. The result is bit-identical to load_hf_weights then the trainer's adapt_base
    (apply_lora, apply_quantize_base), but this rank never holds more than one block's unquantized
    weights besides the quantized blocks and the unquantized rest (embeddings, final norm, lm_head)."""
    from floe.lora import apply_lora, reset_adapters
    from floe.quantize import apply_quantize_base

    apply_lora(model, lora, seed=seed)  # on the meta model: shapes only, the base frozen

    def each_block(i, block):
        reset_adapters(model, lora.targets, seed, under=f"layers.{i}.")
        apply_quantize_base(model, lora.quantize_base, lora.targets, under=f"layers.{i}.")
    return load_hf_weights(model, init_from, device, each_block=each_block)


# ---- the base of a LoRA run --------------------------------------------------------------------------
SAMPLE_BYTES = 1 << 20  # the fingerprint reads this many bytes at each end of every file


def dir_fingerprint(hf_dir: str) -> str:
    """sha256 over every file of `hf_dir` (sorted by name): its name, its size, and its first and last
    SAMPLE_BYTES bytes, so files up to 2 MiB are hashed whole and a 480B directory costs 2 MiB of reads per
    shard. A safetensors file starts with its header (every tensor's name, dtype, shape and offsets)."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(os.listdir(hf_dir)):
        path = os.path.join(hf_dir, name)
        if not os.path.isfile(path):
            continue
        size = os.path.getsize(path)
        digest.update(f"{name}\0{size}\0".encode())
        with open(path, "rb") as f:
            digest.update(f.read(SAMPLE_BYTES))
            if size > 2 * SAMPLE_BYTES:
                f.seek(size - SAMPLE_BYTES)
            digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def base_identity(init_from: str | None, seed: int) -> dict:
    """The frozen base a LoRA run's adapters belong to: {"init_from": dir, "fingerprint": ...} or, for a
    base initialised from scratch, {"fresh_init_seed": seed}. Recorded in every LoRA checkpoint."""
    if init_from:
        return {"init_from": os.path.abspath(init_from), "fingerprint": dir_fingerprint(init_from)}
    return {"fresh_init_seed": seed}


def base_problem(saved: dict | None, current: dict) -> str | None:
    """Why adapters trained on base `saved` do not belong on base `current` (None: they do). The directory
    may move: the fingerprint decides."""
    if saved is None or saved == current:
        return None
    if "fingerprint" in saved and saved.get("fingerprint") == current.get("fingerprint"):
        return None

    def show(base):
        if "fresh_init_seed" in base:
            return f"a fresh init with train.seed={base['fresh_init_seed']}"
        return f"train.init_from={base['init_from']} (fingerprint {base['fingerprint'][:16]}...)"
    return f"the adapters were trained on {show(saved)}, this run's base is {show(current)}"
