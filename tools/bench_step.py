"""Benchmark: the whole training step of launch/train.py, phase by phase, against a naive Arctic.

    python tools/bench_step.py                                    # 128 and 16 experts, ZeRO-0 and ZeRO-2
    python tools/bench_step.py --experts 128 --zero 0 --steps 6 --profile
    python tools/bench_step.py --procs 2 --experts 128 --zero 2   # 2 ranks, ep_size 2, ZeRO-2
    python tools/bench_step.py --experts 128 --zero 0 --lora 8 --no-naive --no-floor   # LoRA rank 8 (lora=default)

Each configuration reports the process's peak resident memory (VmHWM on a CPU, the allocator's peak on
CUDA), on a CPU also that peak less the process's resident set before the run is built (what the run
itself added; the interpreter and the imported libraries hold ~0.2 GiB before it), and the bytes of weights,
gradients and optimizer state after its last step; run one configuration
per process (--no-floor, --no-naive) to compare the peaks of two runs, e.g. full fine-tuning vs --lora.

The launcher side is the real thing: the config is composed by Hydra from conf/ exactly as
`python launch/train.py <overrides>` composes it, and floe.run.trainer.Trainer (DeepSpeed's engine
included) runs `train_step`, `log` and `maybe_save` as `Trainer.fit` does. Its methods, the
engine's and the optimizer's are wrapped by timers (exclusive time: a phase's children are
not counted twice), giving the breakdown

    data       loader (host)                  forward    the model's forward
    backward   autograd (hooks included)      reduce     DeepSpeed's gradient all-reduce / ZeRO buckets
    norm/clip  the global gradient norm       optimizer  the torch optimizer's step
    engine     DeepSpeed's step bookkeeping    metrics    the logged sums, the one host sync
    logging    metrics.jsonl/progress bar      checkpoint one save (timed once, not per step)

Against two references, alternating step by step with the launcher (so the machine's load hits
all alike; medians are reported):
  floor: floe's bare model, forward+backward of the same micro-batches (no optimizer), in the
         launcher's process;
  naive: a Hugging Face Arctic-style model (floe.testing.arctic_reference, with its MoE replaced by
         Arctic's own sparse loop over experts: for each expert, gather its tokens, SwiGLU,
         index_add back, as modeling_arctic.py's ArcticMoE does) + plain torch.optim.AdamW,
         the same shape, batch and fp32, in a process of its own with glibc's default allocator
         as a plain script has it (--naive-allocator retain gives it floe's CPU setting instead).
`overhead` is the share of the launcher's step spent outside the model's forward+backward.
With --procs 2 every rank runs the launcher (ep_size 2) and its own floor; no naive reference.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn as nn
import torch.nn.functional as F

PHASES = ("data", "forward", "backward", "reduce", "norm/clip", "optimizer", "engine", "metrics", "logging", "other")


def overrides(args, experts: int, zero: int, procs: int) -> list[str]:
    """The launch/train.py command line of the benchmarked run."""
    return [f"model.vocab_size={args.vocab}", f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}",
            f"model.num_heads={args.heads}", f"model.num_kv_heads={args.kv_heads}", f"model.dense_ffn={args.hidden}",
            f"model.expert_ffn={args.expert_ffn}", f"model.num_experts={experts}", "model.top_k=2",
            "model.capacity_factor=null", f"data.seq_len={args.seq_len}", f"model.max_seq_len={args.seq_len}",
            f"train.global_batch_size={args.batch * procs}", f"train.micro_batch_size={args.micro_batch}",
            "train.max_steps=1000", "train.device=cpu" if args.cpu else "train.device=auto",
            f"parallel.ep_size={procs}", f"parallel.zero_stage={zero}", "log.wandb=disabled",
            *(["lora=default", f"lora.rank={args.lora}"] if args.lora else []), *args.override]


# ----------------------------------------------------------------------------- the naive reference


class ArcticSparseMoE(nn.Module):
    """Arctic's MoE as modeling_arctic.py runs it (the Mixtral loop): per expert, the tokens routed
    to it are gathered, run through its SwiGLU, weighted and index_add-ed back."""

    def __init__(self, hidden: int, width: int, num_experts: int, top_k: int):
        super().__init__()
        from floe.testing.arctic_reference import SwiGLU

        self.top_k, self.num_experts = top_k, num_experts
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(hidden, width) for _ in range(num_experts))

    def forward(self, x):  # x: (B, S, D)
        b, s, d = x.shape
        x = x.view(-1, d)
        logits = self.gate(x)
        probs = F.softmax(logits, dim=1, dtype=torch.float)
        weights, selected = torch.topk(probs, self.top_k, dim=-1)
        if self.top_k > 1:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        mask = F.one_hot(selected, num_classes=self.num_experts).permute(2, 1, 0)  # (E, k, T)
        for e, expert in enumerate(self.experts):
            idx, top_x = torch.where(mask[e])
            if top_x.shape[0] == 0:
                continue
            top_x_list, idx_list = top_x.tolist(), idx.tolist()
            y = expert(x[None, top_x_list].reshape(-1, d)) * weights[top_x_list, idx_list, None]
            out.index_add_(0, top_x, y.to(x.dtype))
        # Mixtral/Arctic-style balance loss (fraction routed x mean probability), coefficient 0.01
        routed = F.one_hot(selected, self.num_experts).float().mean(dim=(0, 1))
        self.aux = self.num_experts * (routed * probs.mean(0)).sum()
        return out.view(b, s, d)


def build_naive(args, experts: int, seed: int = 0):
    from floe.testing.arctic_reference import ArcticReference, tiny_arctic_config

    c = tiny_arctic_config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.expert_ffn,
                           num_hidden_layers=args.layers, num_attention_heads=args.heads,
                           num_key_value_heads=args.kv_heads, num_local_experts=experts,
                           max_position_embeddings=args.seq_len)
    model = ArcticReference(c)
    for layer in model.model.layers:
        layer.block_sparse_moe = ArcticSparseMoE(args.hidden, args.expert_ffn, experts, 2)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    return model


class NaiveProcess:
    """The naive reference in a process of its own, as a user's plain script runs: glibc's default
    allocator unless told otherwise (the launcher's process runs with train.host_allocator), the
    same torch threads. Stepped in lock-step with the launcher, so the machine's load hits both alike."""

    def __init__(self, args, experts: int, batch: dict, device: torch.device):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_naive_worker, args=(child, args, experts, batch, str(device)), daemon=True)
        self.proc.start()
        child.close()
        self.conn.recv()  # built

    def step(self) -> tuple[float, int]:
        """One naive training step: (seconds, minor page faults)."""
        self.conn.send("step")
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send("stop")
        self.proc.join()


def _naive_worker(conn, args, experts: int, batch: dict, device: str) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.naive_allocator == "retain":
        from floe.run.host_allocator import retain_freed_memory

        retain_freed_memory()
    device = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    model = build_naive(args, experts).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    batch = {k: v.to(device) for k, v in batch.items()}
    conn.send("built")
    while conn.recv() == "step":
        sync()
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        naive_step(model, opt, batch)
        sync()
        conn.send((time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0))


def naive_step(model, opt, batch):
    """One training step as a plain PyTorch loop would take it."""
    logits = model(batch["input_ids"], batch["position_ids"])
    loss = F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), batch["labels"].view(-1), ignore_index=-100)
    loss = loss + 0.01 * sum(layer.block_sparse_moe.aux for layer in model.model.layers)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


# ----------------------------------------------------------------------------- phase timers


class PhaseTimer:
    """Wrap bound methods with timers that record exclusive time per phase."""

    def __init__(self, sync):
        self.sync = sync
        self.totals: dict[str, float] = defaultdict(float)
        self.stack: list[float] = []

    def wrap(self, obj, attr: str, phase: str) -> None:
        fn = getattr(obj, attr, None)
        if fn is None:
            return
        timer = self

        def timed(*a, **k):
            timer.sync()
            t0 = time.perf_counter()
            timer.stack.append(0.0)
            try:
                return fn(*a, **k)
            finally:
                timer.sync()
                dt = time.perf_counter() - t0
                child = timer.stack.pop()
                timer.totals[phase] += dt - child
                if timer.stack:
                    timer.stack[-1] += dt

        setattr(obj, attr, timed)

    def take(self) -> dict[str, float]:
        out, self.totals = dict(self.totals), defaultdict(float)
        return out


def instrument(trainer, timer: PhaseTimer) -> None:
    timer.wrap(trainer.loader, "next_step", "data")
    timer.wrap(trainer.loader, "global_loss_tokens", "data")
    for obj, attr, phase in trainer.engine.timing_points():
        timer.wrap(obj, attr, phase)
    timer.wrap(trainer, "_sums", "metrics")
    timer.wrap(trainer, "_record", "logging")
    timer.wrap(trainer, "log", "logging")
    timer.wrap(trainer, "maybe_save", "logging")


# ----------------------------------------------------------------------------- one configuration


def build_trainer(args, experts: int, zero: int, procs: int, run_dir: str):
    """Trainer exactly as floe.run.entry.train builds it from the composed config (process group first)."""
    return trainer_from_overrides(overrides(args, experts, zero, procs), run_dir, procs)


def trainer_from_overrides(launch_overrides: list[str], run_dir: str, procs: int = 1):
    """(trainer, configs, device) for `python launch/train.py <launch_overrides>` (also tools/gpu_check.py)."""
    from hydra import compose, initialize_config_dir

    from launch.train import CONF_DIR, parse_config
    from floe.data import build_dataset
    from floe.parallel import init_distributed, read_launch_env
    from floe.run.config import check_config, pick_device
    from floe.run.trainer import Trainer
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose("config", overrides=[f"run.dir={run_dir}", "run.name=bench", *launch_overrides])
    c = parse_config(cfg)
    check_config(c, read_launch_env())
    _, dataset = build_dataset(c.data, seed=c.train.seed)
    device = torch.device(pick_device(c.train.device), int(os.environ.get("LOCAL_RANK", 0))
                          if pick_device(c.train.device) == "cuda" else None)
    init_distributed(device)
    trainer = Trainer(c, OmegaConf.to_container(cfg, resolve=True), dataset, device)
    if trainer.screen is not None and trainer.screen.bar is not None:  # a bar would mix into the timings' output
        trainer.screen.bar.disable = True
    return trainer, c, device


def bare_model(c, device, seed: int):
    from floe.model import ArcticForCausalLM

    model = ArcticForCausalLM(c.model).to(device)
    model.reset_parameters(seed=seed)
    return model


def bare_fwd_bwd(model, batches, lm_scale) -> None:
    for mb in batches:
        out = model(input_ids=mb["input_ids"], position_ids=mb["position_ids"], labels=mb["labels"],
                    attention_mask=mb["attention_mask"])
        (out.lm_loss_sum * lm_scale + out.aux_loss).backward()
    for p in model.parameters():
        p.grad = None


def run_config(args, experts: int, zero: int, procs: int, rank: int) -> dict:
    import torch.distributed as dist

    from floe.run import checkpoint
    from floe.run.metrics import mem_peak_gb

    run_dir = os.path.join(args.run_root, f"e{experts}_zero{zero}")  # one directory for all ranks
    start_gb = resident_gb()  # the process before the run: the interpreter and imported libraries (~0.2 GiB)
    trainer, c, device = build_trainer(args, experts, zero, procs, run_dir)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    timer = PhaseTimer(sync)
    instrument(trainer, timer)
    floor = None if args.no_floor else bare_model(c, device, seed=1)
    host_batches = trainer.loader.next_step()
    batches = [{k: v.to(device) for k, v in mb.items()} for mb in host_batches]
    naive = NaiveProcess(args, experts, host_batches[0], device) if procs == 1 and not args.no_naive else None
    lm_scale = 1.0 / max(sum(int((mb["labels"] != -100).sum()) for mb in batches), 1)

    faults, cpu = defaultdict(list), defaultdict(list)

    def timed(fn, name=None):
        sync()
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        fn()
        sync()
        dt = time.perf_counter() - t0
        if name is not None:
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            faults[name].append(r1.ru_minflt - r0.ru_minflt)
            # CPU seconds of this process (all its threads): the work, less sensitive than wall time to a
            # machine shared with other jobs
            cpu[name].append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
        return dt

    def launcher_step():
        record = trainer.train_step()
        trainer.log(record)
        trainer.maybe_save()

    rows = defaultdict(list)
    for i in range(args.warmup + args.steps):
        if naive is not None:
            t_naive, naive_faults = naive.step()
            faults["naive"].append(naive_faults)
        t_floor = timed(lambda: bare_fwd_bwd(floor, batches, lm_scale), "floor") if floor is not None else float("nan")
        timer.take()
        t_step = timed(launcher_step, "step")
        phases = timer.take()
        if i < args.warmup:
            continue
        rows["step"].append(t_step)
        rows["floor"].append(t_floor)
        if naive is not None:
            rows["naive"].append(t_naive)
        phases["other"] = t_step - sum(phases.values())
        for name in PHASES:
            rows[name].append(phases.get(name, 0.0))
    if args.profile and rank == 0:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts, record_shapes=False) as prof:
            launcher_step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
    elif args.profile:
        launcher_step()  # the other ranks take the same collectives
    state_gb, trainable = training_state_gb(trainer.engine)
    ckpt = timed(lambda: checkpoint.save(trainer.engine, os.path.join(run_dir, "bench_ckpt"), 1,
                                         {"step": 1, "loader": trainer.loader.state_dict()}, keep_last=1))
    ckpt_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(os.path.join(run_dir, "bench_ckpt"))
                     for f in files)
    if naive is not None:
        naive.close()
    med = {k: statistics.median(v) for k, v in rows.items()}
    result = {"experts": experts, "zero_stage": zero, "procs": procs, "steps": args.steps,
              "step_s": med["step"], "floor_s": med["floor"], "checkpoint_s": ckpt,
              "phases_s": {k: med[k] for k in PHASES},
              "overhead_frac": 1.0 - (med["forward"] + med["backward"]) / med["step"],
              "outside_floor_frac": max(0.0, 1.0 - med["floor"] / med["step"]),
              "page_faults": {k: int(statistics.median(v[args.warmup:])) for k, v in faults.items()},
              "step_cpu_s": statistics.median(cpu["step"][args.warmup:]), "lora_rank": args.lora,
              "checkpoint_mb": ckpt_bytes / 1e6, "trainable_params": trainable, "state_gb": state_gb,
              "peak_gb": mem_peak_gb(device)}
    result["peak_above_start_gb"] = result["peak_gb"] - (start_gb if device.type == "cpu" else 0.0)
    if "naive" in med:
        result["naive_s"], result["naive_allocator"] = med["naive"], args.naive_allocator
        result["speedup_vs_naive"] = med["naive"] / med["step"]
    del trainer
    if dist.is_initialized():
        dist.barrier()
    from floe.parallel import teardown

    teardown()
    if rank == 0:
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)
    return result


def resident_gb() -> float:
    """The process's resident set now (VmRSS), GiB; 0 where /proc is not there."""
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) * 1024 / 1024**3 for ln in f if ln.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0.0


def training_state_gb(engine) -> tuple[float, int]:
    """(GiB held by this rank's weights, their gradients and Adam's two fp32 moments of what its optimizer
    updates (engine.optimizer_numel: its partitions under ZeRO-1/2), trainable parameter count). Separate
    fp32 master copies (bf16, ZeRO-1/2 partitions) are not counted."""
    tensors = {id(t.untyped_storage()): t.untyped_storage().nbytes() for p in engine.model.parameters()
               for t in (p, p.grad) if t is not None}
    trainable = sum(p.numel() for p in engine.model.parameters() if p.requires_grad)
    return (sum(tensors.values()) + 2 * 4 * engine.optimizer_numel()) / 1024**3, trainable


def report(r: dict) -> None:
    head = f"E={r['experts']:3d} ZeRO-{r['zero_stage']} procs={r['procs']}: launcher {r['step_s']:.3f} s/step"
    if "naive_s" in r:
        head += f", naive ({r['naive_allocator']} allocator) {r['naive_s']:.3f} s ({r['speedup_vs_naive']:.2f}x)"
    head += (f", floor fwd+bwd {r['floor_s']:.3f} s; outside forward+backward {100 * r['overhead_frac']:.0f}%"
             f" (outside the floor {100 * r['outside_floor_frac']:.0f}%); checkpoint {r['checkpoint_s']:.2f} s")
    print(head)
    print("    " + "  ".join(f"{k} {v:.3f}" for k, v in r["phases_s"].items()), flush=True)
    print(f"    lora rank {r['lora_rank']}: CPU time {r['step_cpu_s']:.3f} s/step; {r['trainable_params'] / 1e6:.2f}M trainable parameters; weights + "
          f"gradients + optimizer state {r['state_gb']:.3f} GiB; peak memory {r['peak_gb']:.3f} GiB "
          f"({r['peak_above_start_gb']:.3f} above the process before the run); checkpoint "
          f"{r['checkpoint_mb']:.1f} MB", flush=True)
    print("    minor page faults per step: " + "  ".join(f"{k} {v}" for k, v in r["page_faults"].items()), flush=True)


def run(args, rank: int = 0, procs: int = 1) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for experts in args.experts:
        for zero in args.zero:
            r = run_config(args, experts, zero, procs, rank)
            if rank == 0:
                report(r)
            results.append(r)
    return results


def _spawned(rank, procs, port, args, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(procs), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    results = run(args, rank, procs)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, nargs="+", default=[128, 16])
    p.add_argument("--zero", type=int, nargs="+", default=[0, 2], help="ZeRO stages to run")
    p.add_argument("--procs", type=int, default=1, help="ranks (spawned here); >1 sets ep_size = procs")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--expert-ffn", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="rows per step per rank")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch threads per process")
    p.add_argument("--cpu", action="store_true", help="train.device=cpu even where CUDA exists")
    p.add_argument("--no-naive", action="store_true", help="skip the naive reference")
    p.add_argument("--no-floor", action="store_true", help="skip the bare-model floor (its weights and gradients "
                                                             "would count in this process's peak memory)")
    p.add_argument("--lora", type=int, default=0, help="LoRA rank (lora=default on every linear); 0 = full training")
    p.add_argument("--naive-allocator", choices=("system", "retain"), default="system",
                   help="the naive process's allocator: glibc's default, or floe's train.host_allocator=retain")
    p.add_argument("--profile", action="store_true", help="torch.profiler table of one launcher step")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--override", nargs="*", default=[], help="more launch/train.py overrides")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.run_root = tempfile.mkdtemp(prefix="bench_step_")
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {' '.join(load)}", flush=True)
    try:
        if args.procs == 1:
            results = run(args)
        else:  # fresh ranks for every configuration: a torch/DeepSpeed process group is not rebuilt in one process
            import copy
            import socket

            import torch.multiprocessing as mp

            results, out = [], os.path.join(args.run_root, "results.json")
            for experts in args.experts:
                for zero in args.zero:
                    one = copy.copy(args)
                    one.experts, one.zero = [experts], [zero]
                    with socket.socket() as s:
                        s.bind(("127.0.0.1", 0))
                        port = s.getsockname()[1]
                    mp.spawn(_spawned, args=(args.procs, port, one, out), nprocs=args.procs)
                    with open(out) as f:
                        results += json.load(f)
                    os.remove(out)
    finally:  # also after a failed configuration: nothing is left in the temp dir
        import shutil

        shutil.rmtree(args.run_root, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"load_average": load, "args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
