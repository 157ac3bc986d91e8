"""The process group's life cycle: join torchrun's group (or make one of one), tear it down, and the
fake group the memory plan runs in; with the DeepSpeed version check and the comm-layer set-up that
every group needs. Private DeepSpeed state touched here says why and the version it was checked on."""
from __future__ import annotations

import contextlib
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from floe.parallel.groups import default_backend

TESTED_DEEPSPEED = ("0.19.8", "0.20")  # [lowest tested, first untested): setup.py pins the same range


def check_deepspeed_version(version: str | None = None) -> None:
    """Raise ImportError unless the installed DeepSpeed is in the tested range."""
    from packaging.version import Version

    low, high = TESTED_DEEPSPEED
    pin = f"deepspeed>={low},<{high}"
    if version is None:
        try:
            import deepspeed
        except ImportError as e:
            raise ImportError(f"floe needs {pin} for ZeRO and expert parallelism: pip install '{pin}' ({e})") from None
        version = deepspeed.__version__
    if not Version(low) <= Version(version) < Version(high):
        raise ImportError(f"deepspeed {version} is outside the range floe was tested with ({pin}): floe relies on "
                          f"how that range reduces expert gradients and names its groups. pip install '{pin}'")


def skip_shm_comm_build() -> None:
    """Keep DeepSpeed's comm layer from JIT-compiling its shared-memory all-reduce.

    On a CPU, every DeepSpeed TorchBackend (deepspeed.init_distributed) builds the C++ op
    `deepspeed_shm_comm` with ninja into ~/.cache/torch_extensions. DeepSpeed uses it only under
    its own launcher (it needs LOCAL_SIZE == world size; torchrun does not set LOCAL_SIZE), so under
    floe it is built and never used. The build costs about a minute of CPU and prints compiler
    output, and torch's build lock (a file in that cache) left behind by a process killed mid-build
    makes every later process on the machine wait for it forever: the hang that timed out CI.
    Private DeepSpeed state (checked on 0.19.8): comm/torch.py's build_shm_op returns None when
    the op is marked incompatible in deepspeed.ops.__compatible_ops__, and it is that dict's only
    reader. The dict is filled lazily by a probe that compiles test programs (printing linker
    errors such as "cannot find -laio"); when nothing has probed yet, floe installs the one entry
    it needs instead of running the probe.
    """
    import deepspeed.ops

    probed = vars(deepspeed.ops).get("__compatible_ops__")
    if probed is None:
        vars(deepspeed.ops)["__compatible_ops__"] = {"deepspeed_shm_comm": False}
    else:
        probed["deepspeed_shm_comm"] = False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def patched_environ(env: dict[str, str]):
    """os.environ with `env` set for the body; each of its keys restored (or removed) afterwards."""
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def single_process_env() -> dict[str, str]:
    """The rendezvous environment of a group of one (a plain `python` launch, no torchrun): rank 0 of
    1 on a free local port. floe.run.context sets it for a run and restores the environment after."""
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port())}


def init_distributed(device: torch.device, timeout_s: float = 600.0) -> bool:
    """Join torchrun's process group (env://), or make a group of one for a plain `python`
    launch, and let DeepSpeed's comm layer wrap it. Returns True if this call created it."""
    import deepspeed

    created = not dist.is_initialized()
    if created:
        if "RANK" not in os.environ:  # a tool's plain `python` launch (a run sets it: floe.run.context)
            os.environ.update(single_process_env())
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=default_backend(device), timeout=timedelta(seconds=timeout_s))
    skip_shm_comm_build()
    deepspeed.init_distributed(dist_backend=dist.get_backend(), timeout=timedelta(seconds=timeout_s))
    return created


def teardown() -> None:
    """Destroy the default process group and forget DeepSpeed's cached groups, so that the
    same process can initialise again (tests do)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    # Private DeepSpeed state (checked on 0.19.8): deepspeed.utils.groups caches process-group
    # handles in module globals and has no reset; after the default group is destroyed they are
    # stale, and a second init would reuse them.
    from deepspeed.utils import groups

    for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                 "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP"):
        getattr(groups, name).clear()
    for name in ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP",
                 "_MODEL_PARALLEL_GROUP", "_TENSOR_MODEL_PARALLEL_GROUP"):
        setattr(groups, name, None)


@contextlib.contextmanager
def fake_process_group(world_size: int, rank: int):
    """torch.distributed's fake process group of `world_size` ranks, seen from `rank` (for the
    memory plan's dry run of one rank of a large layout): groups can be created and collectives
    called, nothing moves. DeepSpeed's comm layer wraps it, as init_distributed does."""
    import deepspeed
    import deepspeed.comm.comm as ds_comm
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group already exists in this process; run the estimate alone")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        skip_shm_comm_build()
        deepspeed.init_distributed(dist_backend="fake")
        yield
    finally:
        teardown()
        # Private DeepSpeed state (checked on 0.19.8): the comm layer keeps its backend object
        # for the fake group; a later real init_distributed must make a fresh one.
        ds_comm.cdb = None
