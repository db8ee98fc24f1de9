"""Train a DeepSeek-style MoE model on one device.

    python launch/train.py                                    # tiny model on the bundled corpus (CPU)
    python launch/train.py --config configs/runs/tiny-shakespeare.yaml --train.steps=500
    python launch/train.py --resume auto                      # continue the newest checkpoint in run.dir
    python launch/train.py --resume runs/tiny-shakespeare/checkpoints/step_0000200.pt
    python launch/train.py --dry-run                          # the plan and memory estimate, no training
    python launch/train.py --help-config                      # every field, its default and meaning

Several processes: launch/train_ddp.py under torchrun.
"""
import sys

from common import run_training

if __name__ == "__main__":
    sys.exit(run_training(sys.argv[1:], __doc__))
