"""The projected step under ``torch.compile(opt.step, backend="memcompile")``: one graph, no
graph break (SVD refresh included), no recompilation at a refresh, and eager's result."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import memcompile  # noqa: F401  (registers the backend)
from memcompile.optim import GaLoreAdamW, NaturalGaLoreAdamW

SHAPES = [(12, 8), (6, 10), (5,), (4, 3)]


def make(cls, dtype):
    """Two projected weights, a bias on the reference rule and a matrix on torch's rule."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s, generator=g, dtype=dtype)) for s in SHAPES]
    groups = [{"params": params[:2], "rank": 3, "update_proj_gap": 3, "scale": 0.25},
              {"params": params[2:3]},
              {"params": params[3:], "adam_rule": "torch", "eps": 1e-8}]
    return params, cls(groups, lr=1e-2, weight_decay=0.1)


def grads(steps, dtype):
    """Small gradients (norms near 1, where λ = 1e-3 keeps Natural GaLore well conditioned)."""
    g = torch.Generator().manual_seed(1)
    return [[0.1 * torch.randn(*s, generator=g, dtype=dtype) for s in SHAPES]
            for _ in range(steps)]


def step_all(step, params, step_grads):
    """Give each parameter its gradient and call ``step``."""
    for p, grad in zip(params, step_grads):
        p.grad = grad.clone()
    step()


def compare_compiled(cls, dtype, options, steps=7):
    """Per parameter, max |compiled − eager| after ``steps`` steps; asserts one steady graph and
    no break."""
    torch._dynamo.reset()
    counters.clear()
    eager_params, eager_opt = make(cls, dtype)
    params, opt = make(cls, dtype)
    compiled = torch.compile(opt.step, backend="memcompile", options=options)
    for step_grads in grads(steps, dtype):
        step_all(eager_opt.step, eager_params, step_grads)
        step_all(compiled, params, step_grads)
    assert not counters["graph_break"], dict(counters["graph_break"])
    # One graph for the first call (which creates the state), one for every later call: the
    # refreshes at steps 3 and 6 run inside the second graph's torch.cond, no recompilation.
    assert counters["stats"]["unique_graphs"] == 2
    return [(a - b).abs().max().item() for a, b in zip(params, eager_params)]


@pytest.mark.parametrize("cls", [GaLoreAdamW, NaturalGaLoreAdamW])
def test_compiled_step_float64_matches_eager(cls):
    """memcompile's eager runtime runs the captured step: float64 results equal eager's.

    The weight on torch's rule is looser: traced, torch.optim's Adam computes its bias
    correction from the float32 step tensor instead of a Python float (torch's behaviour for a
    compiled torch.optim.AdamW as well), a 1e-7-relative difference.
    """
    *ours, torch_rule = compare_compiled(cls, torch.float64, {"runtime": "eager"})
    assert max(ours) < 1e-12 and torch_rule < 1e-6


@pytest.mark.parametrize("cls", [GaLoreAdamW, NaturalGaLoreAdamW])
def test_explain_finds_no_graph_break(cls):
    """torch._dynamo.explain on the first step (state creation + SVD) and a later one."""
    torch._dynamo.reset()
    params, opt = make(cls, torch.float32)
    for step_grads in grads(2, torch.float32):
        for p, grad in zip(params, step_grads):
            p.grad = grad
        explanation = torch._dynamo.explain(opt.step)()
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1


@pytest.mark.slow
@pytest.mark.parametrize("cls", [GaLoreAdamW, NaturalGaLoreAdamW])
def test_compiled_step_inductor_float32(cls):
    """Inductor's code for the step (no pattern-matcher addmm dropping a coefficient) is within
    1e-6 of eager in float32 (~30 s of Inductor compiling on two cores)."""
    assert max(compare_compiled(cls, torch.float32, {"runtime": "inductor"})) < 1e-6
