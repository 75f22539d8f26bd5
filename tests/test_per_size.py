"""A byte budget holds at every length a symbolic graph runs at (`memcompile/per_size.py`).

Dynamo compiles the first length statically and the second with a symbolic length, reused for
every later one. Under a byte budget, that graph is planned again at each length it runs at:
the tracked peak stays under the budget at each, and a length no plan can fit raises
`MemoryBudgetError` with that length's least peak. (Before, the plan made at 128 tokens ran at
256 at 7.30 MB, over a budget of 4 MiB.)
"""

from __future__ import annotations

import pytest
import torch
from helpers import FLOAT64_TOL, clone_model, step_error

import memcompile
from memcompile.measure import tracked_peak
from memcompile.models import build_model, make_batch
from memcompile.per_size import specialize
from memcompile.report import recording

BUDGET = 4 * 2**20
"""Between the least peaks the fixed cost model's plans reach at 256 tokens (2,985,488 B) and at
512 (5,920,272 B): a margin of 1.4x at 256, so the test does not hang on the greedy's path."""


def test_a_byte_budget_holds_at_every_length_of_one_compiled_function():
    model = build_model("tiny", dtype=torch.float64)
    ref = clone_model(model)
    torch._dynamo.reset()
    step = torch.compile(lambda b: model(**b).loss, backend="memcompile",
                         options={"runtime": "eager", "memory_budget": BUDGET,
                                  "cost_model": "fixed"})
    with recording() as records:
        for length in (64, 128, 256):
            batch = make_batch("tiny", seq_len=length)

            def train_step():
                model.zero_grad(set_to_none=True)
                step(batch).backward()

            peak = tracked_peak(train_step)
            assert peak <= BUDGET, f"{length} tokens: tracked peak {peak:,} B over the budget"
            err, where = step_error(step, model, ref, batch)
            assert err <= FLOAT64_TOL, f"{length} tokens: {err:.3e} at {where}"
        with pytest.raises(memcompile.MemoryBudgetError,
                           match=r"cannot be met: the least achievable peak is .* \(at input "
                                 r"sizes 512"):
            step(make_batch("tiny", seq_len=512))
    # One plan per length: the first compile is static, the symbolic one plans 128 and 256.
    assert [r.kind for r in records] == ["training"] * 3
    assert all(r.plan.budget_bytes == BUDGET and r.plan.chosen_peak <= BUDGET for r in records)


def test_specialize_bakes_the_sizes_of_a_call_into_the_graph():
    """gm(n, x) -> x.view(n, -1).sum(1); specialized at n = 2 it takes x alone."""
    class Rows(torch.nn.Module):
        def forward(self, n, x):
            return x.view(n, -1).sum(1)

    gm = torch.fx.symbolic_trace(Rows())
    static = specialize(gm, (2, torch.ones(6)))
    assert [n.op for n in static.graph.nodes].count("placeholder") == 1
    torch.testing.assert_close(static(torch.arange(6.0)), torch.tensor([3.0, 12.0]))
