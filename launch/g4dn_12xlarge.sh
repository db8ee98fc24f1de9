#!/usr/bin/env bash
# g4dn.12xlarge: 4 x T4 16 GB over PCIe (no NVLink), DDP, fp16 + GradScaler (never bf16 on T4),
# grad accumulation 8 (configs/hardware/g4dn_12xlarge.yaml; estimate ~10.5 GiB per GPU).
#   launch/g4dn_12xlarge.sh [--resume auto] [--section.field=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
# in-place restarts (--max-restarts): a fresh store per attempt, so no rank reads the previous one's addresses
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
# NCCL: on a hang the watchdog dumps each rank's last collectives (flight recorder) to runs/nccl_trace_rank_N
export TORCH_NCCL_TRACE_BUFFER_SIZE="${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}" TORCH_NCCL_DUMP_ON_TIMEOUT=1
export TORCH_FR_DUMP_TEMP_FILE="${TORCH_FR_DUMP_TEMP_FILE:-$PWD/runs/nccl_trace_rank_}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-12}"  # 48 vCPUs shared by 4 ranks
mkdir -p runs
exec python -m dsmoe.run --standalone --max-restarts 3 --nproc_per_node 4 launch/train_ddp.py --config configs/hardware/g4dn_12xlarge.yaml "$@"
