"""What the training launchers share: arguments, threads, clean errors, stops and the end-of-run summary.

Exit codes: 0 done, or a resume of a run already at its last step (nothing written); 2 a config,
checkpoint, data or run-directory error (nothing written); 3 the guard aborted, out of memory, or a
checkpoint could not be written (full disk, read-only or vanished run directory: the previous checkpoint
is intact); 4 the ranks could not connect (the message names the cause and the fix); 75 stopped on request
(SIGINT/SIGTERM/SIGUSR1) with a checkpoint: rerun with --resume auto; 130 a second Ctrl-C.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python launch/x.py` from a checkout
    sys.path.insert(0, str(REPO))

from dsmoe.config import CONFIG_ROOT, ConfigError, help_text, load_config, load_yaml_tree  # noqa: E402
from dsmoe.run import LAUNCHER_ENV  # noqa: E402
from dsmoe.run import resume_command as run_command  # noqa: E402

DEFAULT_CONFIG = CONFIG_ROOT / "runs" / "tiny-shakespeare.yaml"
RANK = int(os.environ.get("RANK", "0"))
WORLD = int(os.environ.get("WORLD_SIZE", "1"))


def say_error(text: str, agreed: bool = True) -> None:
    """One clean message: rank 0's for errors every rank meets alike, else each failing rank's, prefixed.
    Under torchrun it also goes to the worker's error file, so torchrun's failure summary quotes it
    instead of a traceback (plain torchrun still prints its own ChildFailedError epilogue; python -m
    dsmoe.run prints only this message, once)."""
    if agreed and RANK != 0:
        import time

        time.sleep(3)  # torchrun stops every rank once one exits: let rank 0 say it first
        return
    prefix = f"[rank {RANK}] " if WORLD > 1 and not agreed else ""
    if not (agreed and os.environ.get(LAUNCHER_ENV)):  # python -m dsmoe.run prints rank 0's message last
        print(f"{prefix}error: {text}", file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file and not os.path.exists(error_file):
        import json
        import time

        with open(error_file, "w") as f:  # the format torch.distributed.elastic's error handler writes
            json.dump({"message": {"message": f"{prefix}{text}",  # torchrun's summary shows py_callstack
                                   "extraInfo": {"py_callstack": f"{prefix}error: {text}",
                                                 "timestamp": str(int(time.time()))}}}, f)


def parse_args(argv: list[str], description: str):
    parser = argparse.ArgumentParser(description=description, add_help=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="any config field: --section.field=value (--help-config lists them)")
    parser.add_argument("--config", default=None,
                        help=f"run / preset / hardware YAML file (default {DEFAULT_CONFIG.relative_to(REPO)}; "
                             f"with --resume PATH: the checkpoint's own config)")
    parser.add_argument("--resume", default=None, help="checkpoint path, or 'auto' for the newest in run.dir")
    parser.add_argument("--init-from-hf", "--init-from", dest="init_from", default=None,
                        help="start from these weights (a transformers directory or a dsmoe checkpoint): fresh "
                             "optimizer, step 0; without --config its model config is used")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit without training")
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("--help-config", action="store_true", help="list every config field")
    args, rest = parser.parse_known_args(argv)
    if args.help:
        parser.print_help()
        sys.exit(0)
    try:
        if args.help_config:
            path = args.config or DEFAULT_CONFIG
            print(help_text(load_yaml_tree(path), str(path)) if args.config else help_text())
            sys.exit(0)
        return args, resolve_config(args, rest)
    except ConfigError as e:
        say_error(f"config: {e}")
        sys.exit(2)


def resolve_config(args, overrides: list[str]):
    """--config FILE + overrides; or, resuming a checkpoint without --config, the checkpoint's own
    config + overrides (so `--resume ckpt.pt` continues that run, not the default one)."""
    from dsmoe.config import config_from_tree
    from dsmoe.checkpoint import CheckpointError
    from dsmoe.train.state import checkpoint_config

    if args.config is None and args.resume not in (None, "", "none", "auto"):
        try:
            return config_from_tree(checkpoint_config(args.resume), overrides)
        except CheckpointError as e:
            raise ConfigError(str(e)) from None
    cfg = load_config(args.config or DEFAULT_CONFIG, overrides)
    if args.init_from and args.config is None:  # the source's model (and tokenizer), the default run's rest
        from dsmoe.config import MODEL_SECTIONS
        from dsmoe.train.init_from import init_config

        try:
            source = init_config(args.init_from)
        except CheckpointError as e:
            raise ConfigError(str(e)) from None
        tree = {**cfg.to_dict(), **{k: source[k] for k in MODEL_SECTIONS},
                "data": {**cfg.to_dict()["data"], "tokenizer": source["data"]["tokenizer"]}}
        cfg = config_from_tree(tree, overrides)
    return cfg


def set_cpu_threads(requested: int = 0) -> int:
    """Intra-op threads: train.threads, else OMP_NUM_THREADS, else this machine's cores shared by the
    processes torchrun started on it (oversubscribed cores make each step many times slower)."""
    import torch

    if requested > 0:
        torch.set_num_threads(requested)
    elif "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    return torch.get_num_threads()


def resume_command(argv: list[str]) -> str:
    """This launch again with --resume auto (under plain torchrun, its usual single-node form), or
    DSMOE_RESUME_COMMAND where a wrapper that takes no --resume set it (`make train` says `make resume`)."""
    if os.environ.get("DSMOE_RESUME_COMMAND"):
        return os.environ["DSMOE_RESUME_COMMAND"]
    script = os.path.relpath(sys.argv[0])
    launcher = os.environ.get(LAUNCHER_ENV)
    if launcher is None and WORLD > 1:
        nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
        launcher = (f"torchrun --nproc_per_node {os.environ.get('LOCAL_WORLD_SIZE', WORLD)} "
                    + ("--standalone" if nodes == 1 else f"--nnodes {nodes} ..."))
    return run_command(launcher or "python", script, argv)


def summary(trainer, result: dict, argv: list[str]) -> list[str]:
    """The end-of-run lines: time, tokens, rate, losses, the checkpoint, and what to run next."""
    from dsmoe.metrics.logger import fmt_tokens

    rows = result["history"]
    train = [r["loss"] for r in rows if "loss" in r]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    seconds = result["seconds"]
    part = "this part (from step {}): ".format(result["resumed_at"]) if result.get("resumed_at") else ""
    lines = [f"{'stopped' if result['stopped'] else 'done'} at step {result['step']}: {part}{seconds:.0f} s, "
             f"{fmt_tokens(result['tokens'])} tokens, {fmt_tokens(result['tokens'] / max(seconds, 1e-9))} tokens/s"
             + (f", final train loss {train[-1]:.4f}" if train else "")
             + (f", best validation loss {min(val):.4f}" if val else "")]
    if part:  # a resumed run: the whole run's totals too
        lines.append(f"whole run (steps 0-{result['step']}): {result['run_seconds']:.0f} s, "
                     f"{fmt_tokens(result['run_tokens'])} tokens")
    ckpt = result["checkpoint"]
    lines.append(f"latest checkpoint: {ckpt}" if ckpt else "no checkpoint written (checkpoint.save_final is off)")
    run_dir = trainer.run_dir
    if ckpt:
        lines.append(f"  resume:   {resume_command(argv)}")
        lines.append(f"  generate: python launch/generate.py --ckpt auto --run-dir {run_dir} --prompt \"...\"")
    lines.append(f"  plot:     python -m dsmoe.plot {run_dir}")
    return lines


def warn_restart_store() -> None:
    """Under torchrun --max-restarts, workers that share the rendezvous store can read the previous
    attempt's addresses (pytorch/pytorch#135712): gloo's connect is refused, or hangs."""
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if restarts > 0 and os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") != "1" and RANK == 0:
        print(f"warning: torchrun --max-restarts {restarts} with a shared rendezvous store: a restarted attempt can "
              f"connect to the previous one's addresses and fail or hang. Launch with "
              f"TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun ... (the launch/*.sh scripts do)",
              file=sys.stderr, flush=True)


def run_training(argv: list[str], description: str) -> int:
    """Build the trainer from the command line and train; see the module docstring for exit codes."""
    from dsmoe.data.sources import DataError
    from dsmoe.parallel.mesh import StartupError, shutdown
    from dsmoe.checkpoint import CheckpointError
    from dsmoe.checkpoint.file import CheckpointWriteError
    from dsmoe.train.guard import TrainingAborted
    from dsmoe.train.state import RunFinished
    from dsmoe.train.signals import EXIT_INTERRUPTED, EXIT_STOPPED, stop_with_launcher

    stop_with_launcher()
    args, cfg = parse_args(argv, description)
    set_cpu_threads(cfg.train.threads)
    warn_restart_store()
    trainer = None
    try:
        if args.dry_run:
            from dsmoe.train.plan import print_plan

            print_plan(cfg, world=WORLD, config_path=args.config)
            return 0
        from dsmoe.train.trainer import Trainer

        trainer = Trainer(cfg, resume=args.resume, init_from=args.init_from)
        result = trainer.fit()
        if RANK == 0:
            for line in summary(trainer, result, argv):
                print(line, flush=True)
        return EXIT_STOPPED if result["stopped"] else 0
    except RunFinished as e:
        if RANK == 0:
            print(str(e), flush=True)
        return 0
    except CheckpointWriteError as e:
        say_error(str(e))
        return 3
    except (ConfigError, CheckpointError, DataError, FileNotFoundError) as e:
        say_error(str(e))
        return 2
    except TrainingAborted as e:
        say_error(str(e))
        return 3
    except MemoryError as e:
        say_error(str(e), agreed=False)
        return 3
    except StartupError as e:
        say_error(str(e), agreed=False)
        return 4
    except KeyboardInterrupt:
        say_error("interrupted before training started: nothing to save", agreed=False)
        return EXIT_INTERRUPTED
    finally:
        if trainer is not None:
            shutdown(trainer.mesh)
