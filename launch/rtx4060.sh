#!/usr/bin/env bash
# One RTX 4060 (8 GB): SmolLM2-135M MoE, bf16, full activation checkpointing, grad accumulation 4
# (configs/hardware/rtx4060.yaml; python -m dsmoe.estimate configs/hardware/rtx4060.yaml: ~7.0 GiB).
#   launch/rtx4060.sh [--resume auto] [--section.field=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
exec python launch/train.py --config configs/hardware/rtx4060.yaml "$@"
