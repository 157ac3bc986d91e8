"""Will my run fit? The per-rank memory plan of a training config, without a GPU.

    python tools/estimate.py model=arctic_480b parallel.ep_size=128 parallel.zero_stage=2 \
        train.micro_batch_size=1 data.seq_len=4096 train.activation_checkpointing=full \
        +world_size=256 +gpu_mem_gb=80
    python tools/estimate.py ... +rank=37 --json     # the plan of rank 37, with the experts it holds
    python tools/estimate.py ... +rank=37 --dry-run  # only build rank 37's shard: experts, parameters
    python tools/estimate.py ... train.device=cpu --measure   # also train real steps here and compare

Takes the training config (conf/, the same overrides as launch/train.py) plus:
  +world_size=N     ranks of the run (default 1)
  +gpu_mem_gb=G     memory of one GPU in GiB (default 80)
  +rank=r           the rank to build and report (default 0; ranks differ only in experts held)
  +routing=worst|balanced   worst (default): this rank's experts full to capacity from every
                    source rank; balanced: every expert gets tokens * top_k / num_experts
  +reserve_gb=R     held back for memory no tensor counts (CUDA context, NCCL, fragmentation)
train.device=auto is taken as cuda (the estimate is for the GPU run); train.device=cpu plans a
CPU run (fp32, reference kernels), which --measure checks against real training steps
(+world_size gloo processes). A config error (Hydra's or floe's) prints one message and exits 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EXTRA_KEYS = {"world_size": 1, "gpu_mem_gb": 80.0, "rank": 0, "routing": "worst", "reserve_gb": 0.0}


def compose(overrides: list[str]):
    """The training config composed from conf/ with `overrides` (Hydra's compose API)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from launch.train import CONF_DIR

    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    defaults = [d for d in ("run.name=estimate", "run.dir=runs/estimate", "log.wandb=disabled")
                if d.split("=", 1)[0] not in given]  # run.name's default interpolates Hydra's runtime
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return hydra_compose("config", overrides=[*defaults, *overrides])


def build_spec(cfg):
    """EstimateSpec from a composed config; every bad key named in one ValueError."""
    from launch.train import parse_config
    from floe.plan.memory_plan import EstimateSpec
    from floe.parallel import resolve_precision

    extras = {k: cfg.get(k, default) for k, default in EXTRA_KEYS.items()}
    c = parse_config(_without_extras(cfg))
    device = "cpu" if c.train.device == "cpu" else "cuda"
    precision = resolve_precision(c.train.precision, device)  # training's own rule for train.precision=auto
    checkpointing = c.train.activation_checkpointing
    kernels = c.train.kernels if c.train.kernels != "auto" else ("triton" if device == "cuda" else "reference")
    overlap = c.parallel.overlap_comm if c.parallel.overlap_comm is not None else device == "cuda"
    return EstimateSpec(
        model=c.model, world_size=int(extras["world_size"]), ep_size=c.parallel.ep_size,
        zero_stage=c.parallel.zero_stage, micro_batch_size=c.train.micro_batch_size, seq_len=c.data.seq_len,
        precision=precision, activation_checkpointing=str(checkpointing),
        kernels=kernels, device=device, reduce_bucket_size=c.parallel.reduce_bucket_size,
        allgather_bucket_size=c.parallel.allgather_bucket_size, overlap_comm=bool(overlap),
        gpu_mem_gb=float(extras["gpu_mem_gb"]), reserve_gb=float(extras["reserve_gb"]),
        routing=str(extras["routing"]), rank=int(extras["rank"]), lora=c.lora)


def _without_extras(cfg):
    from omegaconf import OmegaConf, open_dict

    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(cfg):
        for k in EXTRA_KEYS:
            cfg.pop(k, None)
    return cfg


def format_table(e) -> str:
    s = e.spec
    rows = [
        f"rank {e.rank} of {s['world_size']}: ep_size {s['ep_size']}, ZeRO-{s['zero_stage']}, {s['precision']}, "
        f"micro-batch {s['micro_batch_size']} x {s['seq_len']} tokens, checkpointing {s['activation_checkpointing']}",
        f"experts held       {_ids(e.experts)} ({len(e.experts)} of {s['model']['num_experts']})",
        f"parameters         {e.params_per_rank / 1e9:.3f} B  (dense {e.dense_params / 1e9:.3f} B, "
        f"experts {e.expert_params / 1e9:.3f} B, trainable {e.trainable_params / 1e9:.3f} B)",
    ]
    if e.quantized_params:
        rows.append(f"quantized base     {e.quantized_params / 1e9:.3f} B parameters in {e.quantized_base_gb:.2f} GiB "
                    f"({s['lora']['quantize_base']}; part of the weights)")
    for label, value in (("weights", e.weights_gb), ("gradients", e.grads_gb), ("fp32 master", e.master_gb),
                         ("Adam moments", e.adam_gb), ("reduce buckets", e.buffers_gb),
                         ("activations", e.activations_gb), ("  per layer", e.activations_per_layer_gb),
                         ("step temporaries", e.step_extra_gb), ("stage-0 all-reduce", e.reduce_extra_gb),
                         ("reserve", e.reserve_gb)):
        rows.append(f"{label:<18} {value:9.2f} GiB")
    verdict = "fits" if e.fits else "does NOT fit"
    rows.append(f"{'total':<18} {e.total_gb:9.2f} GiB of {e.gpu_mem_gb:g} GiB: {verdict}; "
                f"largest micro-batch that fits: {e.max_micro_batch}")
    rows += [f"note: {n}" for n in e.notes]
    return "\n".join(rows)


def _ids(ids: list[int]) -> str:
    return f"{ids[0]}..{ids[-1]}" if len(ids) > 2 else ", ".join(map(str, ids))


def _train_peak(rank, world_size, overrides, run_dir):
    from launch.train import train
    from floe.plan.tensor_memory import PeakMemoryTracker

    cfg = compose([*overrides, f"run.dir={run_dir}"])
    with PeakMemoryTracker() as mem:
        train(cfg)
    return mem.peak_bytes


def measure_training_peak(overrides: list[str], world_size: int = 1) -> float:
    """Peak GiB of real training (max over ranks) for these overrides; spawns the ranks."""
    from floe.testing.distributed import run_distributed

    with tempfile.TemporaryDirectory() as run_dir:
        peaks = run_distributed(_train_peak, world_size=world_size, args=(list(overrides), run_dir), timeout=900)
    return max(peaks) / 2**30


def main(argv=None) -> int:
    """The command line; config errors (Hydra's or floe's) print one message and exit 2, as training does."""
    from launch.errors import config_errors

    with config_errors():
        return _main(argv)


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--dry-run", action="store_true",
                   help="only build +rank's shard (fake process group): experts held, parameter counts")
    p.add_argument("--measure", action="store_true",
                   help="CPU only: also train real steps (1 process) and report the measured peak")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for launch/train.py")
    args = p.parse_args(argv)
    from floe.errors import ConfigError
    from floe.plan.memory_plan import dry_run, estimate

    cfg = compose(args.overrides)
    spec = build_spec(cfg)
    errors = spec.errors()
    if args.measure and spec.device != "cpu":
        errors.append("--measure trains real steps on this machine's CPU: add train.device=cpu")
    if errors:
        raise ConfigError("invalid estimate config:\n  " + "\n  ".join(errors))
    if args.dry_run:
        shard = dry_run(spec.model, spec.world_size, spec.ep_size, spec.rank, spec.lora)
        print(json.dumps(shard) if args.json else "\n".join(f"{k:<28} {v}" for k, v in shard.items()))
        return 0
    result = estimate(spec)
    out = result.to_json()
    if args.measure:
        # training knows none of the estimator's own keys (+world_size, +gpu_mem_gb, ...)
        training = [o for o in args.overrides if o.split("=", 1)[0].lstrip("+~") not in EXTRA_KEYS]
        out["measured_peak_gb"] = measure_training_peak(training, spec.world_size)
    if args.json:
        print(json.dumps(out))
    else:
        print(format_table(result))
        if args.measure:
            print(f"measured peak (real training steps): {out['measured_peak_gb']:.4f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
