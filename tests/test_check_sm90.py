"""tools/check_sm90.py: the Triton expert kernels compiled for Hopper (sm_90a) on a CPU.

Runs the tool in a fresh process (it must import Triton without TRITON_INTERPRET, which
tests/test_kernels.py sets) at the Arctic expert-parallel shape, on the TMA path the kernels
take on Hopper, compiling only the configs the autotuner may pick, with an empty Triton cache
(so nothing from an earlier run is reused). It fails if any of those configs cannot launch
(shared memory over 227 KiB, registers over the file) or spills anywhere, main loop or
epilogue. The tool's spill parsing is checked on its records against a second reading: the
LDL/STL instructions in the SASS it disassembles against ptxas's `-v` spill bytes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITES = {"mm.fwd", "mm.dX", "mm.dW", "swiglu.fwd.gate_up", "swiglu.fwd.down", "swiglu.bwd.dH",
         "swiglu.bwd.gate_up", "swiglu.bwd.dX", "swiglu.bwd.dW2", "swiglu.bwd.dW13"}
ROW_TILED = {"_grouped_mm_kernel", "_swiglu_gate_up_kernel"}  # the kernels that read weights through TMA


def _ptxas_present() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return os.path.exists(get_ptxas(90).path)
    except Exception:  # noqa: BLE001  (no NVIDIA backend in this Triton build)
        return False


def _env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return {**env, "PYTHONPATH": REPO, "TRITON_CACHE_DIR": str(tmp_path / "triton_cache")}


needs_ptxas = pytest.mark.skipif(not _ptxas_present(), reason="Triton's NVIDIA backend (ptxas) is not installed")


@needs_ptxas
def test_any_spill_of_a_pickable_config_is_a_failure(tmp_path):
    """problem() rejects an epilogue-only spill (no LDL/STL in the main loop) as well as a
    main-loop spill or a config that cannot launch; configs the autotuner cannot pick pass."""
    code = (
        "import json, sys; sys.path.insert(0, 'tools'); import check_sm90 as c\n"
        "ok = dict(may_pick=True, launchable=True, spill_bytes=dict(stores=0, loads=0), spill_instrs=0,"
        " main_loop_spills=0)\n"
        "cases = [ok, {**ok, 'spill_bytes': dict(stores=48, loads=48), 'spill_instrs': 22},"
        " {**ok, 'spill_bytes': dict(stores=4, loads=4), 'spill_instrs': 2, 'main_loop_spills': 2},"
        " {**ok, 'launchable': False}, {**ok, 'may_pick': False, 'launchable': False, 'spill_instrs': 9}]\n"
        "print(json.dumps([c.problem(r) for r in cases]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(tmp_path), capture_output=True,
                          text=True, timeout=300, check=True)
    verdicts = json.loads(proc.stdout)
    assert verdicts[0] is None and verdicts[4] is None
    assert "spills 48/48" in verdicts[1] and "0 in the main loop" in verdicts[1]
    assert "2 in the main loop" in verdicts[2]
    assert verdicts[3] == "cannot launch"


@pytest.mark.slow
@needs_ptxas
def test_every_pickable_config_launches_without_spills(tmp_path):
    proc = subprocess.run(
        [sys.executable, "tools/check_sm90.py", "--shapes", "arctic_ep8", "--only-may-pick", "--json"],
        cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=900, check=False,
    )
    records = json.loads(proc.stdout)
    assert {r["site"] for r in records} == SITES
    for r in records:
        assert set(r) >= {"kernel", "shape", "config", "regs", "spill_bytes", "smem_bytes", "launchable", "may_pick"}
        assert r["may_pick"]
        where = f"{r['site']} {r['config']}"
        assert r["smem_bytes"] <= 227 * 1024, f"{where}: {r['smem_bytes']} bytes of shared memory"
        assert r["launchable"], where
        assert r["spill_bytes"] == {"stores": 0, "loads": 0}, f"{where}: spills {r['spill_bytes']}"
        # A second reading of the same fact: no LDL/STL anywhere in the SASS.
        assert r["spill_instrs"] == 0 and r["main_loop_spills"] == 0, where
        assert r["wgmma"], f"{where}: bf16 tiles should compile to wgmma on sm_90a"
        assert r["tma"] == (r["kernel"] in ROW_TILED), f"{where}: weights via TMA (UTMALDG) exactly in {ROW_TILED}"
    assert proc.returncode == 0, proc.stderr[-3000:]
