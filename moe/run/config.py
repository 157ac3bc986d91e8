"""The run's config schema (TrainConfig, Configs) and the one check of the whole config.

    problems = config_errors(sections, launch)   # every problem of one launch, as a list of messages
    check_config(configs, launch)                # the same, raised as one ConfigError

launch/train.py builds the sections from Hydra's config (each dataclass checks its own keys and
types on construction) and then calls `config_errors` once, before the run dir is claimed, the data
is built or any process group exists: the cross-section rules, the launch (world size against
parallel.*, the device, the kernels) and every file and path a run reads or writes (data.tokenizer,
data.paths, data.eval_paths, train.init_from, run.dir). A rule whose section did not build is
skipped, so one launch names every problem it can see at once.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field

import torch

from floe import kernels
from floe.config import ModelConfig
from floe.data import DataConfig
from floe.errors import ConfigError, batch_errors
from floe.lora import LoRAConfig, lora_model_errors
from floe.quantize import quantize_config_errors
from floe.model import CHECKPOINTING
from floe.optim import OptimConfig
from floe.parallel import PRECISIONS, LaunchEnv, ParallelConfig, parallel_errors
from floe.run.dpo import OBJECTIVES, DPOConfig, objective_errors
from floe.run.host_allocator import HOST_ALLOCATORS

MAX_NAME_BYTES = 255  # a path component (NAME_MAX on Linux and macOS)


@dataclass
class TrainConfig:
    max_steps: int = 60
    epochs: int = 1
    global_batch_size: int = 16
    micro_batch_size: int = 8
    seed: int = 0
    save_every: int = 0
    eval_every: int = 0  # optimizer steps between held-out evaluations; 0 = only at the end
    keep_last: int = 2
    resume: str = "auto"
    allow_schedule_change: bool = False  # resume may change max_steps, epochs, optim.* (moe/run/run_dir.py)
    kernels: str = "auto"
    device: str = "auto"
    init_from: str | None = None  # a Hugging Face Arctic directory to start from (moe/run/init_from.py)
    require_init_from: bool = False  # set by recipes that fine-tune a pretrained model (+experiment=arctic_sft)
    max_skipped_steps: int = 3  # consecutive non-finite (skipped) steps before the run stops with an error
    precision: str = "auto"  # auto (bf16 on cuda, fp32 on cpu) | fp32 | bf16 (fp32 master weights), on any device
    activation_checkpointing: str = "none"  # none | moe | selective | full (moe/model.py CHECKPOINTING)
    host_allocator: str = "auto"  # auto (retain on cpu) | retain | system (moe/run/host_allocator.py)
    objective: str = "sft"  # sft (LM loss on the trained tokens) | dpo (preference pairs; moe/run/dpo.py)
    neftune_alpha: float = 0.0  # NEFTune noise on the input embeddings in training (0 = off; moe/model.py)

    def __post_init__(self):
        from floe.errors import field_type_errors

        if errors := field_type_errors(self, "train"):
            raise ValueError("invalid train config:\n  " + "\n  ".join(errors))
        errors = batch_errors(self.global_batch_size, self.micro_batch_size, dp_size=1)
        if self.epochs <= 0:
            errors.append(f"train.epochs must be > 0, got {self.epochs}")
        if not self.neftune_alpha >= 0:
            errors.append(f"train.neftune_alpha must be >= 0 (0 = off), got {self.neftune_alpha!r}")
        if self.max_skipped_steps < 1:
            errors.append(f"train.max_skipped_steps must be >= 1, got {self.max_skipped_steps}")
        for name in ("max_steps", "save_every", "eval_every", "keep_last"):
            if getattr(self, name) < 0:
                errors.append(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.resume not in ("auto", "never"):
            errors.append(f"train.resume must be 'auto' or 'never', got {self.resume!r}")
        if self.kernels not in kernels.CHOICES:
            errors.append(f"train.kernels must be one of {kernels.CHOICES}, got {self.kernels!r}")
        if self.require_init_from and not self.init_from:
            errors.append("train.init_from is required here (train.require_init_from is true, e.g. by "
                          "+experiment=arctic_sft): set train.init_from=<a Hugging Face Arctic directory, "
                          "e.g. tools/export.py's output>")
        if self.precision not in ("auto", *PRECISIONS):
            errors.append(f"train.precision must be one of ('auto', {', '.join(map(repr, PRECISIONS))}), "
                          f"got {self.precision!r}")
        if self.activation_checkpointing not in CHECKPOINTING:
            errors.append(f"train.activation_checkpointing must be one of {', '.join(CHECKPOINTING)}, "
                          f"got {self.activation_checkpointing!r}")
        if self.host_allocator not in HOST_ALLOCATORS:
            errors.append(f"train.host_allocator must be one of {', '.join(HOST_ALLOCATORS)}, "
                          f"got {self.host_allocator!r}")
        if self.objective not in OBJECTIVES:
            errors.append(f"train.objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            errors.append(f"train.device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if errors:
            raise ValueError("invalid train config:\n  " + "\n  ".join(errors))


@dataclass
class Configs:
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    parallel: ParallelConfig
    train: TrainConfig
    run_dir: str
    wandb: str
    wandb_project: str
    log_every: int
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # rank 0: no adapters
    expert_load_every: int = 10  # optimizer steps between lines of run_dir/expert_load.jsonl; 0 = last step only
    console_every: int = 10  # optimizer steps between console lines when stderr is not a terminal
    tensorboard: bool = False  # log.tensorboard: metrics.jsonl's scalars also as TensorBoard events
    dpo: DPOConfig = field(default_factory=DPOConfig)  # train.objective=dpo


def pick_device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is available")
    return choice


def config_errors(sections: dict, launch: LaunchEnv | None = None) -> list[str]:
    """Every problem of the config `sections` ({"model": ModelConfig, "data": ..., "parallel": ...,
    "train": ..., "run_dir": str}; a section that did not build is absent). Without `launch`, only the
    rules between sections; with it, also the launch and every file and path (no data is read)."""
    model, data, parallel, train = (sections.get(k) for k in ("model", "data", "parallel", "train"))
    errors = []
    if data is not None and train is not None:
        errors += objective_errors(train.objective, data.name)
    if model is not None and data is not None and data.seq_len > model.max_seq_len:
        errors.append(f"data.seq_len ({data.seq_len}) must be <= model.max_seq_len ({model.max_seq_len})")
    if model is not None and sections.get("lora") is not None:
        errors += lora_model_errors(sections["lora"], model)
        errors += quantize_config_errors(model, sections["lora"].quantize_base, sections["lora"].targets)
    if launch is None:
        return errors
    if parallel is not None:
        errors += parallel_errors(model, launch.world_size, parallel.ep_size, parallel.zero_stage,
                                  *((train.global_batch_size, train.micro_batch_size) if train else (None, None)))
    if train is not None:
        errors += _device_errors(train)
    if data is not None:
        errors += _data_file_errors(data, model)
    if "run_dir" in sections:
        errors += run_dir_errors(sections["run_dir"])
    return errors


def check_config(c: Configs, launch: LaunchEnv) -> None:
    """Raise one ConfigError naming every problem of `c` under `launch` (config_errors)."""
    sections = {"model": c.model, "data": c.data, "optim": c.optim, "parallel": c.parallel, "train": c.train,
                "lora": c.lora, "run_dir": c.run_dir}
    if errors := config_errors(sections, launch):
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def _device_errors(train: TrainConfig) -> list[str]:
    errors = []
    if train.device == "cuda" and not torch.cuda.is_available():
        errors.append("train.device=cuda but no CUDA device is available")
    cpu = train.device == "cpu" or (train.device == "auto" and not torch.cuda.is_available())
    if train.kernels == "triton" and cpu and not kernels.interpreter_enabled():
        errors.append("train.kernels=triton on a CPU needs TRITON_INTERPRET=1 in the environment (slow: for "
                      "checking the kernels); use train.kernels=auto or reference to train on a CPU")
    return errors


def _data_file_errors(data: DataConfig, model: ModelConfig | None) -> list[str]:
    """The tokenizer (loaded: it is small) against model.vocab_size, and every data file entry."""
    from floe.data import Tokenizer, path_errors

    errors = path_errors(data)
    try:
        vocab_size = Tokenizer(data.tokenizer).vocab_size
    except ValueError as e:
        return errors + [str(e)]
    if model is not None and vocab_size > model.vocab_size:
        errors.append(f"model.vocab_size ({model.vocab_size}) is smaller than the tokenizer's vocabulary "
                      f"({vocab_size}); set model.vocab_size >= {vocab_size}")
    return errors


def run_dir_errors(run_dir: str) -> list[str]:
    """run.dir must name a directory this process can create and write: not empty, not an existing
    file, no path component longer than the file system allows, not on a read-only file system."""
    if not run_dir or not run_dir.strip():
        return ["run.dir is empty: set run.dir=<a directory> (or leave it unset for runs/<model>/<overrides>)"]
    long = [p for p in run_dir.split(os.sep) if len(os.fsencode(p)) > MAX_NAME_BYTES]
    if long:
        return [f"run.dir={run_dir}: the path component {long[0][:40]!r}... is {len(os.fsencode(long[0]))} bytes; "
                f"a file system allows at most {MAX_NAME_BYTES}"]
    existing = os.path.abspath(run_dir)
    while not os.path.lexists(existing):  # the nearest part of the path that exists
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return [f"run.dir={run_dir}: {existing} exists and is not a directory"]
    for path in (existing, os.path.join(existing, "checkpoints")):
        if os.path.isdir(path) and not os.access(path, os.W_OK | os.X_OK):
            why = "read-only file system" if _read_only_fs(path) else "no write permission"
            return [f"run.dir={run_dir}: cannot write to {path} ({why})"]
    return []


def _read_only_fs(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError as e:
        return e.errno == errno.EROFS
