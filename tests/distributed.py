"""Run a function on several gloo processes and collect each rank's return value.

    results = run_workers(fn, world=2, args=(a, b))   # fn(rank, world, *args) -> picklable

The function must be importable (module level). Each worker gets torchrun-style environment
variables, one CPU thread, and an initialised gloo process group.

Workers fork from one forkserver that imported torch and dsmoe once per test session: a start costs a
fork, not an interpreter and a torch import (seconds per rank on a 2-core machine). They meet through a
file:// rendezvous in a fresh temporary directory, so no port is chosen, released and raced for.
"""
from __future__ import annotations

import io
import os
import queue as queue_module
import socket
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PRELOAD = ["torch", "torch.distributed", "torch.distributed.checkpoint", "torch.distributed.fsdp",
           "dsmoe.model", "dsmoe.parallel.wrap", "dsmoe.train.trainer"]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # read when the server starts: the first call of a session
    return ctx


def _worker(rank: int, world: int, rendezvous: str, fn, args, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
        buf = io.BytesIO()  # tensors travel as bytes: shared-memory handles die with the worker
        torch.save(fn(rank, world, *args), buf)
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException:  # report every failure to the parent instead of hanging it
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


AFTER_ERROR_S = 15.0  # once a rank has failed, how long the others get to report before they are killed


def run_workers(fn, world: int, args: tuple = (), timeout: float = 300.0) -> list:
    """Fails (instead of hanging) when a worker dies without reporting, the whole run overruns, or a rank
    failed and the others have not reported AFTER_ERROR_S later (a rank left waiting on the failed one)."""
    ctx = _context()
    queue = ctx.Queue()
    rendezvous_dir = tempfile.TemporaryDirectory(prefix="dsmoe-rdzv-")
    rendezvous = f"file://{rendezvous_dir.name}/store"
    procs = [ctx.Process(target=_worker, args=(r, world, rendezvous, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict = {}
    errors = []
    deadline = give_up = time.monotonic() + timeout
    while len(results) + len(errors) < world:
        try:
            rank, status, value = queue.get(timeout=1.0)
        except queue_module.Empty:
            silent = [r for r, p in enumerate(procs) if not p.is_alive() and p.exitcode != 0]
            if silent or time.monotonic() > deadline:
                errors.append(f"ranks {silent} died without a report" if silent else f"timed out after {timeout}s")
                break
            if errors and time.monotonic() > give_up:
                errors.append(f"the other ranks had not reported {AFTER_ERROR_S:.0f} s after that error")
                break
            continue
        if status == "error":
            if not errors:
                give_up = time.monotonic() + AFTER_ERROR_S
            errors.append(f"rank {rank}:\n{value}")
        else:
            results[rank] = torch.load(io.BytesIO(value), weights_only=False)
    for p in procs:
        p.join(timeout=5 if errors else 30)
        if p.is_alive():
            p.kill()
    rendezvous_dir.cleanup()
    if errors:
        raise RuntimeError("worker failed\n" + "\n".join(errors))
    return [results[r] for r in range(world)]
