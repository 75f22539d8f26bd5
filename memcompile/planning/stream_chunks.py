"""How many tokens a layer chunk holds when `chunk_size` is "auto", and how a numeric
`memory_budget` is split between held layer inputs and chunk length.

A chunk's length trades calls for memory. Each chunk of each layer costs a fixed number of
kernel calls whatever its length (a GPU step of 1,024-token chunks was launch-bound: BENCHMARKS.md,
"wide on an NVIDIA H200"), while what the chunk computes grows with it (`StreamMemory.layer_chunk`).
The held layer inputs grow with the whole length. So, from the plan's estimate
(`stream_memory.estimate`, linear in the chunk length):

- **No numeric budget**: the longest chunk whose values stay within a quarter of the held
  layer inputs' bytes (`TRANSIENT_SHARE`): the chunk term then adds at most a quarter to what
  the inputs hold, and the number of chunks stays about constant as the sequence grows (about
  10 on a Llama-shaped layer: its chunk values are some 40 hidden states per token). Never
  below `MIN_AUTO_CHUNK` tokens: shorter chunks save little memory at the lengths where they
  would be picked, and multiply the calls.
- **A numeric budget**: recomputing a layer input costs a whole layer forward, a chunk only its
  calls, so memory is bought with chunks first: the most inputs held (`checkpoints`), then the
  fewest chunks (of at least `MIN_AUTO_CHUNK` tokens) whose estimated peak meets the budget.
  When even the fewest inputs need shorter chunks, chunks go down to `MIN_BUDGET_CHUNK`.

The chunks of a length are as equal as they can be: `k` chunks of `ceil(length / k)` tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from memcompile.errors import MemoryBudgetError
from memcompile.planning.stream_memory import StreamMemory, estimate
from memcompile.planning.stream_schedule import least_checkpoints, reversal

MIN_AUTO_CHUNK = 1024
"""The shortest chunk "auto" picks unless a budget needs shorter ones (tokens)."""
MIN_BUDGET_CHUNK = 16
"""The shortest chunk a budget may ask for (tokens)."""
TRANSIENT_SHARE = 4
"""Without a budget a chunk's values stay within 1/TRANSIENT_SHARE of the held inputs' bytes."""


@dataclass(frozen=True)
class ChunkChoice:
    """The layer chunk length and the inputs held, with the reason the report gives."""

    chunk: int
    """Tokens per layer chunk."""
    checkpoints: int | None
    """The most layer inputs a run holds at once; None: every input."""
    memory: StreamMemory
    """The estimate at that chunk length."""
    why: str


def choose_chunks(plan: Any, parameters: list[torch.Tensor], budget: Any,
                  checkpoints: int | None) -> ChunkChoice:
    """Size `plan`'s layer chunks (and set them) for the whole length `plan.info.length`.

    `budget`: `Options.memory_budget` (only bytes or a fraction count); `checkpoints`: the
    held inputs the user fixed, or None to choose them. Raises `MemoryBudgetError` when no
    split meets the budget.
    """
    length = plan.info.length

    def memory_at(chunk: int) -> StreamMemory:
        for region in plan.layers:
            region.chunk_size = chunk
        return estimate(plan, parameters)

    choice = size_chunks(memory_at, length, budget, checkpoints)
    for region in plan.layers:
        region.chunk_size = choice.chunk
    return choice


def size_chunks(memory_at: Callable[[int], StreamMemory], length: int, budget: Any,
                checkpoints: int | None) -> ChunkChoice:
    """The rule of this module on any estimate: `memory_at(chunk)` is the estimate with layer
    chunks of `chunk` tokens, `length` the whole length; `budget` and `checkpoints` as in
    `choose_chunks`."""
    if budget is None or budget == "auto":
        return _without_budget(memory_at, length, checkpoints)
    return _under_budget(memory_at, length, memory_at(length).layers, budget, checkpoints)


def _without_budget(memory_at: Callable[[int], StreamMemory], length: int,
                    checkpoints: int | None) -> ChunkChoice:
    memory = memory_at(length)
    held = min(checkpoints or memory.layers, memory.layers)
    allowed = held * memory.hidden // TRANSIENT_SHARE
    longest = _fewest_chunks(lambda c: memory_at(c).layer_chunk <= allowed, length, 1)
    chunk = max(longest or 1, min(MIN_AUTO_CHUNK, length))
    memory = memory_at(chunk)
    inputs = f"the {held} held layer inputs ({held * memory.hidden:,} bytes)"
    if longest is not None and longest >= chunk:
        why = (f"the longest whose chunk values ({memory.layer_chunk:,} bytes estimated) stay "
               f"within a quarter of {inputs}")
    else:
        why = (f"the shortest 'auto' picks: a quarter of {inputs} would allow "
               f"{longest or 1:,} tokens, and shorter chunks would multiply the calls for "
               "little memory")
    return ChunkChoice(chunk, checkpoints, memory, _split(chunk, length) + ": " + why)


def _under_budget(memory_at: Callable[[int], StreamMemory], length: int, n: int, budget: Any,
                  checkpoints: int | None) -> ChunkChoice:
    if isinstance(budget, float):
        reference = _without_budget(memory_at, length, None).memory.peak(n)
        limit = int(budget * reference)
    else:
        reference, limit = None, int(budget)
    least = least_checkpoints(n)
    held_options = [checkpoints] if checkpoints else list(range(n, least - 1, -1))
    for floor in (MIN_AUTO_CHUNK, MIN_BUDGET_CHUNK):
        for held in held_options:
            chunk = _fewest_chunks(lambda c: memory_at(c).peak(held) <= limit, length, floor)
            if chunk is None:
                continue
            memory = memory_at(chunk)
            walk = reversal(n, max(held, least))
            if checkpoints:
                reason = "the inputs held as given"
            elif held >= n:
                reason = "every input held"
            elif floor == MIN_AUTO_CHUNK:
                reason = f"holding more would need chunks under {MIN_AUTO_CHUNK:,} tokens"
            else:
                reason = "holding more meets it with no chunk length"
            if floor < MIN_AUTO_CHUNK:
                reason += (f"; no split meets it with chunks of {MIN_AUTO_CHUNK:,} tokens or "
                           "more")
            why = (f"memory_budget {budget!r} ({limit:,} bytes): {walk.held()} of {n} layer "
                   f"inputs held ({walk.recomputed()} layer forwards recomputed) and the "
                   f"fewest chunks that meet it, estimated peak {memory.peak(held):,} bytes; "
                   + reason)
            return ChunkChoice(chunk, held if held < n or checkpoints else None, memory,
                               _split(chunk, length) + ": " + why)
    fewest = held_options[-1]
    smallest = memory_at(min(MIN_BUDGET_CHUNK, length)).peak(fewest)
    raise MemoryBudgetError(
        limit, smallest, f"stream: the estimated peak holding {fewest} of {n} layer inputs "
        f"at once with chunks of {min(MIN_BUDGET_CHUNK, length)} tokens; a shorter sequence "
        "lowers it", budget=budget if isinstance(budget, float) else None,
        reference_bytes=reference)


def _fewest_chunks(fits: Callable[[int], bool], length: int, floor: int) -> int | None:
    """The longest chunk `ceil(length / k)` of at least `floor` tokens (or the whole length)
    that `fits`, by bisection on `k` (the estimate only grows with the chunk); None if none."""
    most = max(1, math.ceil(length / max(floor, 1)))
    while most > 1 and math.ceil(length / most) < floor:
        most -= 1
    if not fits(math.ceil(length / most)):
        return None
    low, high = 1, most  # fits(high) holds; find the least k that fits
    while low < high:
        mid = (low + high) // 2
        if fits(math.ceil(length / mid)):
            high = mid
        else:
            low = mid + 1
    return math.ceil(length / low)


def _split(chunk: int, length: int) -> str:
    count = math.ceil(length / chunk)
    return (f"chunk_size 'auto': {chunk:,} tokens ({count} chunk{'s' if count > 1 else ''} "
            f"of {length:,})")
