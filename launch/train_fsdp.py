"""FSDP2 training under torchrun: parameters, gradients and AdamW moments sharded over the ranks
(expert stacks over the ranks holding the same experts). Same flags as train_ddp.py; this one sets
--parallel.dp=fsdp.

Paste the command for your machine:

    # CPU, 2 processes (gloo)
    torchrun --standalone --nproc_per_node 2 launch/train_fsdp.py --config configs/hardware/cpu.yaml
    # g4dn.12xlarge, 4x T4: fp16 parameters for compute, fp32 gradient reduction, GradScaler
    torchrun --standalone --nproc_per_node 4 launch/train_fsdp.py --config configs/hardware/g4dn_12xlarge.yaml --resume auto
    # one 8x H100 node, v3-mini (5.7B): experts split 8 ways, the rest sharded 8 ways
    torchrun --standalone --nproc_per_node 8 launch/train_fsdp.py --config configs/runs/v3-mini-h100-fsdp.yaml
    # many nodes, HSDP: shard inside a node, replicate across 4 nodes
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv-id job42 --rdzv-backend c10d --rdzv-endpoint HEAD:29500 \
        launch/train_fsdp.py --config configs/hardware/h100_multinode.yaml --parallel.replicate 4 --resume auto
    # keep gathered parameters between forward and backward (more memory, fewer all-gathers)
    torchrun --standalone --nproc_per_node 8 launch/train_fsdp.py --parallel.reshard_after_forward false

Checkpoints are sharded directories (checkpoints/step_N/, each rank writes its part) that resume at
any world size, ep or DDP; `python -m dsmoe.checkpoint.convert DIR ckpt.pt` makes one file of it
(`launch/train_ddp.py --resume ckpt.pt` continues there), and `--checkpoint.format file` writes files.
"""
import sys

from common import run_training

if __name__ == "__main__":
    sys.exit(run_training(["--parallel.dp=fsdp", *sys.argv[1:]], __doc__))
