"""Argument handling shared by the launchers: --config, --resume, --dry-run, --section.field=value."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python launch/x.py` from a checkout
    sys.path.insert(0, str(REPO))

from dsmoe.config import CONFIG_ROOT, ConfigError, help_text, load_config  # noqa: E402

DEFAULT_CONFIG = CONFIG_ROOT / "runs" / "tiny-shakespeare.yaml"


def parse_args(argv: list[str], description: str):
    parser = argparse.ArgumentParser(description=description, add_help=False,
                                     epilog="any config field: --section.field=value (--help-config lists them)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="run / preset / hardware YAML file")
    parser.add_argument("--resume", default=None, help="checkpoint path, or 'auto' for the newest in run.dir")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit without training")
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("--help-config", action="store_true", help="list every config field")
    args, rest = parser.parse_known_args(argv)
    if args.help:
        parser.print_help()
        sys.exit(0)
    if args.help_config:
        print(help_text())
        sys.exit(0)
    try:
        cfg = load_config(args.config, rest)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    return args, cfg


def set_cpu_threads() -> None:
    """Share the cores between the processes torchrun started on this machine."""
    import torch

    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local_world > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))


def run_training(argv: list[str], description: str) -> int:
    """Build the trainer from the command line and train; clear errors exit with status 2."""
    from dsmoe.parallel.mesh import shutdown
    from dsmoe.train.checkpoint import CheckpointError
    from dsmoe.train.guard import TrainingAborted
    from dsmoe.train.trainer import Trainer

    args, cfg = parse_args(argv, description)
    set_cpu_threads()
    trainer = None
    try:
        if args.dry_run:
            from dsmoe.train.plan import print_plan

            print_plan(cfg, world=int(os.environ.get("WORLD_SIZE", "1")), config_path=args.config)
            return 0
        trainer = Trainer(cfg, resume=args.resume)
        trainer.fit()
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (TrainingAborted, MemoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    finally:
        if trainer is not None:
            shutdown(trainer.mesh)
    return 0
