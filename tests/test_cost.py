"""The cost model: timed in the graph's dtype with CUDA synchronized, from a private generator,
rounded so load does not move a plan, and pinned by `Options.cost_model`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import compile_memcompile, train_step
from memcompile import Options, OptionsError
from memcompile.analysis import cost
from memcompile.analysis.cost import FIXED, CostModel, rounded
from memcompile.models import build_model, make_batch
from memcompile.report import recording


@pytest.fixture
def fresh_calibration():
    """Forget this process's measured constants, so the test times again (and after it)."""
    cost._calibrate.cache_clear()
    yield
    cost._calibrate.cache_clear()


def test_measuring_leaves_the_users_random_stream_untouched(fresh_calibration):
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    expected = torch.rand(4)
    torch.manual_seed(1234)
    model = CostModel.measured("cpu", torch.float32)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(torch.rand(4), expected)
    assert all(0 < v < math.inf for v in model.to_dict().values())


def test_compiling_leaves_the_users_random_stream_untouched(fresh_calibration):
    """A first compile (which measures) and no compile leave the same random stream."""
    batch = make_batch("tiny", seq_len=16)

    def stream_after(compiled: bool) -> tuple[torch.Tensor, torch.Tensor]:
        model = build_model("tiny")
        torch.manual_seed(7)
        run = compile_memcompile(model, runtime="eager") if compiled else model
        train_step(run, batch)
        return torch.get_rng_state(), torch.rand(4)

    with_compile, without = stream_after(True), stream_after(False)
    assert torch.equal(with_compile[0], without[0]) and torch.equal(with_compile[1], without[1])


def test_the_planner_times_the_graphs_dtype(monkeypatch, fresh_calibration):
    timed = []
    real = cost._time_ops

    def spy(dev, dtype):
        timed.append((dev.type, dtype))
        return real(dev, dtype)

    monkeypatch.setattr(cost, "_time_ops", spy)
    model = build_model("tiny", dtype=torch.float64)
    train_step(compile_memcompile(model, runtime="eager"), make_batch("tiny", seq_len=16))
    assert timed == [("cpu", torch.float64)]


def test_cuda_timings_synchronize_around_each_timing(monkeypatch):
    """On CUDA each timed stretch starts and ends with a synchronize: the work, not the launch
    (checked without a GPU: the synchronize is counted, the ops run on the CPU)."""
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: events.append("sync"))
    fns = [(lambda: events.append("a"), 3), (lambda: events.append("b"), 1)]
    seconds = cost._fastest(fns, torch.device("cuda"))
    assert len(seconds) == 2 and all(s >= 0 for s in seconds)
    timed = events[2:]  # after one warm-up call of each
    assert timed[:6] == ["sync", "a", "a", "a", "sync", "sync"]
    assert timed.count("sync") == 2 * 2 * cost._ROUNDS


@settings(max_examples=50, deadline=None)
@given(op_exp=st.integers(-5, 20), flop_exp=st.integers(-10, 5),
       noise=st.lists(st.floats(0.72, 1.38), min_size=3, max_size=3))
def test_noise_within_the_rounding_leaves_the_rounded_model(op_exp, flop_exp, noise):
    """Ratios on a power of two stay there under noise of up to about 40% on each constant
    alone... and under noise on all three at once whose ratio effect stays under 2**0.5."""
    per_byte = 3e-10
    exact = CostModel(per_byte * 2.0 ** op_exp, per_byte, per_byte * 2.0 ** flop_exp)
    noisy = CostModel(exact.seconds_per_op * noise[0], per_byte * noise[1],
                      exact.seconds_per_flop * noise[2])
    for a, b in ((noise[0], noise[1]), (noise[2], noise[1])):
        if not 2 ** -0.5 < a / b < 2 ** 0.5:
            return  # the ratio itself moved past the rounding: not a case of this property
    snapped = rounded(noisy)
    assert snapped.seconds_per_op / snapped.seconds_per_byte == 2.0 ** op_exp
    assert snapped.seconds_per_flop / snapped.seconds_per_byte == 2.0 ** flop_exp


def _plan_of(model, batch, **options):
    with recording() as records:
        train_step(compile_memcompile(model, runtime="eager", **options), batch)
    (record,) = [r for r in records if r.kind == "training"]
    return record


@pytest.mark.parametrize("pin", ["fixed", "dict", "path"])
def test_a_pinned_cost_model_plans_one_graph_identically(pin, tmp_path, fresh_calibration):
    """Two compiles of one graph under a pinned cost model: the same decisions and peaks; a
    measured run's constants (`plan.cost`) pin a later run to its plan; nothing is timed."""
    batch = make_batch("tiny", seq_len=64)
    model = build_model("tiny", dtype=torch.float64)
    measured = _plan_of(model, batch, memory_budget=0.8)
    spec = {"fixed": "fixed", "dict": measured.plan.cost.to_dict(),
            "path": str(tmp_path / "cost.json")}[pin]
    (tmp_path / "cost.json").write_text(json.dumps(measured.plan.cost.to_dict()))
    cost._calibrate.cache_clear()
    first = _plan_of(model, batch, memory_budget=0.8, cost_model=spec)
    second = _plan_of(model, batch, memory_budget=0.8, cost_model=spec)
    assert cost._calibrate.cache_info().currsize == 0  # pinned: nothing was timed
    assert first.decisions == second.decisions and first.decisions
    assert first.plan.chosen_peak == second.plan.chosen_peak
    assert first.plan.chain == second.plan.chain
    expected = FIXED["cpu"] if pin == "fixed" else measured.plan.cost
    assert first.plan.cost == expected
    if pin != "fixed":
        assert first.decisions == measured.decisions


def test_options_take_and_check_the_cost_model(tmp_path):
    assert Options().cost_model == "measured"
    assert Options(cost_model="fixed").cost_model == "fixed"
    pinned = FIXED["cuda"].to_dict()
    assert Options(cost_model=pinned).cost_model == pinned
    (tmp_path / "c.json").write_text(json.dumps(pinned))
    assert Options(cost_model=tmp_path / "c.json").cost_model == pinned
    for bad, fragment in [
        ("fast", "'fast' is neither a name nor a readable JSON file"),
        ({"seconds_per_op": 1e-6}, "keys ['seconds_per_op']"),
        ({**pinned, "seconds_per_flop": 0}, "'cost_model.seconds_per_flop': got 0"),
        ({**pinned, "seconds_per_op": "1e-6"}, "'cost_model.seconds_per_op': got '1e-6'"),
        (3, "got 3"),
    ]:
        with pytest.raises(OptionsError) as e:
            Options(cost_model=bad)
        assert fragment in str(e.value) and '"measured", "fixed"' in str(e.value)
