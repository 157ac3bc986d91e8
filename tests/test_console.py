"""What launch/train.py prints and where runs go: quiet libraries, a log-file-friendly console,
data statistics in a file, a relaunch of a finished run, run.dir names, the table after a -m sweep."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from launch.train import MAX_RUN_NAME, run_name

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["data.num_examples=200", "data.seq_len=64", "train.global_batch_size=4", "train.micro_batch_size=2",
         "log.wandb=disabled"]


def launch(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    return subprocess.run([sys.executable, "launch/train.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def run_in_terminal(args, cwd, timeout=300) -> tuple[int, str]:
    """launch/train.py with stdin, stdout and stderr on a pseudo-terminal of 40 x 160 characters; all it wrote."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a real terminal has a size
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    p = subprocess.Popen([sys.executable, os.path.join(REPO, "launch/train.py"), *args], cwd=cwd, stdin=slave,
                         stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], 1.0)
        try:
            chunk = os.read(master, 1 << 16) if ready else b""
        except OSError:  # the child closed the terminal
            break
        out += chunk
        if not chunk and p.poll() is not None:
            break
    p.wait(timeout)
    os.close(master)
    return p.returncode, out.decode(errors="replace")


@pytest.mark.slow
def test_terminal_bar_lines_stay_intact(tmp_path):
    """On a terminal every line the user finally sees is either a whole log line or a whole bar line:
    the checkpoint and eval lines are written above the bar, never into it; the bar shows the numbers."""
    import re

    rc, out = run_in_terminal([f"run.dir={tmp_path / 'run'}", *SMALL, "train.max_steps=4", "train.save_every=2"],
                              tmp_path)
    assert rc == 0, out[-3000:]
    bar = re.compile(r"train: +\d+%\|[^|]*\| \d+/4 \[[^\]]*loss=[\d.]+, gnorm=[\d.]+, tok/s=\d+, step=[\d.]+s, "
                     r"mem=[\d.]+G\]")
    shown = [line.split("\r")[-1] if line.split("\r")[-1].strip() else line.rstrip("\r") for line in out.split("\n")]
    shown = [line.split("\r")[-1] for line in shown if line.strip()]
    assert any(bar.fullmatch(line.strip()) for line in shown), shown
    for line in shown:
        assert re.match(r"\[\d\d:\d\d:\d\d floe\] ", line) or bar.fullmatch(line.strip()), line
    assert sum("] saved " in line for line in shown) == 2 and any("eval at step 4" in line for line in shown)
    assert not any("floe]" in seg and "train:" in seg for seg in out.replace("\n", "\r").split("\r"))


def test_sweep_names():
    from launch.train import sweep_name

    a = sweep_name(argv=["-m", "train.max_steps=1,2", "log.wandb=disabled", "--config-name", "config"],
                   exclude_keys=["log.wandb"])
    assert a == "train.max_steps=1,2"
    assert sweep_name(argv=["--multirun", "optim.lr=1e-3,1e-4", "train.max_steps=1,2"]) == \
        sweep_name(argv=["train.max_steps=1,2", "optim.lr=1e-3,1e-4", "-m"])  # the order does not matter
    assert sweep_name(argv=["-m", "data.paths=[/a.jsonl],[/b.jsonl]"]).startswith("data.paths=")
    assert "/" not in sweep_name(argv=["-m", "data.paths=[/a.jsonl],[/b.jsonl]"])
    assert sweep_name(argv=["-m"]) == "default"


@pytest.mark.slow
def test_two_sweeps_write_two_directories_and_two_tables(tmp_path):
    """Each -m sweep in its own runs/multirun/<overrides> with its own compare table (none mixes in)."""
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    for steps in ("1", "2"):
        out = subprocess.run([sys.executable, os.path.join(REPO, "launch/train.py"), "-m", f"train.max_steps={steps}",
                              *SMALL], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
    sweeps = sorted(p.name for p in (tmp_path / "runs" / "multirun").iterdir())
    assert len(sweeps) == 2 and all("train.max_steps=" in s for s in sweeps)
    for sweep in sweeps:
        rows = (tmp_path / "runs" / "multirun" / sweep / "compare" / "compare.csv").read_text().splitlines()
        assert len(rows) == 2  # the header and this sweep's one run


def test_run_names():
    assert run_name("") == "default"  # a default run is a sibling of the override runs
    assert run_name("model.capacity_factor=1.0,optim.lr=0.001") == "model.capacity_factor=1.0,optim.lr=0.001"
    with_path = run_name("data.paths=[/data/a.jsonl,/data/b.jsonl]")
    assert "/" not in with_path and with_path.startswith("data.paths=")
    assert with_path == run_name("data.paths=[/data/a.jsonl,/data/b.jsonl]")  # stable
    assert with_path != run_name("data.paths=[/data/a.jsonl,/data/c.jsonl]")
    long_a = ",".join(f"model.x{i}=1" for i in range(40))
    long_b = long_a.replace("x39=1", "x39=2")
    assert len(long_a) > 255  # OSError: File name too long, as a directory name
    assert len(run_name(long_a)) <= MAX_RUN_NAME and run_name(long_a) != run_name(long_b)


def test_default_and_override_run_dirs_are_siblings():
    dirs = []
    for args in ([], ["model.capacity_factor=1.0"]):
        out = launch(*args, "--cfg", "job", "--resolve", timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        dirs.append(next(line.split(":", 1)[1].strip() for line in out.stdout.splitlines()
                         if line.startswith("  dir:")))
    assert dirs == ["runs/tiny/default", "runs/tiny/model.capacity_factor=1.0"]


def test_deepspeed_and_gloo_warnings_are_silenced():
    code = ("import os, torch, floe.parallel, deepspeed, torch.distributed as dist\n"
            "from deepspeed.accelerator import get_accelerator\n"
            "assert get_accelerator()._name == 'cpu'\n"
            "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(__import__('floe.testing.distributed', "
            "fromlist=['free_port']).free_port()))\n"
            "dist.init_process_group('gloo', rank=0, world_size=1)\n"
            "out = torch.zeros(2); dist.all_gather_into_tensor(out, torch.ones(2))  # as DeepSpeed's ZeRO-2 does\n"
            "dist.destroy_process_group(); print('done')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "PYTHONWARNINGS")}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**env, "PYTHONPATH": REPO, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "done", out.stdout
    assert "Setting accelerator" not in out.stderr and "Warning" not in out.stderr, out.stderr


def test_log_file_console_data_stats_and_relaunch(tmp_path):
    run_dir = tmp_path / "run"
    out = launch(f"run.dir={run_dir}", *SMALL, "train.max_steps=3", "log.console_every=2")
    assert out.returncode == 0, out.stderr[-3000:]
    console = out.stdout + out.stderr
    assert "\r" not in console  # no progress-bar redraws in a log file
    steps = [line.split("step ", 1)[1].split()[0] for line in console.splitlines() if "] step " in line]
    assert steps == ["1/3", "2/3", "3/3"]  # step 1 (a sign of life), every 2nd and the last
    first = next(line for line in console.splitlines() if "] step 1/3 " in line)
    assert " step " in first.split("tokens/s", 1)[1] and " eta " in first and "grad_norm" in first
    assert "eval at step 3: loss" in console
    assert "Setting accelerator" not in console
    stats = json.loads((run_dir / "data_stats.json").read_text())
    assert stats["train"]["rows"] > 0 and stats["eval"]["examples"] > 0
    assert '"sources"' not in console  # the long JSON is in the file, not on the console
    metrics = (run_dir / "metrics.jsonl").read_text()

    again = launch(f"run.dir={run_dir}", *SMALL, "train.max_steps=3")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already complete (checkpoint at step 3 of 3)" in again.stdout + again.stderr
    assert "model:" not in again.stdout + again.stderr  # nothing was built
    assert (run_dir / "metrics.jsonl").read_text() == metrics


@pytest.mark.slow
def test_sweep_prints_the_compare_table(tmp_path):
    sweep = tmp_path / "sweep"
    out = launch("-m", "train.max_steps=1,2", *SMALL, f"hydra.sweep.dir={sweep}")
    assert out.returncode == 0, out.stderr[-3000:]
    runs = sorted(p.name for p in sweep.iterdir() if (p / "metrics.jsonl").is_file())
    assert len(runs) == 2
    table = out.stdout[out.stdout.index("| run |"):].splitlines()
    assert "train.max_steps" in table[0] and "eval_loss (final)" in table[0] and "mfu (final)" not in table[0]
    assert len(table) == 4 and sorted(row.split(" | ")[0].strip("| ") for row in table[2:]) == \
        ["train.max_steps=1", "train.max_steps=2"]  # the overrides every run shares are left out
    assert "mfu (final)" in (sweep / "compare" / "compare.csv").read_text().splitlines()[0]
    assert (sweep / "compare" / "compare.md").is_file() and (sweep / "compare" / "loss.png").is_file()


@pytest.mark.slow
def test_a_failing_sweep_job_does_not_stop_the_sweep(tmp_path):
    """A -m sweep stopped at its first failing job and never ran the valid ones after it."""
    sweep = tmp_path / "sweep"
    out = launch("-m", "train.max_steps=1,-1,2", *SMALL, f"hydra.sweep.dir={sweep}")
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "floe: sweep job" in out.stderr and "train.max_steps must be >= 0" \
        in out.stderr, out.stderr[-3000:]
    runs = sorted(p.name for p in sweep.iterdir() if (p / "metrics.jsonl").is_file())
    assert [r for r in runs if "max_steps=1," in r] and [r for r in runs if "max_steps=2," in r] and len(runs) == 2
    table = out.stdout[out.stdout.index("| run |"):].splitlines()
    rows = [row.split(" | ")[0].strip("| ") for row in table[2:] if row.startswith("|")]
    assert len(rows) == 2 and all(any(row in run for run in runs) for row in rows), table  # the finished jobs
    failed = out.stdout[out.stdout.index("sweep: 1 run(s) failed"):]
    assert "train.max_steps=-1," in failed and "(invalid config:" in failed, out.stdout[-2000:]
