"""Train an Arctic-style MoE: Hydra config -> data -> model -> DeepSpeed engine -> loop.

    python launch/train.py                                     # tiny model, embedded data, this machine
    torchrun --standalone --nproc_per_node=8 launch/train.py model=small parallel.ep_size=8 \
        parallel.zero_stage=2 optim.lr=2e-4 train.max_steps=2000
    python launch/train.py -m model.capacity_factor=1.0,1.25,2.0   # an ablation sweep

Everything a run writes goes to run.dir (deterministic, so every rank agrees and a relaunch
resumes): config.yaml, metrics.jsonl (one line per optimizer step), checkpoints/, wandb/.
`train(cfg)` is importable: tests call it with a composed config.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import socket
import sys
import time
from dataclasses import dataclass

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

import kernels
from moe import checkpoint
from moe.config import ModelConfig
from moe.data import DataConfig, StepLoader, build_dataset
from moe.model import IGNORE_INDEX, ArcticForCausalLM, shift_targets
from moe.optim import OptimConfig, lr_lambda, param_groups
from moe.parallel import (apply_deepspeed_moe, apply_expert_parallel, build_deepspeed_config, build_parallel_groups,
                          check_deepspeed_version, fix_engine, global_grad_norm, parallel_errors,
                          read_launch_env, split_moe_param_groups)
from moe.parallel import init_distributed as parallel_init_distributed

log = logging.getLogger("floe")

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


@dataclass
class TrainConfig:
    max_steps: int = 60
    epochs: int = 1
    global_batch_size: int = 16
    micro_batch_size: int = 8
    seed: int = 0
    save_every: int = 0
    keep_last: int = 2
    resume: str = "auto"
    kernels: str = "auto"
    device: str = "auto"

    def __post_init__(self):
        errors = []
        for name in ("global_batch_size", "micro_batch_size", "epochs"):
            if getattr(self, name) <= 0:
                errors.append(f"train.{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_steps", "save_every", "keep_last"):
            if getattr(self, name) < 0:
                errors.append(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.resume not in ("auto", "never"):
            errors.append(f"train.resume must be 'auto' or 'never', got {self.resume!r}")
        if self.kernels not in ("auto", *kernels.BACKENDS):
            errors.append(f"train.kernels must be one of ('auto', {', '.join(map(repr, kernels.BACKENDS))}), "
                          f"got {self.kernels!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            errors.append(f"train.device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if errors:
            raise ValueError("invalid train config:\n  " + "\n  ".join(errors))


@dataclass
class ParallelConfig:
    ep_size: int = 1  # ranks sharing one copy of the experts; each owns num_experts / ep_size
    zero_stage: int = 0  # 0, 1 or 2
    reduce_bucket_size: int = 500_000_000  # elements per ZeRO gradient-reduction bucket
    allgather_bucket_size: int = 500_000_000  # elements per ZeRO parameter all-gather bucket
    overlap_comm: bool | None = None  # None: on for CUDA, off on CPU
    contiguous_gradients: bool = True
    async_dispatch: bool = True  # expert-parallel all-to-all in flight during attention


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


def _build(cls, section: DictConfig | dict, key: str):
    """Instantiate dataclass `cls` from a config section, naming unknown keys."""
    values = OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else dict(section)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(f'{key}.{u}' for u in unknown)}; "
                         f"known: {', '.join(sorted(known))}")
    return cls(**values)


def parse_config(cfg: DictConfig) -> Configs:
    """Turn the composed Hydra config into floe's dataclasses; all problems in one ValueError."""
    errors, built = [], {}
    for key, cls in (("model", ModelConfig), ("data", DataConfig), ("optim", OptimConfig),
                     ("parallel", ParallelConfig), ("train", TrainConfig)):
        try:
            built[key] = _build(cls, cfg[key], key)
        except (ValueError, TypeError) as e:
            errors.append(str(e))
    if cfg.log.wandb not in ("offline", "online", "disabled"):
        errors.append(f"log.wandb must be offline, online or disabled, got {cfg.log.wandb!r}")
    if "model" in built and "data" in built and built["data"].seq_len > built["model"].max_seq_len:
        errors.append(f"data.seq_len ({built['data'].seq_len}) must be <= model.max_seq_len "
                      f"({built['model'].max_seq_len})")
    if errors:
        raise ValueError("invalid config:\n" + "\n".join(errors))
    return Configs(run_dir=str(cfg.run.dir), wandb=str(cfg.log.wandb), wandb_project=str(cfg.log.project),
                   log_every=int(cfg.log.every), **built)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device_kind: str) -> bool:
    """Join torchrun's process group (or make a 1-process one). Returns True if we created it."""
    if dist.is_initialized():
        return False
    if "RANK" not in os.environ:  # plain `python launch/train.py`: a group of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    local_rank = read_launch_env().local_rank
    parallel_init_distributed(torch.device(device_kind, local_rank if device_kind == "cuda" else None))
    return True


def pick_device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is available")
    return choice


def deepspeed_config(c: Configs, world_size: int, device_kind: str) -> dict:
    """DeepSpeed's JSON config from floe's: ZeRO stage, batch split, clipping, precision."""
    return build_deepspeed_config(
        zero_stage=c.parallel.zero_stage, global_batch_size=c.train.global_batch_size,
        micro_batch_size=c.train.micro_batch_size, dp_size=world_size, grad_clip=c.optim.grad_clip,
        device=device_kind, reduce_bucket_size=c.parallel.reduce_bucket_size,
        allgather_bucket_size=c.parallel.allgather_bucket_size, overlap_comm=c.parallel.overlap_comm,
        contiguous_gradients=c.parallel.contiguous_gradients, steps_per_print=10**12)


def _check_launch(c: Configs, world_size: int, vocab_size: int) -> None:
    """Config rules that depend on the launch or the data; raised before any collective."""
    # Expert parallelism, ZeRO stage and the batch split (moe/parallel/groups.py).
    errors = parallel_errors(c.model, world_size, c.parallel.ep_size, c.parallel.zero_stage,
                             c.train.global_batch_size, c.train.micro_batch_size)
    if c.train.kernels == "triton" and pick_device(c.train.device) == "cpu" and not kernels.interpreter_enabled():
        errors.append("train.kernels=triton on a CPU needs TRITON_INTERPRET=1 in the environment (slow: for "
                      "checking the kernels); use train.kernels=auto or reference to train on a CPU")
    if vocab_size > c.model.vocab_size:
        errors.append(f"model.vocab_size ({c.model.vocab_size}) is smaller than the tokenizer's vocabulary "
                      f"({vocab_size}); set model.vocab_size >= {vocab_size}")
    if errors:
        raise ValueError("invalid launch:\n  " + "\n  ".join(errors))


class MetricsWriter:
    """metrics.jsonl (rank 0), plus wandb when enabled."""

    def __init__(self, c: Configs, resolved: dict, resume_step: int):
        self.path = os.path.join(c.run_dir, "metrics.jsonl")
        if os.path.exists(self.path):  # drop lines past the checkpoint we resume from
            with open(self.path) as f:
                kept = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(kept)
        self.wandb = None
        if c.wandb != "disabled":
            import wandb

            self.wandb = wandb.init(project=c.wandb_project, dir=c.run_dir, mode=c.wandb, config=resolved,
                                    name=os.path.basename(os.path.normpath(c.run_dir)), resume="allow",
                                    id=_wandb_id(c.run_dir))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_id(run_dir: str) -> str:
    import hashlib

    return hashlib.sha1(os.path.abspath(run_dir).encode()).hexdigest()[:16]


def train(cfg: DictConfig) -> dict:
    """Run training as configured; returns the last step's metrics (on every rank)."""
    c = parse_config(cfg)
    device_kind = pick_device(c.train.device)
    launch = read_launch_env()  # torchrun's RANK / WORLD_SIZE, checked before any collective
    world_size, rank = launch.world_size, launch.rank
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="[%(asctime)s floe] %(message)s", datefmt="%H:%M:%S", force=True)

    # Everything that can be checked without talking to other ranks is checked first.
    tokenizer, dataset = build_dataset(c.data, seed=c.train.seed)
    _check_launch(c, world_size, tokenizer.vocab_size)
    check_deepspeed_version()
    kernels.set_backend(c.train.kernels)

    env_before = dict(os.environ)
    created_group = init_distributed(device_kind)
    try:
        return _train(c, cfg, dataset, device_kind)
    finally:
        kernels.set_backend(None)
        if created_group:
            dist.destroy_process_group()
            _forget_deepspeed_groups()
            for key in set(os.environ) - set(env_before):  # the 1-process rendezvous we made up
                del os.environ[key]


def _forget_deepspeed_groups() -> None:
    """DeepSpeed caches process groups in module globals; after we destroy the default group
    (so train() can run again in the same process, as tests do) those handles are stale."""
    from deepspeed.utils import groups

    for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                 "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP"):
        getattr(groups, name).clear()
    for name in ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP",
                 "_MODEL_PARALLEL_GROUP", "_TENSOR_MODEL_PARALLEL_GROUP"):
        setattr(groups, name, None)


def _train(c: Configs, cfg: DictConfig, dataset, device_kind: str) -> dict:
    import deepspeed

    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device(device_kind, read_launch_env().local_rank if device_kind == "cuda" else None)
    if rank == 0:
        os.makedirs(c.run_dir, exist_ok=True)
        OmegaConf.save(cfg, os.path.join(c.run_dir, "config.yaml"), resolve=True)
        log.info("run dir %s; %d rank(s) on %s; data: %s", c.run_dir, world_size, device_kind,
                 json.dumps(dataset.stats))

    groups = build_parallel_groups(c.parallel.ep_size) if c.parallel.ep_size > 1 else None
    with torch.device("meta"):  # shapes only: no rank ever allocates experts it does not own
        model = ArcticForCausalLM(c.model)
    if groups is not None:  # each rank keeps experts [ep_rank * E/ep, (ep_rank + 1) * E/ep)
        apply_expert_parallel(model, groups, async_dispatch=c.parallel.async_dispatch)
        log.info("expert parallel: ep_size %d, rank %d holds experts %d..%d of %d", groups.ep_size, rank,
                 groups.ep_rank * c.model.num_experts // groups.ep_size,
                 (groups.ep_rank + 1) * c.model.num_experts // groups.ep_size - 1, c.model.num_experts)
    model.to_empty(device=device)
    # Dense weights and each expert row are keyed by (seed, name, global expert id): every rank
    # gets the weights the 1-process model would have, for the experts it holds.
    model.reset_parameters(seed=c.train.seed)
    if groups is not None:
        # Last before initialize: the engine must see the experts as MoE (expert-data-parallel
        # gradient reduction, per-group optimizer partitions, no broadcast from rank 0).
        apply_deepspeed_moe(model)
    total, active = c.model.num_params()
    log.info("model: %.2fM parameters, %.2fM active per token", total / 1e6, active / 1e6)

    loader = StepLoader(dataset, global_batch_size=c.train.global_batch_size,
                        micro_batch_size=c.train.micro_batch_size, dp_rank=rank, dp_size=world_size,
                        seed=c.train.seed)
    total_steps = c.train.max_steps or c.train.epochs * loader.steps_per_epoch
    # Expert parameters go to DeepSpeed's per-expert-group optimizer groups (no-op without EP).
    optimizer = torch.optim.AdamW(split_moe_param_groups(param_groups(model, c.optim.weight_decay)), lr=c.optim.lr,
                                  betas=(c.optim.beta1, c.optim.beta2), eps=c.optim.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, c.optim.warmup_ratio, c.optim.min_lr_ratio))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(c, world_size, device_kind))
    ep_group = groups.ep_group if groups is not None else None
    fix_engine(engine, ep_group)  # stage-0 clipping over all experts; checks the engine saw the MoE
    grad_accum = engine.gradient_accumulation_steps()

    ckpt_dir = os.path.join(c.run_dir, "checkpoints")
    start_step = 0
    resume_path = checkpoint.latest_checkpoint(ckpt_dir) if c.train.resume == "auto" else None
    if resume_path is not None:
        client = checkpoint.load(engine, resume_path)
        loader.load_state_dict(client["loader"])
        start_step = client["step"]
        log.info("resumed from %s at step %d", resume_path, start_step)

    writer = MetricsWriter(c, OmegaConf.to_container(cfg, resolve=True), start_step) if rank == 0 else None
    progress = None
    if rank == 0:
        from tqdm import tqdm

        progress = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    record: dict = {}
    step = start_step
    try:
        while step < total_steps:
            t0 = time.perf_counter()
            micro_batches = [{k: v.to(device) for k, v in mb.items()} for mb in loader.next_step()]
            assert len(micro_batches) == grad_accum, (len(micro_batches), grad_accum)
            # The LM loss is normalised by the loss tokens of the whole global batch, so the
            # gradient is the same at any world size and accumulation split.
            local_tokens = sum(int((shift_targets(mb["labels"], mb["position_ids"]) != IGNORE_INDEX).sum())
                               for mb in micro_batches)
            global_tokens = _all_reduce_sum(float(local_tokens), device)
            # DeepSpeed divides each micro-batch loss by grad_accum and averages gradients over
            # ranks; this factor undoes both for the LM term (the aux term stays a mean).
            lm_scale = grad_accum * world_size / max(global_tokens, 1.0)
            # lm_sum, balance, aux, dropped, assigned, input tokens: summed over ranks in one all-reduce
            sums = torch.zeros(6, dtype=torch.float64, device=device)
            for i, mb in enumerate(micro_batches):
                out = engine(input_ids=mb["input_ids"], position_ids=mb["position_ids"], labels=mb["labels"],
                             attention_mask=mb["attention_mask"])
                engine.backward(out.lm_loss_sum * lm_scale + out.aux_loss)
                sums += torch.stack([
                    out.lm_loss_sum.detach().double(), out.balance_loss.detach().double(),
                    out.aux_loss.detach().double(),
                    sum(st.dropped for st in out.router_stats).double(),
                    torch.tensor(float(sum(st.num_assignments for st in out.router_stats)), device=device,
                                 dtype=torch.float64),
                    mb["attention_mask"].sum().double()])
                if i < len(micro_batches) - 1:
                    engine.step()  # inside the accumulation window DeepSpeed only counts the micro-step
            step += 1
            dist.all_reduce(sums)
            # NOTE: host sync once per step for logging and the NaN check.
            lm_sum, balance, aux, dropped, assigned, input_tokens = sums.tolist()
            num_micro = grad_accum * world_size
            loss = lm_sum / max(global_tokens, 1.0)
            # Checked before the update is applied, with the same verdict on every rank, so no
            # rank skips a collective the others enter and the last checkpoint stays clean.
            if not math.isfinite(loss) or not math.isfinite(aux):
                raise FloatingPointError(f"non-finite loss at step {step} (before its update was applied): "
                                         f"lm {loss}, aux {aux}; resume from the last checkpoint with a lower "
                                         "optim.lr or a higher optim.warmup_ratio")
            grad_norm = None
            if c.parallel.zero_stage == 0:  # ZeRO-0 keeps no norm for a torch optimizer; experts of all ranks count
                grad_norm = float(global_grad_norm(model.parameters(), ep_group))
            engine.step()  # the accumulation boundary: clip and update
            if grad_norm is None:
                grad_norm = float(engine.get_global_grad_norm())
            elapsed = time.perf_counter() - t0
            record = {
                "step": step,
                "epoch": loader.epoch,
                "loss": loss,
                "balance_loss": balance / num_micro,
                "balance_floor": float(c.model.num_layers),
                "aux_loss": aux / num_micro,
                "lr": engine.get_lr()[0],
                "grad_norm": grad_norm,
                "tokens_per_s": input_tokens / elapsed,
                "dropped_frac": dropped / max(assigned, 1.0),
                "loss_tokens": int(global_tokens),
                "step_time_s": elapsed,
            }
            if rank == 0:
                if step % c.log_every == 0 or step == total_steps:
                    writer.write(record)
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.3f}", bal=f"{record['balance_loss']:.3f}",
                                     drop=f"{record['dropped_frac']:.3f}", lr=f"{record['lr']:.1e}")
            if (c.train.save_every and step % c.train.save_every == 0) or step == total_steps:
                path = checkpoint.save(engine, ckpt_dir, step,
                                       {"step": step, "loader": loader.state_dict()}, keep_last=c.train.keep_last)
                log.info("saved %s", path)
    finally:
        if progress is not None:
            progress.close()
        if writer is not None:
            writer.close()
    if rank == 0 and record:
        log.info("done: step %d loss %.4f balance %.4f (floor %.1f)", record["step"], record["loss"],
                 record["balance_loss"], record["balance_floor"])
    return record


def _all_reduce_sum(value: float, device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())  # NOTE: host sync


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
