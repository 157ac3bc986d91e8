"""train.objective=dpo: the Trainer with a preference train_step, the reference pass and held-out accuracy.

Before the first step, one pass of the run's own model (the starting weights; a run never holds a
second copy) computes every sequence's reference log-probability, train and eval sets, each rank its
share of the rows, summed over ranks; rank 0 caches them in run_dir/reference_logps.npz, keyed by
the data fingerprints and the starting point. A relaunch reuses the cache; a resume requires it
(the starting weights are gone), checked before any process group exists. With LoRA (lora.rank > 0,
nothing but the adapters training: not lora.train_router or lora.train_embeddings)
the frozen base IS the starting point: each micro-batch's reference is the same model with its
adapters disabled (floe.lora.disable_adapters), one extra forward without gradients, nothing cached.

Per-sequence log-probabilities are taken with the MoE dropless, in the reference pass and in training:
with capacity dropping a sequence's value would depend on which rows share its micro-batch, and the
policy would differ from the reference at step 1 by drop noise alone. The MoE balance (and z) loss
stays in the objective with model.balance_coef and is logged every step, as in SFT.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist

from floe.data import eval_micro_batches
from floe.errors import ConfigError
from floe.lora import disable_adapters
from floe.run.dpo import local_sequences, preference_loss, sequence_logps
from floe.run.trainer import Trainer

log = logging.getLogger("floe")
REFERENCE_FILE = "reference_logps.npz"
# Summed over micro-batches and ranks beside the trainer's SUMMED (one all-reduce).
DPO_SUMMED = ("chosen_rewards", "rejected_rewards", "correct", "chosen_logps", "rejected_logps")


def reference_key(c, dataset, eval_dataset) -> dict:
    """What the cached reference log-probs were computed from: the data and the starting weights."""
    return {"train": dataset.fingerprint, "eval": eval_dataset.fingerprint if eval_dataset is not None else None,
            "init_from": c.train.init_from, "seed": c.train.seed, "model": dataclasses.asdict(c.model)}


def load_reference(run_dir: str) -> tuple[dict, dict[str, np.ndarray]] | None:
    """(key, {"train": [N], "eval": [M]} float32) from run_dir's cache, or None when there is none."""
    path = os.path.join(run_dir, REFERENCE_FILE)
    if not os.path.isfile(path):
        return None
    with np.load(path, allow_pickle=False) as f:
        return json.loads(str(f["key"])), {k: f[k] for k in f.files if k != "key"}


def save_reference(run_dir: str, key: dict, arrays: dict[str, np.ndarray]) -> None:
    """Write the cache atomically (a crash never leaves half a file that a relaunch would trust)."""
    path = os.path.join(run_dir, REFERENCE_FILE)
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    np.savez(tmp, key=np.array(json.dumps(key, sort_keys=True)), **arrays)
    os.replace(tmp, path)


def check_resumed_reference(c, dataset, eval_dataset) -> None:
    """A resumed DPO run needs its cached reference (files only: before any process group)."""
    if not c.dpo.needs_reference or c.lora.base_is_adapters_off:
        return
    found = load_reference(c.run_dir)
    want = json.loads(json.dumps(reference_key(c, dataset, eval_dataset), sort_keys=True))
    if found is None or found[0] != want:
        what = "is missing" if found is None else "was computed from other data or starting weights"
        raise ConfigError(f"{os.path.join(c.run_dir, REFERENCE_FILE)} {what}: a resumed DPO run reuses the "
                          "reference log-probs of its starting weights, which its checkpoints no longer hold. "
                          "Start a new run.dir (or train.resume=never)")


class DPOTrainer(Trainer):
    """Trainer whose step optimises a preference loss (floe.run.dpo) instead of the LM loss."""

    def __init__(self, c, resolved: dict, dataset, device: torch.device, eval_dataset=None, run=None):
        super().__init__(c, resolved, dataset, device, eval_dataset, run=run)
        # With LoRA the reference is the frozen base itself (adapters disabled), computed on the fly,
        # unless something beside the adapters trains (lora.train_router, train_embeddings): then the cache.
        cached = c.dpo.needs_reference and not c.lora.base_is_adapters_off
        self.reference = self._reference(dataset, eval_dataset) if cached else None

    def _reference(self, dataset, eval_dataset) -> dict[str, torch.Tensor]:
        want = json.loads(json.dumps(reference_key(self.c, dataset, eval_dataset), sort_keys=True))
        found = load_reference(self.c.run_dir)
        if found is not None and found[0] == want:
            log.info("reference log-probs: reused %s", os.path.join(self.c.run_dir, REFERENCE_FILE))
            return {k: torch.from_numpy(v) for k, v in found[1].items()}
        assert self.step == 0, "check_resumed_reference let a resume through without its cache"
        t0 = time.perf_counter()
        out = {"train": self.reference_logps(dataset)}
        if eval_dataset is not None:
            out["eval"] = self.reference_logps(eval_dataset)
        if self.rank == 0:
            save_reference(self.c.run_dir, want, {k: v.numpy() for k, v in out.items()})
        dist.barrier()
        log.info("reference log-probs of %d sequences computed in %.1f s (cached in %s)",
                 sum(len(v) for v in out.values()), time.perf_counter() - t0, REFERENCE_FILE)
        return out

    @torch.no_grad()
    def reference_logps(self, dataset) -> torch.Tensor:
        """[num_examples] float32 on the host: each sequence's log-prob under the current weights.
        Every rank runs the same number of micro-batches (the expert all-to-all stays matched)."""
        model = self.engine.model
        was_training = model.training
        model.eval()
        out = torch.zeros(len(dataset.seg_example), dtype=torch.float32, device=self.device)
        try:
            for mb in eval_micro_batches(dataset, self.c.train.micro_batch_size, self.rank, self.world_size,
                                         with_example_ids=True):
                mb, local, examples = self._micro_batch(mb)
                _, logps, _ = self._logps(model, mb, local, len(examples))
                out[examples.to(self.device)] = logps
        finally:
            model.train(was_training)
        dist.all_reduce(out)  # each sequence is computed on exactly one rank
        return out.cpu()

    def _logps(self, forward, mb: dict, local: torch.Tensor, n: int):
        """(model output, log-probs [n], answer tokens [n]) of one micro-batch's sequences (on the device)."""
        out = forward(input_ids=mb["input_ids"], position_ids=mb["position_ids"],
                      attention_mask=mb["attention_mask"], dropless=True)
        logps, tokens = sequence_logps(out.logits, mb["labels"], mb["position_ids"], local, n)
        return out, logps, tokens

    def _micro_batch(self, mb: dict) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """(the batch on the device, local sequence ids [B, S] on the device, example ids [N] on the host);
        local order: 2i a chosen sequence, 2i + 1 its rejected one."""
        local, examples = local_sequences(mb["example_ids"])
        return {k: v.to(self.device) for k, v in mb.items()}, local.to(self.device), examples

    def _pairs(self, mb, local, examples, logps, tokens, split: str):
        """The preference loss and rewards of one micro-batch's pairs, against its reference log-probs:
        the cache (from the starting weights), or with LoRA the base with adapters disabled, now."""
        ref = None
        if self.c.lora.base_is_adapters_off and self.c.dpo.needs_reference:
            with torch.no_grad(), disable_adapters(self.engine.model):
                _, ref, _ = self._logps(self.engine.model, mb, local, len(examples))
        elif self.reference is not None:
            ref = self.reference[split][examples].to(self.device)
        return preference_loss(self.c.dpo, logps[0::2], logps[1::2], None if ref is None else ref[0::2],
                               None if ref is None else ref[1::2], tokens[0::2], tokens[1::2])

    def train_step(self) -> dict:
        """One optimizer step of the preference loss (mean over the global batch's pairs) + aux loss."""
        t0 = time.perf_counter()
        engine = self.engine
        num_pairs = self.loader.global_examples() // 2  # every rank's rows, counted on the host
        micro_batches = self.loader.next_step()
        assert len(micro_batches) == engine.grad_accum, (len(micro_batches), engine.grad_accum)
        # As the trainer's lm_scale: undo DeepSpeed's 1/grad_accum and rank average for the pair mean.
        scale = engine.grad_accum * self.world_size / max(num_pairs, 1)
        num_base = self.num_summed()
        sums = torch.zeros(num_base + len(DPO_SUMMED), dtype=torch.float64, device=self.device)
        for i, mb in enumerate(micro_batches):
            mb, local, examples = self._micro_batch(mb)
            out, logps, tokens = self._logps(engine, mb, local, len(examples))
            pairs = self._pairs(mb, local, examples, logps, tokens, "train")
            engine.backward(pairs.losses.sum() * scale + out.aux_loss)
            sums[:num_base] += self._sums(out, mb, lm_sum=pairs.losses.sum())
            sums[num_base:] += torch.stack([
                pairs.chosen_rewards.sum(), pairs.rejected_rewards.sum(),
                (pairs.chosen_rewards > pairs.rejected_rewards).sum(),
                logps[0::2].detach().sum(), logps[1::2].detach().sum()]).double()
            if i < len(micro_batches) - 1:
                engine.micro_step()
        dist.all_reduce(sums)
        # NOTE: host sync once per step for logging and the non-finite check.
        values = sums.tolist()
        totals = self._totals(values[:num_base])
        extra = dict(zip(DPO_SUMMED, values[num_base:]))
        loss = totals["lm_sum"] / max(num_pairs, 1)
        finite_loss = math.isfinite(loss) and math.isfinite(totals["aux"])
        grad_norm, applied = engine.step(skip=not finite_loss)
        if applied:
            self._update_expert_bias(totals["routed_per_expert"])
        self.step += 1
        self._count_skip(applied, loss, grad_norm)
        record = self._record(totals, loss, num_pairs, grad_norm, time.perf_counter() - t0)
        record.pop("loss_tokens")
        record.update(pairs=num_pairs, skipped=not applied, skipped_steps=self.skipped_steps,
                      **preference_metrics(extra, num_pairs))
        return record

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out preference loss, reward accuracy and margin over the whole eval set (dropless)."""
        t0 = time.perf_counter()
        model = self.engine.model
        was_training = model.training
        model.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss, correct, margin, pairs
        try:
            for mb in eval_micro_batches(self.eval_dataset, self.c.train.micro_batch_size, self.rank,
                                         self.world_size, with_example_ids=True):
                mb, local, examples = self._micro_batch(mb)
                _, logps, tokens = self._logps(model, mb, local, len(examples))
                p = self._pairs(mb, local, examples, logps, tokens, "eval")
                margin = p.chosen_rewards - p.rejected_rewards
                sums += torch.stack([p.losses.sum(), (margin > 0).sum(), margin.sum(),
                                     torch.tensor(float(len(margin)), device=self.device)]).double()
        finally:
            model.train(was_training)
        dist.all_reduce(sums)
        loss, correct, margin, pairs = sums.tolist()  # NOTE: host sync (once per evaluation)
        n = max(pairs, 1.0)
        return {"eval_loss": loss / n, "eval_rewards/accuracies": correct / n, "eval_rewards/margins": margin / n,
                "eval_pairs": int(pairs), "eval_time_s": time.perf_counter() - t0}

    def console_extra(self, record: dict, evaluation: bool) -> str:
        if evaluation:
            return f" accuracy {record['eval_rewards/accuracies']:.3f} margin {record['eval_rewards/margins']:.3f}"
        return f" accuracy {record['rewards/accuracies']:.3f} margin {record['rewards/margins']:.3f}"


def preference_metrics(sums: dict, num_pairs: int) -> dict:
    """TRL's metric names, means over the global batch's pairs."""
    n = max(num_pairs, 1)
    return {"rewards/chosen": sums["chosen_rewards"] / n, "rewards/rejected": sums["rejected_rewards"] / n,
            "rewards/accuracies": sums["correct"] / n,
            "rewards/margins": (sums["chosen_rewards"] - sums["rejected_rewards"]) / n,
            "logps/chosen": sums["chosen_logps"] / n, "logps/rejected": sums["rejected_logps"] / n}
