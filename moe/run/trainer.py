"""The training loop: build once (data, model, engine), then a short `train_step`, log, save.

launch/train.py is only the Hydra entry point around `train(configs, resolved)`: everything
here takes floe's dataclasses and works without Hydra.

One optimizer step, on every rank:
    loss tokens of the global batch  <- the loader, on the host (it knows every rank's rows)
    for each micro-batch: forward, backward of (lm_sum * scale + aux), DeepSpeed counts it
    one all-reduce of the logged sums -> one host sync -> non-finite check (before the update)
    engine.step(): clip + update, the gradient norm computed once
"""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import shutil
import time

import torch
import torch.distributed as dist
from safetensors import SafetensorError

from floe.data import StepLoader, eval_micro_batches
from floe.errors import ConfigError
from floe.lora import LoRAConfig, apply_lora
from floe.quantize import apply_quantize_base
from floe.model import ArcticForCausalLM, apply_activation_checkpointing, apply_kernel_backend
from floe.parallel import build_engine, resolve_precision
from floe.run import checkpoint, host_allocator, run_dir
from floe.run.config import Configs, TrainConfig
from floe.run.console import Console
from floe.run.context import CheckpointError, RunContext, RunStopped
from floe.run.evaluation import eval_loss_record, eval_loss_sums
from floe.run.init_from import base_identity, base_problem, weight_loader
from floe.run.metrics import device_peak_flops, load_cv, mem_peak_gb, train_flops_per_token
from floe.run.router_watch import RouterWatch

log = logging.getLogger("floe")

# What each step sums over micro-batches and ranks (one all-reduce): the logged quantities,
# followed by the kept assignments per expert of every layer (num_layers x num_experts counts), then
# the assignments per expert before capacity (the router's choice: the balancing bias moves against it).
# "stop": micro-batches run while a stop signal was pending, so every rank stops after the same step.
SUMMED = ("lm_sum", "balance", "aux", "dropped", "assigned", "input_tokens", "dropped_loss", "loss_assigned", "stop")


def total_steps(t: TrainConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of the whole run: train.max_steps, or train.epochs full epochs when it is 0."""
    return t.max_steps or t.epochs * steps_per_epoch


class NonFiniteTraining(FloatingPointError):
    """train.max_skipped_steps consecutive steps were not finite: the run stops (non-zero exit)."""


def lora_base(c: Configs) -> dict | None:
    """The frozen base of a LoRA run (floe.run.init_from.base_identity), None without LoRA."""
    return base_identity(c.train.init_from, c.train.seed) if c.lora.enabled else None


def check_resumed_base(c: Configs, latest: str) -> None:
    """Refuse to resume LoRA adapters onto another base than the one they were trained on."""
    saved = checkpoint.read_client_state(latest).get("base")
    if c.lora.enabled and (problem := base_problem(saved, lora_base(c))):
        raise ConfigError(f"cannot resume {latest}: {problem}. Relaunch with the base it was trained on, or set "
                          "another run.dir to start over")


def adapt_base(model, lora: LoRAConfig, seed: int) -> None:
    """build_engine's adapt hook of a LoRA run: adapters beside the loaded (sharded) weights, the base
    frozen, then the frozen weights of lora.targets stored quantized (lora.quantize_base)."""
    apply_lora(model, lora, seed=seed)
    apply_quantize_base(model, lora.quantize_base, lora.targets)


class Trainer:
    """Build once, then `fit`: train_step, log, save until the last step."""

    def __init__(self, c: Configs, resolved: dict, dataset, device: torch.device, eval_dataset=None,
                 run: RunContext | None = None):
        """`run` (floe.run.context) says what to resume from and whether a stop was requested; without
        it (benchmarks) the run starts fresh and stops at its last step."""
        self.c, self.device, self.eval_dataset, self.run, self.resolved = c, device, eval_dataset, run, resolved
        self.stop_agreed = False
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        allocator = host_allocator.configure(c.train.host_allocator, device.type)  # before the model's first tensor
        if self.rank == 0:
            run_dir.write_run_dir(c.run_dir, resolved, dataset.fingerprint)
            stats_file = write_data_stats(c.run_dir, dataset, eval_dataset)
            log.info("run dir %s; %d rank(s) on %s; data statistics in %s", c.run_dir, self.world_size,
                     device.type, stats_file)
        with torch.device("meta"):  # shapes only: no rank ever allocates experts it does not own
            model = ArcticForCausalLM(c.model)
        apply_activation_checkpointing(model, c.train.activation_checkpointing)
        model.neftune_alpha = c.train.neftune_alpha
        apply_kernel_backend(model, c.train.kernels)
        self.loader = StepLoader(dataset, global_batch_size=c.train.global_batch_size,
                                 micro_batch_size=c.train.micro_batch_size, dp_rank=self.rank,
                                 dp_size=self.world_size, seed=c.train.seed,
                                 with_example_ids=c.train.objective == "dpo",
                                 with_source_ids=c.train.objective == "sft")  # expert load per data source
        self.source_labels = dataset.source_labels
        self.total_steps = total_steps(c.train, self.loader.steps_per_epoch)
        self.ckpt_dir = os.path.join(c.run_dir, "checkpoints")
        resume_from = run.resume_from if run is not None else None
        # A run's own checkpoint wins over init_from: its weights would be overwritten anyway. A LoRA
        # run's checkpoint holds only its adapters: the frozen base is loaded (or initialised) again.
        load_base = c.train.init_from and (not resume_from or c.lora.enabled)
        # A QLoRA base from init_from is adapted and quantized block by block inside the load (one block
        # unquantized at a time, floe.run.init_from.load_quantized), so the adapt hook has nothing left.
        streamed = bool(load_base) and c.lora.enabled and c.lora.quantize_base != "none"
        load_weights = weight_loader(c.train.init_from, device, c.lora if streamed else None, c.train.seed) if load_base else None
        self.base = lora_base(c)
        adapt = (lambda m: adapt_base(m, c.lora, c.train.seed)) if c.lora.enabled and not streamed else None
        self.engine = build_engine(model, c.parallel, c.optim, seed=c.train.seed, device=device, adapt=adapt,
                                   global_batch_size=c.train.global_batch_size, load_weights=load_weights,
                                   micro_batch_size=c.train.micro_batch_size, total_steps=self.total_steps,
                                   precision=c.train.precision)
        self._log_model(allocator)
        self.flops_per_token = train_flops_per_token(c.model, c.data.seq_len)
        self.peak_flops = device_peak_flops(device, next(self.engine.model.parameters()).dtype)
        if self.peak_flops is None and self.rank == 0:
            log.warning("no peak FLOP/s known for %s: mfu is not logged (set FLOE_PEAK_TFLOPS)",
                        torch.cuda.get_device_name(device))
        self.step = self._resume(resume_from)
        self.skipped_steps = self.consecutive_skips = 0
        # Every rank watches the same global counts (records agree); only rank 0 warns.
        self.router_watch = RouterWatch(c.model.num_experts, c.model.top_k, warn=self.rank == 0)
        self.writer = MetricsWriter(c, resolved, self.step) if self.rank == 0 else None
        # rank 0: a bar on a terminal (log lines above it), plain lines in a log file (floe/run/console.py)
        self.screen = Console(self.total_steps, self.step, c.console_every, self.console_extra) \
            if self.rank == 0 else None

    def _log_model(self, allocator: str) -> None:
        groups, cfg = self.engine.groups, self.c.model
        if groups is not None:
            experts = self.engine.model.layers[0].moe.experts
            log.info("expert parallel: ep_size %d, rank %d holds experts %d..%d of %d", groups.ep_size, self.rank,
                     experts.first_expert, experts.first_expert + experts.num_local_experts - 1, cfg.num_experts)
        total, active = cfg.num_params()
        if self.c.lora.enabled:
            trained = sum(p.numel() for p in self.engine.model.parameters() if p.requires_grad)
            log.info("lora: rank %d on %s; %.3fM trainable parameters on this rank, the base frozen",
                     self.c.lora.rank, ", ".join(self.c.lora.targets), trained / 1e6)
        log.info("model: %.2fM parameters, %.2fM active per token; %s, ZeRO-%d; host allocator %s", total / 1e6,
                 active / 1e6, resolve_precision(self.c.train.precision, self.device), self.c.parallel.zero_stage,
                 allocator)

    def _resume(self, path: str | None) -> int:
        if path is None:
            return 0
        try:
            client = checkpoint.load(self.engine, path)
            self.loader.load_state_dict(client["loader"])
        except (KeyError, TypeError, ValueError) as e:  # read_state checked the counters; this is the rest
            raise CheckpointError(f"cannot resume {path}: {e}") from None
        log.info("resumed from %s at step %d", path, client["step"])
        return client["step"]

    def fit(self) -> dict:
        record: dict = {}
        try:
            while self.step < self.total_steps:
                record = self.train_step()
                record.update(self.maybe_evaluate())
                self.log(record)
                self.stop_if_diverged()
                saved = self.maybe_save()
                if self.stop_agreed:
                    self.stop(saved)
        finally:
            if self.screen is not None:
                self.screen.close()
            if self.writer is not None:
                self.writer.close()
        if self.rank == 0 and record:
            log.info("done: step %d loss %.4f balance %.4f (%.1f under uniform routing)%s", record["step"],
                     record["loss"], record["balance_loss"], record["balance_uniform"],
                     f"; {self.skipped_steps} non-finite step(s) skipped" if self.skipped_steps else "")
        return record

    def stop(self, saved: str | None) -> None:
        """Every rank agreed on a stop signal this step: write a checkpoint (unless this step just did)
        and raise RunStopped. A skipped (non-finite) step is not saved; `latest` stays the last good one."""
        path = saved or (self.save() if not self.consecutive_skips else checkpoint.latest_checkpoint(self.ckpt_dir))
        raise RunStopped(self.run.signum, self.step, path, self.c.run_dir)

    def train_step(self) -> dict:
        """One optimizer step over the loader's next global batch; returns its metrics."""
        t0 = time.perf_counter()
        engine = self.engine
        num_loss_tokens = self.loader.global_loss_tokens()  # every rank's rows, counted on the host
        micro_batches = [{k: v.to(self.device) for k, v in mb.items()} for mb in self.loader.next_step()]
        assert len(micro_batches) == engine.grad_accum, (len(micro_batches), engine.grad_accum)
        # The LM loss is normalised by the loss tokens of the whole global batch, so the gradient is
        # the same at any world size and accumulation split. DeepSpeed divides each micro-batch loss
        # by grad_accum and averages gradients over ranks; this factor undoes both for the LM term
        # (the aux term stays a mean).
        lm_scale = engine.grad_accum * self.world_size / max(num_loss_tokens, 1.0)
        sums = torch.zeros(self.num_summed(), dtype=torch.float64, device=self.device)
        for i, mb in enumerate(micro_batches):
            out = engine(input_ids=mb["input_ids"], position_ids=mb["position_ids"], labels=mb["labels"],
                         attention_mask=mb["attention_mask"])
            engine.backward(out.lm_loss_sum * lm_scale + out.aux_loss)
            sums += self._sums(out, mb)
            if i < len(micro_batches) - 1:
                engine.micro_step()
        dist.all_reduce(sums)
        # NOTE: host sync once per step for logging and the non-finite check.
        totals = self._totals(sums.tolist())
        loss = totals["lm_sum"] / max(num_loss_tokens, 1.0)
        # The loss (all-reduced) and the gradient norm (global) decide, before the update and alike
        # on every rank, whether this step is applied (Engine.step).
        finite_loss = math.isfinite(loss) and math.isfinite(totals["aux"])
        grad_norm, applied = engine.step(skip=not finite_loss)  # clip and update, or skip
        if applied:  # the global batch's counts: every rank moves its copy of the bias alike
            self._update_expert_bias(totals["routed_per_expert"])
        self.step += 1
        self._count_skip(applied, loss, grad_norm)
        record = self._record(totals, loss, num_loss_tokens, grad_norm, time.perf_counter() - t0)
        record.update(skipped=not applied, skipped_steps=self.skipped_steps)
        return record

    def _count_skip(self, applied: bool, loss: float, grad_norm: float) -> None:
        """Count a skipped (non-finite) step; stop after train.max_skipped_steps in a row."""
        if applied:
            self.consecutive_skips = 0
            return
        self.skipped_steps += 1
        self.consecutive_skips += 1
        log.warning("step %d skipped (not applied): loss %s, gradient norm %s (%d in a row, %d in all)",
                    self.step, loss, grad_norm, self.consecutive_skips, self.skipped_steps)

    def stop_if_diverged(self) -> None:
        """Raise NonFiniteTraining after train.max_skipped_steps skipped steps in a row."""
        if self.consecutive_skips >= self.c.train.max_skipped_steps:
            last = checkpoint.latest_checkpoint(self.ckpt_dir)
            raise NonFiniteTraining(
                f"{self.consecutive_skips} consecutive steps (up to step {self.step}) had a non-finite loss or "
                f"gradient norm and were skipped (train.max_skipped_steps={self.c.train.max_skipped_steps}); "
                f"nothing non-finite was applied or saved. Last good checkpoint: "
                f"{last or 'none (no checkpoint was written)'}. Lower optim.lr, raise optim.warmup_ratio or check "
                f"model.init_std, then relaunch (it resumes from that checkpoint) or start a new run.dir")

    def num_summed(self) -> int:
        """Length of _sums' vector: SUMMED, then kept and routed assignments per expert of every layer,
        then routed assignments per (layer, data source, expert)."""
        cfg = self.c.model
        return len(SUMMED) + (2 + len(self.source_labels)) * cfg.num_layers * cfg.num_experts

    def _update_expert_bias(self, routed_per_expert: list[list[int]]) -> None:
        """After an applied step: each layer's balancing bias against the global batch's routed counts."""
        if self.c.model.balance_bias_rate <= 0:
            return
        for block, load in zip(self.engine.model.layers, routed_per_expert):
            block.moe.update_expert_bias(torch.tensor(load, dtype=torch.float64))

    def _sums(self, out, mb, lm_sum: torch.Tensor | None = None) -> torch.Tensor:
        """This micro-batch's contribution to SUMMED, on the device (no sync); lm_sum: the objective's
        summed loss when it is not the LM loss (train.objective=dpo)."""
        stats = out.router_stats
        assigned = float(sum(st.num_assignments for st in stats))
        return torch.cat([torch.stack([
            (out.lm_loss_sum if lm_sum is None else lm_sum).detach().double(), out.balance_loss.detach().double(),
            out.aux_loss.detach().double(),
            sum(st.dropped for st in stats).double(),
            torch.tensor(assigned, device=self.device, dtype=torch.float64),
            mb["attention_mask"].sum().double(),
            sum(st.dropped_loss for st in stats).double(), sum(st.loss_assignments for st in stats).double(),
            torch.tensor(float(self.run is not None and self.run.stop_requested), device=self.device,
                         dtype=torch.float64)]),
            torch.stack([st.tokens_per_expert for st in stats]).reshape(-1).double(),
            torch.stack([st.routed_per_expert for st in stats]).reshape(-1).double(),
            self._routed_per_source(stats, mb).reshape(-1).double()])

    def _routed_per_source(self, stats, mb) -> torch.Tensor:
        """[L, S, E] routed assignments per layer, data source and expert (zeros without source_ids)."""
        num_sources, num_experts = len(self.source_labels), self.c.model.num_experts
        if "source_ids" not in mb:
            return torch.zeros(len(stats), num_sources, num_experts, device=self.device)
        source_T = mb["source_ids"].reshape(-1)[mb["attention_mask"].reshape(-1).bool()]  # the routed tokens
        return torch.stack([torch.bincount((source_T[:, None] * num_experts + st.expert_ids).reshape(-1),
                                           minlength=num_sources * num_experts).view(num_sources, num_experts)
                            for st in stats])

    def _totals(self, values: list[float]) -> dict:
        """The summed values by name; "tokens_per_expert" and "routed_per_expert": [layer][expert]
        kept assignments and assignments before capacity (ints)."""
        totals = dict(zip(SUMMED, values))
        self.stop_agreed = totals["stop"] > 0  # all-reduced: the same on every rank
        num_layers, num_experts = self.c.model.num_layers, self.c.model.num_experts
        load = values[len(SUMMED):]
        rows = [[int(v) for v in load[i:i + num_experts]] for i in range(0, len(load), num_experts)]
        totals["tokens_per_expert"], totals["routed_per_expert"] = rows[:num_layers], rows[num_layers:2 * num_layers]
        per_source = rows[2 * num_layers:]  # layer-major: [L][S] rows of E
        num_sources = len(self.source_labels)
        totals["routed_per_source"] = {name: [per_source[layer * num_sources + s] for layer in range(num_layers)]
                                       for s, name in enumerate(self.source_labels)}
        return totals

    def _step_metrics(self, totals: dict, elapsed: float) -> dict:
        """mfu, mem_peak_gb and expert load (see moe/run/metrics.py for what each measures)."""
        out = {"mem_peak_gb": mem_peak_gb(self.device), "expert_load_cv": load_cv(totals["tokens_per_expert"])}
        if self.peak_flops:
            tokens_per_s = totals["input_tokens"] / elapsed  # every rank's tokens
            out["mfu"] = self.flops_per_token * tokens_per_s / (self.peak_flops * self.world_size)
        router = self.router_watch.observe(self.step, totals["routed_per_expert"])  # guardrails (router_watch.py)
        out.update(router.summary)
        out["tokens_per_expert"] = totals["tokens_per_expert"]  # to expert_load.jsonl, not to metrics.jsonl
        out["expert_load_layers"] = {"routed_per_expert": totals["routed_per_expert"], **router.per_layer,
                                     "routed_per_source": totals["routed_per_source"]}  # likewise
        return out

    def _record(self, totals: dict, loss: float, num_loss_tokens: int, grad_norm: float, elapsed: float) -> dict:
        num_micro = self.engine.grad_accum * self.world_size
        return {
            "step": self.step,
            "epoch": self.loader.epoch,
            "loss": loss,
            "balance_loss": totals["balance"] / num_micro,
            "balance_uniform": float(self.c.model.num_layers),  # balance_loss under perfectly uniform routing
            "aux_loss": totals["aux"] / num_micro,
            "lr": self.engine.lr,
            "grad_norm": grad_norm,
            "tokens_per_s": totals["input_tokens"] / elapsed,
            "dropped_frac": totals["dropped"] / max(totals["assigned"], 1.0),
            "dropped_loss_frac": totals["dropped_loss"] / max(totals["loss_assigned"], 1.0),
            "loss_tokens": num_loss_tokens,
            "step_time_s": elapsed,
            **self._step_metrics(totals, elapsed),
        }

    def log(self, record: dict) -> None:
        if self.rank != 0:
            return
        load, per_layer = record.pop("tokens_per_expert", None), record.pop("expert_load_layers", None)
        every = self.c.expert_load_every
        if load is not None and ((every and record["step"] % every == 0) or record["step"] == self.total_steps):
            self.writer.write_expert_load(record["step"], load, per_layer)
        if record["step"] % self.c.log_every == 0 or record["step"] == self.total_steps or "eval_loss" in record:
            self.writer.write(record)
        self.screen.step(record)

    def console_extra(self, record: dict, evaluation: bool) -> str:
        """What an objective adds to a console line (train.objective=dpo: reward accuracy and margin)."""
        return ""

    def maybe_evaluate(self) -> dict:
        """eval_loss and eval_loss/<source> every train.eval_every steps and at the last step; {} otherwise."""
        every = self.c.train.eval_every
        if self.eval_dataset is None or not ((every and self.step % every == 0) or self.step == self.total_steps):
            return {}
        return self.evaluate()

    def evaluate(self) -> dict:
        """Held-out loss over the whole eval set: each rank its share of the rows, summed over ranks
        (same value as 1 process). Every rank runs the same number of micro-batches, so the expert
        all-to-all stays matched. Training state is untouched; the model is back in train mode."""
        t0 = time.perf_counter()
        ds = self.eval_dataset
        batches = eval_micro_batches(ds, self.c.train.micro_batch_size, dp_rank=self.rank, dp_size=self.world_size)
        sums = eval_loss_sums(self.engine.model, batches, len(ds.source_names), self.device)
        dist.all_reduce(sums)
        record = eval_loss_record(sums, ds.source_labels)
        record["eval_time_s"] = time.perf_counter() - t0
        return record

    def maybe_save(self) -> str | None:
        """Save at every train.save_every steps and at the last step; returns the path, or None."""
        save_every = self.c.train.save_every
        if self.consecutive_skips and self.step != self.total_steps:
            return None  # a skipped step changed nothing worth a checkpoint; `latest` stays the last applied step
        if (save_every and self.step % save_every == 0) or self.step == self.total_steps:
            return self.save()
        return None

    def save(self) -> str:
        """Write checkpoint self.step. A write that fails (disk full, read-only) leaves no partial
        .tmp-step_N behind and raises OSError naming the path; `latest` stays the last complete one."""
        # The config goes with the checkpoint: a resume compares it with its own (floe.run.context).
        client = {"step": self.step, "loader": self.loader.state_dict(), "config": self.resolved}
        if self.base is not None:
            client["base"] = self.base
        try:
            path = checkpoint.save(self.engine, self.ckpt_dir, self.step, client, keep_last=self.c.train.keep_last)
        except (OSError, SafetensorError) as e:
            tmp = os.path.join(self.ckpt_dir, f".tmp-step_{self.step:08d}")
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            found = re.search(r"os error (\d+)", str(e))  # safetensors' errors carry the OS's in their text
            errno_ = getattr(e, "errno", None) or (int(found.group(1)) if found else errno.EIO)
            raise OSError(errno_, f"{getattr(e, 'strerror', None) or e} (checkpoint step {self.step} not written, "
                                  f"its partial {tmp} removed; latest stays "
                                  f"{checkpoint.latest_checkpoint(self.ckpt_dir) or 'none'})",
                          getattr(e, "filename", None) or self.ckpt_dir) from e
        log.info("saved %s", path)
        return path


def write_data_stats(run_dir: str, dataset, eval_dataset) -> str:
    """run_dir/data_stats.json: the train (and eval) set's statistics, too long for the console
    (the data builder already logged a one-line summary of each); returns its path."""
    path = os.path.join(run_dir, "data_stats.json")
    stats = {"train": dataset.stats}
    if eval_dataset is not None:
        stats["eval"] = eval_dataset.stats
    with open(path, "w") as f:
        json.dump(stats, f, indent=1)
    return path


class MetricsWriter:
    """metrics.jsonl and expert_load.jsonl (rank 0), plus wandb and TensorBoard when enabled."""

    def __init__(self, c: Configs, resolved: dict, resume_step: int):
        self.path = os.path.join(c.run_dir, "metrics.jsonl")
        self.load_path = os.path.join(c.run_dir, "expert_load.jsonl")
        for path in (self.path, self.load_path):
            if os.path.exists(path):  # drop lines past the checkpoint we resume from, and a torn last one
                kept = run_dir.metrics_lines_upto(path, resume_step)
                with open(path, "w") as f:
                    f.writelines(kept)
        self.wandb = None
        if c.wandb != "disabled":
            import wandb

            # quiet: no end-of-run summary block (~30 lines of history and summary) on the console
            self.wandb = wandb.init(project=c.wandb_project, dir=c.run_dir, mode=c.wandb, config=resolved,
                                    name=os.path.basename(os.path.normpath(c.run_dir)), resume="allow",
                                    id=_wandb_id(c.run_dir), settings=wandb.Settings(quiet=True))
        self.tensorboard = None
        if c.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events past the checkpoint we resume from are dropped, as metrics.jsonl's lines are
            self.tensorboard = SummaryWriter(os.path.join(c.run_dir, "tensorboard"),
                                             purge_step=resume_step + 1 if resume_step else None)

    def write(self, record: dict) -> None:
        # A skipped step's non-finite loss or norm is written as null (strict JSON has no NaN/inf).
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def write_expert_load(self, step: int, tokens_per_expert: list[list[int]], per_layer: dict | None = None) -> None:
        """One compact line {"step", "tokens_per_expert": [[layer 0 counts], ...], then per_layer's lists
        (routed_per_expert, load_cv, max_over_mean, dead_experts: one entry per layer)}; to wandb as one
        histogram per layer whose bins are the experts (bin e holds expert e's tokens)."""
        line = {"step": step, "tokens_per_expert": tokens_per_expert, **(per_layer or {})}
        with open(self.load_path, "a") as f:
            f.write(json.dumps(line, separators=(",", ":")) + "\n")
        if self.wandb is not None:
            import wandb

            edges = list(range(len(tokens_per_expert[0]) + 1))
            self.wandb.log({f"expert_load/layer_{i}": wandb.Histogram(np_histogram=(counts, edges))
                            for i, counts in enumerate(tokens_per_expert)}, step=step)

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _wandb_id(run_dir: str) -> str:
    import hashlib

    return hashlib.sha1(os.path.abspath(run_dir).encode()).hexdigest()[:16]
