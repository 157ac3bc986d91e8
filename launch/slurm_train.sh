#!/bin/bash
# Multi-node training on SLURM: one srun task per node, each running torchrun for the
# node's GPUs, all meeting at a c10d rendezvous on the first node of the allocation.
#
#   cd <the floe checkout> && sbatch --nodes=4 launch/slurm_train.sh model=small parallel.ep_size=8 \
#       parallel.zero_stage=2 optim.lr=2e-4 train.max_steps=2000
#
# Everything after the script name is passed to launch/train.py as Hydra overrides.
# sbatch runs a copy of this file from its spool directory, so the repository is found from
# $SLURM_SUBMIT_DIR (where sbatch was called; run it from the checkout, or set FLOE_REPO).
# The job's output goes to <submit dir>/floe-<job id>.out: SLURM opens --output before this script
# runs, so it must name a directory that exists on a fresh checkout.
#
# Preemption and time limits: SLURM sends SIGUSR1 to this batch shell 300 s before the time limit
# (--signal=B:USR1@300), and SIGTERM on preemption or scancel. The shell passes the signal on to the
# training (srun forwards it to torchrun, torchrun to every worker); each worker finishes its step,
# writes a checkpoint and exits. The job then requeues itself (scontrol requeue), and the requeued
# run resumes from that checkpoint: run.dir is deterministic, so the same command resumes.
# The plain equivalent, run on every node by hand:
#   torchrun --nnodes=$NNODES --nproc_per_node=$GPUS --rdzv-backend=c10d \
#       --rdzv-endpoint=$HEAD_NODE:29500 --rdzv-id=$JOB_ID launch/train.py ...
#SBATCH --job-name=floe
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append

set -euo pipefail

REPO=${FLOE_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
if [[ ! -f "$REPO/launch/train.py" ]]; then
    echo "floe: $REPO is not a floe checkout (no launch/train.py): run sbatch from the checkout, or set FLOE_REPO" >&2
    exit 2
fi

GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)  # sed reads all: head would SIGPIPE scontrol under pipefail
RDZV_PORT=${RDZV_PORT:-29500}

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export NCCL_ASYNC_ERROR_HANDLING=1   # a failed rank ends the job instead of hanging the others
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
# torchrun passes these signals on to its workers (SIGUSR1 is not among its defaults).
export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1

echo "floe: ${SLURM_NNODES} node(s) x ${GPUS_PER_NODE} GPU(s), rendezvous ${HEAD_NODE}:${RDZV_PORT}, job ${SLURM_JOB_ID}, repo ${REPO}"

STOPPED_BY=""
on_signal() {  # the training writes a checkpoint and exits; then the job requeues itself
    STOPPED_BY=$1
    echo "floe: got SIG$1: the training stops after its current step and writes a checkpoint"
    # USR1 (--signal=B:) reaches only this shell: pass it on. SLURM sends TERM to the job's steps
    # itself; a second one would make the workers stop at once, without their checkpoint.
    if [[ $1 == USR1 ]]; then kill -s USR1 "$SRUN_PID" 2>/dev/null || true; fi
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

# srun starts one torchrun per node; torchrun starts one process per GPU and sets
# RANK / WORLD_SIZE / LOCAL_RANK, which launch/train.py reads. In the background, so that this
# shell can take the signals above while it waits.
srun --kill-on-bad-exit=1 bash -c "cd '$REPO' && exec torchrun \
    --nnodes='${SLURM_NNODES}' \
    --nproc_per_node='${GPUS_PER_NODE}' \
    --rdzv-backend=c10d \
    --rdzv-endpoint='${HEAD_NODE}:${RDZV_PORT}' \
    --rdzv-id='${SLURM_JOB_ID}' \
    --max-restarts=0 \
    launch/train.py $(printf '%q ' "$@")" &
SRUN_PID=$!
status=0
while true; do  # `wait` returns early when a trapped signal arrives: wait again for the training
    wait "$SRUN_PID" && status=0 || status=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break
done
if [[ -n "$STOPPED_BY" ]]; then
    echo "floe: stopped by SIG${STOPPED_BY} (exit ${status}); requeueing job ${SLURM_JOB_ID} to resume from its checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$status"
