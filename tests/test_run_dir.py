"""One run per run.dir (lock, workers that lose their torchrun agent stop) and resume checks."""
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from launch.train import train
from floe.run.run_dir import ResumeMismatch, RunDirBusy, metrics_lines_upto, resume_problems
from tests.test_train import make_cfg, read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ("train.global_batch_size=8", "train.micro_batch_size=4")


def _children(pid: int) -> list[int]:
    """Pids whose parent is `pid` (from /proc, independent of floe)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie no longer runs
    except OSError:
        return False


def _num_lines(path) -> int:
    return sum(1 for _ in open(path)) if os.path.exists(path) else 0


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.mark.slow  # spawns processes
def test_one_run_per_run_dir_and_workers_stop_without_their_agent(tmp_path):
    run_dir = tmp_path / "run"
    metrics = run_dir / "metrics.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "launch/train.py",
           f"run.dir={run_dir}", "run.name=test", "log.wandb=disabled", "train.max_steps=100000", *SMALL]
    agent = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    workers = []
    try:
        _wait(lambda: _num_lines(metrics) >= 1 or agent.poll() is not None, 240, "the first run's first step")
        assert agent.poll() is None, agent.stderr.read()[-3000:]
        workers = _children(agent.pid)
        assert len(workers) == 1, workers
        # A second launch into the same run.dir stops at once, naming the first run's worker (rank 0).
        config_before = (run_dir / "config.yaml").read_bytes()
        t0 = time.monotonic()
        with pytest.raises(RunDirBusy, match=rf"host={socket.gethostname()} pid={workers[0]}\b"):
            train(make_cfg(run_dir, "train.max_steps=2", *SMALL))
        assert time.monotonic() - t0 < 10
        assert (run_dir / "config.yaml").read_bytes() == config_before
        steps = [m["step"] for m in read_metrics(run_dir)[:-1]]  # the last line may be being written
        assert steps == list(range(1, len(steps) + 1))
        # Killing the agent (no chance to clean up) must not leave its worker training and writing.
        agent.kill()
        agent.wait()
        _wait(lambda: not _alive(workers[0]), 20, f"worker {workers[0]} to stop after its agent was killed")
        lines = _num_lines(metrics)
        time.sleep(2.0)
        assert _num_lines(metrics) == lines
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    # The lock died with its holder: the directory is usable again (a fresh start: no checkpoint).
    last = train(make_cfg(run_dir, "train.max_steps=2", *SMALL))
    assert last["step"] == 2 and [m["step"] for m in read_metrics(run_dir)] == [1, 2]


def _snapshot(run_dir) -> dict:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()
            and p.name != "floe.lock"}


def test_resume_refuses_model_data_and_schedule_changes_before_writing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    base = ("train.max_steps=2", *SMALL)
    train(make_cfg(run_dir, *base))
    before = _snapshot(run_dir)
    changed = ["model.hidden_size=96", "data.seq_len=128", "train.seed=1", "train.max_steps=4", "optim.lr=0.001",
               "train.global_batch_size=16"]
    with pytest.raises(ResumeMismatch) as err:
        train(make_cfg(run_dir, *base, *changed, "log.every=2", "train.save_every=1"))
    message = str(err.value)
    for line in ("model.hidden_size: 64 -> 96", "data.seq_len: 256 -> 128", "train.seed: 0 -> 1",
                 "train.max_steps: 2 -> 4", "optim.lr: 0.003 -> 0.001", "train.global_batch_size: 8 -> 16"):
        assert line in message, (line, message)
    assert "log.every" not in message and "train.save_every" not in message  # free to change
    assert _snapshot(run_dir) == before  # nothing rewritten: config.yaml, metrics, checkpoints

    # The schedule alone changes with the explicit flag; the model and the data never do.
    with pytest.raises(ResumeMismatch, match="model.hidden_size: 64 -> 96") as err:
        train(make_cfg(run_dir, *base, "model.hidden_size=96", "train.max_steps=4",
                       "train.allow_schedule_change=true"))
    assert "train.max_steps" not in str(err.value)
    assert _snapshot(run_dir) == before

    # A torn last metrics line (a kill while writing it) is dropped with a warning, not a JSON error.
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 2.')
    capsys.readouterr()
    last = train(make_cfg(run_dir, "train.max_steps=4", *SMALL, "train.allow_schedule_change=true",
                          "log.every=1", "train.save_every=1"))
    assert last["step"] == 4
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3, 4]
    assert "metrics.jsonl:3: dropped a torn last line" in capsys.readouterr().err  # floe logs to stderr
    assert "max_steps: 4" in (run_dir / "config.yaml").read_text()  # the accepted schedule is the new one


def test_resume_refuses_changed_data_content(tmp_path):
    data = tmp_path / "chats.jsonl"
    records = [{"prompt": f"What is {a} plus {a}?", "completion": f"{a} plus {a} is {2 * a}."} for a in range(200)]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    run_dir = tmp_path / "run"
    args = ("data=jsonl", f"data.paths=[{data}]", "data.seq_len=64", "data.eval_fraction=0",
            "data.cache_dir=" + str(tmp_path / "cache"), "train.max_steps=1", *SMALL)
    train(make_cfg(run_dir, *args))
    before = _snapshot(run_dir)
    # Same file name, same number of examples and rows, one answer edited: only the content differs.
    records[7]["completion"] = "7 plus 7 is 15."
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ResumeMismatch, match="training data changed"):
        train(make_cfg(run_dir, *args))
    assert _snapshot(run_dir) == before


def test_resume_problems_by_key():
    saved = {"model": {"num_layers": 2}, "data": {"seq_len": 256, "num_workers": 0, "weights": [1, 1]},
             "optim": {"lr": 3e-3}, "train": {"max_steps": 60, "epochs": 1, "seed": 0, "global_batch_size": 16,
                                             "micro_batch_size": 8, "save_every": 0, "kernels": "auto"},
             "parallel": {"ep_size": 1}, "log": {"every": 1}, "run": {"dir": "a"}}
    same = json.loads(json.dumps(saved))
    assert resume_problems(saved, same, False) == []
    free = json.loads(json.dumps(saved))
    free["data"]["num_workers"], free["train"]["micro_batch_size"], free["train"]["save_every"] = 4, 4, 10
    free["train"]["kernels"], free["parallel"]["ep_size"], free["log"]["every"], free["run"]["dir"] = \
        "reference", 2, 5, "b"
    assert resume_problems(saved, free, False) == []
    schedule = json.loads(json.dumps(saved))
    schedule["optim"]["lr"], schedule["train"]["max_steps"], schedule["train"]["epochs"] = 1e-3, 90, 2
    assert [p.split(":")[0] for p in resume_problems(saved, schedule, False)] == \
        ["optim.lr", "train.epochs", "train.max_steps"]
    assert resume_problems(saved, schedule, True) == []
    never = json.loads(json.dumps(saved))
    never["model"]["num_layers"], never["data"]["weights"], never["train"]["seed"] = 3, [2, 1], 1
    never["train"]["global_batch_size"] = 32
    assert resume_problems(saved, never, True) == [
        "data.weights: [1, 1] -> [2, 1]", "model.num_layers: 2 -> 3", "train.global_batch_size: 16 -> 32",
        "train.seed: 0 -> 1"]


def test_torn_metrics_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    assert metrics_lines_upto(str(path), 3) == ['{"step": 1}\n', '{"step": 2}\n', '{"step": 3}\n']
    path.write_text('{"step": 1}\n{"step": 2}')  # complete but for its newline: kept, and terminated
    assert metrics_lines_upto(str(path), 5) == ['{"step": 1}\n', '{"step": 2}\n']
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')  # not the last line: damage, not a kill
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a metrics record"):
        metrics_lines_upto(str(path), 5)


@pytest.mark.slow  # spawns processes
def test_refused_resume_fails_alike_on_every_rank_before_any_group(tmp_path):
    from floe.testing.distributed import run_distributed
    from tests.test_parallel_train import _bad_launch_worker, _train_worker

    run_dir = tmp_path / "run"
    run_distributed(_train_worker, 2, args=(str(run_dir), ["train.max_steps=1"]), timeout=180)
    before = _snapshot(run_dir)
    results = run_distributed(_bad_launch_worker, 2, args=(str(run_dir), ["train.max_steps=1", "model.num_layers=3"]),
                              timeout=120)
    for res in results:
        assert res["error"] is not None and "model.num_layers: 2 -> 3" in res["error"], res
        assert not res["group_created"]
    assert _snapshot(run_dir) == before


def _procs_naming(text: str) -> list[int]:
    """Live pids whose command line contains `text` (from /proc, independent of floe)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read().decode(errors="replace")
            except OSError:
                continue
            if text in cmdline and _alive(int(entry)):
                out.append(int(entry))
    return out


@pytest.mark.slow  # starts torchrun four times
def test_workers_never_outlive_their_agent_whatever_the_timing(tmp_path):
    """Killed within the first 1.5-3 s (workers still importing), the workers lived on with parent 1,
    holding the lock; now they die with the agent at any delay, and the run dir is free again."""
    run_dir = tmp_path / "run"
    for delay in (0.0, 0.7, 1.5, 3.0):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "launch/train.py",
               f"run.dir={run_dir}", "log.wandb=disabled", "train.max_steps=100000", *SMALL]
        agent = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        workers = _children(agent.pid)
        agent.kill()
        agent.wait()
        try:
            _wait(lambda: not _procs_naming(f"run.dir={run_dir}"), 15,
                  f"the workers to stop (agent killed at {delay} s)")
        finally:
            for pid in _procs_naming(f"run.dir={run_dir}") + workers:
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
    last = train(make_cfg(run_dir, "train.max_steps=1", *SMALL))
    assert last["step"] == 1


def test_a_lock_whose_holder_is_gone_is_taken_over_with_a_note(tmp_path, caplog):
    from floe.run.run_dir import LOCK_FILE, RunLock

    (tmp_path / LOCK_FILE).write_text("host=gone pid=123 since=2026-01-01T00:00:00\n")  # killed, never released
    with caplog.at_level(logging.WARNING, logger="floe"):
        lock = RunLock(str(tmp_path))
    assert "took over the lock of a run that is gone (host=gone pid=123" in caplog.text
    lock.release()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="floe"):
        RunLock(str(tmp_path)).release()  # released cleanly: nothing to say
    assert "took over" not in caplog.text
