"""The memory simulator equals the tracked peak (eager runtime) to the byte."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.checkpoint import checkpoint

from memcompile.measure import tracked_peak
from memcompile.models import build_model, make_batch
from memcompile.report import recording

MiB = 2**20


def compiled_step(fn, *args, dynamic=False, params=()):
    """Compile `fn` (returns a scalar loss) with memcompile's eager runtime; return a step
    (forward, backward, gradients of `params`, fn's parameters and args dropped) and the
    records of the graphs it compiled."""
    torch._dynamo.reset()
    # torch's min-cut split (the planner off): these tests pin the simulator on it; plans of
    # `plan_remat` are pinned in test_remat_plan.py.
    cf = torch.compile(fn, backend="memcompile", dynamic=dynamic,
                       options={"runtime": "eager", "disable_passes": ["plan_remat"]})
    own = list(fn.parameters()) if isinstance(fn, torch.nn.Module) else []
    leaves = [t for t in [*params, *own, *args] if t.requires_grad]

    def step(*call_args):
        cf(*(call_args or args)).backward()
        for t in leaves:
            t.grad = None

    with recording() as records:
        step()
    return step, records


def test_matmul_tanh_in_exact_bytes():
    """
    def f(x, W): return (x @ W).tanh().sum()      # x, W: 512x512 float32 = 1 MiB each

    forward saves mm (1 MiB) and recomputes tanh in the backward. The peak, 2 MiB + 8 B, is
    two 1 MiB tensors at once plus the 4-byte loss and its 4-byte tangent.
    """
    x, W = torch.randn(512, 512), torch.randn(512, 512, requires_grad=True)
    step, (record,) = compiled_step(lambda x, W: (x @ W).tanh().sum(), x, W)
    sim = record.simulate()
    assert sim.saved_bytes == MiB + 4  # mm, and the loss
    assert sim.peak_bytes == 2 * MiB + 8
    assert tracked_peak(step) == 2 * MiB + 8


class WholeMiBMLP(torch.nn.Module):
    """Three 512x512 bias-free linears with GELU and tanh: every tensor is 1 MiB."""

    def __init__(self, checkpointed=False):
        super().__init__()
        self.a, self.b, self.c = (torch.nn.Linear(512, 512, bias=False) for _ in range(3))
        self.checkpointed = checkpointed

    def block(self, x):
        return self.b(torch.nn.functional.gelu(self.a(x))).tanh()

    def forward(self, x):
        h = checkpoint(self.block, x, use_reentrant=False) if self.checkpointed else self.block(x)
        return self.c(h).square().mean()


@pytest.mark.parametrize("checkpointed,saved", [(False, 4 * MiB + 4), (True, MiB + 4)])
def test_whole_mib_mlp(checkpointed, saved):
    """Saving everything keeps mm, gelu, tanh and the output (4 MiB) and the 4-byte loss;
    checkpointing the block keeps only the output. Both peak at 6 MiB + 8 B in the backward:
    the three 1 MiB weight gradients meet the recomputed block (torch recomputes it whole,
    before the block's first gradient op), the loss and its tangent."""
    torch.manual_seed(0)
    model, x = WholeMiBMLP(checkpointed), torch.randn(512, 512)
    step, (record,) = compiled_step(model, x)
    sim = record.simulate()
    assert sim.saved_bytes == saved
    assert sim.peak_bytes == 6 * MiB + 8
    assert tracked_peak(step) == 6 * MiB + 8


@pytest.mark.parametrize("preset,seq_len,dtype", [
    ("tiny", 64, torch.float32), ("tiny", 33, torch.float64), ("small", 128, torch.float32),
])
def test_presets(preset, seq_len, dtype):
    model = build_model(preset, dtype=dtype)
    batch = make_batch(preset, seq_len=seq_len)
    step, records = compiled_step(lambda ids, labels: model(ids, labels).loss,
                                  batch["input_ids"], batch["labels"],
                                  params=model.parameters())
    assert len(records) == 1
    assert records[0].simulate().peak_bytes == tracked_peak(step)


@pytest.mark.slow
def test_wide_preset():
    model = build_model("wide")
    batch = make_batch("wide", seq_len=256)
    step, (record,) = compiled_step(lambda ids, labels: model(ids, labels).loss,
                                    batch["input_ids"], batch["labels"],
                                  params=model.parameters())
    assert record.simulate().peak_bytes == tracked_peak(step)


def test_simulating_another_length_of_a_dynamic_graph():
    """One dynamic graph, simulated at other lengths by binding its size symbol."""
    model = build_model("tiny")
    fn = lambda ids, labels: model(ids, labels).loss  # noqa: E731
    first = make_batch("tiny", seq_len=16)
    step, (record,) = compiled_step(fn, first["input_ids"], first["labels"],
                                         params=model.parameters(), dynamic=True)
    (symbol,) = {n.meta["val"].node.expr for n in record.forward.graph.find_nodes(op="placeholder")
                 if isinstance(n.meta["val"], torch.SymInt)}
    for seq_len in (24, 40):
        batch = make_batch("tiny", seq_len=seq_len)
        measured = tracked_peak(lambda: step(batch["input_ids"], batch["labels"]))
        assert record.simulate(sizes={symbol: seq_len}).peak_bytes == measured


@settings(max_examples=8, deadline=None)
@given(batch=st.integers(1, 64), widths=st.lists(st.integers(1, 96), min_size=1, max_size=4),
       act=st.sampled_from(["relu", "tanh", "gelu", "silu"]))
def test_random_mlps(batch, widths, act):
    torch.manual_seed(0)
    dims = [32, *widths]
    layers = []
    for i, o in zip(dims, dims[1:]):
        layers += [torch.nn.Linear(i, o), getattr(torch.nn, {"relu": "ReLU", "tanh": "Tanh",
                                                              "gelu": "GELU", "silu": "SiLU"}[act])()]
    model = torch.nn.Sequential(*layers)
    x = torch.randn(batch, 32)
    step, (record,) = compiled_step(lambda x: model(x).pow(2).mean(), x,
                                    params=model.parameters())
    assert record.simulate().peak_bytes == tracked_peak(step)


def test_checkpointed_layers_with_rng_state_wrappers():
    """Per-layer checkpointing: CPU flash attention takes a dropout probability, so torch wraps
    it in RNG-state operators (no FakeTensor metadata of their own; memcompile fills it in)."""
    model = build_model("tiny")
    model.enable_gradient_checkpointing()
    batch = make_batch("tiny", seq_len=32)
    step, (record,) = compiled_step(lambda ids, labels: model(ids, labels).loss,
                                    batch["input_ids"], batch["labels"],
                                    params=model.parameters())
    targets = {n.target for n in record.forward.graph.nodes}
    assert torch.ops.higher_order.run_and_save_rng_state in targets
    assert record.simulate().peak_bytes == tracked_peak(step)
