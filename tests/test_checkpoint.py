"""floe's checkpoint format (moe/run/checkpoint.py): nothing in a checkpoint can run code, `latest`
cannot leave the run's checkpoints, a poisoned state is never written, and a checkpoint resumes
under another layout (process count, ep_size, ZeRO stage) onto the uninterrupted run's losses."""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil

import pytest
import torch

from floe.run import checkpoint
from floe.testing.distributed import run_distributed
from tests.test_parallel_train import checkpoint_params

TINY = ["model=tiny", "model.capacity_factor=null", "train.global_batch_size=8", "train.micro_batch_size=2",
        "data.num_examples=400", "data.seq_len=64", "log.wandb=disabled", "run.name=test", "train.keep_last=0"]


def _compose(run_dir, overrides):
    from hydra import compose, initialize_config_dir

    from launch.train import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose("config", overrides=[f"run.dir={run_dir}", *TINY, *overrides])


def _train_worker(rank, world_size, run_dir, overrides):
    from launch.train import train

    return train(_compose(run_dir, overrides))


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ---- `latest` ---------------------------------------------------------------------------------------

def test_latest_may_not_leave_the_checkpoints_dir(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "step_00000002").mkdir()
    elsewhere = tmp_path / "elsewhere" / "step_00000009"
    elsewhere.mkdir(parents=True)
    (ckpt / "latest").write_text("step_00000002")
    assert checkpoint.latest_checkpoint(str(ckpt)) == str(ckpt / "step_00000002")
    for bad in ("../../elsewhere/step_00000009", str(elsewhere), "step_00000002/../../../elsewhere/step_00000009",
                "..", ""):
        (ckpt / "latest").write_text(bad)
        with pytest.raises(ValueError, match="latest"):
            checkpoint.latest_checkpoint(str(ckpt))
    os.symlink(elsewhere, ckpt / "step_00000009")  # a well-named link that leads out
    (ckpt / "latest").write_text("step_00000009")
    with pytest.raises(ValueError, match="link leading out"):
        checkpoint.latest_checkpoint(str(ckpt))


def test_dense_writers_spread_the_bytes():
    sizes = {"embed": 100, "head": 100, "a": 10, "b": 10, "c": 5}
    owner = checkpoint.dense_writers(sizes, 2)
    load = [sum(s for n, s in sizes.items() if owner[n] == r) for r in range(2)]
    assert sorted(load) == [110, 115] and owner["embed"] != owner["head"]
    assert set(checkpoint.dense_writers(sizes, 1).values()) == {0}


# ---- planted pickles --------------------------------------------------------------------------------

class _Payload:
    """Unpickling this creates `marker` (as a malicious checkpoint file would run any code)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _build_engine(c):
    from floe.model import ArcticForCausalLM
    from floe.parallel import build_engine

    with torch.device("meta"):
        model = ArcticForCausalLM(c.model)
    return build_engine(model, c.parallel, c.optim, seed=c.train.seed, device=torch.device("cpu"),
                        global_batch_size=c.train.global_batch_size, micro_batch_size=c.train.micro_batch_size,
                        total_steps=c.train.max_steps)


@contextlib.contextmanager
def _engine_after_training(rank, world_size, run_dir):
    """Train 2 steps at ZeRO-2 into run_dir, then yield a fresh engine of the same config (in a
    process group that is torn down afterwards)."""
    from launch.train import parse_config
    from floe.parallel import init_distributed, teardown

    overrides = ["parallel.zero_stage=2", "train.max_steps=2"]
    _train_worker(rank, world_size, run_dir, overrides)
    c = parse_config(_compose(run_dir, overrides))
    init_distributed(torch.device("cpu"))
    try:
        yield _build_engine(c)
    finally:
        teardown()


def _planted_worker(rank, world_size, run_dir, work_dir, marker):
    """Train 2 steps (ZeRO-2), then load copies of the checkpoint with one file replaced by a pickle
    payload each (plus DeepSpeed-named and .pt files added). Returns {file: outcome}."""
    with _engine_after_training(rank, world_size, run_dir) as engine:
        src = os.path.join(run_dir, "checkpoints", "step_00000002")
        files = sorted(os.path.relpath(os.path.join(d, f), src) for d, _, fs in os.walk(src) for f in fs)
        payload = pickle.dumps(_Payload(marker))
        outcomes = {}
        extra = ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "rng_rank0.pt",
                 "model/expert_00000.pt"]
        for target in files + ["<extra files>"]:
            dst = os.path.join(work_dir, "ckpt")
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst)
            for name in ([target] if target != "<extra files>" else extra):
                with open(os.path.join(dst, name), "wb") as f:
                    f.write(payload)
            try:
                checkpoint.load(engine, dst)
                outcomes[target] = "loaded"
            except ValueError as e:
                outcomes[target] = f"ValueError: {e}"
            assert not os.path.exists(marker), f"the payload in {target} ran"
        return {"files": files, "outcomes": outcomes}


def test_planted_pickle_in_any_checkpoint_file_never_runs(tmp_path):
    marker = str(tmp_path / "PWNED")
    result, = run_distributed(_planted_worker, 1, args=(str(tmp_path / "run"), str(tmp_path / "work"), marker),
                              timeout=240)
    files, outcomes = result["files"], result["outcomes"]
    # The checkpoint really has every kind of file: JSON state, RNG, weights and optimizer state.
    assert {"floe.json", "state.json", "rng/rank_00000.json", "model/dense_rank_00000.safetensors",
            "optim/dense_rank_00000.safetensors", "model/expert_00007.safetensors",
            "optim/expert_00007.safetensors"} <= set(files)
    assert not os.path.exists(marker)
    for name in files:  # every file floe reads rejects a pickle with a clear error naming it
        assert outcomes[name].startswith("ValueError") and name.split("/")[-1] in outcomes[name], (name, outcomes)
    assert outcomes["<extra files>"] == "loaded"  # DeepSpeed's names and .pt files are never opened


def test_non_finite_state_is_never_saved(tmp_path):
    """A NaN in the weights after training: the save refuses, names the tensor and the last good
    checkpoint, and `latest` keeps naming it."""
    result, = run_distributed(_nan_save_worker, 1, args=(str(tmp_path / "run"),), timeout=180)
    assert "refusing to write checkpoint step_00000003" in result and "layers.0.attn.q_proj.weight" in result
    assert "step_00000002" in result
    ckpt = tmp_path / "run" / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_00000002"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_00000002"]


def _nan_save_worker(rank, world_size, run_dir):
    with _engine_after_training(rank, world_size, run_dir) as engine:
        ckpt_dir = os.path.join(run_dir, "checkpoints")
        checkpoint.load(engine, checkpoint.latest_checkpoint(ckpt_dir))
        with torch.no_grad():
            engine.model.layers[0].attn.q_proj.weight[3, 5] = float("nan")
        try:
            checkpoint.save(engine, ckpt_dir, 3, {"step": 3})
        except FloatingPointError as e:
            return str(e)
        return "saved"


# ---- RNG state ----------------------------------------------------------------------------------------

def _draws():
    import random

    import numpy as np

    return [random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(3).tolist(),
            torch.rand(3).tolist(), torch.randint(0, 1 << 30, (2,)).tolist()]


def _rng_worker(rank, world_size, run_dir):
    """Save a checkpoint with python's, numpy's and torch's generators mid-stream (a Gaussian pair half
    used in each), draw, scramble every generator, load: the same draws again."""
    import random

    import numpy as np

    with _engine_after_training(rank, world_size, run_dir) as engine:
        ckpt_dir = os.path.join(run_dir, "checkpoints")
        checkpoint.load(engine, checkpoint.latest_checkpoint(ckpt_dir))
        random.seed(11), np.random.seed(12), torch.manual_seed(13)
        random.gauss(0, 1), np.random.randn(1), torch.randn(5)  # leave cached Gaussians behind
        path = checkpoint.save(engine, ckpt_dir, 3, {"step": 3})
        expected = _draws()
        random.seed(0), np.random.seed(0), torch.manual_seed(0)
        scrambled = _draws()
        checkpoint.load(engine, path)
        return {"expected": expected, "scrambled": scrambled, "after_load": _draws()}


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    result, = run_distributed(_rng_worker, 1, args=(str(tmp_path / "run"),), timeout=240)
    assert result["after_load"] == result["expected"]
    assert all(a != b for a, b in zip(result["scrambled"], result["expected"]))  # each generator was moved


# ---- resume under another layout --------------------------------------------------------------------

STEPS, SAVED = 4, 2
LAYOUT_A = (2, ["parallel.ep_size=2", "parallel.zero_stage=2"])  # 2 procs, ep 2, ZeRO-2
LAYOUT_C = (1, ["parallel.zero_stage=0"])  # 1 proc, ZeRO-0


def _run(run_dir, layout, extra=()):
    procs, overrides = layout
    run_distributed(_train_worker, procs, args=(run_dir, [*overrides, f"train.max_steps={STEPS}",
                                                          f"train.save_every={SAVED}", *extra]), timeout=180)
    return run_dir


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    base = tmp_path_factory.mktemp("uninterrupted")
    return {"A": _run(str(base / "A"), LAYOUT_A), "C": _run(str(base / "C"), LAYOUT_C)}


CHANGES = [  # (from, to procs, to overrides)
    ("A", 1, ["parallel.zero_stage=2"]),
    ("A", 1, ["parallel.zero_stage=0"]),
    ("C", 2, ["parallel.ep_size=2", "parallel.zero_stage=2"]),
    ("A", 2, ["parallel.ep_size=1", "parallel.zero_stage=2"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("source,procs,overrides", CHANGES,
                         ids=["2p-ep2-z2_to_1p-z2", "2p-ep2-z2_to_1p-z0", "1p-z0_to_2p-ep2-z2", "2p-ep2_to_2p-ep1"])
def test_resume_under_another_layout(tmp_path, uninterrupted, source, procs, overrides):
    straight = uninterrupted[source]
    resumed = str(tmp_path / "resumed")
    shutil.copytree(straight, resumed)
    ckpt = os.path.join(resumed, "checkpoints")
    shutil.rmtree(os.path.join(ckpt, f"step_{STEPS:08d}"))
    with open(os.path.join(ckpt, "latest"), "w") as f:
        f.write(f"step_{SAVED:08d}")
    _run(resumed, (procs, overrides))
    a, b = _metrics(straight), _metrics(resumed)
    assert [m["step"] for m in b] == list(range(1, STEPS + 1))
    assert b[:SAVED] == a[:SAVED]  # kept from before the resume
    for ma, mb in zip(a[SAVED:], b[SAVED:]):  # the steps after it: the uninterrupted run's, at fp32 tolerance
        assert mb["loss"] == pytest.approx(ma["loss"], rel=1e-5, abs=1e-6), (ma, mb)
        assert mb["grad_norm"] == pytest.approx(ma["grad_norm"], rel=1e-4), (ma, mb)
        assert mb["lr"] == pytest.approx(ma["lr"], rel=1e-12), (ma, mb)
    for kind in ("model", "optim"):  # and the final state, every tensor by name
        got, ref = checkpoint_params(resumed, STEPS, kind), checkpoint_params(straight, STEPS, kind)
        assert set(got) == set(ref) and ref
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=2e-5, msg=lambda m: f"{name}: {m}")


# ---- every file of a checkpoint is checked before use (issue 24's tampered checkpoints) ----------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A run dir with a 2-step checkpoint (trained once for the tests below, which copy it)."""
    from launch.train import train

    run_dir = tmp_path_factory.mktemp("saved") / "run"
    train(_compose(run_dir, ["train.max_steps=2"]))
    return run_dir


def _tampered(saved, tmp_path, edit_state=None):
    run_dir = tmp_path / "run"
    shutil.copytree(saved, run_dir)
    path = run_dir / "checkpoints" / "step_00000002"
    if edit_state is not None:
        state = json.loads((path / "state.json").read_text())
        edit_state(state)
        (path / "state.json").write_text(json.dumps(state))
    return run_dir, path


@pytest.mark.parametrize("edit,named", [
    (lambda s: s["client"].update(step=-7), "field client.step must be a non-negative integer, got -7"),
    (lambda s: s.update(step=99), "field step is 99, but the checkpoint directory is step_00000002"),
    (lambda s: s["client"].update(step=99), "field client.step is 99, but the checkpoint directory is step_00000002"),
    (lambda s: s.update(adam_step=2.5), "field adam_step must be a non-negative integer, got 2.5"),
    (lambda s: s.update(global_steps="2"), "field global_steps must be a non-negative integer, got '2'"),
    (lambda s: s["client"]["loader"].update(step=True), "field client.loader.step must be a non-negative integer"),
    (lambda s: s["client"].update(loader=[3]), "field client.loader must be a non-negative integer, got [3]"),
    (lambda s: s.pop("client"), "not a floe checkpoint state"),
])
def test_malformed_state_is_one_message_naming_file_and_field(saved, tmp_path, edit, named):
    _, path = _tampered(saved, tmp_path, edit)
    with pytest.raises(ValueError) as err:
        checkpoint.read_state(str(path))
    assert str(err.value).startswith(f"{path / 'state.json'}: ") and named in str(err.value), str(err.value)


def test_a_tampered_counter_refuses_the_resume_before_the_data_is_built(saved, tmp_path, monkeypatch):
    """client.step=-7 trained steps -6..4 and wrote checkpoints/step_-0000002; now a ConfigError (exit 2)."""
    import floe.run.entry
    from floe.run.context import CheckpointError
    from launch.train import train

    def no_data(*args, **kwargs):
        raise AssertionError("the data was built before the checkpoint was checked")

    run_dir, path = _tampered(saved, tmp_path, lambda s: s["client"].update(step=-7))
    monkeypatch.setattr(floe.run.entry, "build_dataset", no_data)
    with pytest.raises(CheckpointError, match=r"cannot resume: .*state.json: field client.step"):
        train(_compose(run_dir, ["train.max_steps=4", "train.allow_schedule_change=true"]))


def test_state_files_that_are_not_objects(saved, tmp_path):
    _, path = _tampered(saved, tmp_path)
    (path / "state.json").write_text("[]")
    with pytest.raises(ValueError, match="state.json: not a floe checkpoint state"):
        checkpoint.read_state(str(path))
    (path / "floe.json").write_text('"floe"')
    with pytest.raises(ValueError, match="floe.json: not a floe checkpoint"):
        checkpoint.read_meta(str(path))


def _tiny_model(run_dir):
    from floe.model import ArcticForCausalLM
    from launch.train import parse_config

    return ArcticForCausalLM(parse_config(_compose(run_dir, [])).model)


def test_a_changed_dtype_is_refused_not_cast(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    run_dir, path = _tampered(saved, tmp_path)
    file = path / "model" / "dense_rank_00000.safetensors"
    tensors = load_file(file)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].to(torch.int32)  # F32 -> I32: was cast silently and moved the loss
    save_file(tensors, file)
    with pytest.raises(ValueError, match=rf"{name}: dtype torch.int32 in the checkpoint"):
        checkpoint.load_weights(_tiny_model(run_dir), str(path))


def test_symlinks_are_refused(saved, tmp_path):
    run_dir, path = _tampered(saved, tmp_path)
    outside = tmp_path / "outside"
    shutil.copytree(run_dir / "checkpoints", outside)
    latest = run_dir / "checkpoints" / "latest"
    latest.unlink()
    latest.symlink_to(outside / "latest")  # `latest` itself a link out of checkpoints/
    with pytest.raises(ValueError, match="latest is a symlink"):
        checkpoint.latest_checkpoint(str(run_dir / "checkpoints"))
    tensor = path / "model" / "dense_rank_00000.safetensors"
    tensor.unlink()
    tensor.symlink_to(outside / "step_00000002" / "model" / "dense_rank_00000.safetensors")  # a tensor file
    with pytest.raises(ValueError, match="a link leading to .*outside the checkpoint; refusing to read it"):
        checkpoint.load_weights(_tiny_model(run_dir), str(path))
