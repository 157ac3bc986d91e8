"""Held-out loss per source: the trainer's evaluation, without torch.distributed.

    sums = eval_loss_sums(model, eval_micro_batches(eval_ds, m, rank, world), len(eval_ds.source_names), device)
    # sum `sums` over ranks, then eval_loss_record(sums, eval_ds.source_labels)

Every rank sums its own rows; the sums add up over ranks to the 1-process value, so the
trainer needs one all-reduce. The MoE runs dropless (as in inference): a token's loss then does
not depend on which other tokens share its micro-batch, so the value is the same at any world
size, micro-batch size and expert-parallel size.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from floe.model import IGNORE_INDEX, shift_targets


def eval_loss_sums(model: torch.nn.Module, micro_batches: Iterable[dict[str, torch.Tensor]], num_sources: int,
                   device: torch.device) -> torch.Tensor:
    """[num_sources, 2] float64 on `device`: (summed cross-entropy, loss tokens) per source.

    micro_batches: floe.data.eval_micro_batches' dicts (input_ids, labels, position_ids,
    attention_mask, source_ids, each [B, S]). The model is put in eval mode under no_grad and
    given back in the mode it was in; no parameter, gradient, optimizer or RNG state is touched.
    """
    sums_N2 = torch.zeros(num_sources, 2, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for mb in micro_batches:
                mb = {k: v.to(device) for k, v in mb.items()}
                out = model(input_ids=mb["input_ids"], position_ids=mb["position_ids"],
                            attention_mask=mb["attention_mask"], dropless=True)
                targets_BT = shift_targets(mb["labels"], mb["position_ids"])  # (B, S-1) for logits[:, :-1]
                logits_BTV = out.logits[:, :-1]
                loss_N = F.cross_entropy(logits_BTV.reshape(-1, logits_BTV.shape[-1]).float(),
                                         targets_BT.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
                keep_N = targets_BT.reshape(-1) != IGNORE_INDEX
                source_N = mb["source_ids"][:, 1:].reshape(-1)[keep_N]  # the source of each target token
                sums_N2[:, 0].index_add_(0, source_N, loss_N[keep_N].double())
                sums_N2[:, 1].index_add_(0, source_N, torch.ones_like(source_N, dtype=torch.float64))
    finally:
        model.train(was_training)
    return sums_N2


def eval_loss_record(sums_N2: torch.Tensor, labels: list[str]) -> dict[str, float]:
    """{'eval_loss': over all loss tokens, 'eval_loss/<label>': per source} from the summed
    (loss, tokens) pairs; a source without loss tokens gets no key."""
    # NOTE: host sync (once per evaluation).
    pairs = sums_N2.tolist()
    loss, tokens = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
    out = {"eval_loss": loss / tokens if tokens else float("nan"), "eval_tokens": int(tokens)}
    out.update({f"eval_loss/{label}": p[0] / p[1] for label, p in zip(labels, pairs, strict=True) if p[1]})
    return out
