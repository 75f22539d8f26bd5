"""Spawned gloo ranks for tests: a pool kept for many jobs, and one-off runs for failure tests.

Starting a rank (a spawned process importing torch) takes seconds on a small machine, so tests
that only need working ranks share a `RankPool`; a test that breaks its ranks (raising, dying,
stalling leaves the process group unusable) starts its own with `run_ranks`.

A job is a module-level function, called on every rank as `fn(*args)` after the process group
is up; what it returns (tensors included) comes back per rank. Objects travel serialized by
`torch.save`, not through shared memory, so a rank may exit right after answering.
"""

from __future__ import annotations

import io
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

START_TIMEOUT = 120.0
"""Seconds a rank may take to start and join the process group."""


def free_port() -> int:
    """A TCP port free on the loopback interface now (bound to port 0, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _dumps(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _loads(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def _serve(rank: int, world: int, port: int, jobs: Any, results: Any) -> None:
    """A rank's loop: join the group, then run jobs until told to stop (None)."""
    # Ranks share the machine's cores: one thread each keeps them from oversubscribing it.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        while (job := jobs.get()) is not None:
            fn, args = _loads(job)
            try:
                results.put((rank, True, _dumps(fn(*args))))
            except BaseException:  # reported to the test, which names the rank
                results.put((rank, False, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


class RankPool:
    """`world` gloo ranks kept running; `run(fn, *args)` runs a job on all of them."""

    def __init__(self, world: int):
        context = mp.get_context("spawn")
        port = free_port()
        self.world = world
        self.results = context.Queue()
        self.jobs = [context.Queue() for _ in range(world)]
        self.processes = [context.Process(target=_serve, daemon=True,
                                          args=(rank, world, port, self.jobs[rank],
                                                self.results))
                          for rank in range(world)]
        for process in self.processes:
            process.start()

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 60.0) -> list[Any]:
        """`fn(*args)`'s result on each rank, by rank; an AssertionError with the tracebacks
        of the ranks that raised."""
        job = _dumps((fn, args))
        for jobs in self.jobs:
            jobs.put(job)
        answers = _collect(self.results, self.processes, timeout + START_TIMEOUT)
        missing = sorted(set(range(self.world)) - set(answers))
        if missing:
            raise AssertionError(f"rank(s) {missing} exited without answering")
        failed = {rank: text for rank, (ok, text) in answers.items() if not ok}
        if failed:
            raise AssertionError("\n".join(f"rank {rank} raised:\n{text}"
                                           for rank, text in sorted(failed.items())))
        return [_loads(answers[rank][1]) for rank in range(self.world)]

    def close(self) -> None:
        """Stop the ranks (they leave the group and exit)."""
        for jobs in self.jobs:
            jobs.put(None)
        _stop(self.processes)


def _stop(processes: list[Any]) -> None:
    """Wait for the ranks to exit; kill those that do not within 30 s."""
    for process in processes:
        process.join(30)
        if process.is_alive():
            process.kill()
            process.join()


def _collect(results: Any, processes: list[Any], timeout: float
             ) -> dict[int, tuple[bool, Any]]:
    """An answer `{rank: (ok, payload)}` from every rank still alive, or an AssertionError
    naming the ranks that neither answered nor exited within `timeout` seconds."""
    answers: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout
    while True:
        waiting = [rank for rank, process in enumerate(processes)
                   if rank not in answers and process.exitcode is None]
        if not waiting:  # answers sent just before exiting may still be in the queue
            while True:
                try:
                    rank, ok, payload = results.get(timeout=0.5)
                    answers[rank] = (ok, payload)
                except queue.Empty:
                    return answers
        if time.monotonic() > deadline:
            raise AssertionError(f"rank(s) {waiting} did not answer within {timeout:g} s")
        try:
            rank, ok, payload = results.get(timeout=0.2)
            answers[rank] = (ok, payload)
        except queue.Empty:
            pass


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 60.0
              ) -> tuple[dict[int, tuple[bool, Any]], list[int | None]]:
    """Run `fn(*args)` once on `world` fresh ranks: `({rank: (ok, result or traceback)}, exit
    codes)`. A rank that dies without answering is missing from the answers."""
    pool = RankPool(world)
    for jobs in pool.jobs:
        jobs.put(_dumps((fn, args)))
        jobs.put(None)
    try:
        answers = _collect(pool.results, pool.processes, timeout + START_TIMEOUT)
    finally:
        _stop(pool.processes)
    return ({rank: (ok, _loads(payload) if ok else payload)
             for rank, (ok, payload) in answers.items()},
            [process.exitcode for process in pool.processes])
