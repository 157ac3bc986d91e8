"""floe's checkpoint format: safetensors weights and optimizer state by name, JSON state, no pickle.

Layout under <run.dir>/checkpoints/:
    step_00000040/                        one complete checkpoint
        floe.json                         format and version, step, the layout that wrote it (for information)
        state.json                        step, loader position, lr schedule, Adam's step count, DeepSpeed counters
        rng/rank_00000.json               each rank's python / numpy / torch (/ cuda) RNG state
        model/dense_rank_00000.safetensors   dense weights by parameter name (split over the ranks that wrote them),
                                          and the state dict's buffers (the balancing bias "layers.<i>.moe.expert_bias")
        model/expert_00005.safetensors       expert 5 by global id: "layers.<i>.moe.experts.w1|w3|w2", one row each
        optim/dense_rank_00000.safetensors   "<name>.exp_avg", "<name>.exp_avg_sq" (+ "<name>.fp32", the master
        optim/expert_00005.safetensors        weights, only when the weights are not fp32), same split as model/
    latest                                the name of the newest complete checkpoint
A LoRA run (floe.lora) writes only what trains: the adapters (the experts' by global id, as the experts)
and what trains in full beside them (lora.train_router, lora.train_embeddings), with their optimizer
state; floe.json says "adapters_only", and
the trainer's client state in state.json names the frozen base (floe.run.init_from.base_identity).

Who writes what, in parallel, with no gather of the model on one rank:
  - dense parameters are dealt out over ALL ranks, largest first to the least-loaded rank (every rank
    holds a replica of the dense weights), so each rank writes about 1/world of the dense bytes;
  - expert e is written once, by one of the ranks that hold it: local expert i by the rank whose
    expert-data-parallel rank is i % (expert-data-parallel size);
  - under ZeRO-1/2 the optimizer state is rebuilt one parameter at a time (an all-reduce over that
    parameter's data-parallel group, Engine.full_optimizer_state) and kept only by its writer.
Loading needs nothing of the layout that wrote it: every rank reads every dense tensor and the files of
the experts it holds, and under ZeRO-1/2 keeps its own partition of their optimizer state. So a
checkpoint resumes at any process count, parallel.ep_size and parallel.zero_stage the config allows.

Atomic and kill-safe: every rank writes into a hidden temporary directory; only once all ranks are
done does rank 0 rename it into place and then replace `latest`. A crash at any point leaves `latest`
naming the previous complete checkpoint. Before anything is written every rank checks its weights and
optimizer state for NaN/inf (one verdict for all ranks): a poisoned state is never saved.

Safe to load: only JSON and safetensors are read (nothing is unpickled); `latest` must name a
step_<N> directory directly inside the checkpoints directory (no path, no symlink leading out).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from floe.files import readable_as_umask
from floe.layer import EXPERT_BIAS, expert_tensors
from floe.lora import adapters, trainable_parameters
from floe.parallel import ADAM_STATE

LATEST = "latest"
FORMAT, VERSION = "floe-checkpoint", 1
TAG_RE = re.compile(r"step_\d{8,}")


def _tag(step: int) -> str:
    return f"step_{step:08d}"


# ---- which tensor lives where ----------------------------------------------------------------------

def saved_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """What a checkpoint of `model` holds: every parameter, or for a model with LoRA adapters only what
    trains (the adapters, and the router, embedding and lm_head on request); its frozen base is re-created from
    train.init_from or the seed (the checkpoint records which: `base` in state.json)."""
    return trainable_parameters(model) if adapters(model) else dict(model.named_parameters())


def state_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: buffer} of the model state that is not a parameter: each MoE layer's balancing bias
    (model.balance_bias_rate > 0), which moves in training with or without adapters; saved and loaded
    with the dense weights, no optimizer state. (Other buffers, e.g. a quantized frozen base, are not.)"""
    return {n: b for n, b in model.named_buffers() if n.rsplit(".", 1)[-1] == EXPERT_BIAS}


def dense_writers(sizes: dict[str, int], world_size: int) -> dict[str, int]:
    """{dense parameter name: the rank that writes it}: largest first to the least-loaded rank."""
    load = [0] * world_size
    owner = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[name] = rank
        load[rank] += sizes[name]
    return owner


def _expert_file(path: str, kind: str, gid: int) -> str:
    return os.path.join(path, kind, f"expert_{gid:05d}.safetensors")


def _edp_slot(engine) -> tuple[int, int]:
    """(this rank's index among the ranks holding the same experts, how many hold them)."""
    if engine.groups is None:
        return dist.get_rank(), dist.get_world_size()
    return dist.get_rank(group=engine.groups.edp_group), dist.get_world_size(group=engine.groups.edp_group)


# ---- reading files safely ---------------------------------------------------------------------------

def _check_inside(path: str) -> None:
    """Refuse a file of a checkpoint that is a symlink or resolves outside its step directory (the
    README's promise: nothing a checkpoint names is read from elsewhere)."""
    step_dir = path
    while not TAG_RE.fullmatch(os.path.basename(step_dir)) and os.path.dirname(step_dir) != step_dir:
        step_dir = os.path.dirname(step_dir)
    real = os.path.realpath(path)
    if os.path.islink(path) or os.path.commonpath([real, os.path.realpath(step_dir)]) != os.path.realpath(step_dir):
        raise ValueError(f"{path}: a link leading to {real}, outside the checkpoint; refusing to read it")


def _read_json(path: str) -> dict:
    _check_inside(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: missing; is {os.path.dirname(path)} a complete floe checkpoint?") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a floe checkpoint JSON file ({e})") from None


class _Tensors:
    """Lazy name -> tensor lookup over safetensors files (a pickle or other file is a ValueError)."""

    def __init__(self, files: list[str]):
        self.where: dict[str, str] = {}
        self.handles = {}
        for path in files:
            handle = _open_safetensors(path)
            self.handles[path] = handle
            for key in handle.keys():
                if key in self.where:
                    raise ValueError(f"{path}: tensor {key!r} is also in {self.where[key]}")
                self.where[key] = path

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def get(self, key: str) -> torch.Tensor:
        return self.handles[self.where[key]].get_tensor(key)


def _open_safetensors(path: str):
    _check_inside(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: missing; is {os.path.dirname(os.path.dirname(path))} a complete checkpoint?")
    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # noqa: BLE001 -- safetensors raises its own error types for a bad header
        raise ValueError(f"{path}: not a safetensors file ({type(e).__name__}: {e}); floe reads no other "
                         "tensor format") from None


def read_meta(path: str) -> dict:
    """floe.json of checkpoint `path`, checked to be floe's format in a version this code reads."""
    meta = _read_json(os.path.join(path, "floe.json"))
    if not isinstance(meta, dict):
        raise ValueError(f"{path}/floe.json: not a floe checkpoint (a JSON object with format and version)")
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{path}/floe.json: format {meta.get('format')!r} version {meta.get('version')!r}; this "
                         f"floe reads {FORMAT!r} version {VERSION} (checkpoints of older floe versions, written "
                         "by DeepSpeed, cannot be resumed)")
    return meta


def read_client_state(path: str) -> dict:
    """The client state save() was given for checkpoint `path` (no process group needed)."""
    return _read_json(os.path.join(path, "state.json"))["client"]


def latest_checkpoint(ckpt_dir: str) -> str | None:
    """Path of the newest complete checkpoint under ckpt_dir, or None. `latest` must name a
    step_<N> directory directly inside ckpt_dir, which must not be a symlink leading elsewhere."""
    pointer = os.path.join(ckpt_dir, LATEST)
    if os.path.islink(pointer):
        raise ValueError(f"{pointer} is a symlink (to {os.path.realpath(pointer)}); floe writes it as a file "
                         "naming step_<N>: replace it with one, or delete it")
    if not os.path.isfile(pointer):
        return None
    with open(pointer, encoding="utf-8", errors="replace") as f:
        tag = f.read().strip()
    if not TAG_RE.fullmatch(tag):
        raise ValueError(f"{pointer} names {tag!r}, which is not a checkpoint of this directory (expected "
                         "step_<N>, no path); fix or delete the file")
    path = os.path.join(ckpt_dir, tag)
    if os.path.islink(path) or os.path.dirname(os.path.realpath(path)) != os.path.realpath(ckpt_dir):
        raise ValueError(f"{pointer} names {path}, a link leading out of {ckpt_dir}; refusing to follow it")
    if not os.path.isdir(path):
        raise ValueError(f"{pointer} names checkpoint {tag!r}, but {path} does not exist")
    return path


def read_state(path: str) -> dict:
    """state.json of checkpoint `path`, every field checked: the counters (and the trainer's client
    step and data-loader position, when the client state has them) are non-negative integers, the step
    is the one in the directory's name (and floe.json's). One ValueError naming the file and the field."""
    file, meta_step = os.path.join(path, "state.json"), read_meta(path).get("step")
    named = TAG_RE.fullmatch(os.path.basename(path))  # a copy elsewhere (tools, tests) may be named otherwise
    step = int(os.path.basename(path).rsplit("_", 1)[1]) if named else meta_step
    state = _read_json(file)
    if not isinstance(state, dict) or not isinstance(state.get("client"), dict):
        raise ValueError(f"{file}: not a floe checkpoint state (a JSON object with a 'client' object)")
    client = state["client"]
    fields = {"step": state.get("step"), "adam_step": state.get("adam_step", 0),
              **{k: state.get(k) for k in SCHEDULE_COUNTERS}}
    if "step" in client:  # the trainer's client state (floe.run.trainer): its step and loader position
        fields["client.step"] = client["step"]
    if "loader" in client:
        loader = client["loader"]
        fields.update({f"client.loader.{k}": loader.get(k) for k in LOADER_COUNTERS} if isinstance(loader, dict)
                      else {"client.loader": loader})
    for name, value in fields.items():
        if name == "adam_step" and value is None:
            continue  # saved before the first update
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{file}: field {name} must be a non-negative integer, got {value!r}")
    for name in ("step", "client.step"):
        if name in fields and fields[name] != step:
            raise ValueError(f"{file}: field {name} is {fields[name]}, but the checkpoint directory is "
                             f"{os.path.basename(path)} (step {step})")
    if meta_step != step:
        raise ValueError(f"{path}/floe.json: field step is {meta_step!r}, the directory's name says {step}")
    return state


SCHEDULE_COUNTERS = ("scheduler_last_epoch", "global_steps", "global_samples")  # engine.schedule_state's keys
LOADER_COUNTERS = ("epoch", "step", "seed", "num_rows", "global_batch_size")  # StepLoader.state_dict's keys


# ---- RNG state as JSON ------------------------------------------------------------------------------

def rng_state() -> dict:
    version, keys, gauss = random.getstate()
    name, mt, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(keys), gauss], "numpy": [name, mt.tolist(), int(pos), int(has_gauss),
                                                              float(cached)],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, mt, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(mt, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ---- save -------------------------------------------------------------------------------------------

def check_finite(engine, step: int, ckpt_dir: str) -> None:
    """Raise FloatingPointError on every rank if any rank holds a non-finite weight or optimizer
    state (collective: one verdict for all ranks, before anything is written)."""
    bad = engine.nonfinite_state()
    count = torch.tensor([len(bad)], dtype=torch.int64, device=next(engine.model.parameters()).device)
    dist.all_reduce(count)
    if int(count.item()):  # NOTE: host sync, once per checkpoint
        last = latest_checkpoint(ckpt_dir) if os.path.isdir(ckpt_dir) else None
        raise FloatingPointError(
            f"refusing to write checkpoint {_tag(step)}: {int(count.item())} weight/optimizer tensor(s) hold NaN or "
            f"inf (on rank {dist.get_rank()}: {', '.join(bad[:5]) or 'none'}{' ...' if len(bad) > 5 else ''}); the "
            f"last good checkpoint stays {last or 'none (no checkpoint yet)'}")


@torch.no_grad()
def save(engine, ckpt_dir: str, step: int, client_state: dict, keep_last: int = 2) -> str:
    """Write checkpoint `step` of a floe.parallel.Engine atomically (collective: every rank calls it).
    `client_state` (JSON-serialisable, e.g. the loader's position) comes back from load()."""
    rank, world = dist.get_rank(), dist.get_world_size()
    check_finite(engine, step, ckpt_dir)
    tag, tmp_tag = _tag(step), f".tmp-{_tag(step)}"
    tmp_path, final_path = os.path.join(ckpt_dir, tmp_tag), os.path.join(ckpt_dir, tag)
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        shutil.rmtree(tmp_path, ignore_errors=True)  # left by a crash during an earlier save
        for sub in ("model", "optim", "rng"):
            os.makedirs(os.path.join(tmp_path, sub))
    dist.barrier()

    model = engine.model
    adam_step = engine.optimizer_step_count()
    experts = expert_tensors(model)
    params = saved_parameters(model)
    buffers = state_buffers(model)
    writer = dense_writers({n: p.numel() for n, p in (params | buffers).items() if n not in experts}, world)
    edp_rank, edp_size = _edp_slot(engine)
    dense_model, dense_optim, expert_model, expert_optim = {}, {}, {}, {}
    # Buffers of the model's state (the balancing bias): replicated on every rank, no optimizer state.
    dense_model.update({n: b.detach() for n, b in buffers.items() if writer[n] == rank})
    for name, p in params.items():  # the same order on every rank: the gathers below are collective
        state = engine.full_optimizer_state(p) if adam_step is not None and engine.optimizes(p) else {}
        if p.dtype == torch.float32:
            state.pop("fp32", None)  # the weights are the master weights
        if name in experts:
            first = experts[name][0]
            for local in range(p.shape[0]):
                if local % edp_size == edp_rank:
                    gid = first + local
                    expert_model.setdefault(gid, {})[name] = p[local].clone()
                    for k, v in state.items():
                        expert_optim.setdefault(gid, {})[f"{name}.{k}"] = v[local].clone()
        elif writer[name] == rank:  # no copies: nothing changes the tensors while they are written
            dense_model[name] = p.detach()
            dense_optim.update({f"{name}.{k}": v.detach() for k, v in state.items()})
    _save(dense_model, os.path.join(tmp_path, "model", f"dense_rank_{rank:05d}.safetensors"))
    _save(dense_optim, os.path.join(tmp_path, "optim", f"dense_rank_{rank:05d}.safetensors"))
    for gid, tensors in expert_model.items():
        _save(tensors, _expert_file(tmp_path, "model", gid))
    for gid, tensors in expert_optim.items():
        _save(tensors, _expert_file(tmp_path, "optim", gid))
    _write_json(os.path.join(tmp_path, "rng", f"rank_{rank:05d}.json"), rng_state())
    if rank == 0:
        _write_json(os.path.join(tmp_path, "state.json"), {
            "step": step, "client": client_state, "adam_step": adam_step, **engine.schedule_state()})
        _write_json(os.path.join(tmp_path, "floe.json"), {
            "format": FORMAT, "version": VERSION, "step": step, "world_size": world,
            "ep_size": engine.groups.ep_size if engine.groups is not None else 1,
            "zero_stage": engine.zero_stage, "adapters_only": bool(adapters(model))})
    dist.barrier()  # every rank's files are on disk
    if rank == 0:
        shutil.rmtree(final_path, ignore_errors=True)
        os.rename(tmp_path, final_path)
        pointer_tmp = os.path.join(ckpt_dir, LATEST + ".tmp")
        with open(pointer_tmp, "w") as f:
            f.write(tag)
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer_tmp, os.path.join(ckpt_dir, LATEST))
        _prune(ckpt_dir, keep_last)
    dist.barrier()
    return final_path


def _save(tensors: dict[str, torch.Tensor], path: str) -> None:
    if tensors:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, path, metadata={"format": "pt"})
        readable_as_umask(path)


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)


def _prune(ckpt_dir: str, keep_last: int) -> None:
    if keep_last <= 0:
        return
    tags = sorted(t for t in os.listdir(ckpt_dir) if TAG_RE.fullmatch(t))
    for tag in tags[:-keep_last]:
        shutil.rmtree(os.path.join(ckpt_dir, tag), ignore_errors=True)


# ---- load -------------------------------------------------------------------------------------------

def _dense_files(path: str, kind: str) -> list[str]:
    directory = os.path.join(path, kind)
    if not os.path.isdir(directory):
        raise ValueError(f"{directory}: missing; is {path} a complete floe checkpoint?")
    return sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.startswith("dense_rank_"))


@torch.no_grad()
def load_weights(model: nn.Module, path: str) -> None:
    """Fill `model` (full or expert-sharded, on any device) with checkpoint `path`'s weights: every
    dense tensor by name and each expert row this model holds by global id. Strict: every name and
    shape must match. No process group needed (tools/export.py uses it on one CPU process)."""
    meta = read_meta(path)
    if meta.get("adapters_only", False) != bool(adapters(model)):
        raise ValueError(f"checkpoint {path} holds {'only LoRA adapters' if meta.get('adapters_only') else 'a full model'}"
                         f", the model {'has' if adapters(model) else 'has no'} adapters (was lora.rank changed?)")
    saved = saved_parameters(model)
    experts = {n: v for n, v in expert_tensors(model).items() if n in saved}
    dense = _Tensors(_dense_files(path, "model"))
    own = {n: p for n, p in saved.items() if n not in experts} | state_buffers(model)
    missing, unexpected = sorted(set(own) - set(dense.where)), sorted(set(dense.where) - set(own))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]} (was model.* changed, e.g. model.balance_bias_rate turned on or off?)")
    for name, p in own.items():
        _copy(p, dense.get(name), f"{path}: {name}")
    cache: dict[int, _Tensors] = {}
    for name, (first, p) in experts.items():
        for local in range(p.shape[0]):
            gid = first + local
            if gid not in cache:
                cache[gid] = _Tensors([_expert_file(path, "model", gid)])
            if name not in cache[gid]:
                raise ValueError(f"{_expert_file(path, 'model', gid)}: has no {name} (was model.* changed?)")
            _copy(p[local], cache[gid].get(name), f"{path}: expert {gid} {name}")


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what floe writes (train.precision may change)


def _check_dtype(src: torch.Tensor, what: str) -> None:
    if src.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{what}: dtype {src.dtype} in the checkpoint; floe writes weights and optimizer state "
                         f"as {', '.join(str(d) for d in FLOAT_DTYPES)} (a changed or foreign file?)")


def _copy(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    _check_dtype(src, what)
    if tuple(src.shape) != tuple(dst.shape):
        raise ValueError(f"{what}: shape {tuple(src.shape)} in the checkpoint, {tuple(dst.shape)} in the model "
                         "(was model.* changed?)")
    dst.copy_(src)


@torch.no_grad()
def load(engine, path: str) -> dict:
    """Restore weights, optimizer state, schedule and this rank's RNG from checkpoint `path` into a
    floe.parallel.Engine of any layout; returns the client state given to save()."""
    model = engine.model
    state = read_state(path)
    load_weights(model, path)
    if state["adam_step"] is not None:
        engine.init_optimizer_state(int(state["adam_step"]))
        experts = expert_tensors(model)
        dense = _Tensors(_dense_files(path, "optim"))
        cache: dict[int, _Tensors] = {}
        for name, p in model.named_parameters():
            if not engine.optimizes(p):
                continue
            keys = ("fp32", *ADAM_STATE)
            if name in experts:
                first = experts[name][0]
                rows = {k: [] for k in keys}
                for local in range(p.shape[0]):
                    gid = first + local
                    if gid not in cache:
                        cache[gid] = _Tensors([_expert_file(path, "optim", gid)])
                    for k in keys:
                        rows[k].append(_optim_tensor(cache[gid], name, k, p[local], path))
                full = {k: torch.stack(v) for k, v in rows.items()}
            else:
                full = {k: _optim_tensor(dense, name, k, p, path) for k in keys}
            engine.set_full_optimizer_state(p, full)
    engine.load_schedule_state(state)
    rng_file = os.path.join(path, "rng", f"rank_{dist.get_rank():05d}.json")
    if os.path.isfile(rng_file):  # a rank the writing run did not have keeps its seeded state
        try:
            set_rng_state(_read_json(rng_file))
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise ValueError(f"{rng_file}: not a floe RNG state ({type(e).__name__}: {e})") from None
    return state["client"]


def _optim_tensor(tensors: _Tensors, name: str, key: str, weight: torch.Tensor, path: str) -> torch.Tensor:
    full = f"{name}.{key}"
    if full in tensors:
        value = tensors.get(full)
    elif key == "fp32":
        value = weight.detach().float()  # saved without: the weights were fp32 and are the master weights
    else:
        raise ValueError(f"checkpoint {path} has no optimizer state {full!r} for a trained parameter (was "
                         "model.freeze_moe changed?)")
    _check_dtype(value, f"checkpoint {path}: {full}")
    if tuple(value.shape) != tuple(weight.shape):
        raise ValueError(f"checkpoint {path}: {full} has shape {tuple(value.shape)}, the model {tuple(weight.shape)}")
    return value
