"""Point-to-point transfers with a deadline, and a count of the bytes they send.

A `Transfer` collects the sends and receives of one moment of the schedule and posts them
together with `dist.batch_isend_irecv` (one NCCL group on GPUs; separate gloo ops on the CPU).
The caller posts the next step's transfer before computing on the current step's buffer, so
the two overlap (double buffering), and waits on it only when it needs the data.

Every wait has a deadline. A peer that raised before posting its side, stalled, or died makes
the wait fail (gloo: "Connection closed by peer" at once for a dead process, a timeout for the
others); either way `PeerError` names the ranks whose transfers had not completed. After that
the process group is unusable (gloo closes the pair on a timeout): destroy it.

Peers are ranks within the group (`group_peer`), so any subgroup works.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from memcompile.errors import MemcompileError

log = logging.getLogger(__name__)


class PeerError(MemcompileError, RuntimeError):
    """A transfer with other ranks did not complete in time: a peer raised, died or stalled.

    `rank` is this process's rank in the group, `peers` the group ranks whose transfers had not
    completed, `what` the transfer (phase and step)."""

    def __init__(self, rank: int, peers: list[int], what: str, timeout: float,
                 cause: BaseException | None):
        self.rank, self.peers, self.what = rank, peers, what
        names = ", ".join(str(p) for p in peers)
        reason = f": {cause}" if cause is not None else ""
        super().__init__(
            f"rank {rank}: {what} with rank(s) {names} failed or did not complete within "
            f"{timeout:g} s{reason}. Rank(s) {names} raised, died or stalled (their own "
            f"output says why); this process group cannot be used again, destroy it")


@dataclass
class ByteCounter:
    """Bytes this rank sent while the counter was active, by phase of the attention call."""

    forward: int = 0
    """Bytes sent by forward calls (keys/values)."""
    backward: int = 0
    """Bytes sent by backward calls (keys/values again, and key/value gradients)."""
    calls: int = 0
    """Forward calls counted."""
    masks: int = 0
    """Bytes sent exchanging padding masks (`distributed.masks`), apart from the schedule's."""


_ACTIVE: list[ByteCounter] = []
"""Counters of the open `count_bytes` blocks. A plain list, not a context variable: the
backward may run on another thread (the autograd engine's device threads)."""


@contextmanager
def count_bytes() -> Iterator[ByteCounter]:
    """Count the bytes this rank sends in the block (forward and backward of every distributed
    attention call): `with count_bytes() as sent: ...; sent.forward`."""
    counter = ByteCounter()
    _ACTIVE.append(counter)
    try:
        yield counter
    finally:
        _ACTIVE.remove(counter)


def count_call() -> None:
    """Record one forward call in the active counters."""
    for counter in _ACTIVE:
        counter.calls += 1


class Transfer:
    """Sends and receives of one moment of the schedule, posted together.

    `phase` ("forward" or "backward") picks the counter field; `what` names the transfer in
    errors ("forward keys/values of step 2"); `timeout` is the seconds `wait` allows."""

    def __init__(self, group: dist.ProcessGroup | None, phase: str, what: str, timeout: float):
        self.group, self.phase, self.what, self.timeout = group, phase, what, timeout
        self._ops: list[dist.P2POp] = []
        self._peers: list[int] = []
        self._works: list[dist.Work] = []

    def send(self, tensor: torch.Tensor, peer: int) -> None:
        """Queue sending `tensor` (made contiguous) to group rank `peer`."""
        self._ops.append(dist.P2POp(dist.isend, tensor.contiguous(), group=self.group,
                                    group_peer=peer))
        self._peers.append(peer)

    def recv(self, tensor: torch.Tensor, peer: int) -> torch.Tensor:
        """Queue receiving into `tensor` (contiguous) from group rank `peer`; returns it."""
        self._ops.append(dist.P2POp(dist.irecv, tensor, group=self.group, group_peer=peer))
        self._peers.append(peer)
        return tensor

    def start(self) -> Transfer:
        """Post every queued op (nothing to post is fine) and count the bytes sent."""
        if self._ops:
            try:
                self._works = dist.batch_isend_irecv(self._ops)
            except Exception as error:  # gloo raises at once when a peer's socket is closed
                raise self._error(self._peers, error) from error
        sent = sum(op.tensor.numel() * op.tensor.element_size()
                   for op in self._ops if op.op is dist.isend)
        for counter in _ACTIVE:
            setattr(counter, self.phase, getattr(counter, self.phase) + sent)
        return self

    def wait(self) -> None:
        """Wait for every op until `timeout` seconds after this call, or raise `PeerError`
        naming the peers whose ops had not completed."""
        deadline = time.monotonic() + self.timeout
        for index, work in enumerate(self._works):
            # A zero timedelta means "no deadline" to Work.wait: keep at least a millisecond.
            left = max(deadline - time.monotonic(), 1e-3)
            try:
                if work.wait(datetime.timedelta(seconds=left)) is False:
                    raise TimeoutError(f"timed out after {self.timeout:g} s")
            except Exception as error:  # gloo and NCCL raise RuntimeError or DistBackendError
                raise self._failure(index, error) from error

    def _failure(self, index: int, cause: BaseException) -> PeerError:
        """The error for a wait that failed at op `index`: that op's peer and every later
        op's that had not completed either."""
        if len(self._works) != len(self._peers):  # NCCL may coalesce a batch into one work
            return self._error(self._peers, cause)
        stuck = [self._peers[index]] + [peer for peer, work in
                                        zip(self._peers[index + 1:], self._works[index + 1:])
                                        if not work.is_completed()]
        return self._error(stuck, cause)

    def _error(self, peers: list[int], cause: BaseException) -> PeerError:
        rank = dist.get_rank(self.group)
        log.error("rank %d: %s failed with rank(s) %s: %s", rank, self.what, peers, cause)
        return PeerError(rank, sorted(set(peers)), self.what, self.timeout, cause)
