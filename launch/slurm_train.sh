#!/bin/bash
# Multi-node training on SLURM: one srun task per node, each running torchrun for the
# node's GPUs, all meeting at a c10d rendezvous on the first node of the allocation.
#
#   sbatch --nodes=4 launch/slurm_train.sh model=small parallel.ep_size=8 parallel.zero_stage=2 \
#       optim.lr=2e-4 train.max_steps=2000
#
# Everything after the script name is passed to launch/train.py as Hydra overrides.
# run.dir is deterministic (no timestamps), so resubmitting the same command resumes from
# the last complete checkpoint. The plain equivalent, run on every node by hand:
#   torchrun --nnodes=$NNODES --nproc_per_node=$GPUS --rdzv-backend=c10d \
#       --rdzv-endpoint=$HEAD_NODE:29500 --rdzv-id=$JOB_ID launch/train.py ...
#SBATCH --job-name=floe
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --output=logs/%x-%j.out

set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
RDZV_PORT=${RDZV_PORT:-29500}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$REPO/logs"

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export NCCL_ASYNC_ERROR_HANDLING=1   # a failed rank ends the job instead of hanging the others
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1

echo "floe: ${SLURM_NNODES} node(s) x ${GPUS_PER_NODE} GPU(s), rendezvous ${HEAD_NODE}:${RDZV_PORT}, job ${SLURM_JOB_ID}"

# srun starts one torchrun per node; torchrun starts one process per GPU and sets
# RANK / WORLD_SIZE / LOCAL_RANK, which launch/train.py reads.
srun --kill-on-bad-exit=1 bash -c "cd '$REPO' && torchrun \
    --nnodes='${SLURM_NNODES}' \
    --nproc_per_node='${GPUS_PER_NODE}' \
    --rdzv-backend=c10d \
    --rdzv-endpoint='${HEAD_NODE}:${RDZV_PORT}' \
    --rdzv-id='${SLURM_JOB_ID}' \
    --max-restarts=0 \
    launch/train.py $(printf '%q ' "$@")"
