"""Preference optimisation: the loss as a small pure function of per-sequence log-probabilities.

    logps, tokens = sequence_logps(logits, labels, position_ids, local_ids, num_sequences)
    out = preference_loss(cfg, logps[0::2], logps[1::2], ref[0::2], ref[1::2], tokens[0::2], tokens[1::2])

dpo.loss=sigmoid (Rafailov et al. 2023, TRL's loss_type="sigmoid"), per pair:
    rewards  r_c = beta * (log pi(chosen) - log ref(chosen)),  r_r likewise
    loss     -log sigmoid(r_c - r_r)                             = ln 2 when the policy is the reference
dpo.loss=simpo (Meng et al. 2024, TRL's CPO loss_type="simpo"): reference-free, length-normalised,
    rewards  r_c = beta * log pi(chosen) / |chosen answer tokens|,  r_r likewise
    loss     -log sigmoid(r_c - r_r - gamma)                     gamma = dpo.simpo_gamma, the target margin
A sequence's log-probability sums over its answer tokens only (labels != -100).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from floe.model import IGNORE_INDEX, shift_targets

OBJECTIVES = ("sft", "dpo")
LOSSES = ("sigmoid", "simpo")


@dataclass
class DPOConfig:
    """The `dpo` config section (conf/config.yaml); used when train.objective=dpo."""
    beta: float = 0.1          # sigmoid: strength of the pull to the reference; SimPO's paper uses 2.0-2.5
    loss: str = "sigmoid"      # sigmoid (DPO) | simpo (reference-free)
    simpo_gamma: float = 0.5   # SimPO's target reward margin (TRL's simpo_gamma); only for dpo.loss=simpo

    def __post_init__(self):
        from floe.errors import field_type_errors

        errors = field_type_errors(self, "dpo")
        if not errors:
            if not self.beta > 0:
                errors.append(f"dpo.beta must be > 0, got {self.beta}")
            if self.loss not in LOSSES:
                errors.append(f"dpo.loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
            if not self.simpo_gamma >= 0:
                errors.append(f"dpo.simpo_gamma must be >= 0, got {self.simpo_gamma}")
        if errors:
            raise ValueError("invalid dpo config:\n  " + "\n  ".join(errors))

    @property
    def needs_reference(self) -> bool:
        return self.loss == "sigmoid"


def objective_errors(objective: str, data_name: str) -> list[str]:
    """The train.objective / data pairing, named for the user (train.objective is checked by TrainConfig)."""
    if objective == "dpo" and data_name != "preference":
        return [f"train.objective=dpo trains on preference pairs: set data=preference (got data={data_name})"]
    if objective == "sft" and data_name == "preference":
        return ["data=preference holds preference pairs: train them with train.objective=dpo"]
    return []


@dataclass
class PreferenceOut:
    losses: torch.Tensor            # [P] per-pair loss
    chosen_rewards: torch.Tensor    # [P] (no gradient)
    rejected_rewards: torch.Tensor  # [P] (no gradient)


def preference_loss(cfg: DPOConfig, chosen: torch.Tensor, rejected: torch.Tensor,
                    ref_chosen: torch.Tensor | None, ref_rejected: torch.Tensor | None,
                    chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor) -> PreferenceOut:
    """Per-pair loss and rewards from per-sequence log-probs (all [P]); see the module docstring."""
    if cfg.loss == "sigmoid":
        chosen_r = cfg.beta * (chosen - ref_chosen)
        rejected_r = cfg.beta * (rejected - ref_rejected)
        losses = -F.logsigmoid(chosen_r - rejected_r)
    else:  # simpo
        chosen_r = cfg.beta * chosen / chosen_tokens.clamp(min=1)
        rejected_r = cfg.beta * rejected / rejected_tokens.clamp(min=1)
        losses = -F.logsigmoid(chosen_r - rejected_r - cfg.simpo_gamma)
    return PreferenceOut(losses, chosen_r.detach(), rejected_r.detach())


def sequence_logps(logits_BSV: torch.Tensor, labels_BS: torch.Tensor, position_ids_BS: torch.Tensor,
                   local_ids_BS: torch.Tensor, num_sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed log-probabilities of the trained tokens, and their counts: ([N] fp32, [N] fp32).

    local_ids_BS: the sequence (0..N-1) each token belongs to, -1 on padding (local_sequences). The
    target at column t is token t + 1, which belongs to token t + 1's sequence."""
    targets_BT = shift_targets(labels_BS, position_ids_BS)  # (B, S-1)
    logits_NV = logits_BSV[:, :-1].reshape(-1, logits_BSV.shape[-1]).float()
    logp_N = -F.cross_entropy(logits_NV, targets_BT.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    keep_N = targets_BT.reshape(-1) != IGNORE_INDEX
    seq_N = local_ids_BS[:, 1:].reshape(-1)[keep_N]
    logps = torch.zeros(num_sequences, dtype=torch.float32, device=logits_BSV.device)
    tokens = torch.zeros(num_sequences, dtype=torch.float32, device=logits_BSV.device)
    logps = logps.index_add(0, seq_N, logp_N[keep_N])
    tokens = tokens.index_add(0, seq_N, torch.ones_like(logp_N[keep_N]))
    return logps, tokens


def local_sequences(example_ids_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """On the host: (local ids [B, S] in 0..N-1, -1 on padding; the examples [N] in local order).

    Examples 2p / 2p + 1 are pair p's chosen / rejected sequence and always share a micro-batch
    (moe/data/preference.py), so in sorted order local 2i is a chosen and 2i + 1 its rejected."""
    real = example_ids_BS >= 0
    examples = torch.unique(example_ids_BS[real])  # sorted
    assert len(examples) % 2 == 0 and bool((examples[0::2] % 2 == 0).all()) and bool(
        (examples[1::2] == examples[0::2] + 1).all()), "a preference pair was split across micro-batches"
    local = torch.searchsorted(examples, example_ids_BS.clamp(min=0))
    return torch.where(real, local, torch.full_like(local, -1)), examples
