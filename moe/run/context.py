"""The life of one run on one rank: run dir, resume, process group, signals.

    with RunContext(c, resolved, launch) as run:   # rank 0 locks run.dir; every torchrun worker watches
        ...                                        # its agent; resume decided ONCE (run.resume_from);
        ...                                        # SIGTERM / SIGUSR1 / SIGINT request a graceful stop
        with run.process_group(device):            # a 1-process launch gets RANK.. set here, and back
            Trainer(..., run=run).fit()            # the loop polls run.stop_requested every step

Resume, decided here and nowhere else, from files only (every rank decides the same before any
process group exists):
  - train.resume=never starts a new run: rank 0 moves what an earlier run left in run.dir
    (checkpoints/, metrics.jsonl, expert_load.jsonl, config.yaml, data.json) into
    run.dir/replaced-<UTC time>/ and says so, so that no later launch can resume another run's
    checkpoints;
  - train.resume=auto continues `checkpoints/latest` after checking its state (checkpoint.read_state)
    and comparing the config the checkpoint itself was written with (its client state) and
    run.dir/config.yaml with this launch's (run_dir.resume_problems): a changed model, data or schedule
    is refused, naming each key.

A graceful stop: the first signal sets a flag; the loop all-reduces it with the step's sums, so every
rank stops after the same step, writes a checkpoint and raises RunStopped (launch/train.py prints one
line and exits with 128 + the signal's number). The first signal also restores the default actions,
so a second one stops the process at once (the last complete checkpoint stays `latest`).
"""
from __future__ import annotations

import logging
import os
import signal
import time
from contextlib import contextmanager

from floe.errors import ConfigError
from floe.run import checkpoint, run_dir

log = logging.getLogger("floe")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# What an earlier run leaves in run.dir; train.resume=never moves it aside.
RUN_FILES = ("checkpoints", "metrics.jsonl", "expert_load.jsonl", run_dir.CONFIG_FILE, run_dir.DATA_FILE)


class CheckpointError(ConfigError):
    """A checkpoint the run would resume from is malformed (the message names the file and field)."""


class RunStopped(Exception):
    """The run stopped on a signal after writing a checkpoint (launch/train.py: one line, exit 128 + signal)."""

    def __init__(self, signum: int | None, step: int, path: str | None, run_dir: str):
        self.signum, self.step, self.path = signum, step, path
        name = signal.Signals(signum).name if signum else "a stop signal (on another rank)"
        super().__init__(f"stopped by {name} after step {step}; checkpoint {path or '(none)'}. Relaunch the same "
                         f"command (train.resume=auto) to continue from it in {run_dir}")


class RunContext:
    """One run on this rank (module docstring): enter before the data is built."""

    def __init__(self, c, resolved: dict, launch):
        self.c, self.resolved, self.rank = c, resolved, launch.rank
        self.ckpt_dir = os.path.join(c.run_dir, "checkpoints")
        self.resume_from: str | None = None
        self.signum: int | None = None
        self._old_handlers: dict[int, object] = {}
        self._claim = None

    def __enter__(self) -> RunContext:
        self._claim = run_dir.claim(self.c.run_dir, self.rank)
        self._claim.__enter__()
        try:
            self.resume_from = self._decide_resume()
            self._install_signals()
        except BaseException:
            self._claim.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._restore_signals()
        self._claim.__exit__(*exc)

    # ---- resume -----------------------------------------------------------------------------------
    def _decide_resume(self) -> str | None:
        c = self.c
        if c.train.resume == "never":
            if self.rank == 0:
                move_aside(c.run_dir)
            return None
        try:
            latest = checkpoint.latest_checkpoint(self.ckpt_dir)
            state = checkpoint.read_state(latest) if latest else None
        except ValueError as e:
            raise CheckpointError(f"cannot resume: {e}") from None
        if latest is None:
            return None
        run_dir.check_resumed_config(c.run_dir, self.resolved, c.train.allow_schedule_change)
        saved = state["client"].get("config")
        if isinstance(saved, dict):
            problems = run_dir.resume_problems(saved, self.resolved, c.train.allow_schedule_change)
            if problems:
                raise run_dir.ResumeMismatch(
                    f"cannot resume {latest}: this launch's config differs from the one the checkpoint was "
                    "written with (its state.json):\n  " + "\n  ".join(problems) +
                    "\nRelaunch with the checkpoint's values, or set another run.dir (or train.resume=never, "
                    "which moves this run aside) to start over")
        return latest

    def resumed_step(self) -> int:
        """The step of the checkpoint this run resumes from (0 for a fresh start)."""
        return int(os.path.basename(self.resume_from).rsplit("_", 1)[1]) if self.resume_from else 0

    # ---- signals ----------------------------------------------------------------------------------
    @property
    def stop_requested(self) -> bool:
        return self.signum is not None

    def _install_signals(self) -> None:
        for sig in STOP_SIGNALS:
            try:
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread (an embedding program): it keeps its own handling
                return

    def _on_signal(self, signum: int, frame) -> None:
        self.signum = signum
        for sig in STOP_SIGNALS:  # a second signal: the default action, at once
            signal.signal(sig, signal.SIG_DFL)
        run_dir.say(f"floe: got {signal.Signals(signum).name} (rank {self.rank}): finishing this step, then "
                    "writing a checkpoint; a second signal stops at once\n")

    def _restore_signals(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    # ---- the process group --------------------------------------------------------------------------
    @contextmanager
    def process_group(self, device):
        """Join torchrun's process group (or make a group of one: its environment is set here and
        restored afterwards) for the body; torn down afterwards if this call created it."""
        from floe.parallel import init_distributed, teardown
        from floe.parallel.lifecycle import patched_environ, single_process_env

        # plain `python launch/train.py`: a group of one; under torchrun its environment as it is
        with patched_environ(single_process_env() if "RANK" not in os.environ else {}):
            created = False
            try:
                created = init_distributed(device)
                yield
            finally:
                if created:
                    teardown()


def move_aside(path: str) -> str | None:
    """Move what an earlier run left in run dir `path` into path/replaced-<UTC time>/ (train.resume=never);
    returns that directory, or None when there was nothing to move."""
    present = [name for name in RUN_FILES if os.path.lexists(os.path.join(path, name))]
    if not present:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target, n = os.path.join(path, f"replaced-{stamp}"), 1
    while os.path.lexists(target):
        n += 1
        target = os.path.join(path, f"replaced-{stamp}-{n}")
    os.makedirs(target)
    for name in present:
        os.rename(os.path.join(path, name), os.path.join(target, name))
    log.warning("train.resume=never: moved the earlier run's %s into %s; this run starts from step 0 and "
                "can never resume them", ", ".join(present), target)
    return target
