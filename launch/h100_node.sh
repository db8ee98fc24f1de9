#!/usr/bin/env bash
# One 8 x H100 80 GB node: SmolLM2-MoE 576x30 at sequence 2048, bf16, DDP over NVLink
# (configs/hardware/h100_node.yaml; estimate ~55 GiB per GPU).
#   launch/h100_node.sh [--resume auto] [--section.field=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
# in-place restarts (--max-restarts): a fresh store per attempt, so no rank reads the previous one's addresses
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
# NCCL: on a hang the watchdog dumps each rank's last collectives (flight recorder) to runs/nccl_trace_rank_N
export TORCH_NCCL_TRACE_BUFFER_SIZE="${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}" TORCH_NCCL_DUMP_ON_TIMEOUT=1
export TORCH_FR_DUMP_TEMP_FILE="${TORCH_FR_DUMP_TEMP_FILE:-$PWD/runs/nccl_trace_rank_}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
mkdir -p runs
exec python -m dsmoe.run --standalone --max-restarts 3 --nproc_per_node 8 launch/train_ddp.py --config configs/hardware/h100_node.yaml "$@"
