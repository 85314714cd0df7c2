"""Several training processes on one machine, started by `engine.run.train` itself (TrainConfig.processes;
`rtdetr train` chooses them for the device): N processes train one model together as under `torchrun
--nproc_per_node N` (DDP, gloo on a CPU; rank 0 logs and writes the checkpoints; each process loads its own
share of every batch), each with cores / N threads. The processes are spawned: a script that calls `train` with
processes != 1 must do so under `if __name__ == "__main__":`, as for any multiprocessing.

Why on a CPU (AMD EPYC Zen 3, 2 cores, rtdetr_tiny, batch 16, fp32; `benchmarks/RESULTS.md`): two single-thread
processes of 8 images take 0.78 s per step at 320 px where one process with 2 threads takes 0.91 (steps 20-100,
three interleaved rounds): PyTorch spreads a small model's many small ops over threads poorly; data parallelism
splits the batch instead.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

logger = logging.getLogger(__name__)

MIN_IMAGES_PER_PROCESS = 8  # BatchNorm statistics come from each process's own images on a CPU (no SyncBatchNorm)
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError)  # raised again as themselves in the parent


def local_processes(requested: int, device_type: str, cpu_cores: int, batch_size: int) -> tuple[int, str]:
    """How many processes to train with, and why. requested > 0 is kept; 0 (auto) starts, on a CPU, the most
    processes (up to one per core) that split the batch evenly into at least `MIN_IMAGES_PER_PROCESS` images each,
    and one process on other devices (use torchrun for several GPUs)."""
    if requested > 0:
        return requested, "set by you"
    if device_type != "cpu":
        return 1, "one process per run on a GPU here (several GPUs: torchrun --nproc_per_node N)"
    fitting = [n for n in range(1, cpu_cores + 1) if batch_size % n == 0 and batch_size // n >= MIN_IMAGES_PER_PROCESS]
    processes = max(fitting, default=1)
    if processes == 1:
        return 1, f"one process: batch {batch_size} does not split into {MIN_IMAGES_PER_PROCESS}+ images per core"
    return processes, (f"{processes} processes x {cpu_cores // processes} thread(s), {batch_size // processes} images "
                       "each: faster than one process with every thread (AMD EPYC Zen 3, 2 cores, 320 px: 0.78 vs "
                       "0.91 s per step)")  # fmt: skip


def launch(function: Callable[..., Any], kwargs: dict[str, Any], processes: int) -> Any:
    """`function(**kwargs)` in `processes` new processes joined into one torch.distributed group on this machine
    (loopback, a free port), cores / processes intra-op threads each; returns rank 0's result.

    An exception in any process ends the others and is raised here: a user's mistake (ValueError,
    FileNotFoundError) as itself with its message, anything else as a RuntimeError with the process's traceback.
    """
    context = mp.get_context("spawn")
    results = context.Queue()
    threads = max(1, (os.cpu_count() or 1) // processes)
    settings = dict(threads=threads, log_level=logging.getLogger().level)
    workers = [
        context.Process(target=_worker, args=(rank, settings, function, kwargs, results)) for rank in range(processes)
    ]
    # torchrun's environment; OMP_NUM_THREADS must be there before a process imports torch (unpickling `function`).
    environment = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(processes),
                       OMP_NUM_THREADS=str(threads))  # fmt: skip
    saved = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)
    try:
        for worker in workers:
            worker.start()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value
    try:
        outcomes = _collect(workers, results)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
            worker.join()
    return outcomes[0]


def _collect(workers: list, results: Any) -> dict[int, Any]:
    """Every process's result, or the first failure raised (a process that died without a word included)."""
    outcomes: dict[int, Any] = {}
    while len(outcomes) < len(workers):
        try:
            rank, ok, value = results.get(timeout=1.0)
        except queue.Empty:
            dead = [r for r, w in enumerate(workers) if r not in outcomes and w.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"training process {dead[0]} ended with exit code {workers[dead[0]].exitcode}")
            continue
        if not ok:
            kind, message, trace = value
            user_error = {error.__name__: error for error in USER_ERRORS}.get(kind)
            raise user_error(message) if user_error else RuntimeError(f"training process {rank} failed:\n{trace}")
        outcomes[rank] = value
    return outcomes


def _worker(rank: int, settings: dict[str, Any], function: Callable[..., Any], kwargs: dict[str, Any], results: Any) -> None:
    """One process: its rank, its threads and the parent's log level (rank 0 only: the others log warnings),
    then `function(**kwargs)`; its result or its failure goes to `results`."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(settings["threads"])
    level = settings["log_level"] if rank == 0 else max(settings["log_level"], logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        results.put((rank, True, function(**kwargs)))
    except KeyboardInterrupt:
        pass
    except Exception as error:  # reported to the parent, which raises it
        kind = next((user.__name__ for user in USER_ERRORS if isinstance(error, user)), type(error).__name__)
        results.put((rank, False, (kind, str(error), traceback.format_exc())))


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

