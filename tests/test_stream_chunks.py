"""`chunk_size="auto"` (memcompile.planning.stream_chunks): the rule on hand-built estimates,
and the plan of a real model."""

from __future__ import annotations

import math

import pytest
import torch

from memcompile.errors import MemoryBudgetError
from memcompile.planning.stream_chunks import MIN_AUTO_CHUNK, choose_chunks, size_chunks
from memcompile.planning.stream_memory import StreamMemory

_KIB = 2**10


def _linear(hidden_per_token: int, chunk_per_token: int, length: int, layers: int = 8,
            gradients: int = 0):
    """An estimate whose chunk term is `chunk_per_token` bytes per chunk token and whose
    hidden state is `hidden_per_token` bytes per token of `length`."""
    def memory_at(chunk: int) -> StreamMemory:
        return StreamMemory(gradients=gradients, hidden=hidden_per_token * length,
                            keys_values=0, gradient_sums=0, tables=0,
                            layer_chunk=chunk_per_token * chunk, head_chunk=0, layers=layers)
    return memory_at


@pytest.mark.parametrize("length,expected", [
    # 8 held inputs of 4 KiB per token; a chunk holds 64 KiB per token: a quarter of the
    # inputs (8 KiB per token of the length) allows length / 8 tokens.
    (65536, 8192), (131072, 16384), (100000, 12500),
    # length / 8 under the floor: the floor.
    (4096, MIN_AUTO_CHUNK), (1000, 1000)])
def test_without_a_budget_chunks_hold_at_most_a_quarter_of_the_held_inputs(length, expected):
    memory_at = _linear(4 * _KIB, 64 * _KIB, length)
    choice = size_chunks(memory_at, length, None, None)
    assert choice.chunk == expected and choice.checkpoints is None
    count = math.ceil(length / choice.chunk)
    if expected > MIN_AUTO_CHUNK:  # the longest that fits: one chunk fewer would not
        assert 4 * memory_at(choice.chunk).layer_chunk <= 8 * 4 * _KIB * length
        assert 4 * memory_at(math.ceil(length / (count - 1))).layer_chunk > 8 * 4 * _KIB * length
        assert "within a quarter of the 8 held layer inputs" in choice.why
    elif length > MIN_AUTO_CHUNK:
        assert "the shortest 'auto' picks" in choice.why
    assert choice.why.startswith(f"chunk_size 'auto': {expected:,} tokens ({count} chunk")


def test_fixed_checkpoints_shrink_the_chunks_with_the_inputs_held():
    memory_at = _linear(4 * _KIB, 64 * _KIB, 65536)
    assert size_chunks(memory_at, 65536, None, 4).chunk == 4096  # half the inputs: half


def test_a_budget_buys_memory_with_chunks_before_held_inputs():
    length = 65536
    memory_at = _linear(4 * _KIB, 64 * _KIB, length, gradients=100 * 2**20)
    every = memory_at(MIN_AUTO_CHUNK).peak(8)  # every input held, chunks of the floor
    # Room for every input and longer chunks: every input held, the fewest chunks.
    choice = size_chunks(memory_at, length, every + 64 * _KIB * 3072, None)
    assert (choice.chunk, choice.checkpoints) == (4096, None)
    assert "every input held" in choice.why
    # Just below every input at the floor: one input fewer, and the longest chunks that fit.
    choice = size_chunks(memory_at, length, every - 1, None)
    assert choice.checkpoints == 7
    assert memory_at(choice.chunk).peak(7) <= every - 1
    assert memory_at(math.ceil(length / (math.ceil(length / choice.chunk) - 1))).peak(7) > every - 1
    assert "holding more would need chunks under 1,024 tokens" in choice.why
    # Below the fewest inputs at the floor: chunks under the floor, with the fewest inputs.
    least = memory_at(MIN_AUTO_CHUNK).peak(2)
    choice = size_chunks(memory_at, length, least - 1, None)
    assert choice.checkpoints == 2 and choice.chunk < MIN_AUTO_CHUNK
    assert "no split meets it with chunks of 1,024 tokens or more" in choice.why
    # Below that even with 16-token chunks: refused with the least estimate.
    with pytest.raises(MemoryBudgetError, match="holding 2 of 8 layer inputs at once with "
                                                "chunks of 16 tokens"):
        size_chunks(memory_at, length, memory_at(16).peak(2) - 1, None)


def test_a_fractional_budget_is_of_the_unbudgeted_plan():
    length = 65536
    memory_at = _linear(4 * _KIB, 64 * _KIB, length)
    reference = memory_at(8192).peak(8)  # the plan without a budget (chunks of 8,192)
    choice = size_chunks(memory_at, length, 0.9, None)
    assert memory_at(choice.chunk).peak(choice.checkpoints or 8) <= int(0.9 * reference)
    assert f"({int(0.9 * reference):,} bytes)" in choice.why


class _Planned(Exception):
    pass


def test_a_real_plan_gets_the_chosen_chunks_and_the_report_says_why():
    """The built-in `small` model (4 layers) traced at 32,768 tokens and planned, not run:
    without a budget the layers get the floor's 1,024 tokens (the chunk's values are some 25
    hidden states per token: a quarter of 4 held inputs allows far fewer tokens); a budget 1
    byte below every input held at the floor holds 3, and the input let go pays for longer
    chunks."""
    from memcompile.capture import trace_static
    from memcompile.config import Options
    from memcompile.meta import NOTES
    from memcompile.models import build_model, make_batch
    from memcompile.passes.stream_plan import plan_stream

    model = build_model("small", dtype=torch.float32)
    batch = make_batch("small", seq_len=32768)
    found = {}

    def backend(gm, example_inputs):
        parameters = [x for x in example_inputs
                      if isinstance(x, torch.Tensor) and x.requires_grad]
        for name in ("plain", "budget"):
            traced = trace_static(gm, example_inputs)
            budget = None
            if name == "budget":
                memory = found["plain"]["memory"]
                budget = memory.peak(memory.layers) - 1
            plan = plan_stream(traced, list(example_inputs),
                               Options(stream=True, memory_budget=budget))
            chunks = {r.chunk_size for r in plan.layers}
            found[name] = {"chunks": chunks, "held": plan.checkpoints,
                           "notes": [t for _, t in traced.meta[NOTES]],
                           "memory": choose_chunks(plan, parameters, budget, None).memory}
            assert {r.chunk_size for r in plan.layers} == chunks  # choosing again: the same
        raise _Planned

    torch._dynamo.reset()
    with pytest.raises(Exception) as raised:
        torch.compile(lambda b: model(**b).loss, backend=backend)(batch)
    assert isinstance(getattr(raised.value, "inner_exception", raised.value), _Planned)
    plain, budgeted = found["plain"], found["budget"]
    assert plain["chunks"] == {MIN_AUTO_CHUNK} and plain["held"] is None
    assert any(n.startswith("chunk_size 'auto': 1,024 tokens (32 chunks of 32,768): the "
                            "shortest 'auto' picks") for n in plain["notes"]), plain["notes"]
    layers = plain["memory"].layers
    assert layers == 4 and budgeted["held"] == 3
    (chunk,) = budgeted["chunks"]
    assert chunk > MIN_AUTO_CHUNK, budgeted["notes"]
    assert any("3 of 4 layer inputs held" in n for n in budgeted["notes"])
