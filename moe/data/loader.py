"""StepLoader: one optimizer step's micro-batches for one data-parallel rank, resumable.

Order: epoch e visits the rows in the permutation drawn from (seed, e). Global batch s of
the epoch is rows perm[s*G:(s+1)*G], whatever the data-parallel size; rank r takes its
contiguous share perm[s*G + r*G/n : s*G + (r+1)*G/n] and cuts it into micro-batches. So the
global batch, and with it the loss of a step, does not depend on the number of ranks, and
every row served in an epoch is served once, on one rank. The last R % G rows of each
epoch's permutation (an incomplete global batch) are not served that epoch; they are
logged at construction, and as the permutation changes every epoch, different rows sit
out each time.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import numpy as np
import torch

from floe.data.dataset import PackedDataset
from floe.errors import batch_errors

log = logging.getLogger(__name__)


def check_enough_rows(dataset: PackedDataset, global_batch_size: int) -> None:
    """Raise ValueError (with the numbers and the fix) when the data packs into fewer rows than one
    global batch, so no optimizer step could ever be served. Call it before building the model."""
    rows = dataset.num_rows
    if rows >= global_batch_size:
        return
    examples = int(dataset.stats.get("examples", 0))
    need = math.ceil(examples * global_batch_size / max(rows, 1))  # at this data's examples per row
    raise ValueError(
        f"the data packs into {rows} rows of data.seq_len={dataset.seq_len} tokens ({examples} examples), "
        f"fewer than one global batch (train.global_batch_size={global_batch_size}). Fix: lower "
        f"train.global_batch_size to at most {rows}, or give about {need} examples (more data, or "
        f"data.num_examples={need}, which repeats examples of small sources)")


def eval_micro_batches(dataset: PackedDataset, micro_batch_size: int, dp_rank: int = 0,
                       dp_size: int = 1, with_example_ids: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """All rows of an eval set, in row order, as this rank's micro-batches of `micro_batch_size` rows.

    Rank r takes rows r, r + dp_size, ...; every rank yields the SAME number of micro-batches
    (ceil(ceil(R / dp_size) / micro_batch_size)) so collectives inside the forward (expert
    all-to-all) stay matched; missing rows are filled with empty rows (labels -100, attention_mask
    False, source_ids -1) that add nothing to any loss sum. Each batch is PackedDataset.batch()'s
    dict plus "source_ids" [B, L] (long, index into dataset.source_names, -1 on padding), aligned
    with "labels": summing the token losses where labels != -100 per source id gives eval_loss/<source>.
    with_example_ids: also "example_ids" [B, L] (PackedDataset.example_ids; -1 on padding).
    """
    if not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise ValueError(f"eval micro-batch size must be a positive integer, got {micro_batch_size!r}")
    assert 0 <= dp_rank < dp_size, (dp_rank, dp_size)
    mine = np.arange(dp_rank, dataset.num_rows, dp_size)
    per_rank = math.ceil(dataset.num_rows / dp_size)
    L = dataset.seq_len
    for start in range(0, math.ceil(per_rank / micro_batch_size) * micro_batch_size, micro_batch_size):
        rows = mine[start:start + micro_batch_size]
        batch = dataset.batch(rows)
        batch["source_ids"] = dataset.source_ids(rows)
        if with_example_ids:
            batch["example_ids"] = dataset.example_ids(rows)
        missing = micro_batch_size - len(rows)
        if missing:
            empty = {"input_ids": torch.full((missing, L), dataset.pad_id, dtype=torch.long),
                     "labels": torch.full((missing, L), -100, dtype=torch.long),
                     "position_ids": torch.arange(L).repeat(missing, 1),
                     "attention_mask": torch.zeros((missing, L), dtype=torch.bool),
                     "source_ids": torch.full((missing, L), -1, dtype=torch.long),
                     "example_ids": torch.full((missing, L), -1, dtype=torch.long)}
            batch = {k: torch.cat([batch[k], empty[k]]) for k in batch}
        yield batch


class StepLoader:
    """Deterministic, world-size-invariant step batches over a PackedDataset."""

    def __init__(self, dataset: PackedDataset, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0, with_example_ids: bool = False,
                 with_source_ids: bool = False):
        """with_example_ids: each micro-batch also holds "example_ids" (PackedDataset.example_ids);
        with_source_ids: and "source_ids" [B, L] (PackedDataset.source_ids; -1 on padding)."""
        problems = batch_errors(global_batch_size, micro_batch_size, dp_size)
        if problems:
            raise ValueError("\n".join(problems))
        check_enough_rows(dataset, global_batch_size)
        assert 0 <= dp_rank < dp_size, (dp_rank, dp_size)
        self.dataset, self.seed = dataset, int(seed)
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.with_example_ids, self.with_source_ids = with_example_ids, with_source_ids
        self.steps_per_epoch = dataset.num_rows // global_batch_size
        self.rows_left_out_per_epoch = dataset.num_rows % global_batch_size
        self.epoch, self.step = 0, 0  # position of the NEXT step to serve
        self._perm_epoch, self._perm = -1, None
        if dp_rank == 0:
            log.info("data: %d rows, %d steps per epoch of %d rows; %d rows per epoch left out "
                     "(incomplete last global batch)", dataset.num_rows, self.steps_per_epoch,
                     global_batch_size, self.rows_left_out_per_epoch)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of all rows that epoch `epoch` follows."""
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.dataset.num_rows)
            self._perm_epoch = epoch
        return self._perm

    def step_rows(self, epoch: int, step: int) -> np.ndarray:
        """Row indices of this rank for step `step` of epoch `epoch`."""
        G, share = self.global_batch_size, self.global_batch_size // self.dp_size
        start = step * G + self.dp_rank * share
        return self.epoch_order(epoch)[start:start + share]

    def global_loss_tokens(self) -> int:
        """Loss targets in the NEXT step's whole global batch (every rank's rows), after the
        shift of floe.model.shift_targets: the target at column j-1 is token j, counted iff it
        is trained and does not start an example (position != 0). Known on every rank from
        the host-side arrays: no device work, no collective."""
        G = self.global_batch_size
        rows = np.sort(self.epoch_order(self.epoch)[self.step * G:(self.step + 1) * G])
        trained = self.dataset.trained[rows, 1:].astype(bool)
        return int(np.count_nonzero(trained & (self.dataset.position[rows, 1:] != 0)))

    def global_examples(self) -> int:
        """Examples (packed segments; for preference data, sequences) in the NEXT step's whole global
        batch, every rank's rows: known on the host, no collective."""
        G, ds = self.global_batch_size, self.dataset
        rows = self.epoch_order(self.epoch)[self.step * G:(self.step + 1) * G]
        return int((ds.seg_offsets[rows + 1] - ds.seg_offsets[rows]).sum())

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches for one optimizer step, then advance (rolling into the next epoch)."""
        rows = self.step_rows(self.epoch, self.step)
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        m = self.micro_batch_size
        batches = [self.dataset.batch(rows[i:i + m]) for i in range(0, len(rows), m)]
        for i, b in enumerate(batches):
            if self.with_example_ids:
                b["example_ids"] = self.dataset.example_ids(rows[i * m:(i + 1) * m])
            if self.with_source_ids:
                b["source_ids"] = self.dataset.source_ids(rows[i * m:(i + 1) * m])
        return batches

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed,
                "num_rows": self.dataset.num_rows, "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at the saved position; the data, seed and global batch size must be the same."""
        problems = []
        if int(state["num_rows"]) != self.dataset.num_rows:
            problems.append(f"the data has {self.dataset.num_rows} rows but the checkpoint was written with "
                            f"{state['num_rows']}: data.* changed since the checkpoint")
        if int(state["seed"]) != self.seed:
            problems.append(f"train.seed is {self.seed} but the checkpoint was written with {state['seed']}")
        if int(state["global_batch_size"]) != self.global_batch_size:
            problems.append(f"train.global_batch_size is {self.global_batch_size} but the checkpoint was "
                            f"written with {state['global_batch_size']}")
        if problems:
            raise ValueError("cannot resume the data loader: " + "; ".join(problems))
        if not 0 <= int(state["step"]) < self.steps_per_epoch:
            raise ValueError(f"loader state step={state['step']} outside [0, {self.steps_per_epoch})")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
