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

import numpy as np
import torch

from moe.data.dataset import PackedDataset

log = logging.getLogger(__name__)


class StepLoader:
    """Deterministic, world-size-invariant step batches over a PackedDataset."""

    def __init__(self, dataset: PackedDataset, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0):
        problems = []
        if not isinstance(global_batch_size, int) or global_batch_size < 1:
            problems.append(f"train.global_batch_size must be a positive integer, got {global_batch_size!r}")
        if not isinstance(micro_batch_size, int) or micro_batch_size < 1:
            problems.append(f"train.micro_batch_size must be a positive integer, got {micro_batch_size!r}")
        if not problems and global_batch_size % (micro_batch_size * dp_size):
            problems.append(
                f"train.global_batch_size ({global_batch_size}) must be divisible by "
                f"train.micro_batch_size ({micro_batch_size}) x data-parallel size ({dp_size})")
        if not problems and dataset.num_rows < global_batch_size:
            problems.append(
                f"train.global_batch_size ({global_batch_size}) exceeds the {dataset.num_rows} packed rows "
                f"of the data: add data (data.num_examples), or lower data.seq_len or the batch size")
        if problems:
            raise ValueError("\n".join(problems))
        assert 0 <= dp_rank < dp_size, (dp_rank, dp_size)
        self.dataset, self.seed = dataset, int(seed)
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
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

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches for one optimizer step, then advance (rolling into the next epoch)."""
        rows = self.step_rows(self.epoch, self.step)
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        m = self.micro_batch_size
        return [self.dataset.batch(rows[i:i + m]) for i in range(0, len(rows), m)]

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
