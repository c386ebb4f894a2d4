#!/bin/bash
# Prepare a large video collection as a SLURM job array: each array task takes a disjoint,
# deterministic share of the videos (crossflow reads SLURM_ARRAY_TASK_COUNT / SLURM_ARRAY_TASK_ID)
# and writes its own shards; the last task to finish writes OUT/index.json.
# Rerunning the same array after a failure or preemption resumes where each task stopped.
#   sbatch configs/cluster/slurm_prepare.sh /data/videos /data/pairs
#SBATCH --job-name=crossflow-prepare
#SBATCH --array=0-63
#SBATCH --cpus-per-task=16
#SBATCH --mem=32G
#SBATCH --time=12:00:00
#SBATCH --output=logs/prepare-%A_%a.out
set -euo pipefail
VIDEOS=${1:?usage: sbatch slurm_prepare.sh VIDEOS_DIR OUT_DIR}
OUT=${2:?usage: sbatch slurm_prepare.sh VIDEOS_DIR OUT_DIR}
srun crossflow prepare "$VIDEOS" --out "$OUT" --workers "$SLURM_CPUS_PER_TASK" \
    --frames-per-video 8 --gap 5 --short-side 256 --method dis --val-fraction 0.05 --seed 0
# If tasks were killed and rerun out of order, this (cheap) step writes the index once all are done:
#   crossflow prepare --merge --out "$OUT"
