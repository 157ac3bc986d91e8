"""launch/slurm_train.sh run as sbatch runs it: a copy in a spool directory, started from elsewhere,
with stub srun / scontrol / torchrun on the PATH (no SLURM here). The stubs only record what they
were asked to do; the stub torchrun plays a training that stops on SIGUSR1."""
import os
import shutil
import signal
import stat
import subprocess
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STUBS = {
    "scontrol": """#!/bin/bash
if [[ "$1 $2" == "show hostnames" ]]; then echo node-a; echo node-b; exit 0; fi
echo "$*" >> "$STUB_DIR/scontrol.log"
""",
    "srun": """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done   # srun's own options
exec "$@"
""",
    "torchrun": """#!/bin/bash
{ echo "pwd=$(pwd)"; echo "signals=$TORCHELASTIC_SIGNALS_TO_HANDLE"; echo "args=$*"; } > "$STUB_DIR/torchrun.log"
trap 'echo "got USR1" >> "$STUB_DIR/torchrun.log"; exit 138' USR1
touch "$STUB_DIR/started"
for _ in $(seq 300); do [[ "$STUB_MODE" == exit ]] && exit 0; sleep 0.1; done
exit 1
""",
}


def _setup(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    shutil.copy(os.path.join(REPO, "launch", "slurm_train.sh"), spool / "slurm_script")  # as slurmd stores it
    stub_dir = tmp_path / "stubs"
    stub_dir.mkdir()
    for name, text in STUBS.items():
        (stub_dir / name).write_text(text)
        (stub_dir / name).chmod(stat.S_IRWXU)
    env = {**os.environ, "PATH": f"{stub_dir}:{os.environ['PATH']}", "STUB_DIR": str(stub_dir),
           "SLURM_SUBMIT_DIR": REPO, "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node-[a-b]",
           "SLURM_GPUS_ON_NODE": "2"}
    env.pop("FLOE_REPO", None)
    return spool / "slurm_script", stub_dir, env


def _log(stub_dir, name):
    path = stub_dir / name
    return path.read_text() if path.exists() else ""


def test_sbatch_copy_finds_the_repo_forwards_usr1_and_requeues(tmp_path):
    script, stub_dir, env = _setup(tmp_path)
    job = subprocess.Popen(["bash", str(script), "model=small", "train.max_steps=5"], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while not (stub_dir / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (stub_dir / "started").exists(), job.communicate(timeout=10)[0]
    job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 sends before the time limit
    out, _ = job.communicate(timeout=30)
    assert job.returncode == 0, out
    log = _log(stub_dir, "torchrun.log")
    assert f"pwd={REPO}\n" in log  # the repository from $SLURM_SUBMIT_DIR, not the spool directory
    assert "args=--nnodes=2 --nproc_per_node=2 --rdzv-backend=c10d --rdzv-endpoint=node-a:29500" in log
    assert "--rdzv-id=4242 --max-restarts=0 launch/train.py model=small train.max_steps=5" in log
    assert "SIGUSR1" in log.split("signals=")[1].splitlines()[0]  # torchrun passes USR1 on to the workers
    assert "got USR1" in log
    assert _log(stub_dir, "scontrol.log") == "requeue 4242\n"
    assert "requeueing job 4242" in out


def test_sbatch_copy_without_a_signal_ends_with_the_training(tmp_path):
    script, stub_dir, env = _setup(tmp_path)
    out = subprocess.run(["bash", str(script)], cwd=tmp_path, env={**env, "STUB_MODE": "exit"},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert _log(stub_dir, "scontrol.log") == ""  # nothing requeued
    # Not from a checkout: one clear line, exit 2, nothing started.
    (stub_dir / "torchrun.log").unlink()
    out = subprocess.run(["bash", str(script)], cwd=tmp_path, env={**env, "SLURM_SUBMIT_DIR": str(tmp_path)},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "is not a floe checkout" in out.stderr and _log(stub_dir, "torchrun.log") == ""


def test_output_file_needs_no_directory():
    """SLURM opens --output before the script runs: on a fresh checkout only existing directories work."""
    with open(os.path.join(REPO, "launch", "slurm_train.sh")) as f:
        options = [line.split()[1] for line in f if line.startswith("#SBATCH ")]
    output = [o.split("=", 1)[1] for o in options if o.startswith("--output=")]
    assert output and "/" not in output[0], output
    assert "--signal=B:USR1@300" in options and "--requeue" in options
