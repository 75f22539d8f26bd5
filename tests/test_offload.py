"""Offload to host (`Options.offload`, `planning.offload`, `runtime.offload`), on the CPU.

A CPU has no separate host memory, so these tests plan with `offload={"on_cpu": True}`: the CPU
plays the device, an offloaded value goes to a separate CPU buffer and comes back, and the
memory counted is the device's (the host copies are left out by the simulator and by the
tracked measure alike). The bandwidth is pinned, and so is the cost model, so plans do not
depend on this machine's timings.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from helpers import FLOAT64_TOL, clone_model, compile_memcompile, max_grad_error, train_step
from memcompile import MemcompileWarning, Options, OptionsError, explain
from memcompile.config import OffloadOptions
from memcompile.measure import tracked_peak
from memcompile.models import build_model, make_batch
from memcompile.planning.offload import Offload, _fits
from memcompile.report import recording
from memcompile.runtime.offload import FETCH, OFFLOAD

MiB = 2**20
FIXED_COST = {"seconds_per_op": 1e-6, "seconds_per_byte": 1e-10, "seconds_per_flop": 1e-11}
ON_CPU = {"on_cpu": True, "bandwidth": 1e15}  # transfers that always fit


class SumOf(torch.nn.Module):
    """`module(x).sum()`: a scalar loss, so the forward returns nothing else."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x).sum()


def whole_mib_chain() -> tuple[torch.nn.Module, torch.Tensor]:
    """4 x [512x512 bias-free Linear, tanh] on a 2048x512 input, summed: each weight (and its
    gradient) is 1 MiB, each activation 4 MiB."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(512, 512, bias=False) for _ in range(4)]
    chain = torch.nn.Sequential(*itertools.chain.from_iterable((l, torch.nn.Tanh()) for l in layers))
    return SumOf(chain), torch.randn(2048, 512)


def step_of(model, inputs, **options):
    """Compile `model` (eager runtime, fixed costs), run one step; the step and its record."""
    compiled = compile_memcompile(model, runtime="eager", cost_model=FIXED_COST, **options)
    with recording() as records:
        train_step(compiled, inputs)
    (record,) = [r for r in records if r.kind == "training"]
    return (lambda: train_step(compiled, inputs)), record


def test_offloading_a_whole_mib_chain_in_exact_bytes():
    """
    x -> mm -> tanh -> mm_1 -> tanh_1 -> mm_2 -> tanh_2 -> mm_3 -> tanh_3 -> sum
    The backward reads the four tanh outputs (4 MiB each). Saving them all (budget None) peaks
    at 21 MiB + 8 B in the backward of the last layer (the four, the 4 MiB gradient flowing
    down, the 4 MiB it makes, a 1 MiB weight gradient). Offloading tanh and tanh_1 (each to
    host after mm_1 / mm_2 reads it, back before its first backward reader) takes their 8 MiB
    off the device at that peak: 15 MiB + 8 B, with the same (no) recompute. Planned,
    simulated on the split graphs and tracked at the dispatcher: the same bytes.
    """
    model, x = whole_mib_chain()
    step, record = step_of(clone_model(model), x, memory_budget=None)
    assert record.plan.chosen_peak == tracked_peak(step) == 21 * MiB + 8
    assert not record.decisions_of("offloaded")

    step, record = step_of(clone_model(model), x, memory_budget=None, offload=ON_CPU)
    offloaded = record.decisions_of("offloaded")
    assert sorted((d.node, d.bytes) for d in offloaded) == [("tanh", 4 * MiB), ("tanh_1", 4 * MiB)]
    assert not {d.node for d in record.decisions_of("saved")} & {"tanh", "tanh_1"}
    assert (record.plan.chosen_peak == record.simulate().peak_bytes == tracked_peak(step)
            == 15 * MiB + 8)
    assert record.plan.recompute_seconds == 0
    # The forward hands the backward the host copies; the backward fetches each right before
    # its first reader.
    fw, bw = record.forward, record.backward
    assert [n.args[0].name for n in fw.graph.find_nodes(op="call_function", target=OFFLOAD)] \
        == ["tanh", "tanh_1"]
    offloads = fw.graph.find_nodes(op="call_function", target=OFFLOAD)
    assert all(n.prev.target is torch.ops.aten.mm.default and n.prev.args[0] is n.args[0]
               for n in offloads)
    fetches = bw.graph.find_nodes(op="call_function", target=FETCH)
    assert sorted(n.args[0].name for n in fetches) == ["tanh", "tanh_1"]
    assert all(n.next in n.users for n in fetches)


def test_offload_step_is_exact_and_tracked_exactly_on_the_tiny_model():
    """Float64 gradients against eager; the simulated peak equals the tracked one."""
    model = build_model("tiny", dtype=torch.float64)
    batch = make_batch("tiny", seq_len=64)
    ref = clone_model(model)
    step, record = step_of(model, batch, memory_budget=None, offload=ON_CPU)
    train_step(ref, batch)
    assert record.decisions_of("offloaded")
    assert max_grad_error(model, ref) <= FLOAT64_TOL
    assert record.plan.chosen_peak == record.simulate().peak_bytes == tracked_peak(step)
    assert record.plan.chosen_peak < record.plan.save_all_peak


def test_inductor_runs_the_transfers_and_stays_exact():
    model = build_model("tiny", dtype=torch.float64)
    batch = make_batch("tiny", seq_len=64)
    ref = clone_model(model)
    compiled = compile_memcompile(model, cost_model=FIXED_COST, memory_budget=None,
                                  offload=ON_CPU)
    with recording() as records:
        train_step(compiled, batch)
    train_step(ref, batch)
    (record,) = [r for r in records if r.kind == "training"]
    assert record.decisions_of("offloaded")
    assert "memcompile.offload" in record.forward_code
    assert "memcompile.fetch" in record.backward_code
    assert max_grad_error(model, ref) <= FLOAT64_TOL


def test_the_report_names_each_offload():
    model, x = whole_mib_chain()
    report = explain(model, x, options={"runtime": "eager", "cost_model": FIXED_COST,
                                        "memory_budget": None, "offload": ON_CPU},
                     measure=False)
    offloaded = [d for d in report.decisions if d.kind == "offloaded"]
    assert [d.node for d in offloaded] == ["tanh", "tanh_1"]
    assert all("back before its first backward reader" in d.reason for d in offloaded)
    assert "2 values (8.00 MiB) to host" in str(report)


def test_transfers_that_do_not_fit_under_the_compute_are_not_offloaded():
    """At 1 kB/s a 4 MiB value takes over an hour each way: nothing goes, and the explicit
    request warns."""
    model, x = whole_mib_chain()
    with pytest.warns(MemcompileWarning, match="offload not applied: no saved value's transfers"):
        step, record = step_of(model, x, memory_budget=None,
                               offload={"on_cpu": True, "bandwidth": 1e3})
    assert not record.decisions_of("offloaded")
    assert record.plan.chosen_peak == tracked_peak(step) == 21 * MiB + 8


def test_a_cpu_graph_has_no_host_memory_to_offload_to():
    model, x = whole_mib_chain()
    with pytest.warns(MemcompileWarning, match="offload not applied: the graph runs on the CPU"):
        _, record = step_of(model, x, memory_budget=None, offload=True)
    assert not record.decisions_of("offloaded")
    assert "memcompile.offload" not in record.forward_code


def test_a_streamed_graph_says_offload_does_not_apply():
    """StreamBP's runtime holds only layer inputs and offloads nothing: asked for both, the
    graph streams and a warning says offload did not apply, and why."""
    model = build_model("tiny", dtype=torch.float32)
    batch = make_batch("tiny", seq_len=64)
    torch._dynamo.reset()
    step = torch.compile(lambda b: model(**b).loss, backend="memcompile", options={
        "runtime": "eager", "stream": {"chunk_size": 16}, "offload": ON_CPU})
    with recording() as records, pytest.warns(
            MemcompileWarning, match="offload not applied: the graph streams"):
        step(batch).backward()
    assert [r.kind for r in records] == ["stream"]


def test_one_side_stream_runs_transfers_one_at_a_time():
    """Two values whose windows overlap must fit their four transfers in each window."""
    node = object()
    a = Offload(node, 1, transfer_seconds=2.0, window=(0.0, 3.0))
    b = Offload(node, 1, transfer_seconds=2.0, window=(1.0, 5.0))
    c = Offload(node, 1, transfer_seconds=2.0, window=(3.0, 6.0))
    assert _fits([a]) and _fits([b]) and _fits([a, c])
    assert not _fits([a, b])
    assert not _fits([Offload(node, 1, transfer_seconds=4.0, window=(0.0, 3.0))])


def test_the_ops_copy_into_a_new_buffer_on_the_cpu():
    x = torch.arange(6.0).reshape(2, 3)
    host = OFFLOAD(x)
    back = FETCH(host, x.device)
    assert torch.equal(back, x)
    storages = {t.untyped_storage().data_ptr() for t in (x, host, back)}
    assert len(storages) == 3


def test_offload_is_off_by_default():
    assert Options().offload is False
    model, x = whole_mib_chain()
    _, record = step_of(model, x, memory_budget=None)
    assert "memcompile.offload" not in record.forward_code


@pytest.mark.parametrize("value", [
    "yes", 1, None, {"bandwidth": 0}, {"bandwidth": -1.0}, {"bandwidth": True},
    {"bandwidth": "fast"}, {"bandwidth": float("inf")}, {"on_cpu": 1}, {"speed": 1e9},
])
def test_bad_offload_values_raise_options_error(value):
    with pytest.raises(OptionsError, match=r"^memcompile option 'offload(\.\w+)?':.*valid"):
        Options(offload=value)


def test_offload_values_normalize():
    assert Options(offload=True).offload == OffloadOptions()
    assert Options(offload={"bandwidth": 2e10}).offload == OffloadOptions(bandwidth=2e10)
    assert Options(offload={"on_cpu": True}).offload == OffloadOptions(on_cpu=True)
    assert Options(offload=False).offload is False
