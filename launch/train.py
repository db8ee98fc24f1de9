"""Train a DeepSeek-style MoE model on one device.

    python launch/train.py                                    # tiny model on the bundled corpus (CPU)
    python launch/train.py --config configs/runs/tiny-shakespeare.yaml --train.steps=500
    python launch/train.py --resume auto                      # continue the newest checkpoint in run.dir
    python launch/train.py --resume runs/tiny/checkpoints/step_0000200.pt
    python launch/train.py --help-config                      # every field, its default and meaning
"""
import sys

from common import parse_args

from dsmoe.config import ConfigError
from dsmoe.train.checkpoint import CheckpointError
from dsmoe.train.trainer import Trainer


def main(argv=None) -> int:
    args, cfg = parse_args(sys.argv[1:] if argv is None else argv, __doc__)
    try:
        Trainer(cfg, resume=args.resume).fit()
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
