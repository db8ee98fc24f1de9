"""`python -m dsmoe.run`: torchrun (same flags) that stops and fails the way dsmoe's launchers document.

    python -m dsmoe.run --standalone --nproc_per_node 2 launch/train_ddp.py --config configs/hardware/cpu.yaml

Plain torchrun turns a stop into a failure: on Ctrl-C or SIGTERM it raises SignalException (a
traceback), signals the ranks itself, SIGKILLs them after 30 s (a checkpoint still being written is
lost), and exits 1; SIGUSR1 kills it (status 138); --max-restarts restarts ranks that stopped on
request or met a config error. Here torchrun's agent runs in this process with three changes:
- SIGINT, SIGTERM and SIGUSR1 go to the ranks only (they run in their own session, so a terminal's
  Ctrl-C reaches this process alone): the ranks agree to stop after the step with a checkpoint; a
  second Ctrl-C reaches them as their second SIGINT (out at once).
- a rank that exits with one of dsmoe's own statuses (2, 3, 75, 130), or any exit after a stop
  request, is not restarted: rerunning cannot change a config error or a guard abort, and a stop was
  asked for.
- the exit status is the ranks' own (see EXIT_STATUSES), and the last line printed is dsmoe's: the
  resume command, or the ranks' error message (read from torchrun's per-rank error file) with no
  torchrun traceback. A rank killed by a signal S gives 128 + S; a crash keeps its traceback, status 1.
Torch's agent classes are patched by name (`_monitor_workers`, `_terminate_process_handler`): both
exist unchanged from torch 2.2 to 2.13; torchrun has no hook for either decision.
"""
from __future__ import annotations

import logging
import os
import shlex
import signal
import sys

from dsmoe.train.signals import EXIT_INTERRUPTED, EXIT_STOPPED, STOP_SIGNALS

EXIT_STATUSES = {0: "done", 2: "config, checkpoint, data or run-directory error", 3: "the guard aborted, or out of memory",
                 4: "the ranks could not connect", 75: "stopped with a checkpoint", 130: "a second Ctrl-C"}
FINAL = {2, 3, EXIT_STOPPED, EXIT_INTERRUPTED}  # statuses a restart cannot change
LAUNCHER_ENV = "DSMOE_LAUNCHER"  # the command before the training script, for the ranks' resume line


def resume_command(launcher: str, script: str, args: list[str]) -> str:
    """`launcher script args` with any --resume replaced by --resume auto."""
    rest, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--resume":
            skip = True
        elif not a.startswith("--resume="):
            rest.append(a)
    return " ".join([launcher, script, *map(shlex.quote, rest), "--resume", "auto"])


def ranks_status(failures: dict) -> tuple[int, int, object]:
    """(status, rank, failure) of the failure that speaks for the run: the lowest rank that exited with one
    of dsmoe's statuses (the others were often stopped by torchrun because it exited), else the lowest
    rank. `failures`: global rank -> torchrun's ProcessFailure."""
    ours = [r for r in sorted(failures) if failures[r].exitcode in EXIT_STATUSES]
    rank = ours[0] if ours else min(failures)
    code = failures[rank].exitcode
    return (128 - code if code < 0 else code), rank, failures[rank]


def failure_message(failure) -> str | None:
    """The message a rank left in torchrun's error file (dsmoe's say_error writes one), if any."""
    if not (failure.error_file and os.path.isfile(failure.error_file)):
        return None
    message = failure.message
    return message.get("message") if isinstance(message, dict) else message


def describe(status: int) -> str:
    """A rank's exit status in words."""
    if status in EXIT_STATUSES:
        return EXIT_STATUSES[status]
    if status > 128:
        try:
            return f"killed by {signal.Signals(status - 128).name}"
        except ValueError:
            pass
    return "a crash: see its traceback above"


class Launcher:
    """torchrun's agent in this process, with dsmoe's signal and restart rules (module docstring)."""

    def __init__(self, argv: list[str]):
        from torch.distributed.run import parse_args

        self.argv = argv
        self.args = parse_args(argv)
        self.agent = None
        self.stop_signal: str | None = None

    def _patch_torch(self) -> None:
        from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
        from torch.distributed.elastic.multiprocessing import api

        launcher, monitor, terminate = self, LocalElasticAgent._monitor_workers, api._terminate_process_handler

        def monitor_workers(agent, worker_group):
            launcher.agent = agent
            result = monitor(agent, worker_group)
            if launcher.stop_signal or any(f.exitcode in FINAL for f in (result.failures or {}).values()):
                agent._remaining_restarts = 0  # after a stop request, or a deliberate exit: never restart
            return result

        def on_signal(signum, frame):
            if signum in STOP_SIGNALS:
                return launcher.forward(signum)
            return terminate(signum, frame)  # SIGHUP, SIGQUIT: torchrun's own way

        LocalElasticAgent._monitor_workers = monitor_workers
        api._terminate_process_handler = on_signal
        for sig in STOP_SIGNALS:  # torchrun installs its handler (now on_signal) when it starts the ranks
            signal.signal(sig, on_signal)

    def forward(self, signum: int) -> None:
        """Send the signal to this node's ranks (none yet: stop before they start)."""
        name = signal.Signals(signum).name
        pcontext = getattr(self.agent, "_pcontext", None)
        pids = list(pcontext.pids().values()) if pcontext is not None else []
        if not pids:
            print(f"{name} before the ranks started: nothing to save", file=sys.stderr, flush=True)
            os._exit(EXIT_INTERRUPTED if signum == signal.SIGINT else 128 + signum)
        self.stop_signal = self.stop_signal or name
        for pid in pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def launcher_command(self) -> str:
        script_at = len(self.argv) - len(self.args.training_script_args) - 1
        return " ".join(["python -m dsmoe.run", *map(shlex.quote, self.argv[:script_at])])

    def run(self) -> int:
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.run import run

        os.environ[LAUNCHER_ENV] = self.launcher_command()
        # torchrun logs each rank's exit and the signals it sends them; dsmoe's last line says what happened
        logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
        self._patch_torch()
        try:
            run(self.args)
            return 0
        except ChildFailedError as e:
            status, rank, failure = ranks_status(e.failures)
        sys.stdout.flush()
        if status == EXIT_STOPPED:
            print(f"stopped with a checkpoint ({self.stop_signal or 'a stop request'}): exit 75; resume: "
                  + resume_command(self.launcher_command(), self.args.training_script,
                                   self.args.training_script_args), file=sys.stderr, flush=True)
        elif (message := failure_message(failure)) is not None:
            print(f"error: {message}", file=sys.stderr, flush=True)
        else:
            print(f"rank {rank} exited with status {status} ({describe(status)})", file=sys.stderr, flush=True)
        return status


def main(argv: list[str] | None = None) -> int:
    return Launcher(sys.argv[1:] if argv is None else argv).run()


if __name__ == "__main__":
    sys.exit(main())
