"""floe.run.config: the one check of the whole config, before the run dir, the data or any process
group is touched; every problem of one launch named at once; one clean line and exit code 2."""
import os
import subprocess
import sys

import pytest
import torch

import floe.run.config
import floe.run.run_dir
import floe.run.entry
from floe.errors import ConfigError
from floe.run.config import config_errors, run_dir_errors
from launch.train import train
from tests.test_train import make_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def nothing_may_start(monkeypatch):
    """Fail the test if a check let the launch reach the lock or the data build."""
    def refuse(*args, **kwargs):
        raise AssertionError("the run dir was claimed or the data was built before the config was refused")

    monkeypatch.setattr(floe.run.run_dir, "RunLock", refuse)
    monkeypatch.setattr(floe.run.entry, "build_dataset", refuse)


def test_five_problems_of_one_launch_are_named_together(tmp_path, nothing_may_start):
    with pytest.raises(ConfigError) as err:
        train(make_cfg(tmp_path / "run", "train.max_steps=-1", "optim.lr=-1", "model.top_k=0", "parallel.zero_stage=7",
                       "+train.bogus=1"))
    message = str(err.value)
    for named in ("train.max_steps must be >= 0", "optim.lr must be >= 0", "model.top_k", "parallel.zero_stage must be",
                  "train.bogus"):
        assert named in message, (named, message)


def test_launch_file_and_path_problems_before_the_data_and_the_lock(tmp_path, nothing_may_start, monkeypatch):
    """Each was refused only after the data was built and cached and the run dir locked."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    cases = [
        (["parallel.zero_stage=3"], "parallel.zero_stage=3 is not supported"),
        (["parallel.ep_size=2"], "must divide the world size (1 processes)"),
        (["model.vocab_size=10"], "model.vocab_size (10) is smaller than the tokenizer's vocabulary"),
        ([f"data.tokenizer={tmp_path / 'missing.model'}"], "data.tokenizer: no SentencePiece model"),
        ([f"data.tokenizer={tmp_path / 'adir'}"], "data.tokenizer: no SentencePiece model"),
        (["data=jsonl", f"data.paths=[{tmp_path / 'missing.jsonl'}]"], "data.paths[0]: no file matches"),
        (["data=jsonl", f"data.paths=[{tmp_path / 'adir'}]"], "is a directory but not a datasets"),
        (["data=jsonl", f"data.paths=[{tmp_path / 'nothing*.jsonl'}]"], "data.paths[0]: no file matches"),
        (["data=jsonl", f"data.paths=[{data}]", f"data.eval_paths=[{tmp_path / 'no.jsonl'}]"],
         "data.eval_paths[0]: no file matches"),
        ([f"train.init_from={tmp_path / 'afile'}"], "train.init_from=" + str(tmp_path / "afile") + ": not a directory"),
        (["train.device=cuda"] if not torch.cuda.is_available() else [], "train.device=cuda but no CUDA device"),
    ]
    for overrides, named in cases:
        if not overrides:
            continue
        with pytest.raises(ConfigError, match="invalid config") as err:
            train(make_cfg(tmp_path / "run", *overrides))
        assert named in str(err.value), (overrides, str(err.value))
    assert not torch.distributed.is_initialized()


def test_run_dir_problems(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    assert "run.dir is empty" in run_dir_errors("")[0]
    assert "exists and is not a directory" in run_dir_errors(str(tmp_path / "file"))[0]
    assert "exists and is not a directory" in run_dir_errors(str(tmp_path / "file" / "below"))[0]
    assert "is 300 bytes; a file system allows at most 255" in run_dir_errors(str(tmp_path / ("x" * 300)))[0]
    assert run_dir_errors(str(tmp_path / "new" / "run")) == []
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    ckpt = str(tmp_path / "run" / "checkpoints")
    monkeypatch.setattr(floe.run.config.os, "access", lambda path, mode: path != ckpt)  # as a read-only mount
    assert run_dir_errors(str(tmp_path / "run")) == [f"run.dir={tmp_path / 'run'}: cannot write to {ckpt} "
                                                      "(no write permission)"]
    assert config_errors({"run_dir": ""}) == []  # path rules need the launch: parse_config alone checks keys


@pytest.mark.slow  # a few launches of launch/train.py
def test_every_refusal_is_one_line_and_exit_code_2(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    (tmp_path / "file").write_text("x")
    for overrides, named in ((["run.dir="], "run.dir is empty"),
                             ([f"run.dir={tmp_path / 'file'}"], "exists and is not a directory"),
                             ([f"run.dir={tmp_path / ('y' * 300)}"], "a file system allows at most 255"),
                             ([f"run.dir={tmp_path / 'r'}", f"train.init_from={tmp_path / 'file'}"],
                              "not a directory")):
        out = subprocess.run([sys.executable, os.path.join(REPO, "launch", "train.py"), "log.wandb=disabled",
                              *overrides], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
        assert out.returncode == 2 and "Traceback" not in out.stderr, (overrides, out.stderr[-3000:])
        assert out.stderr.count("floe: invalid config") == 1 and named in out.stderr, (overrides, out.stderr[-3000:])


@pytest.mark.slow  # torchrun, 2 processes
def test_a_refusal_under_torchrun_is_one_line_and_exit_code_2(tmp_path):
    """Every config error exited 1 under torchrun, followed by its ChildFailedError traceback;
    launch/torchrun.py ends with the workers' exit code and adds nothing to their message."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out = subprocess.run([sys.executable, "launch/torchrun.py", "--standalone", "--nproc_per_node=2", "launch/train.py",
                          f"run.dir={tmp_path / 'run'}", "log.wandb=disabled", "parallel.ep_size=3", "optim.lr=-1"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "ChildFailedError" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.count("floe: invalid config") == 1 and "parallel.ep_size (3) must divide the world size (2" \
        in out.stderr and "optim.lr must be >= 0" in out.stderr, out.stderr[-3000:]


@pytest.mark.parametrize("codes, expected", [
    ({0: 143, 1: 2}, 2),      # rank 1 refused the config first; torchrun then SIGTERMed rank 0 (its handler: 143)
    ({0: -15, 1: 2}, 2),      # the same, rank 0 killed before its handler was installed
    ({0: 143, 1: 143}, 143),  # a preemption: every rank stopped on SIGTERM
    ({0: 1, 1: 2}, 1),        # two failures of their own: the lowest rank's
    ({0: -9, 1: -15}, 137),   # SIGKILL: 128 + 9
])
def test_torchrun_wrapper_ends_with_the_code_of_the_worker_that_failed_first(codes, expected):
    """Found by this suite: the refusal test under torchrun ended 143 when rank 1 refused before rank 0."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from launch.torchrun import exit_code

    failures = {rank: ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=code, error_file="/nonexistent")
                for rank, code in codes.items()}
    assert exit_code(failures) == expected


def test_each_ending_is_one_line_with_its_exit_code(tmp_path):
    """NonFiniteTraining ended inside Hydra's "Error executing job" block; SIGINT before training in
    a KeyboardInterrupt traceback; a read-only mount in an OSError traceback."""
    import errno
    import signal

    from floe.run.context import RunStopped
    from floe.run.trainer import NonFiniteTraining
    from launch.train import ending

    assert ending(ConfigError("bad key")) == (2, "bad key")
    assert ending(NonFiniteTraining("3 consecutive steps")) == (1, "3 consecutive steps")
    assert ending(KeyboardInterrupt())[0] == 130
    stopped = RunStopped(signal.SIGUSR1, 7, "/r/checkpoints/step_00000007", "/r")
    assert ending(stopped) == (138, "stopped by SIGUSR1 after step 7; checkpoint /r/checkpoints/step_00000007. "
                                    "Relaunch the same command (train.resume=auto) to continue from it in /r")
    assert ending(OSError(errno.EROFS, "Read-only file system", "/r/metrics.jsonl")) == \
        (2, "cannot write /r/metrics.jsonl: Read-only file system")
    assert ending(RuntimeError("a bug")) == (None, "")  # a crash keeps its traceback
