"""Data-parallel (and expert-parallel) training under torchrun; one process behaves like train.py.

Paste the command for your machine:

    # CPU, 2 processes (gloo)
    torchrun --standalone --nproc_per_node 2 launch/train_ddp.py --config configs/hardware/cpu.yaml
    # one RTX 4060 (8 GB): bf16, activation checkpointing, accumulation
    torchrun --standalone --nproc_per_node 1 launch/train_ddp.py --config configs/hardware/rtx4060.yaml
    # g4dn.12xlarge, 4x T4 over PCIe: fp16 + GradScaler, never bf16
    torchrun --standalone --nproc_per_node 4 launch/train_ddp.py --config configs/hardware/g4dn_12xlarge.yaml --resume auto
    # one 8x H100 node: bf16
    torchrun --standalone --nproc_per_node 8 launch/train_ddp.py --config configs/hardware/h100_node.yaml --resume auto
    # expert parallelism: experts split over 4 ranks, replicated over the rest
    torchrun --standalone --nproc_per_node 8 launch/train_ddp.py --config configs/hardware/h100_node.yaml --parallel.ep 4
    # many nodes: run on every node (Slurm: sbatch launch/slurm_h100_multinode.sbatch)
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv-id job42 --rdzv-backend c10d --rdzv-endpoint HEAD:29500 \
        launch/train_ddp.py --config configs/hardware/h100_multinode.yaml --resume auto
    # continue a run, at any world size
    torchrun --nproc_per_node 4 launch/train_ddp.py --resume ckpt.pt

Every flag of launch/train.py works here: --config, --resume PATH|auto, --dry-run, --section.field=value.
Rank 0 logs; every rank writes its shards of the checkpoints (one DCP directory per step at world > 1);
other ranks print warnings and errors only. Exit codes: see launch/common.py (75 = stopped with a checkpoint).
`python -m dsmoe.run` takes torchrun's flags and keeps them through torchrun: Ctrl-C ends with status 75
and the resume command, a config error with status 2 and its one message (plain torchrun exits 1 and
adds its traceback), and a rank that stopped on request is not restarted.
"""
import os
import sys

from common import run_training

if __name__ == "__main__":
    if "WORLD_SIZE" not in os.environ and not {"-h", "--help", "--help-config"} & set(sys.argv):
        print("note: not started by torchrun: training in this one process (see the commands above for more)",
              file=sys.stderr)
    sys.exit(run_training(sys.argv[1:], __doc__))
