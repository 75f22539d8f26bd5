"""Which layer inputs a stream of layers keeps, and how its backward gets the others back.

StreamBP keeps each layer's input from the forward. A run of `n` layers then holds `n`
whole-length hidden states until its backward reaches them; at long lengths those dominate the
peak. Holding at most `c` of them at once instead means recomputing some layers' forward in the
backward: the problem is the classic one of reversing a chain with `c` checkpoints (Griewank's
"revolve"), solved here by dynamic programming over (layers, checkpoints).

A `Reversal` is the plan for one segment of layers whose input is held. A leaf is one layer:
its backward re-runs it in chunks from that input. A split at `k` runs the first `k` layers
forward from the held input, holds the result, reverses the rest, drops it, then reverses the
first `k`. The segment's input and every split point held above it count toward `c`; so does a
leaf's input. In the step's forward, the splits along the first segment's right spine are
computed anyway: they are kept then instead of recomputed (`Reversal.kept_in_forward`).

`c = n` keeps every input (no recompute); `c = 2` keeps the run's input and one more state, for
`n (n - 1) / 2` recomputed layer forwards; `c = 1` only reverses a single layer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

_NEVER = float("inf")


@dataclass(frozen=True)
class Reversal:
    """How the backward walks layers `[start, stop)` from their held input."""

    start: int
    stop: int
    split: int = 0
    """Layers run forward from `start` to the state held for the right part; 0 for a leaf."""
    right: Reversal | None = None
    """Layers `[start + split, stop)`, reversed first, from the state at `start + split`."""
    left: Reversal | None = None
    """Layers `[start, start + split)`, reversed after `right`."""
    kept: bool = True
    """Whether the step's forward keeps the held state when this split lies on its right spine
    (False: the backward recomputes it all the same, so the forward holds fewer states)."""

    @property
    def middle(self) -> int:
        """The layer index whose input the split holds."""
        return self.start + self.split

    def kept_in_forward(self) -> list[int]:
        """Layer indices whose inputs the step's forward keeps: the run's first, and the split
        points along the right spine (the forward computes them anyway)."""
        kept, node = [self.start], self
        while node.split and node.kept:
            kept.append(node.middle)
            node = node.right
        return kept

    def recomputed(self, on_spine: bool = True) -> int:
        """Layer forwards the backward runs to get inputs back (a leaf's own re-run excluded)."""
        if not self.split:
            return 0
        kept = on_spine and self.kept
        return ((0 if kept else self.split) + self.right.recomputed(kept)
                + self.left.recomputed(False))

    def held(self) -> int:
        """The most layer inputs held at once while this segment is reversed, its own included."""
        if not self.split:
            return 1
        return max(1 + self.right.held(), self.left.held())


def reversal(n: int, checkpoints: int) -> Reversal:
    """The reversal of `n` layers holding at most `checkpoints` inputs at once, with the fewest
    recomputed layer forwards (the forward's own spine is free). Raises ValueError when
    `checkpoints` cannot reverse `n` layers (fewer than 2 for more than one layer)."""
    if n < 1:
        raise ValueError(f"a reversal needs at least one layer, got {n}")
    c = min(checkpoints, n)
    if _cost(n, c, top=True) == _NEVER:
        raise ValueError(f"{n} layers cannot be reversed holding {checkpoints} input(s) at once; "
                         "valid: at least 2 (or 1 for a single layer)")
    return _build(0, n, c, top=True)


def groups_reversal(n: int, size: int) -> Reversal:
    """Groups of `size` consecutive layers whose first input alone is kept by the forward; a
    group's backward recomputes and holds the others (`StreamOptions.layers_per_checkpoint`)."""
    if n <= size:
        return _chain(0, n, kept=False)
    return Reversal(0, n, size, right=_shift(groups_reversal(n - size, size), size),
                    left=_chain(0, size))


def least_checkpoints(n: int) -> int:
    """The fewest inputs any reversal of `n` layers holds at once."""
    return 1 if n == 1 else 2


def _chain(start: int, stop: int, kept: bool = True) -> Reversal:
    """Every input held: one layer forward at a time, each state kept."""
    if stop - start == 1:
        return Reversal(start, stop)
    return Reversal(start, stop, 1, right=_chain(start + 1, stop, kept),
                    left=Reversal(start, start + 1), kept=kept)


def _shift(r: Reversal, by: int) -> Reversal:
    if not r.split:
        return Reversal(r.start + by, r.stop + by)
    return Reversal(r.start + by, r.stop + by, r.split, _shift(r.right, by), _shift(r.left, by),
                    r.kept)


@functools.lru_cache(maxsize=None)
def _cost(n: int, c: int, top: bool = False) -> float:
    """Fewest layer forwards to reverse `n` layers from a held input, holding at most `c`.
    `top`: the forward has just run, so the states along the right spine come for free."""
    if n == 1:
        return 0 if c >= 1 else _NEVER
    if c < 2:
        return _NEVER
    return min((0 if top else k) + _cost(n - k, c - 1, top) + _cost(k, c) for k in range(1, n))


def _build(start: int, stop: int, c: int, top: bool) -> Reversal:
    n = stop - start
    if n == 1:
        return Reversal(start, stop)
    # Among equally cheap splits, the largest: the held state sits late, and the left part,
    # reversed from the segment's input, is where any further recompute happens.
    best = min(range(1, n), key=lambda k: (
        (0 if top else k) + _cost(n - k, c - 1, top) + _cost(k, c), -k))
    return Reversal(start, stop, best, right=_build(start + best, stop, c - 1, top),
                    left=_build(start, start + best, c, False))
