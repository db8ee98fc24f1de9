#!/usr/bin/env bash
# g4dn.12xlarge: 4 x T4 16 GB over PCIe (no NVLink), DDP, fp16 + GradScaler (never bf16 on T4),
# grad accumulation 8 (configs/hardware/g4dn_12xlarge.yaml; estimate ~10.5 GiB per GPU).
#   launch/g4dn_12xlarge.sh [--resume auto] [--section.field=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-12}"  # 48 vCPUs shared by 4 ranks
exec torchrun --standalone --nproc_per_node 4 launch/train_ddp.py --config configs/hardware/g4dn_12xlarge.yaml "$@"
