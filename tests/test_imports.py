"""floe's import names coexist with the libraries its users run beside it (issue 18).

floe installs one import root, `floe`. `kernels` is Hugging Face's kernel hub (transformers 5.x
imports it) and `moe` an unrelated project on the package index: floe must shadow neither, from the
repository root (what `python -m pytest` and `python -c` put on sys.path) or from anywhere else.
Each check runs in a fresh interpreter, so nothing this test process imported can hide a clash.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_ROOTS = (os.path.join(REPO, "moe"), os.path.join(REPO, "kernels", "floe_kernels"))


def run_python(code: str, cwd: str, timeout: int = 240) -> str:
    """Run `code` with `python -c` in `cwd` (which `-c` puts first on sys.path); return stdout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FLOE_KERNELS")}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode} in {cwd}:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_floe_installs_one_import_root():
    """The distribution's top-level names are exactly {'floe'}, and no other distribution claims it."""
    dist = importlib.metadata.distribution("floe")
    top_level = (dist.read_text("top_level.txt") or "").split()
    owners = importlib.metadata.packages_distributions()
    assert set(top_level) <= {"floe"}, top_level
    assert set(owners.get("floe", [])) == {"floe"}, owners.get("floe")
    assert "floe" not in owners.get("kernels", []) and "floe" not in owners.get("moe", [])
    # Neither top-level directory is a package a bare `import kernels` / `import moe` could pick up.
    assert not os.path.exists(os.path.join(REPO, "kernels", "__init__.py"))


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is a dev dependency")
def test_transformers_mixtral_runs_from_the_repository_root():
    """With the repository root first on sys.path, transformers' own MoE model builds and runs, and
    `kernels` is Hugging Face's package when it is installed (the clash that broke both)."""
    out = run_python("""
        import torch, kernels, floe.kernels
        from transformers import MixtralConfig, MixtralForCausalLM
        cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, num_local_experts=4)
        logits = MixtralForCausalLM(cfg)(torch.tensor([[1, 2, 3, 4]])).logits
        assert logits.shape == (1, 4, 64) and torch.isfinite(logits).all()
        print("kernels", getattr(kernels, "__file__", None))
        print("floe.kernels", floe.kernels.__file__)
    """, cwd=REPO)
    files = dict(line.split(" ", 1) for line in out.strip().splitlines())
    assert files["floe.kernels"].startswith(os.path.join(REPO, "kernels", "floe_kernels"))
    assert not files["kernels"].startswith(os.path.join(REPO, "kernels") + os.sep), files["kernels"]  # never floe's
    hf_owners = importlib.metadata.packages_distributions().get("kernels", [])
    if hf_owners:  # Hugging Face's kernel hub is installed (transformers 5.x requires it): it is that package
        hf_init = importlib.metadata.distribution(hf_owners[0]).locate_file("kernels/__init__.py")
        assert os.path.samefile(files["kernels"], hf_init), (files["kernels"], hf_init)


def test_a_script_elsewhere_trains_a_step(tmp_path):
    """From a temporary directory (the repository nowhere on sys.path), a user's script imports floe's
    model and kernels, trains a step, and every floe module it loaded is one of floe's files."""
    out = run_python(f"""
        import sys, torch
        from floe import kernels
        from floe.config import PRESETS
        from floe.model import ArcticForCausalLM, apply_kernel_backend
        assert {REPO!r} not in sys.path, sys.path
        torch.manual_seed(0)
        model = apply_kernel_backend(ArcticForCausalLM(PRESETS["tiny"]), "reference")
        model.reset_parameters(seed=0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        ids = torch.randint(0, PRESETS["tiny"].vocab_size, (2, 16))
        losses = []
        for _ in range(2):
            out = model(ids, labels=ids)
            (out.loss + out.aux_loss).backward()
            opt.step(); opt.zero_grad()
            losses.append(float(out.loss))
        assert losses[1] < losses[0], losses
        y = kernels.grouped_mm(torch.randn(3, 4), torch.randn(2, 4, 5), torch.tensor([1, 2]))
        assert y.shape == (3, 5)
        for name, mod in sorted(sys.modules.items()):
            if name == "floe" or name.startswith("floe."):
                print(name, getattr(mod, "__file__", None))
    """, cwd=str(tmp_path))
    modules = dict(line.split(" ", 1) for line in out.strip().splitlines())
    assert {"floe.model", "floe.layer", "floe.kernels", "floe.kernels.reference"} <= set(modules)
    for name, path in modules.items():
        assert path != "None" and path.startswith(SOURCE_ROOTS), f"{name} resolved to {path}"


def test_every_floe_module_resolves_to_floe_files_from_the_root():
    """Importing every module of the floe package from the repository root loads floe's own files."""
    out = run_python("""
        import importlib, pkgutil, floe, floe.kernels
        # floe.kernels lives outside floe's directory (setup.py's package_dir), so it is walked too
        for package in (floe, floe.kernels):
            for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
                mod = importlib.import_module(info.name)
                print(info.name, mod.__file__)
    """, cwd=REPO)
    modules = dict(line.split(" ", 1) for line in out.strip().splitlines())
    assert len(modules) > 30 and {"floe.run.trainer", "floe.parallel.engine", "floe.kernels.ops"} <= set(modules)
    for name, path in modules.items():
        assert path.startswith(SOURCE_ROOTS), f"{name} resolved to {path}"
