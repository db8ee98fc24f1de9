#!/usr/bin/env bash
# CPU: the tiny MoE in fp32 on the bundled tiny-Shakespeare corpus (configs/hardware/cpu.yaml).
#   launch/cpu.sh                       # train
#   launch/cpu.sh --resume auto         # continue the newest checkpoint in runs/cpu
#   launch/cpu.sh --train.steps=50      # any --section.field=value override
set -euo pipefail
cd "$(dirname "$0")/.."
exec python launch/train.py --config configs/hardware/cpu.yaml "$@"
