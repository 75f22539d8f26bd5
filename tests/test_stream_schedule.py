"""Structure of the stream's layer-input schedule (`planning.stream_schedule`) and of the budget
that picks it (`planning.stream_memory`): no model runs here."""

from __future__ import annotations

import functools

import pytest

from memcompile.errors import MemoryBudgetError
from memcompile.planning.stream_memory import StreamMemory, checkpoints_for
from memcompile.planning.stream_schedule import (Reversal, groups_reversal, least_checkpoints,
                                               reversal)


def _every_reversal(start: int, stop: int):
    """Every tree of splits over layers [start, stop) (all kept flags True)."""
    if stop - start == 1:
        yield Reversal(start, stop)
        return
    for k in range(1, stop - start):
        for right in _every_reversal(start + k, stop):
            for left in _every_reversal(start, start + k):
                yield Reversal(start, stop, k, right=right, left=left)


@functools.lru_cache(maxsize=None)
def _least_by_search(n: int, c: int) -> int | None:
    costs = [r.recomputed() for r in _every_reversal(0, n) if r.held() <= c]
    return min(costs) if costs else None


@pytest.mark.parametrize("n", range(1, 7))
def test_reversal_recomputes_least_among_all_trees_within_its_checkpoints(n):
    for c in range(least_checkpoints(n), n + 1):
        r = reversal(n, c)
        assert r.held() <= c
        assert r.recomputed() == _least_by_search(n, c), (n, c)
    if n > 1:
        assert _least_by_search(n, 1) is None  # one held input cannot reverse two layers


@pytest.mark.parametrize("n", [2, 5, 8, 12, 32])
def test_reversal_extremes_and_monotone(n):
    every = reversal(n, n)
    assert every.recomputed() == 0 and every.kept_in_forward() == list(range(n))
    # Two held: the forward keeps the input and the last layer's; each other layer's input is
    # recomputed from the first, (n - 1)(n - 2) / 2 layer forwards in all.
    least = reversal(n, 2)
    assert least.kept_in_forward() == [0, n - 1]
    assert least.recomputed() == (n - 1) * (n - 2) // 2
    costs = [reversal(n, c).recomputed() for c in range(2, n + 1)]
    assert costs == sorted(costs, reverse=True)
    assert reversal(n, 10 * n) == every


def test_reversal_of_eight_layers():
    """The schedule the `wide` bench uses: 3 inputs held cost 7 recomputed layer forwards, 4
    cost 4."""
    three = reversal(8, 3)
    assert (three.held(), three.recomputed(), three.kept_in_forward()) == (3, 7, [0, 5, 7])
    four = reversal(8, 4)
    assert (four.held(), four.recomputed(), four.kept_in_forward()) == (4, 4, [0, 4, 6, 7])


def test_reversal_rejects_too_few_checkpoints():
    with pytest.raises(ValueError, match="at least 2"):
        reversal(3, 1)
    assert reversal(1, 1) == Reversal(0, 1)


@pytest.mark.parametrize("n,size,kept,held,recomputed", [
    (5, 1, [0, 1, 2, 3, 4], 5, 0),
    (5, 2, [0, 2, 4], 3, 2),
    (5, 3, [0, 3], 3, 3),
    (5, 5, [0], 5, 4),
    (8, 4, [0, 4], 5, 6),
])
def test_groups_keep_every_gth_input(n, size, kept, held, recomputed):
    r = groups_reversal(n, size)
    assert (r.kept_in_forward(), r.held(), r.recomputed()) == (kept, held, recomputed)


_MIB = 2**20
_MEMORY = StreamMemory(gradients=100 * _MIB, hidden=10 * _MIB, keys_values=5 * _MIB,
                       gradient_sums=5 * _MIB, tables=4 * _MIB, layer_chunk=3 * _MIB,
                       head_chunk=2 * _MIB, layers=8)


def test_estimated_peak_counts_held_inputs_and_working_set():
    # gradients, tables, the larger chunk, then the forward's (3 + 2) hidden states and keys
    # and values, which exceed the backward's (3 + 1) hidden states, keys, values and sums.
    assert _MEMORY.peak(3) == (100 + 4 + 3 + 5 * 10 + 5) * _MIB == 162 * _MIB
    assert _MEMORY.peak(8) - _MEMORY.peak(7) == 10 * _MIB
    assert _MEMORY.peak(20) == _MEMORY.peak(8)
    wide_keys = StreamMemory(gradients=0, hidden=10 * _MIB, keys_values=20 * _MIB,
                             gradient_sums=20 * _MIB, tables=0, layer_chunk=0, head_chunk=0,
                             layers=8)
    assert wide_keys.peak(3) == (4 * 10 + 2 * 20) * _MIB  # the backward's is larger
    # Half-precision keys and values: their gradient sums are float32, twice their bytes.
    half = StreamMemory(gradients=0, hidden=10 * _MIB, keys_values=20 * _MIB,
                        gradient_sums=40 * _MIB, tables=0, layer_chunk=0, head_chunk=0, layers=8)
    assert half.peak(3) == (4 * 10 + 20 + 40) * _MIB


def test_budget_picks_the_most_checkpoints_that_fit():
    assert checkpoints_for(None, _MEMORY) is None
    assert checkpoints_for("auto", _MEMORY) is None
    assert checkpoints_for(162 * _MIB, _MEMORY) == 3
    assert checkpoints_for(172 * _MIB - 1, _MEMORY) == 3
    assert checkpoints_for(172 * _MIB, _MEMORY) == 4
    assert checkpoints_for(10**12, _MEMORY) == 8
    assert checkpoints_for(1.0, _MEMORY) == 8
    # 0.8 of the every-input estimate (212 MiB) is 169.6 MiB: three inputs
    assert checkpoints_for(0.8, _MEMORY) == 3


def test_budget_below_the_least_estimate_names_it():
    with pytest.raises(MemoryBudgetError) as caught:
        checkpoints_for(150 * _MIB, _MEMORY)
    assert caught.value.least_peak_bytes == _MEMORY.peak(2) == 152 * _MIB
    assert "2 of 8 layer inputs" in str(caught.value)
