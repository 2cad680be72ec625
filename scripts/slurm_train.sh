#!/usr/bin/env bash
# `gpt train` on several machines under SLURM: one torchrun per node, each starting one process
# per GPU; torchrun's c10d rendezvous on the job's first node joins them into one run. gpt reads
# only what torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR,
# MASTER_PORT).
#
#   sbatch --nodes=4 scripts/slurm_train.sh configs/gpt2_124m.toml --set train.parallel=hsdp
#
# HSDP shards the model within each node, over its fast links, and replicates it across the
# nodes: with train.hsdp_replicas unset, one replica per node (WORLD_SIZE / LOCAL_WORLD_SIZE),
# so the links between nodes carry only an all-reduce of each node's gradient shards.
# train.parallel=fsdp shards over every GPU of every node instead, ddp shards nothing.
#
# data_dir and out_dir must be on a filesystem every node sees: rank 0 prepares the data that
# all ranks read, and under FSDP and HSDP several ranks write their parts of each checkpoint.
# Resubmitting the same command resumes from the newest checkpoint, on any number of nodes.
#
#SBATCH --job-name=gpt-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

config=${1:?usage: sbatch [--nodes=N] scripts/slurm_train.sh CONFIG [--set KEY=VALUE ...]}
shift
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
gpus_per_node=${SLURM_GPUS_ON_NODE:-$(nvidia-smi --list-gpus | wc -l)}
port=${GPT_RDZV_PORT:-29500}

srun torchrun \
    --nnodes="$SLURM_JOB_NUM_NODES" \
    --nproc-per-node="$gpus_per_node" \
    --rdzv-id="$SLURM_JOB_ID" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="$head_node:$port" \
    -m gpt train --config "$config" "$@"
