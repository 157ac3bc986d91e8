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
    return dataclasses.replace(data, tokenizer=carried)


def weight_loader(init_from: str, device: torch.device):
    """build_engine's load_weights hook: fill this rank's (meta, possibly expert-sharded) model."""
    def load(model):
        report = load_hf_weights(model, init_from, device)
        log.info("init_from %s: read %d tensors (%.1f MB) on this rank", init_from, report.tensors_read,
                 report.bytes_read / 1e6)
    return load
