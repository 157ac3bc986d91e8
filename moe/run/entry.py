"""A run from start to end: claim the run dir, build the data, check what needs it, pick the trainer for
the objective, and train inside the run's process group (launch/train.py calls `train` after checking
the whole config; tools/bench_* call it too). The objectives' trainers (floe.run.trainer: sft,
floe.run.dpo_trainer: dpo) know nothing of this."""
from __future__ import annotations

import json
import logging
import os

import torch

from floe.data import build_dataset, build_eval_dataset, check_enough_rows
from floe.errors import ConfigError
from floe.parallel import check_deepspeed_version
from floe.run import run_dir
from floe.run.config import Configs, pick_device
from floe.run.context import RunContext
from floe.run.dpo_trainer import DPOTrainer, check_resumed_reference
from floe.run.trainer import Trainer, check_resumed_base, total_steps

log = logging.getLogger("floe")


TRAINERS = {"sft": Trainer, "dpo": DPOTrainer}  # train.objective -> its trainer


def completed_run(c: Configs, dataset, run, rank: int) -> dict | None:
    """For a relaunch of a run whose checkpoint is its last step (train.resume=auto): say so and
    return its last metrics line (or {"step": N}); None when there is training left to do. A
    checkpoint past the schedule's end is refused. Reads only files (every rank decides alike)."""
    step = run.resumed_step()
    last = total_steps(c.train, dataset.num_rows // c.train.global_batch_size)
    if not run.resume_from or step < last:
        return None
    if step > last:
        raise ConfigError(f"cannot resume {run.resume_from}: its step {step} is past this run's last step {last} "
                          "(train.max_steps / train.epochs); set them back, or start over with train.resume=never")
    if rank == 0:
        log.info("%s is already complete (checkpoint at step %d of %d): nothing to train. Use another run.dir, "
                 "or train.resume=never to train it again from scratch", c.run_dir, step, last)
    record = {"step": step}
    path = os.path.join(c.run_dir, "metrics.jsonl")
    if os.path.isfile(path):
        with open(path) as f:
            lines = [ln for ln in f if ln.strip()]
        if lines:
            record = json.loads(lines[-1])
    return record


def train(c: Configs, resolved: dict, launch) -> dict:
    """Run training as configured (launch/train.py checked the whole config first: config_errors);
    returns the last step's metrics (on every rank). `resolved` is the whole config as plain data,
    written to run_dir/config.yaml and into every checkpoint."""
    logging.basicConfig(level=logging.INFO if launch.rank == 0 else logging.WARNING,
                        format="[%(asctime)s floe] %(message)s", datefmt="%H:%M:%S", force=True)
    quiet_repeated_reports(launch.rank)
    check_deepspeed_version()
    if launch.rank == 0 and c.train.keep_last == 0:
        log.info("train.keep_last=0: every checkpoint is kept")
    with RunContext(c, resolved, launch) as run:  # one run per run.dir; resume decided once
        return _train_claimed(c, resolved, launch, run)


def _train_claimed(c: Configs, resolved: dict, launch, run: RunContext) -> dict:
    if run.resume_from:  # files only, before the data is built
        check_resumed_base(c, run.resume_from)
    try:
        tokenizer, dataset = build_dataset(c.data, seed=c.train.seed)
        check_enough_rows(dataset, c.train.global_batch_size)  # before the model and any collective
        eval_dataset = build_eval_dataset(c.data, seed=c.train.seed)  # None without data.eval_*
    except (ValueError, FileNotFoundError) as e:  # a data file, line or key: bad input, not a crash
        raise ConfigError(str(e)) from e
    if run.resume_from:
        run_dir.check_resumed_data(c.run_dir, dataset.fingerprint)
    trainer_class = TRAINERS[c.train.objective]
    if c.train.objective == "dpo" and run.resume_from:
        check_resumed_reference(c, dataset, eval_dataset)
    done = completed_run(c, dataset, run, launch.rank)
    if done is not None:
        return done
    device_kind = pick_device(c.train.device)
    device = torch.device(device_kind, launch.local_rank if device_kind == "cuda" else None)
    with run.process_group(device):
        return trainer_class(c, resolved, dataset, device, eval_dataset, run=run).fit()


# Every rank reads the same files with the same config (run_dir checks the data fingerprint), so
# these loggers' warnings (skipped lines, spelled-out tokenizer pieces) are the same on every rank.
RANK_ZERO_REPORTS = ("floe.data.dataset", "floe.data.tokenizer")


def quiet_repeated_reports(rank: int) -> None:
    """The data report once per run, not once per rank: ranks other than 0 keep only its errors."""
    for name in RANK_ZERO_REPORTS:
        logging.getLogger(name).setLevel(logging.NOTSET if rank == 0 else logging.ERROR)
