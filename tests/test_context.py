"""floe.run.context: one run per run dir (resume decided once, against the checkpoint's own config),
the 1-process rendezvous environment set and restored, and the graceful stop on a signal."""
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

import floe.run.entry
from floe.run.context import move_aside
from floe.run.run_dir import ResumeMismatch
from launch.train import train
from tests.test_train import make_cfg, read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ("data.num_examples=200", "data.seq_len=64", "train.global_batch_size=4", "train.micro_batch_size=2")


class Killed(Exception):
    pass


def test_resume_never_starts_a_run_that_can_never_resume_another_runs_checkpoints(tmp_path, monkeypatch, capfd):
    """The probe: run A saves step 2; run B starts in the same dir with train.resume=never and another
    model.capacity_factor and is killed before its first save; relaunching B must not continue A."""
    run = tmp_path / "run"
    train(make_cfg(run, "train.max_steps=2", *SMALL))
    env_before = dict(os.environ)

    def killed(*args, **kwargs):
        raise Killed()

    monkeypatch.setitem(floe.run.entry.TRAINERS, "sft", killed)  # B dies after the start, before any save
    with pytest.raises(Killed):
        train(make_cfg(run, "train.max_steps=2", "train.resume=never", "model.capacity_factor=2.0", *SMALL))
    assert dict(os.environ) == env_before  # the rendezvous environment of a 1-process launch is restored
    assert not (run / "checkpoints").exists()
    aside = [p for p in run.iterdir() if p.name.startswith("replaced-")]
    assert len(aside) == 1 and (aside[0] / "checkpoints" / "step_00000002").is_dir()
    assert "moved the earlier run's checkpoints" in capfd.readouterr().err
    monkeypatch.undo()
    last = train(make_cfg(run, "train.max_steps=2", "model.capacity_factor=2.0", *SMALL))  # B again, resume=auto
    assert "resumed from" not in capfd.readouterr().err
    assert last["step"] == 2 and [m["step"] for m in read_metrics(run)] == [1, 2]
    assert move_aside(str(tmp_path / "empty")) is None  # nothing to move: nothing moved


def test_resume_compares_the_checkpoints_own_config(tmp_path):
    """config.yaml may have been rewritten by a later launch; the checkpoint keeps its own config."""
    run = tmp_path / "run"
    train(make_cfg(run, "train.max_steps=2", *SMALL))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["model"]["capacity_factor"] = 2.0  # as a launch with model.capacity_factor=2.0 would leave it
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ResumeMismatch, match=r"state.json.*\n  model.capacity_factor: 1.25 -> 2.0"):
        train(make_cfg(run, "train.max_steps=4", "train.allow_schedule_change=true", "model.capacity_factor=2.0",
                       *SMALL))


def _launch(run_dir, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "DS_ACCELERATOR")}
    return subprocess.Popen([sys.executable, "launch/train.py", f"run.dir={run_dir}", "log.wandb=disabled",
                             "train.max_steps=100000", *SMALL, *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(proc, metrics, n: int, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"no step {n}: {proc.poll()} {proc.stderr.read()[-3000:] if proc.poll() is not None else ''}")


@pytest.mark.slow  # launches launch/train.py three times
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_finishes_the_step_writes_a_checkpoint_and_resumes(tmp_path, sig):
    run = tmp_path / "run"
    proc = _launch(run)
    try:
        _wait_for_steps(proc, run / "metrics.jsonl", 1)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, err[-3000:]
    assert "Traceback" not in err and err.count(f"floe: stopped by {sig.name} after step") == 1, err[-3000:]
    steps = [m["step"] for m in read_metrics(run)]
    latest = (run / "checkpoints" / "latest").read_text()
    assert latest == f"step_{steps[-1]:08d}" and f"checkpoint {run / 'checkpoints' / latest}." in err
    assert "Relaunch the same command" in err
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    # The relaunch resumes from the checkpoint the signal wrote.
    out = subprocess.run([sys.executable, "launch/train.py", f"run.dir={run}", "log.wandb=disabled",
                          f"train.max_steps={steps[-1] + 1}", "train.allow_schedule_change=true", *SMALL], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / latest} at step {steps[-1]}" in out.stderr
    assert [m["step"] for m in read_metrics(run)] == list(range(1, steps[-1] + 2))


@pytest.mark.slow
def test_a_second_signal_stops_at_once(tmp_path):
    run = tmp_path / "run"
    proc = _launch(run, "data.seq_len=256", "train.global_batch_size=16", "train.micro_batch_size=8")  # slow steps
    try:
        _wait_for_steps(proc, run / "metrics.jsonl", 1)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        line = ""
        while "got SIGTERM" not in line and time.monotonic() < deadline:
            line = proc.stderr.readline()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGTERM  # the default action, at once: no checkpoint was completed
    assert not (run / "checkpoints" / "latest").exists()


@pytest.mark.slow  # torchrun, 2 processes
def test_under_torchrun_every_rank_stops_after_the_same_step(tmp_path):
    """SIGTERM to rank 1 alone: both ranks stop after the same step (the flag rides on the step's
    all-reduce), one checkpoint of that step is written, rank 0 prints the line once."""
    from tests.test_run_dir import _children

    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "DS_ACCELERATOR")}
    proc = subprocess.Popen([sys.executable, "launch/torchrun.py", "--standalone", "--nproc_per_node=2",
                             "launch/train.py", f"run.dir={run}", "log.wandb=disabled", "train.max_steps=100000",
                             *SMALL], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_steps(proc, run / "metrics.jsonl", 1)
        workers = sorted(_children(proc.pid))
        assert len(workers) == 2, workers
        ranks = {}
        for pid in workers:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env_of = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            ranks[int(env_of[b"RANK"])] = pid
        os.kill(ranks[1], signal.SIGTERM)
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "ChildFailedError" not in err, err[-3000:]
    assert err.count("floe: stopped by a stop signal (on another rank) after step") == 1, err[-3000:]
    steps = [m["step"] for m in read_metrics(run)]
    assert (run / "checkpoints" / "latest").read_text() == f"step_{steps[-1]:08d}"


def test_a_full_disk_names_the_path_and_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    """Disk full while a checkpoint is written (safetensors' own error type, as the probe saw it)."""
    from safetensors import SafetensorError

    import floe.run.checkpoint
    from launch.train import ending

    run = tmp_path / "run"
    train(make_cfg(run, "train.max_steps=1", *SMALL))
    real_save, calls = floe.run.checkpoint._save, []

    def full_disk(tensors, path):
        calls.append(path)
        if len(calls) == 2:  # the first file is written, the second finds the disk full
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real_save(tensors, path)

    monkeypatch.setattr(floe.run.checkpoint, "_save", full_disk)
    with pytest.raises(OSError) as err:
        train(make_cfg(run, "train.max_steps=2", "train.allow_schedule_change=true", *SMALL))
    assert err.value.errno == 28 and err.value.filename == str(run / "checkpoints")
    assert sorted(os.listdir(run / "checkpoints")) == ["latest", "step_00000001"]  # no .tmp-step_00000002
    assert (run / "checkpoints" / "latest").read_text() == "step_00000001"
    code, line = ending(err.value)
    assert code == 2 and line.startswith(f"cannot write {run / 'checkpoints'}: Error while serializing")
    assert "not written, its partial" in line and "latest stays" in line
