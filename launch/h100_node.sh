#!/usr/bin/env bash
# One 8 x H100 80 GB node: SmolLM2-MoE 576x30 at sequence 2048, bf16, DDP over NVLink
# (configs/hardware/h100_node.yaml; estimate ~55 GiB per GPU).
#   launch/h100_node.sh [--resume auto] [--section.field=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
exec torchrun --standalone --nproc_per_node 8 launch/train_ddp.py --config configs/hardware/h100_node.yaml "$@"
