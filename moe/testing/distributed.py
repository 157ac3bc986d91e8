"""Run a function on N real processes (torch.distributed, gloo on CPU) and collect the results.

    results = run_distributed(fn, world_size=2, args=(...))   # fn(rank, world_size, *args)

Each rank is a fresh process (multiprocessing "spawn") with torchrun's environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT on a free port). The harness does
NOT create the process group: `fn` decides when (so a test can check that a bad launch
fails before any collective). `init_process_group_from_env()` is the usual first line.

Results come back through files (torch.save), so tensors are fine. If a rank raises, the
harness stops the others and raises DistributedError with every failing rank's
traceback. If ranks are still running at the deadline it names the stuck ranks, shows
where each one was (faulthandler dump), kills them, and raises TimeoutError.
"""
from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import socket
import tempfile
import time
import traceback
from datetime import timedelta

import torch



class DistributedError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group_from_env(backend: str = "gloo", timeout_s: float = 60.0) -> None:
    """The default process group from the harness's (torchrun-style) environment."""
    import torch.distributed as dist

    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))


def _child(fn, rank, world_size, port, args, kwargs, out_dir, deadline_wall, env):
    log_path = os.path.join(out_dir, f"rank{rank}.log")
    log = open(log_path, "w", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    os.environ.update({
        "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
    })
    os.environ.update(env)
    torch.set_num_threads(1)  # N ranks share a small CI machine
    # If this rank is still running near the deadline, write where it is stuck to its log.
    faulthandler.dump_traceback_later(max(0.5, deadline_wall - time.time() - 1.5), exit=False, file=log)
    try:
        result = fn(rank, world_size, *args, **kwargs)
        status = ("ok", result, time.time())
    except BaseException as e:  # noqa: BLE001 -- report everything to the parent
        status = ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}", time.time())
    finally:
        faulthandler.cancel_dump_traceback_later()
    try:
        import torch.distributed as dist

        if dist.is_initialized() and status[0] == "ok":
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass
    tmp = os.path.join(out_dir, f"rank{rank}.pt.tmp")
    try:
        torch.save(status, tmp)
    except Exception as e:  # noqa: BLE001 -- an unpicklable result is a test bug; say so
        torch.save(("error", f"result of rank {rank} could not be saved: {e!r}", time.time()), tmp)
    os.replace(tmp, os.path.join(out_dir, f"rank{rank}.pt"))
    log.flush()
    os._exit(0)  # skip interpreter teardown: fast, and no atexit hooks from DeepSpeed/gloo


def _tail(path: str, n: int = 4000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""


def run_distributed(fn, world_size: int = 2, args: tuple = (), kwargs: dict | None = None, *,
                    backend: str = "gloo", timeout: float = 120.0, env: dict | None = None) -> list:
    """Run fn(rank, world_size, *args, **kwargs) on world_size processes; return [result of rank r].

    `fn` must be importable (module level). `backend` is exported as FLOE_TEST_BACKEND for fn.
    """
    kwargs = kwargs or {}
    ctx = mp.get_context("spawn")
    port = free_port()
    env = {"FLOE_TEST_BACKEND": backend, **(env or {})}
    with tempfile.TemporaryDirectory(prefix="floe-dist-") as out_dir:
        procs = []
        deadline_wall = time.time() + timeout
        for rank in range(world_size):
            p = ctx.Process(target=_child, name=f"rank{rank}", daemon=True,
                            args=(fn, rank, world_size, port, args, kwargs, out_dir, deadline_wall, env))
            p.start()
            procs.append(p)
        deadline = time.monotonic() + timeout
        results: dict[int, tuple] = {}
        try:
            while len(results) < world_size:
                for rank, p in enumerate(procs):
                    path = os.path.join(out_dir, f"rank{rank}.pt")
                    if rank not in results and os.path.exists(path):
                        results[rank] = torch.load(path, weights_only=True)
                    elif rank not in results and not p.is_alive() and not os.path.exists(path):
                        time.sleep(0.2)  # the result file is written just before exit
                        if not os.path.exists(path):
                            results[rank] = ("error", f"rank {rank} died (exit code {p.exitcode}) without a "
                                             f"result; log:\n{_tail(os.path.join(out_dir, f'rank{rank}.log'))}",
                                             time.time())
                failed = [r for r, res in results.items() if res[0] == "error"]
                if failed:
                    # The others may be blocked in a collective with the failed rank: give them
                    # a moment to fail too (their errors are worth reporting), then stop them.
                    grace = time.monotonic() + 3.0
                    while time.monotonic() < grace and len(results) < world_size:
                        time.sleep(0.1)
                        for rank in range(world_size):
                            path = os.path.join(out_dir, f"rank{rank}.pt")
                            if rank not in results and os.path.exists(path):
                                results[rank] = torch.load(path, weights_only=True)
                    failed = sorted(r for r, res in results.items() if res[0] == "error")
                    first = min(failed, key=lambda r: results[r][2])  # the others often fail because of it
                    report = "\n".join(f"--- rank {r} ---\n{results[r][1]}" for r in failed)
                    raise DistributedError(f"rank(s) {failed} of {world_size} failed (first to fail: rank {first}):"
                                           f"\n{report}")
                if time.monotonic() > deadline:
                    stuck = [r for r in range(world_size) if r not in results]
                    time.sleep(1.0)  # let the faulthandler dumps reach the logs
                    where = "\n".join(f"--- rank {r} log (stack dump at the deadline) ---\n"
                                      f"{_tail(os.path.join(out_dir, f'rank{r}.log'))}" for r in stuck)
                    raise TimeoutError(f"rank(s) {stuck} of {world_size} still running after {timeout:.0f}s "
                                       f"(finished: {sorted(results)})\n{where}")
                time.sleep(0.05)
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
                    p.join(timeout=5)
        return [results[r][1] for r in range(world_size)]
