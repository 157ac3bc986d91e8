"""One run per run.dir, and resume checks before anything in it is rewritten.

    with claim(run_dir, rank):           # rank 0: exclusive lock file; every torchrun worker: agent watch
        check_resumed_config(run_dir, resolved, allow_schedule_change)  # every rank, before building anything
        check_resumed_data(run_dir, dataset.fingerprint)                 # every rank, after the data is built
        write_run_dir(run_dir, resolved, dataset.fingerprint)            # rank 0: config.yaml, data.json

The lock is an fcntl.flock on run_dir/floe.lock, which holds the holder's host and pid. The OS
drops it when the holder exits or is killed, so a crashed run never leaves a stale lock behind.

A resume is a launch with train.resume=auto into a run.dir that has a checkpoint. It refuses any
change of the model (model.*), the data (data.* but the tokenizer threads, the cache location and
the eval files; train.seed, which orders it; the fingerprint of the packed rows) or the schedule
(train.max_steps, train.epochs, train.global_batch_size, optim.*), naming each key with its old and
new value. train.allow_schedule_change=true accepts a changed max_steps, epochs or optim.*; the
global batch size never changes mid-run (the data loader's position would not mean the same rows).
Every other key may change freely (log.*, run.*, parallel.*, train.save_every, keep_last, resume,
device, kernels, micro_batch_size, ...).
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager

from floe.errors import ConfigError

log = logging.getLogger("floe")

LOCK_FILE = "floe.lock"
CONFIG_FILE = "config.yaml"
DATA_FILE = "data.json"   # the fingerprint of the packed training rows (floe.data.cache.fingerprint)

# Keys whose change alters what a resumed run computes. A key is matched exactly or by section
# prefix ("model." covers every model.* key); FREE_DATA_KEYS are carved out of data.*.
NEVER_CHANGE = ("model.", "data.", "lora.", "train.seed", "train.global_batch_size")
# data.tokenizer is a path: the same tokenizer may live elsewhere (train.init_from=<another copy of the
# export>); another tokenizer changes the packed rows, which the data fingerprint check refuses.
FREE_DATA_KEYS = ("data.num_workers", "data.cache_dir", "data.eval_paths", "data.tokenizer")
SCHEDULE = ("train.max_steps", "train.epochs", "optim.")


class RunDirBusy(ConfigError):
    """Another live process holds run.dir's lock (launch/train.py: one message, exit code 2)."""


class ResumeMismatch(ConfigError):
    """A relaunch into a run.dir with a checkpoint changes the model, the data or the schedule."""


# ----------------------------------------------------------------------------- the lock
class RunLock:
    """Exclusive lock on run_dir (rank 0), taken before anything in run_dir is written."""

    def __init__(self, run_dir: str):
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, LOCK_FILE)
        # O_RDWR without O_TRUNC: a refused launch must not wipe the holder's name.
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(self.fd)
            os.close(self.fd)
            self.fd = None
            raise RunDirBusy(f"run.dir {run_dir} is in use by another run ({holder}; lock file {self.path}). "
                             "Two runs in one run.dir would interleave metrics.jsonl and overwrite each "
                             "other's checkpoints: wait for it to finish or stop it, or set another "
                             "run.dir") from None
        previous = os.pread(self.fd, 4096, 0).decode(errors="replace").strip()
        if previous:  # release() empties the file: its holder ended without releasing it (killed)
            log.warning("run.dir %s: took over the lock of a run that is gone (%s)", run_dir, previous)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"host={socket.gethostname()} pid={os.getpid()} since="
                           f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode(), 0)
        os.fsync(self.fd)

    def release(self) -> None:
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)  # still locked: nobody reads a stale holder in between
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def _read_holder(fd: int) -> str:
    # The holder writes its name right after locking: give it a moment if we caught it in between.
    for _ in range(20):
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if text:
            return f"held by {text}"
        time.sleep(0.05)
    return "held by a process that has not written its name yet"


# ----------------------------------------------------------------------------- the agent watch
class AgentWatch:
    """Under torchrun, stop this worker when its agent (the parent process) is gone.

    torchrun starts workers in their own session, so killing the agent (SIGKILL, a lost node
    allocation) leaves them running, training and writing into run.dir with nobody to stop them;
    the next launch would then share the directory with them. The worker is re-parented when the
    agent dies, which this thread notices within `interval` seconds. It exits the process at once
    (os._exit): the main thread may be blocked in a collective with ranks that are already gone,
    and every file floe writes survives a kill (checkpoints are renamed into place; a torn
    metrics line is dropped on resume)."""

    def __init__(self, interval: float = 1.0):
        self.parent = os.getppid()
        self.interval = interval
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="floe-agent-watch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(self.interval):
            if os.getppid() != self.parent:
                say(f"floe: the torchrun agent (pid {self.parent}) is gone; stopping this worker "
                     f"(pid {os.getpid()}) so that it does not keep writing to run.dir\n")
                os._exit(1)

    def stop(self) -> None:
        self.stopped.set()


def say(message: str) -> None:
    try:  # stderr may be a pipe the dead agent no longer reads
        os.write(sys.stderr.fileno(), message.encode())
    except (OSError, ValueError):
        pass


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


@contextmanager
def claim(run_dir: str, rank: int):
    """Hold run_dir for this run: rank 0 takes the lock; every torchrun worker watches its agent."""
    watch = AgentWatch() if under_torchrun() else None
    lock = None
    try:
        lock = RunLock(run_dir) if rank == 0 else None
        yield
    finally:
        if lock is not None:
            lock.release()
        if watch is not None:
            watch.stop()


# ----------------------------------------------------------------------------- resume checks
def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists are values."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def resume_problems(saved: dict, new: dict, allow_schedule_change: bool) -> list[str]:
    """Each refused change between the saved and the new resolved config, as 'key: old -> new'."""
    old_flat, new_flat = flatten(saved), flatten(new)
    problems = []
    for key in sorted(set(old_flat) & set(new_flat)):
        old, value = old_flat[key], new_flat[key]
        if old == value:
            continue
        change = f"{key}: {old!r} -> {value!r}"
        if _matches(key, NEVER_CHANGE) and key not in FREE_DATA_KEYS:
            problems.append(change)
        elif _matches(key, SCHEDULE) and not allow_schedule_change:
            problems.append(change + " (schedule: train.allow_schedule_change=true accepts it)")
    return problems


def read_saved_config(run_dir: str) -> dict | None:
    import yaml

    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            saved = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ResumeMismatch(f"cannot resume: {path} is not valid YAML ({e}); restore it or set "
                             "train.resume=never") from None
    return saved if isinstance(saved, dict) else None


def check_resumed_config(run_dir: str, resolved: dict, allow_schedule_change: bool) -> None:
    """Refuse (ResumeMismatch, every key named) a resume that changes the model, data or schedule."""
    saved = read_saved_config(run_dir)
    if saved is None:
        log.warning("resuming in %s without its %s: the config cannot be compared", run_dir, CONFIG_FILE)
        return
    only = sorted(set(flatten(saved)) ^ set(flatten(resolved)))
    if only:
        log.warning("config keys present in only one of the saved and the new config (not compared): %s",
                    ", ".join(only))
    problems = resume_problems(saved, resolved, allow_schedule_change)
    if problems:
        raise ResumeMismatch(
            f"cannot resume {run_dir}: the config differs from the one its checkpoints were trained with "
            f"({os.path.join(run_dir, CONFIG_FILE)}):\n  " + "\n  ".join(problems) +
            "\nRelaunch with the saved values, or set another run.dir (or train.resume=never) to start over")


def check_resumed_data(run_dir: str, fingerprint: str) -> None:
    """Refuse a resume whose packed training rows differ from the ones the run was trained on."""
    path = os.path.join(run_dir, DATA_FILE)
    if not os.path.isfile(path):
        log.warning("resuming in %s without its %s: the data cannot be compared", run_dir, DATA_FILE)
        return
    try:
        with open(path) as f:
            saved = json.load(f)["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ResumeMismatch(f"cannot resume: {path} is unreadable ({e!r}); restore it or set "
                             "train.resume=never") from None
    if saved != fingerprint:
        raise ResumeMismatch(
            f"cannot resume {run_dir}: the training data changed since the run started (fingerprint of the "
            f"packed rows {saved[:16]}... in {path}, now {fingerprint[:16]}...): the same data.* settings "
            "now read other content (edited files, another tokenizer or cache). Restore the data, or set "
            "another run.dir to start over")


def write_run_dir(run_dir: str, resolved: dict, fingerprint: str | None = None) -> None:
    """Write the resolved config and the data fingerprint into run_dir (rank 0), each atomically."""
    import yaml

    os.makedirs(run_dir, exist_ok=True)
    _write_atomic(os.path.join(run_dir, CONFIG_FILE), yaml.safe_dump(resolved, sort_keys=False))
    if fingerprint is not None:
        _write_atomic(os.path.join(run_dir, DATA_FILE), json.dumps({"fingerprint": fingerprint}) + "\n")


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- metrics.jsonl
def metrics_lines_upto(path: str, step: int) -> list[str]:
    """The lines of metrics.jsonl with "step" <= step, each ending in a newline. A torn last line
    (the run was killed while writing it) is dropped with a warning; a bad line elsewhere is an
    error naming path:line."""
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError) as e:
            if number == len(lines):
                log.warning("%s:%d: dropped a torn last line (the run was stopped while writing it): %r",
                            path, number, line[:80])
                continue
            raise ValueError(f"{path}:{number}: not a metrics record ({e}); fix or remove that line") from None
        if record_step <= step:
            kept.append(line.rstrip("\n") + "\n")
    return kept
