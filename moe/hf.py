"""Hugging Face Arctic <-> floe: config.json, weight names, lazy loading, export.

floe's block is Arctic's decoder layer with `parallel_attn_mlp_res: true` and
`moe_layer_frequency: 1` (every layer MoE, every layer with the hidden-wide residual MLP):
    norm_in  -> input_layernorm            attn.*   -> self_attn.*
    norm_res -> residual_layernorm (on h)  mlp.w*   -> residual_mlp.w*
    norm_moe -> post_attention_layernorm (on the block input x)
    moe.gate -> block_sparse_moe.gate      experts w*[e] -> block_sparse_moe.experts.{e}.w*
Stacked expert rows are split along dim 0, one tensor per global expert id.

Starting a run from a Hugging Face directory (what `train.init_from` does, on every rank):
    cfg = read_hf_config(hf_dir, overrides)          # ValueError before any process group exists
    with torch.device("meta"):
        model = ArcticForCausalLM(cfg)
    apply_expert_parallel(model, groups)             # if ep_size > 1: rows [first, first + L) only
    load_hf_weights(model, hf_dir, device)           # materialises, reads only this rank's tensors
    apply_deepspeed_moe(model)                       # after: loading replaced the Parameters

Routing normalisation: Arctic has no config field for it. Its modeling code (Snowflake-Labs/
transformers, branch arctic, ArcticMoE) renormalises the top-k weights exactly when
num_experts_per_tok > 1, as DeepSpeed's top-1/top-2 gating that trained it does. So
`normalize_weights` is derived from top_k on import and refused on export when it differs.
(A copy of the Hub's modeling_arctic.py in optimum-habana renormalises at top_k 1 too; the
two agree for top_k >= 2, which is Arctic's.)

The aux-loss-free balancing bias (model.balance_bias_rate > 0) has no Arctic name: Arctic chooses
experts by the top-k of the router's softmax, floe then by the top-k of softmax + bias, and no
change of the gate weights turns one into the other (the bias shifts probabilities, not logits).
Export refuses such a model unless asked to drop the bias (tools/export.py --drop-expert-bias),
which keeps every weight but routes some tokens differently from training. Starting a run with a
bias from Arctic weights (init_from) starts the bias at zero, as a fresh run does.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from floe.config import ModelConfig
from floe.data.template import CHAT_TEMPLATE
from floe.files import readable_as_umask
from floe.layer import EXPERT_BIAS, EXPERT_WEIGHTS, expert_tensors

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def expert_key(layer: int, w: str) -> str:
    """floe's state-dict name of layer `layer`'s stacked expert weight `w` ([E or L, out, in])."""
    return f"layers.{layer}.moe.experts.{w}"


_LAYER_RENAMES = {
    "norm_in.weight": "input_layernorm.weight",
    "norm_res.weight": "residual_layernorm.weight",
    "norm_moe.weight": "post_attention_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "mlp.w1.weight": "residual_mlp.w1.weight",
    "mlp.w2.weight": "residual_mlp.w2.weight",
    "mlp.w3.weight": "residual_mlp.w3.weight",
    "moe.gate.weight": "block_sparse_moe.gate.weight",
}
_TOP_RENAMES = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                "lm_head.weight": "lm_head.weight"}


def hf_expert_name(layer: int, expert: int, w: str) -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}.weight"


def hf_names(config: ModelConfig) -> dict[str, tuple[str, int | None]]:
    """Every tensor name of the Arctic checkpoint -> (floe state-dict name, global expert id or None)."""
    out: dict[str, tuple[str, int | None]] = {hf: (name, None) for name, hf in _TOP_RENAMES.items()}
    for i in range(config.num_layers):
        for name, hf in _LAYER_RENAMES.items():
            out[f"model.layers.{i}.{hf}"] = (f"layers.{i}.{name}", None)
        for w in EXPERT_WEIGHTS:
            for e in range(config.num_experts):
                out[hf_expert_name(i, e, w)] = (expert_key(i, w), e)
    return out


def to_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Full floe state dict (all experts) -> Arctic state dict; expert tensors are views of rows."""
    names = hf_names(config)
    unknown = sorted(set(state) - {name for name, _ in names.values()})
    if unknown:
        raise ValueError(f"to_hf: no Hugging Face name for {unknown}")
    return {hf: state[name] if e is None else state[name][e] for hf, (name, e) in names.items()}


def from_hf(hf_state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Arctic state dict -> full floe state dict (experts stacked [E, out, in]). In-memory; for
    checkpoints on disk use load_hf_weights, which never holds more than this rank's tensors."""
    names = hf_names(config)
    _check_names(set(hf_state), names, "from_hf")
    out, rows = {}, {}
    for hf, (name, e) in names.items():
        if e is None:
            out[name] = hf_state[hf]
        else:
            rows.setdefault(name, [None] * config.num_experts)[e] = hf_state[hf]
    return out | {name: torch.stack(r) for name, r in rows.items()}


def _check_names(present: set[str], names: dict, where: str) -> None:
    missing, extra = sorted(set(names) - present), sorted(present - set(names))
    if missing or extra:
        def show(xs):
            return f"{xs[:6]}{f' ... ({len(xs)} in all)' if len(xs) > 6 else ''}"
        raise ValueError(f"{where}: the tensors do not match the model config: missing {show(missing)}, "
                         f"unexpected {show(extra)}")


# ----------------------------------------------------------------------------- PEFT adapters

PEFT_PREFIX = "base_model.model."  # PEFT's name of the wrapped model in adapter_model.safetensors
# Arctic module names of what each lora.target adapts (a regex, as PEFT's target_modules takes it).
PEFT_TARGETS = {
    "attention": r"self_attn\.(q_proj|k_proj|v_proj|o_proj)",
    "dense_mlp": r"residual_mlp\.(w1|w3|w2)",
    "experts": r"block_sparse_moe\.experts\.\d+\.(w1|w3|w2)",
}


def peft_target_modules(targets: list[str]) -> str:
    """PEFT's target_modules (a regex matched against whole module names) for floe's lora.targets."""
    return r"model\.layers\.\d+\.(" + "|".join(PEFT_TARGETS[t] for t in targets) + ")"


def to_peft(adapter_state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """floe's trained tensors (adapters with every expert; `moe.gate.weight`, `embed_tokens.weight` and
    `lm_head.weight` when they trained in full) -> PEFT's adapter_model.safetensors names on Hugging Face
    Arctic: "<module>.lora_A.weight" [r, in] and "<module>.lora_B.weight" [out, r] per adapted Linear, one
    per expert; a fully trained tensor as a modules_to_save tensor under its own name."""
    names = {name: hf for hf, (name, e) in hf_names(config).items() if e is None}
    out = {}
    for name, t in adapter_state.items():
        module, found, leaf = name.rpartition(".lora.")
        if not found:  # a fully trained tensor (the router, the embedding, lm_head)
            if name not in names:
                raise ValueError(f"to_peft: {name} has no Hugging Face name")
            out[PEFT_PREFIX + names[name]] = t
        elif leaf in ("A", "B"):  # layers.{i}.attn.q_proj.lora.A
            out[f"{PEFT_PREFIX}{names[module + '.weight'].removesuffix('.weight')}.lora_{leaf}.weight"] = t
        else:  # layers.{i}.moe.experts.lora.w1_A [E, ...]
            w, ab = leaf.split("_")
            layer = int(module.split(".")[1])
            for e in range(t.shape[0]):
                hf = hf_expert_name(layer, e, w).removesuffix(".weight")
                out[f"{PEFT_PREFIX}{hf}.lora_{ab}.weight"] = t[e]
    return out


# ----------------------------------------------------------------------------- config.json

# floe field <- Arctic key, for the fields that decide what the weights compute.
_ARCH_KEYS = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads", "expert_ffn": "intermediate_size", "num_experts": "num_local_experts",
    "top_k": "num_experts_per_tok", "rope_theta": "rope_theta", "norm_eps": "rms_norm_eps",
}
# Arctic keys whose value floe can only take as this one (None: absent or null).
_REQUIRED = {
    "moe_layer_frequency": (1, "floe puts an MoE (and the residual MLP) in every layer"),
    "parallel_attn_mlp_res": (True, "floe's block always has the parallel residual MLP beside the MoE"),
    "hidden_act": ("silu", "floe's MLPs and experts are SwiGLU"),
    "tie_word_embeddings": (False, "floe's embedding and lm_head are separate weights"),
    "attention_dropout": (0.0, "floe has no attention dropout"),
    "attention_bias": (False, "floe has no biases"),
    "mlp_bias": (False, "floe has no biases"),
    "rope_scaling": (None, "floe's RoPE is unscaled"),
    "quantization": (None, "floe loads unquantised weights"),
    "sink_size": (None, "floe's attention has no sink tokens"),
}
# Keys read elsewhere in this module, or that change nothing floe computes.
_KNOWN = {"max_position_embeddings", "num_key_value_heads", "initializer_range", "router_aux_loss_coef",
          "moe_train_capacity_factor", "moe_eval_capacity_factor", "moe_min_capacity", "moe_token_dropping",
          "sliding_window", "head_dim", "model_type", "architectures", "auto_map", "torch_dtype", "dtype",
          "transformers_version", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id",
          "enable_expert_tensor_parallelism", "use_residual", "_name_or_path", "output_router_logits"}


def config_from_hf(hf: dict, overrides: dict | None = None, source: str = CONFIG_FILE) -> ModelConfig:
    """Arctic config.json (a dict) -> ModelConfig; ValueError naming every key floe cannot express.

    `overrides` are the user's explicit `model.*` values: one that contradicts an architecture
    field of the file is an error; training-only fields (capacity_factor, drop_policy,
    balance_coef, z_loss_coef, init_std, max_seq_len, freeze_moe) may differ from the file.
    """
    errors = []
    if hf.get("model_type") != "arctic":
        errors.append(f"{source}: model_type is {hf.get('model_type')!r}, not 'arctic'")
    for key, (want, why) in _REQUIRED.items():
        if hf.get(key, want) != want:
            errors.append(f"{source}: {key} = {hf[key]!r} cannot be expressed ({why}; need {want!r})")
    missing = [k for k in _ARCH_KEYS.values() if k not in hf]
    if missing:
        errors.append(f"{source}: missing {missing}")
    top_k = hf.get("num_experts_per_tok", 0)
    fields = {f: hf[k] for f, k in _ARCH_KEYS.items() if k in hf}
    fields |= dict(dense_ffn=hf.get("hidden_size"), normalize_weights=top_k > 1,
                   num_kv_heads=hf.get("num_key_value_heads") or hf.get("num_attention_heads"))
    hidden, heads = hf.get("hidden_size"), hf.get("num_attention_heads")
    if hf.get("head_dim") is not None and heads and hf["head_dim"] * heads != hidden:
        errors.append(f"{source}: head_dim = {hf['head_dim']} != hidden_size / num_attention_heads "
                      "(floe's heads split the hidden size)")
    window, max_pos = hf.get("sliding_window"), hf.get("max_position_embeddings", 4096)
    if window is not None and window < max_pos:
        errors.append(f"{source}: sliding_window = {window} < max_position_embeddings = {max_pos} "
                      "(floe's attention is full causal)")
    training = _training_fields(hf, source, errors)
    unknown = sorted(set(hf) - set(_ARCH_KEYS.values()) - set(_REQUIRED) - _KNOWN)
    if unknown:
        log.warning("%s: ignoring keys floe does not read: %s", source, unknown)
    known_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for k, v in (overrides or {}).items():
        if k not in known_fields:
            errors.append(f"model.{k} is not a model field")
        elif k in fields and v != fields[k]:
            errors.append(f"model.{k}={v!r} contradicts {source} ({fields[k]!r})")
    if errors:
        raise ValueError("cannot use this Hugging Face Arctic config:\n  " + "\n  ".join(errors))
    return ModelConfig(**(fields | training | (overrides or {})))


def _training_fields(hf: dict, source: str, errors: list[str]) -> dict:
    """Capacity (DeepSpeed's top-k gating: C = ceil(factor * k * T / E), first choices first,
    then by position), balance coefficient, init std and length from the Arctic keys."""
    out = dict(max_seq_len=hf.get("max_position_embeddings", 4096), drop_policy="position",
               init_std=hf.get("initializer_range", 0.02), balance_coef=hf.get("router_aux_loss_coef", 0.001))
    if not hf.get("moe_token_dropping", True):
        return out | dict(capacity_factor=None)
    train, evaluate = hf.get("moe_train_capacity_factor", 1), hf.get("moe_eval_capacity_factor", 1)
    if evaluate != train:
        errors.append(f"{source}: moe_eval_capacity_factor = {evaluate!r} != moe_train_capacity_factor = "
                      f"{train!r} (floe uses one capacity_factor for training and evaluation)")
    if hf.get("moe_min_capacity", 0) not in (0, None):
        errors.append(f"{source}: moe_min_capacity = {hf['moe_min_capacity']!r} cannot be expressed "
                      "(floe's capacity has no floor; need 0)")
    return out | dict(capacity_factor=float(train))


def is_expert_bias(name: str) -> bool:
    """Whether a floe state-dict name is a layer's balancing bias (no Arctic name; module docstring)."""
    return name.rsplit(".", 1)[-1] == EXPERT_BIAS


def hf_config_from(config: ModelConfig, bos_id: int | None = None, eos_id: int | None = None,
                   pad_id: int | None = None, dtype: str = "float32", drop_expert_bias: bool = False) -> dict:
    """ModelConfig -> Arctic config.json; ValueError naming each field Arctic cannot express.
    drop_expert_bias: accept model.balance_bias_rate > 0 (the bias is left out of the weights)."""
    errors = []
    if config.balance_bias_rate > 0 and not drop_expert_bias:
        errors.append(f"model.balance_bias_rate = {config.balance_bias_rate}: this model chooses experts with an "
                      "aux-loss-free balancing bias, which Arctic's router cannot express (it is not foldable "
                      "into the gate weights). Export without it with tools/export.py --drop-expert-bias (same "
                      "weights; some tokens then go to other experts than in training)")
    if config.dense_ffn != config.hidden_size:
        errors.append(f"model.dense_ffn = {config.dense_ffn} != model.hidden_size = {config.hidden_size}: "
                      "Arctic's residual MLP is always hidden_size wide")
    if config.normalize_weights != (config.top_k > 1):
        errors.append(f"model.normalize_weights = {config.normalize_weights} with model.top_k = {config.top_k}: "
                      "Arctic renormalises the top-k router weights exactly when top_k > 1")
    if errors:
        raise ValueError("this model cannot be written as Hugging Face Arctic:\n  " + "\n  ".join(errors))
    dropless = config.capacity_factor is None
    return {
        "architectures": ["ArcticForCausalLM"],
        "model_type": "arctic",
        # Arctic's modeling code is not part of transformers: load with trust_remote_code=True.
        "auto_map": {"AutoConfig": "Snowflake/snowflake-arctic-instruct--configuration_arctic.ArcticConfig",
                     "AutoModelForCausalLM": "Snowflake/snowflake-arctic-instruct--modeling_arctic.ArcticForCausalLM"},
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.expert_ffn,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "num_local_experts": config.num_experts,
        "num_experts_per_tok": config.top_k,
        "moe_layer_frequency": 1,
        "parallel_attn_mlp_res": True,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "max_position_embeddings": config.max_seq_len,
        "sliding_window": None,
        "initializer_range": config.init_std,
        "router_aux_loss_coef": config.balance_coef,
        "moe_token_dropping": not dropless,
        "moe_train_capacity_factor": 1.0 if dropless else config.capacity_factor,
        "moe_eval_capacity_factor": 1.0 if dropless else config.capacity_factor,
        "moe_min_capacity": 0,
        "tie_word_embeddings": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": dtype,
    }


def read_hf_config(hf_dir: str, overrides: dict | None = None) -> ModelConfig:
    """config_from_hf on `hf_dir`/config.json, with errors naming the file."""
    path = os.path.join(hf_dir, CONFIG_FILE)
    try:
        with open(path) as f:
            hf = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"train.init_from: {path} does not exist (not a Hugging Face model directory)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    return config_from_hf(hf, overrides, source=path)


# ----------------------------------------------------------------------------- weights


def checkpoint_files(hf_dir: str) -> dict[str, str]:
    """{tensor name: safetensors file path} from the index, or from model.safetensors's header."""
    from safetensors import safe_open

    index, single = os.path.join(hf_dir, INDEX_FILE), os.path.join(hf_dir, SINGLE_FILE)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index with a weight_map ({e!r})") from None
        absent = sorted({f for f in weight_map.values() if not os.path.isfile(os.path.join(hf_dir, f))})
        if absent:
            raise ValueError(f"{index} names shard files that do not exist in {hf_dir}: {absent}")
        return {name: os.path.join(hf_dir, f) for name, f in weight_map.items()}
    if os.path.isfile(single):
        with safe_open(single, framework="pt", device="cpu") as f:  # reads the header only
            return {name: single for name in f.keys()}
    raise ValueError(f"{hf_dir}: no {SINGLE_FILE} and no {INDEX_FILE}")


@dataclass
class LoadReport:
    """What load_hf_weights read on this rank."""

    tensors_read: int
    bytes_read: int  # in the files' dtype
    files_opened: int


class _LazyReader:
    """Opens each safetensors file on first use and reads one whole named tensor at a time."""

    def __init__(self, files: dict[str, str]):
        from safetensors import safe_open

        self._safe_open, self.files, self.handles = safe_open, files, {}
        self.tensors_read = self.bytes_read = 0

    def read(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        path = self.files[name]
        if path not in self.handles:
            self.handles[path] = self._safe_open(path, framework="pt", device="cpu")
        piece = self.handles[path].get_slice(name)
        if tuple(piece.get_shape()) != shape:
            raise ValueError(f"{path}: {name} has shape {tuple(piece.get_shape())}, the model needs {shape}")
        tensor = piece[:]
        self.tensors_read += 1
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor


@torch.no_grad()
def load_hf_weights(model: nn.Module, hf_dir: str, device: torch.device | str | None = None,
                    each_block=None) -> LoadReport:
    """Fill `model` (built on the meta device or materialised, expert-parallel or not) from an
    Arctic safetensors directory, reading only the tensors this rank holds.

    Dense tensors are read whole; an expert-parallel layer holding experts [first, first + L)
    reads exactly the per-expert tensors experts.{first..first+L-1}. Before anything is read,
    the files' tensor names must be exactly the model config's (ValueError naming the missing and
    unexpected ones), so every tensor in the files is used, and only once per holder. A meta model
    is materialised on `device` (default CPU) first; Module.to_empty replaces Parameter objects,
    so apply_deepspeed_moe must run after this.

    each_block(i, block): block by block instead (a QLoRA load, floe.run.init_from): model.layers[i] is
    materialised and filled (its adapters, if any, left for each_block), then each_block runs before the
    next block is materialised; the rest of the model (embeddings, final norm, lm_head) comes last. So
    at most one block's weights exist as loaded, plus whatever each_block leaves of the earlier ones.
    """
    files = checkpoint_files(hf_dir)
    names = hf_names(model.config)
    _check_names(set(files), names, hf_dir)
    to_hf_name = {(name, e): hf for hf, (name, e) in names.items()}
    reader = _LazyReader(files)
    device = device or "cpu"
    if each_block is None:
        _fill(model, "", to_hf_name, reader, device)
        return LoadReport(reader.tensors_read, reader.bytes_read, len(reader.handles))
    from floe.lora import is_adapter_name

    for i, block in enumerate(model.layers):
        _fill(block, f"layers.{i}.", to_hf_name, reader, device, skip=is_adapter_name)
        each_block(i, block)
    for module in model.modules():  # the blocks are done: what is still meta is the rest's own
        if any(t.is_meta for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))):
            module.to_empty(device=device, recurse=False)
    _fill(model, "", to_hf_name, reader, device, skip=lambda name: name.startswith("layers."))
    return LoadReport(reader.tensors_read, reader.bytes_read, len(reader.handles))


def _fill(module: nn.Module, prefix: str, to_hf_name: dict, reader: _LazyReader, device, skip=None) -> None:
    """Materialise `module` (the model's `prefix`) if it is meta and copy its tensors from `reader`,
    but those whose name under `module` `skip` accepts."""
    if any(p.is_meta for p in module.parameters()):
        module.to_empty(device=device)
    experts = expert_tensors(module)  # {name: (global id of row 0, [rows held here, out, in])}
    for name, param in module.state_dict(keep_vars=True).items():
        full = prefix + name
        if skip is not None and skip(name):
            continue
        if name in experts:
            first, stacked = experts[name]
            for row in range(stacked.shape[0]):
                stacked[row].copy_(reader.read(to_hf_name[(full, first + row)], tuple(stacked.shape[1:])))
        elif is_expert_bias(full):
            param.zero_()  # Arctic has none: the bias starts where a fresh run's does
        elif (full, None) in to_hf_name:
            param.copy_(reader.read(to_hf_name[(full, None)], tuple(param.shape)))
        else:
            raise ValueError(f"load_hf_weights: the model has {full}, which Arctic checkpoints do not name")


# ----------------------------------------------------------------------------- export

def save_hf(state: dict[str, torch.Tensor], config: ModelConfig, out_dir: str, tokenizer,
            dtype: str = "float32", max_shard_bytes: int = 5 * 2**30, drop_expert_bias: bool = False,
            chat_template: str = CHAT_TEMPLATE) -> list[str]:
    """Write a full floe state dict (all experts) as a Hugging Face Arctic directory: weights,
    config.json, generation_config.json and the tokenizer files. Refuses (ValueError) before
    writing anything when Arctic cannot express the model or the tokenizer cannot be mirrored.
    drop_expert_bias: leave the balancing bias out instead of refusing (module docstring)."""
    end_of_turn = tokenizer.end_of_turn_id
    bos = tokenizer.sp.bos_id()
    hf_cfg = hf_config_from(config, bos_id=bos if bos >= 0 else None, eos_id=end_of_turn,
                            pad_id=tokenizer.pad_id, dtype=dtype, drop_expert_bias=drop_expert_bias)
    if drop_expert_bias:
        state = {k: v for k, v in state.items() if not is_expert_bias(k)}
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"model.vocab_size ({config.vocab_size}) is smaller than the tokenizer's "
                         f"({tokenizer.vocab_size}, {tokenizer.path})")
    from floe.data.tokenizer import hf_tokenizer_json

    hf_tokenizer_json(tokenizer.path)  # refuses an unmirrorable tokenizer before anything is written
    os.makedirs(out_dir, exist_ok=True)
    files = tokenizer.save_hf(out_dir, chat_template, config.max_seq_len)
    files += _save_shards(to_hf(state, config), out_dir, getattr(torch, dtype), max_shard_bytes)
    generation = {"bos_token_id": hf_cfg["bos_token_id"], "eos_token_id": end_of_turn,
                  "pad_token_id": tokenizer.pad_id, "do_sample": False}
    for name, content in (("generation_config.json", generation), (CONFIG_FILE, hf_cfg)):
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(content, f, indent=2)
        files.append(name)
    return files


def _save_shards(tensors: dict[str, torch.Tensor], out_dir: str, dtype: torch.dtype,
                 max_shard_bytes: int) -> list[str]:
    """model.safetensors, or shards of at most max_shard_bytes plus model.safetensors.index.json.
    Only one shard's converted tensors exist at a time."""
    from safetensors.torch import save_file

    itemsize = torch.empty((), dtype=dtype).element_size()
    shards, size = [[]], 0
    for name, t in tensors.items():
        nbytes = t.numel() * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    if len(shards) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        index = {"metadata": {"total_size": sum(t.numel() * itemsize for t in tensors.values())},
                 "weight_map": {n: f for f, shard in zip(names, shards) for n in shard}}
        with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2)
    for fname, shard in zip(names, shards):
        save_file({n: tensors[n].detach().to(dtype).contiguous() for n in shard}, os.path.join(out_dir, fname),
                  metadata={"format": "pt"})
        readable_as_umask(os.path.join(out_dir, fname))
    return names + ([INDEX_FILE] if len(shards) > 1 else [])


def hf_tokenizer_path(hf_dir: str) -> str | None:
    """The SentencePiece model a Hugging Face directory carries (floe's export writes one), or None."""
    path = os.path.join(hf_dir, "tokenizer.model")
    return path if os.path.isfile(path) else None
