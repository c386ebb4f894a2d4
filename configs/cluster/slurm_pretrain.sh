#!/bin/bash
# The paper's pretraining on 2 nodes x 4 GPUs with Lightning's DDP under SLURM.
# Lightning reads the SLURM environment: one task per GPU, --trainer.num_nodes and
# --trainer.devices must match the allocation. The paper's batch of 96 is global:
# 96 / 8 processes = 12 per process. sync_batchnorm gives BN statistics over the global batch.
#   sbatch configs/cluster/slurm_pretrain.sh /data/pairs
#SBATCH --job-name=crossflow-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --mem=128G
#SBATCH --time=48:00:00
#SBATCH --output=logs/pretrain-%j.out
#SBATCH --open-mode=append            # a requeued job goes on writing the same log
#SBATCH --requeue                     # a preempted job goes back in the queue
#SBATCH --signal=B:USR1@300           # 5 min before the time limit: USR1 to this script, which requeues the job
# Interruptions lose nothing: SLURM ends a preempted or requeued job with SIGTERM (then SIGKILL after KillWait);
# every rank finishes its step, crossflow.callbacks.ResumableCheckpoint writes checkpoints/last.ckpt and the run
# exits 0. Each start, the first included, runs with --ckpt_path last: it continues from that checkpoint (data
# order and augmentation included) or, when there is none yet, starts afresh. Lightning's own SLURM requeue
# (SIGUSR1 to the tasks) is not used: it writes hpc_ckpt_N.ckpt from inside the signal handler, mid-step.
set -euo pipefail
PAIRS=${1:?usage: sbatch slurm_pretrain.sh PAIRS_DIR}
export WANDB_MODE=${WANDB_MODE:-offline}
trap 'echo "time limit near: requeueing job $SLURM_JOB_ID"; scontrol requeue "$SLURM_JOB_ID"' USR1
srun crossflow fit --config configs/pretrain/cpof_alexnet.yaml \
    --data.init_args.data_dir "$PAIRS" --data.init_args.batch_size 12 --data.init_args.num_workers 6 \
    --trainer.strategy ddp --trainer.num_nodes 2 --trainer.devices 4 \
    --trainer.sync_batchnorm true --trainer.precision bf16-mixed \
    --ckpt_path last &
TRAINING=$!
# `wait` returns when USR1 arrives (bash runs a trap only between commands): wait again until srun ends.
until wait $TRAINING; do kill -0 $TRAINING 2>/dev/null || exit 1; done
# Without SLURM: torchrun --nnodes 2 --nproc_per_node 4 ... $(which crossflow) fit ... (same flags)
