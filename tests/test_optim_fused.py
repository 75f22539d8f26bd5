"""Per-layer updates inside the compiled backward (`lowrank(..., fused_backward=True)`).

Structure: the backward graph updates each projected weight after every op that reads it and
returns no gradient for it. Exactness: the same parameters as the unfused optimizer (which
steps from `.grad` after the backward), with clipping, gradient accumulation and both,
through projector refreshes. Memory: the gradients of projected weights never coexist.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from helpers import compile_memcompile
from memcompile.measure import tracked_peak
from memcompile.models import build_model, make_batch
from memcompile.optim import lowrank
from memcompile.report import recording

UPDATE = torch.ops.memcompile.lowrank_update.default


def projected_weights(opt):
    return [p for g in opt.param_groups if "rank" in g for p in g["params"]]


def train(model, opt, batches, *, micro_batches, runtime):
    """`len(batches) // micro_batches` steps of the loop a user writes; returns the records."""
    compiled = compile_memcompile(model, runtime=runtime)
    it = iter(batches)
    with recording() as records:
        for _ in range(len(batches) // micro_batches):
            for _ in range(micro_batches):
                (compiled(**next(it)).loss / micro_batches).backward()
            opt.step()
            opt.zero_grad()
    return [r for r in records if r.kind == "training"]


def run(fused, *, method="galore", max_grad_norm=None, micro_batches=1, runtime="eager",
        steps=4):
    """Train a float64 tiny Llama from fixed weights and batches; refreshes at steps 0 and 2."""
    torch.manual_seed(0)
    model = build_model("tiny", dtype=torch.float64)
    opt = lowrank(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1),
                  model=model, rank=8, update_proj_gap=2, method=method,
                  fused_backward=fused, max_grad_norm=max_grad_norm,
                  micro_batches=micro_batches if fused else 1)
    batches = [make_batch("tiny", seq_len=32, seed=s) for s in range(steps * micro_batches)]
    records = train(model, opt, batches, micro_batches=micro_batches, runtime=runtime)
    return model, opt, records


def fused_tiny(**options):
    """A float64 tiny Llama, its fused GaLore optimizer (`options` for `lowrank`) and the model
    compiled after the swap (eager runtime)."""
    torch.manual_seed(0)
    model = build_model("tiny", dtype=torch.float64)
    opt = lowrank(torch.optim.AdamW(model.parameters()), model=model, rank=8,
                  fused_backward=True, **options)
    return model, opt, compile_memcompile(model, runtime="eager")


def max_param_error(a, b):
    return max(((p - q).norm() / q.norm()).item() for p, q in zip(a.parameters(), b.parameters()))


def test_the_backward_updates_each_projected_weight_after_its_last_reader():
    model, opt, compiled = fused_tiny()
    with recording() as records:
        compiled(**make_batch("tiny", seq_len=16)).loss.backward()
    (record,) = [r for r in records if r.kind == "training"]
    bw = record.backward.graph
    updates = list(bw.find_nodes(op="call_function", target=UPDATE))
    assert len(updates) == len(projected_weights(opt)) == 14
    assert len(record.decisions_of("fused update")) == 14
    order = {n: i for i, n in enumerate(bw.nodes)}
    returned = set(bw.output_node().all_input_nodes)
    for update in updates:
        grad, after, _ = update.args
        assert after and all(order[r] < order[update] for r in after)
        assert grad not in returned  # not returned: it dies with the update
    # Projected weights got no .grad (already stepped); the rest did, for opt.step().
    projected = {id(p) for p in projected_weights(opt)}
    assert all((p.grad is None) == (id(p) in projected) for p in model.parameters())
    stepped = {id(p) for p in opt.state}
    assert projected <= stepped


@pytest.mark.parametrize("method,max_grad_norm,micro_batches", [
    ("galore", None, 1), ("galore", 0.5, 1), ("galore", None, 2), ("galore", 0.5, 2),
    ("natural_galore", None, 1), ("natural_galore", 0.5, 2),
])
def test_fused_updates_give_the_unfused_parameters(method, max_grad_norm, micro_batches):
    """float64, eager runtime, 4 steps through two projector refreshes."""
    kwargs = dict(method=method, max_grad_norm=max_grad_norm, micro_batches=micro_batches)
    reference, _, _ = run(False, **kwargs)
    fused, _, _ = run(True, **kwargs)
    assert max_param_error(fused, reference) <= 1e-10


def test_fused_updates_under_inductor_give_the_unfused_parameters():
    kwargs = dict(max_grad_norm=0.5, micro_batches=2, runtime="inductor", steps=3)
    reference, _, _ = run(False, **kwargs)
    fused, _, _ = run(True, **kwargs)
    assert max_param_error(fused, reference) <= 1e-10


def test_accumulating_without_saying_so_is_an_error_not_a_silent_double_step():
    _, _, compiled = fused_tiny()
    batch = make_batch("tiny", seq_len=16)
    compiled(**batch).loss.backward()
    with pytest.raises(RuntimeError, match="second time before optimizer.step.*micro_batches"):
        compiled(**batch).loss.backward()


def test_fewer_micro_batches_than_declared_is_an_error():
    _, opt, compiled = fused_tiny(micro_batches=2)
    compiled(**make_batch("tiny", seq_len=16)).loss.backward()
    with pytest.raises(RuntimeError, match="1 backward pass.*set up for 2"):
        opt.step()


def whole_mib_chain():
    """4 bias-free 512x512 linears with tanh on a 16x512 input: each weight and its gradient is
    1 MiB, each activation and its gradient 32 KiB."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(512, 512, bias=False) for _ in range(4)]
    model = torch.nn.Sequential(*itertools.chain.from_iterable(
        (layer, torch.nn.Tanh()) for layer in layers))
    return model, torch.randn(16, 512)


def backward_peak(fused: bool) -> int:
    """Tracked peak of the second step's `loss.backward()`, all four weights projected."""
    model, x = whole_mib_chain()
    weights = [m.weight for m in model if isinstance(m, torch.nn.Linear)]
    opt = lowrank(torch.optim.AdamW(model.parameters()), params=weights, rank=128,
                  fused_backward=fused)
    compiled = compile_memcompile(model, runtime="eager")
    for _ in range(2):  # the first step compiles and creates the optimizer state
        loss = compiled(x).sum()
        peak = tracked_peak(loss.backward)
        opt.step()
        opt.zero_grad()
    return peak


def test_projected_gradients_never_coexist():
    """
    The backward's tracked peak in exact bytes (+4: the loss's tangent).
    - unfused: the backward returns all four gradients; the last layer's weight gradient is
      computed while the other three and the 32 KiB gradient it reads are alive:
      4 MiB + 32 KiB.
    - fused: each weight's gradient is handed to its update after the op computing the input
      gradient (the weight's last reader) and dies there: one 1 MiB gradient, with the 32 KiB
      gradient it came from and the 32 KiB one computed next to it.
    (The tracked measure does not see inside the update op, whose temporaries are one
    weight's and transient; the CPU allocator puts the whole step at 6.50 MiB unfused and
    3.63 MiB fused.)
    """
    assert backward_peak(False) == 4 * 2**20 + 32 * 2**10 + 4
    assert backward_peak(True) == 2**20 + 64 * 2**10 + 4


def test_a_fused_optimizer_resumes_from_its_state_dict():
    """After load_state_dict (new group dicts, new lr), fused updates use the loaded groups."""
    model, opt, compiled = fused_tiny()
    batch = make_batch("tiny", seq_len=16)
    compiled(**batch).loss.backward()
    opt.step()
    opt.zero_grad()
    saved = opt.state_dict()
    saved["param_groups"][-1]["lr"] = 0.0  # the projected group: a zero lr freezes its weights
    opt.load_state_dict(saved)
    before = [p.detach().clone() for p in projected_weights(opt)]
    compiled(**batch).loss.backward()
    opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, projected_weights(opt)))
