"""What the stream runtime's autograd nodes share: chunk ranges, leaves for side inputs, and the
gradient sums of one region's backward (`RegionGrads`)."""

from __future__ import annotations

import weakref
from typing import Any

import torch

from memcompile.runtime.stream import ChunkRunner


def chunks(length: int, size: int) -> list[tuple[int, int]]:
    """`[start, end)` ranges of `size` covering `length` (the last one shorter)."""
    return [(s, min(s + size, length)) for s in range(0, length, size)]


def leaf(t: Any) -> Any:
    """A detached leaf of a tensor that requires grad (gradients are taken for it); anything
    else as it is."""
    return t.detach().requires_grad_() if isinstance(t, torch.Tensor) and t.requires_grad else t


def add_into(total: torch.Tensor | None, part: torch.Tensor | None) -> torch.Tensor | None:
    """`total + part`, in place into `total` (a sum this runtime owns); None counts as zero."""
    if part is None:
        return total
    return part if total is None else total.add_(part)


_OWN_GRADS: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
"""Input gradients this runtime returned to autograd. One handed back to us unchanged as the
next region's output gradient is referenced by nobody else, so its buffer can become that
region's input gradient (rows are overwritten only after they were read)."""


class RegionGrads:
    """A region's backward state: leaves for its side inputs, the input's and side inputs'
    gradient sums."""

    def __init__(self, runner: ChunkRunner, x: torch.Tensor | None, side: list[Any],
                 reusable: torch.Tensor | None = None):
        self.runner, self.saved_x = runner, x
        self.leaves = [leaf(t) for t in side]
        self.wanted = [i for i, t in enumerate(self.leaves)
                       if isinstance(t, torch.Tensor) and t.requires_grad]
        self.whole = dict(zip(runner.region.side_inputs, self.leaves))
        self.x = (None if x is None else
                  reusable if _reusable(reusable, x) else torch.zeros_like(x))
        self.side: list[torch.Tensor | None] = [None] * len(side)

    def result(self) -> torch.Tensor:
        """The input gradient, marked as this runtime's own."""
        _OWN_GRADS[id(self.x)] = self.x
        return self.x

    def targets(self) -> list[torch.Tensor]:
        """The side inputs gradients are taken for."""
        return [self.leaves[i] for i in self.wanted]

    def add_side(self, found: tuple[torch.Tensor | None, ...]) -> None:
        """Add gradients found for `targets()`, in that order."""
        for i, part in zip(self.wanted, found):
            self.side[i] = add_into(self.side[i], part)

    def forget_param_values(self) -> None:
        """Drop input-only values built from parameters (a transposed weight): each chunk's graph
        rebuilds them from the leaves; masks and tables are reused."""
        region = self.runner.region
        self.whole = {k: v for k, v in self.whole.items() if k in region.side_inputs or not (
            isinstance(v, torch.Tensor) and v.requires_grad)}


def _reusable(grad: torch.Tensor | None, x: torch.Tensor) -> bool:
    return (grad is not None and _OWN_GRADS.get(id(grad)) is grad and grad.shape == x.shape
            and grad.dtype == x.dtype and grad.is_contiguous())
