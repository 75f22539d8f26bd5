"""Applying a plan at the split: the split's graphs run the plan's schedule, silently.

A graph that writes into its inputs in place (a buffer's running statistics, a counter, an
explicit `copy_`) ends in AOTAutograd's `copy_` epilogue, which no output reads. The planner
counts it as forward work (`JointGraph.forward_effects`), so the split's forward holds exactly
the plan's nodes: no warning, and the simulated peak is still the tracked one.
"""

from __future__ import annotations

import logging

import pytest
import torch

from helpers import FLOAT64_TOL, clone_model, compile_memcompile, max_grad_error, train_step
from memcompile.measure import tracked_peak
from memcompile.report import recording


class BuffersInPlace(torch.nn.Module):
    """
    def forward(x):
        steps.add_(1)                        # a counter buffer
        h = norm(lin(x)).tanh()              # BatchNorm1d: running stats updated in place
        ema.copy_(h.detach().mean(0))        # an explicit copy_ into a buffer
        return h.square().mean()
    """

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(64, 64, dtype=torch.float64)
        self.norm = torch.nn.BatchNorm1d(64, dtype=torch.float64)
        self.register_buffer("steps", torch.zeros(1, dtype=torch.float64))
        self.register_buffer("ema", torch.zeros(64, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.steps.add_(1)
        h = self.norm(self.lin(x)).tanh()
        self.ema.copy_(h.detach().mean(0))
        return h.square().mean()


@pytest.mark.parametrize("budget", ["auto", None, 1.0])
def test_in_place_buffer_updates_log_no_warning_and_keep_the_plan(budget, caplog):
    torch.manual_seed(0)
    model = BuffersInPlace()
    ref = clone_model(model)
    x = torch.randn(32, 64, dtype=torch.float64)
    compiled = compile_memcompile(model, memory_budget=budget, runtime="eager")
    with caplog.at_level(logging.WARNING, logger="memcompile"), recording() as records:
        train_step(compiled, (x,))
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    train_step(ref, (x,))
    assert max_grad_error(model, ref) <= FLOAT64_TOL
    for name in ("steps", "ema", "norm.running_mean", "norm.running_var"):
        torch.testing.assert_close(model.get_buffer(name), ref.get_buffer(name), rtol=0, atol=0)
    (record,) = [r for r in records if r.kind == "training"]
    copies = [n for n in record.forward.graph.nodes if n.target is torch.ops.aten.copy_.default]
    assert len(copies) >= 3  # the epilogue is in the forward the plan scheduled
    assert record.plan.chosen_peak == record.simulate().peak_bytes
    assert record.simulate().peak_bytes == tracked_peak(lambda: train_step(compiled, (x,)))
