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
set -euo pipefail
PAIRS=${1:?usage: sbatch slurm_pretrain.sh PAIRS_DIR}
export WANDB_MODE=${WANDB_MODE:-offline}
srun crossflow fit --config configs/pretrain/cpof_alexnet.yaml \
    --data.init_args.data_dir "$PAIRS" --data.init_args.batch_size 12 --data.init_args.num_workers 6 \
    --trainer.strategy ddp --trainer.num_nodes 2 --trainer.devices 4 \
    --trainer.sync_batchnorm true --trainer.precision bf16-mixed
# After a preemption, resume with: --ckpt_path runs/pretrain/cpof_alexnet/checkpoints/last.ckpt
# Without SLURM: torchrun --nnodes 2 --nproc_per_node 4 ... $(which crossflow) fit ... (same flags)
