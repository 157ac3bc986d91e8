"""End-to-end tests of launch/train.py: the Hydra entry point, config errors, resume."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from launch.train import CONF_DIR, train
from floe.config import PRESETS, ModelConfig
from tests.test_parallel_train import checkpoint_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_cfg(run_dir, *overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose("config", overrides=[f"run.dir={run_dir}", "run.name=test", "log.wandb=disabled",
                                            *overrides])


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_entry_point_trains_tiny_and_loss_falls(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "launch/train.py", f"run.dir={run_dir}", "log.wandb=disabled", "train.max_steps=30"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 31))
    for key in ("loss", "balance_loss", "balance_uniform", "lr", "grad_norm", "tokens_per_s", "dropped_frac"):
        assert all(isinstance(m[key], float) for m in metrics), key
    first, last = metrics[0]["loss"], sum(m["loss"] for m in metrics[-5:]) / 5
    assert first > 6.0 and last < first - 1.5, (first, last)
    # 1.0 per layer under perfect balance (not a strict lower bound on a batch); stays near it
    assert metrics[0]["balance_uniform"] == 2.0 and all(abs(m["balance_loss"] - 2.0) < 0.2 for m in metrics)
    assert os.path.isfile(run_dir / "config.yaml")
    assert open(run_dir / "checkpoints" / "latest").read() == "step_00000030"


ON_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("extra", [
    pytest.param([], id="fp32"),
    pytest.param(["train.precision=bf16"], id="bf16-zero0"),
    pytest.param(["train.neftune_alpha=5"], id="neftune"),
    pytest.param(["train.device=cuda", "train.precision=bf16"], id="bf16-zero0-cuda", marks=ON_CUDA),
    pytest.param(["train.device=cuda", "train.precision=bf16", "parallel.zero_stage=2"], id="bf16-zero2-cuda",
                 marks=ON_CUDA),
])
def test_resume_is_bit_exact(tmp_path, extra):
    """Also in bf16 at ZeRO-0 (DeepSpeed's unfused bf16 optimizer: fp32 masters per parameter); with
    NEFTune, whose noise draws from torch's RNG every step: the resumed run draws the uninterrupted run's
    noise only if the checkpoint restored the RNG state (without it this case fails); and on CUDA (Triton
    experts, FlexAttention) at ZeRO-0 and ZeRO-2, the CPU bf16 case being their twin."""
    straight = tmp_path / "straight"
    train(make_cfg(straight, "train.max_steps=6", "train.save_every=3", "train.global_batch_size=8",
                   "train.micro_batch_size=4", *extra))
    # Simulate a crash after step 3: keep only the step-3 checkpoint and a half-written step-6 one.
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    ckpt = resumed / "checkpoints"
    os.rename(ckpt / "step_00000006", ckpt / ".tmp-step_00000006")
    (ckpt / "latest").write_text("step_00000003")
    last = train(make_cfg(resumed, "train.max_steps=6", "train.save_every=3", "train.global_batch_size=8",
                          "train.micro_batch_size=4", *extra))
    assert last["step"] == 6
    a, b = read_metrics(straight), read_metrics(resumed)
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]  # no duplicated lines after resume
    for ma, mb in zip(a, b):
        assert ma["loss"] == mb["loss"] and ma["lr"] == mb["lr"] and ma["grad_norm"] == mb["grad_norm"]
    for kind in ("model", "optim"):  # weights, fp32 Adam moments: bit for bit
        sa, sb = checkpoint_params(straight, 6, kind), checkpoint_params(resumed, 6, kind)
        assert set(sa) == set(sb) and len(sa) > 0
        for name, tensor in sa.items():
            assert torch.equal(tensor, sb[name]), name


def test_config_errors_name_every_key(tmp_path):
    cfg = make_cfg(tmp_path, "model.top_k=9", "model.drop_policy=random", "optim.lr=-1", "train.micro_batch_size=0",
                   "train.neftune_alpha=-1")
    with pytest.raises(ValueError) as err:
        train(cfg)
    for key in ("model.top_k", "model.drop_policy", "optim.lr", "train.micro_batch_size", "train.neftune_alpha"):
        assert key in str(err.value)


def test_wrong_types_and_ranges_are_named_together(tmp_path):
    """Issue 8.6's inputs: every bad key named in one message, before anything runs (these used to
    be TypeErrors without the key, torch errors after DeepSpeed was up, or silently accepted)."""
    from launch.train import parse_config
    from floe.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        parse_config(make_cfg(tmp_path, "optim.lr=abc", "model.capacity_factor=abc", "train.global_batch_size=abc",
                              "data.weights=[a,1]", "train.seed=abc", "train.max_steps=1.5", "log.every=0",
                              "log.tensorboard=maybe"))
    msg = str(err.value)
    for expected in ("log.tensorboard must be true or false, got 'maybe'", "optim.lr must be a number, got 'abc'", "model.capacity_factor must be a number or null",
                     "train.global_batch_size must be an integer, got 'abc'", "data.weights must be a list of numbers",
                     "train.seed must be an integer", "train.max_steps must be an integer, got 1.5",
                     "log.every must be an integer >= 1"):
        assert expected in msg, (expected, msg)
    with pytest.raises(ConfigError) as err:
        parse_config(make_cfg(tmp_path, "optim.beta1=1.5", "optim.eps=-1", "optim.beta2=abc"))
    assert "optim.beta1 must be in [0, 1), got 1.5" in str(err.value)
    assert "optim.eps must be > 0, got -1.0" in str(err.value) and "optim.beta2 must be a number" in str(err.value)
    assert parse_config(make_cfg(tmp_path, "optim.lr=1")).optim.lr == 1.0  # an int is a number
    with pytest.raises(ConfigError) as err:  # a typo'd section or key is not silently ignored
        parse_config(make_cfg(tmp_path, "+trian.max_steps=5", "+log.evry=2", "+run.dri=x"))
    for key in ("trian", "log.evry", "run.dri"):
        assert f"unknown config key(s) {key};" in str(err.value), str(err.value)
    with pytest.raises(ConfigError, match="parallel.contiguous_gradients=false is not supported at "
                                          "parallel.zero_stage=2"):  # was an assert inside deepspeed.initialize
        parse_config(make_cfg(tmp_path, "parallel.zero_stage=2", "parallel.contiguous_gradients=false"))
    assert not parse_config(make_cfg(tmp_path, "parallel.zero_stage=1",
                                     "parallel.contiguous_gradients=false")).parallel.contiguous_gradients


def test_config_error_is_one_clean_message_and_exit_code_2(tmp_path):
    """From the command line: no traceback, the message once, exit code 2; a rank other than 0
    (torchrun) prints nothing, so the message is not repeated once per rank."""
    args = [sys.executable, os.path.join(REPO, "launch", "train.py"), "optim.lr=abc", "train.seed=x",
            "log.wandb=disabled", f"run.dir={tmp_path / 'run'}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and out.stderr.count("optim.lr must be a number") == 1
    assert "train.seed must be an integer" in out.stderr
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())  # nothing written (Hydra
    # creates the empty run dir itself)
    out = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, env={**env, "RANK": "1"}, timeout=120)
    assert out.returncode == 2 and "optim.lr" not in out.stderr
    for bad, named in (("model=nope", "'model/nope'"), ("train.bogus=1", "train.bogus"), ("optim.lr=[1", "input '[1'")):
        out = subprocess.run(args[:2] + [bad] + args[4:], capture_output=True, text=True, cwd=tmp_path, env=env,
                             timeout=120)  # Hydra's own errors: the same exit code, no traceback
        assert out.returncode == 2 and named in out.stderr and "Traceback" not in out.stderr, (bad, out.stderr[-2000:])
    out = subprocess.run(args[:2] + ["model=nope"] + args[4:], capture_output=True, text=True, cwd=tmp_path,
                         env={**env, "RANK": "1"}, timeout=120)
    assert out.returncode == 2 and out.stderr == "", out.stderr  # rank 0 prints Hydra's message for all
    code = ("import runpy, sys, floe.run.entry\n"  # once Hydra has composed, training's stderr is every rank's
            "floe.run.entry.train = lambda c, resolved, launch: print('from training', file=sys.stderr)\n"
            f"sys.argv = ['launch/train.py', 'log.wandb=disabled', 'run.dir={tmp_path / 'run'}']\n"
            "runpy.run_path('launch/train.py', run_name='__main__')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**env, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "PYTHONPATH": REPO}, timeout=120)
    assert out.returncode == 0 and out.stderr == "from training\n", out.stderr[-2000:]


def test_too_little_data_is_reported_before_the_model_is_built(tmp_path, monkeypatch):
    import floe.run.trainer

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the data check")

    monkeypatch.setattr(floe.run.trainer, "Trainer", no_model)
    with pytest.raises(ValueError, match=r"packs into \d+ rows.*fewer than one global batch.*Fix"):
        train(make_cfg(tmp_path, "data.num_examples=20"))
    assert not torch.distributed.is_initialized()


def test_batch_split_error_before_any_collective(tmp_path):
    cfg = make_cfg(tmp_path, "train.global_batch_size=10", "train.micro_batch_size=4")
    with pytest.raises(ValueError, match="train.global_batch_size"):
        train(cfg)
    assert not torch.distributed.is_initialized()


def test_vocab_too_small_for_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="model.vocab_size"):
        train(make_cfg(tmp_path, "model.vocab_size=100"))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_model_group_is_the_presets(tmp_path, name):
    """model=<name> composes floe.config.PRESETS[name] (registered by launch/train.py), and no
    conf/model/*.yaml exists that could shadow or drift from it."""
    cfg = make_cfg(tmp_path, f"model={name}")
    from omegaconf import OmegaConf

    assert ModelConfig(**OmegaConf.to_container(cfg.model)) == PRESETS[name]
    assert not os.path.isdir(os.path.join(CONF_DIR, "model")) or not os.listdir(os.path.join(CONF_DIR, "model"))


def test_every_config_composes(tmp_path):
    from launch.train import parse_config

    groups = {g: sorted(f[:-5] for f in os.listdir(os.path.join(CONF_DIR, g)) if f.endswith(".yaml"))
              for g in ("data", "optim", "parallel", "lora")}
    groups["model"] = sorted(PRESETS)  # the model group is registered from PRESETS
    for group, options in groups.items():
        for option in options:
            overrides = [f"{group}={option}"]
            if group == "data" and option in ("jsonl", "preference"):
                overrides.append("data.paths=[x.jsonl]")
            if group == "data" and option == "preference":
                overrides.append("train.objective=dpo")
            parse_config(make_cfg(tmp_path, *overrides))
    for exp in sorted(f[:-5] for f in os.listdir(os.path.join(CONF_DIR, "experiment")) if f.endswith(".yaml")):
        if exp.startswith(("arctic_sft", "arctic_dpo", "arctic_lora", "arctic_qlora")):  # fine-tuning recipes refuse random weights
            with pytest.raises(ValueError, match="train.init_from is required"):
                parse_config(make_cfg(tmp_path, f"+experiment={exp}"))
            continue
        parse_config(make_cfg(tmp_path, f"+experiment={exp}"))


def _trained_weights(run_dir):
    from tools.generate import load_model_for_inference

    return load_model_for_inference(str(run_dir))[0].state_dict()


def test_non_finite_steps_are_never_applied_and_stop_after_max_skipped_steps(tmp_path):
    """Weights of 1e30 overflow the gradients on every step. Each step is skipped (never applied),
    counted in metrics.jsonl (the non-finite norm written as null), and the third in a row stops
    the run with a message naming the last good checkpoint; no checkpoint is written."""
    from floe.run.trainer import NonFiniteTraining

    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteTraining, match=r"3 consecutive steps \(up to step 3\).*Last good checkpoint: none"):
        train(make_cfg(run_dir, "model.init_std=1e30", "train.max_steps=10"))
    assert not (run_dir / "checkpoints" / "latest").exists()
    got = read_metrics(run_dir)
    assert [(m["step"], m["skipped"], m["skipped_steps"], m["grad_norm"]) for m in got] == [
        (1, True, 1, None), (2, True, 2, None), (3, True, 3, None)]
    assert "RANK" not in os.environ  # the made-up 1-process rendezvous is cleaned up


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_finite_loss_with_non_finite_gradients_is_not_applied(tmp_path, zero_stage):
    """model.init_std=1e30: the loss is finite (uniform logits) but the gradient norm is not (the
    case that used to be applied and saved at ZeRO-0, and skipped silently forever at ZeRO-2). No
    update is applied: the saved weights are the initial ones, bit for bit, both steps are counted
    as skipped and the learning-rate schedule did not advance."""
    from floe.config import PRESETS
    from floe.model import ArcticForCausalLM

    run_dir = tmp_path / "run"
    train(make_cfg(run_dir, "model.init_std=1e30", "train.max_steps=2", "train.max_skipped_steps=5",
                   f"parallel.zero_stage={zero_stage}"))
    got = read_metrics(run_dir)
    assert [m["loss"] is not None for m in got] == [True, True], got  # finite losses
    assert [(m["skipped"], m["skipped_steps"]) for m in got] == [(True, 1), (True, 2)]
    assert got[0]["lr"] == got[1]["lr"]
    init = ArcticForCausalLM(PRESETS["tiny"].replace(init_std=1e30))
    init.reset_parameters(seed=0)
    saved = _trained_weights(run_dir)
    for name, tensor in init.state_dict().items():
        assert torch.isfinite(saved[name]).all(), name
        assert torch.equal(saved[name], tensor), name


def test_divergence_mid_run_keeps_the_last_good_checkpoint(tmp_path):
    """optim.lr=1e4 diverges after a few good steps: the steps after it are skipped and the run
    stops naming the last checkpoint, which holds finite weights; resume would pick exactly it."""
    from floe.run import checkpoint
    from floe.run.trainer import NonFiniteTraining

    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteTraining) as err:
        train(make_cfg(run_dir, "optim.lr=1e4", "optim.warmup_ratio=0", "optim.grad_clip=0", "train.max_steps=40",
                       "train.save_every=1", "train.max_skipped_steps=2"))
    got = read_metrics(run_dir)
    skipped = [m["step"] for m in got if m["skipped"]]
    assert len(skipped) == 2 and skipped == [got[-2]["step"], got[-1]["step"]], got
    latest = checkpoint.latest_checkpoint(str(run_dir / "checkpoints"))
    assert latest is not None and latest in str(err.value)
    assert latest.endswith(f"step_{got[-3]['step']:08d}")  # the last applied step
    assert all(torch.isfinite(t).all() for t in _trained_weights(run_dir).values())


def test_triton_kernels_on_cpu_need_the_interpreter(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="train.kernels=triton"):
        train(make_cfg(tmp_path, "train.kernels=triton", "train.device=cpu"))
    assert not torch.distributed.is_initialized()


def test_tensorboard_gets_metrics_jsonls_scalars_and_drops_them_past_a_resume(tmp_path):
    """log.tensorboard=true: every numeric value of each metrics.jsonl record as a scalar at its step;
    a resume from step 2 replaces the later events, as it truncates metrics.jsonl."""
    from types import SimpleNamespace

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from floe.run.trainer import MetricsWriter

    c = SimpleNamespace(run_dir=str(tmp_path), wandb="disabled", wandb_project="floe", tensorboard=True)
    writer = MetricsWriter(c, {}, 0)
    for step in (1, 2, 3):
        writer.write({"step": step, "loss": 10.0 - step, "lr": 1e-3 * step, "note": "x", "skipped": False})
    writer.close()
    writer = MetricsWriter(c, {}, 2)  # resumed from the checkpoint at step 2
    writer.write({"step": 3, "loss": 0.5, "lr": 5e-3})
    writer.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["loss", "lr"]
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 9.0), (2, 8.0), (3, 0.5)]
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in logged] == [9.0, 8.0, 0.5]
    assert [round(e.value, 6) for e in events.Scalars("lr")] == [r["lr"] for r in logged]
