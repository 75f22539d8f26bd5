"""Mixed precision with fused updates (`lowrank(..., fused_backward=True)`), under the compiled
backward (the partition) and StreamBP alike.

The contract (`memcompile.optim.swap.lowrank`): no weight or optimizer state ever changes from a
gradient holding an inf or NaN.

- With `grad_scaler=scaler`, fused gradients are unscaled and checked inside the backward, and
  the weights step in `scaler.step(optimizer)`: all of them, or none after an overflow anywhere,
  and the scaler backs off. Exact against the unfused optimizer stepped by the same scaler.
- Without it, a non-finite gradient raises before its weight is touched, and a GradScaler that
  steps the optimizer is refused (its fused updates took scaled gradients).
- bfloat16 needs no scaler: fused updates give the unfused bfloat16 weights bit for bit, and
  the float32 run's within the rounding of bfloat16 weights.
"""

from __future__ import annotations

import pytest
import torch

from helpers import FLOAT64_TOL, compile_memcompile
from memcompile.models import build_model, make_batch
from memcompile.optim import GaLoreAdamW, lowrank

MODES = {"partition": None, "stream": {"chunk_size": 8, "logits_chunk_size": 8}}


def compiled(model, mode):
    return compile_memcompile(model, runtime="eager", **({"stream": MODES[mode]}
                                                          if MODES[mode] else {}))


def optimizer(model, *, fused, scaler=None, lr=1e-2, micro_batches=1, max_grad_norm=None):
    return lowrank(torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1), model=model,
                   rank=8, update_proj_gap=2, fused_backward=fused,
                   grad_scaler=scaler if fused else None, max_grad_norm=max_grad_norm,
                   micro_batches=micro_batches if fused else 1)


def projected(opt):
    return [p for g in opt.param_groups if "rank" in g for p in g["params"]]


class HandOvers(list):
    """Weights in the order their gradients were handed to fused updates."""

    poison: torch.Tensor | None = None
    """A weight whose gradient gets an inf as it is handed over: a forced overflow."""


@pytest.fixture
def handed(monkeypatch):
    """Records the hand-overs to fused updates (`HandOvers`), poisoning the one it is told to."""
    order = HandOvers()
    original = GaLoreAdamW._fused_update

    def recording(self, p, grad):
        order.append(p)
        if p is order.poison:
            grad[0, 0] = float("inf")
        return original(self, p, grad)

    monkeypatch.setattr(GaLoreAdamW, "_fused_update", recording)
    return order


def last_handed(mode, handed):
    """The name of the projected weight whose gradient a fused backward hands over last."""
    torch.manual_seed(0)
    model = build_model("tiny", dtype=torch.float64)
    opt = optimizer(model, fused=True)
    compiled(model, mode)(**make_batch("tiny", seq_len=20)).loss.backward()
    del opt
    names = {id(p): n for n, p in model.named_parameters()}
    name = names[id(handed[-1])]
    handed.clear()
    return name


def scaled_steps(mode, *, steps, handed=None, overflow_at=None, poison=None, micro_batches=1,
                 max_grad_norm=None):
    """`steps` GradScaler steps of a float64 tiny Llama (scale 1024, doubled after every 2 good
    steps); mode None: the unfused optimizer, eagerly. At step `overflow_at` the gradient of the
    weight named `poison` gets an inf (fused: as it is handed over; unfused: in `.grad`).
    `micro_batches` backward passes per step; `max_grad_norm` clips. Returns the model, the
    optimizer, the scale after each update and, per step, the names of the parameters that
    changed."""
    torch.manual_seed(0)
    model = build_model("tiny", dtype=torch.float64)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
    opt = optimizer(model, fused=mode is not None, scaler=scaler, micro_batches=micro_batches,
                    max_grad_norm=max_grad_norm)
    run = compiled(model, mode) if mode else model
    params = dict(model.named_parameters())
    scales, changed = [], []
    for step in range(steps):
        if handed is not None:
            handed.clear()
            handed.poison = params[poison] if step == overflow_at else None
        for m in range(micro_batches):
            loss = run(**make_batch("tiny", seq_len=20, seed=step * micro_batches + m)).loss
            scaler.scale(loss / micro_batches).backward()
        if mode is None and step == overflow_at:
            params[poison].grad[0, 0] = float("inf")
        if handed is not None and step == overflow_at:
            handed.at_overflow = list(handed)
        before = {n: p.detach().clone() for n, p in params.items()}
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        scales.append(scaler.get_scale())
        changed.append([n for n, p in params.items() if not torch.equal(before[n], p)])
    return model, opt, scales, changed


def max_param_error(a, b):
    return max(((p - q).norm() / q.norm()).item() for p, q in zip(a.parameters(), b.parameters()))


def all_finite(model):
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize("mode,micro_batches,max_grad_norm", [
    ("partition", 1, None), ("stream", 1, None), ("partition", 2, 0.5), ("stream", 1, 0.5),
])
def test_fused_updates_with_a_grad_scaler_give_the_unfused_parameters(mode, micro_batches,
                                                                      max_grad_norm):
    """float64, 4 steps through refreshes at steps 0 and 2, the scale growing from 1024 to
    4096: the same unscaling kernel and scale, the same steps (with accumulation and clipping
    too: the unfused optimizer sums the scaled `.grad`s and unscales once, the fused one
    unscales each micro-batch's gradient; the scale is a power of two, so both are exact)."""
    options = dict(micro_batches=micro_batches, max_grad_norm=max_grad_norm)
    reference, _, ref_scales, _ = scaled_steps(None, steps=4, **options)
    model, _, scales, _ = scaled_steps(mode, steps=4, **options)
    assert scales == ref_scales == [1024.0, 2048.0, 2048.0, 4096.0]
    assert max_param_error(model, reference) <= FLOAT64_TOL


@pytest.mark.parametrize("mode", list(MODES))
def test_an_overflow_in_the_last_gradient_handed_over_skips_the_whole_step(mode, handed):
    """Step 1's overflow is in the gradient handed over last: every other projected weight had
    been handed over (and, before this contract, stepped) when it was seen. The step is
    skipped whole: no parameter changes, no optimizer state moves, the scale halves; the next
    steps go on exactly as the unfused optimizer's under the same scaler."""
    poison = last_handed(mode, handed)
    model, opt, scales, changed = scaled_steps(mode, steps=4, handed=handed, overflow_at=1,
                                               poison=poison)
    reference, _, ref_scales, ref_changed = scaled_steps(None, steps=4, overflow_at=1,
                                                         poison=poison)
    assert len(handed.at_overflow) == 14
    assert handed.at_overflow[-1] is dict(model.named_parameters())[poison]
    assert changed[1] == [] == ref_changed[1]
    assert all(changed[s] for s in (0, 2, 3))
    assert scales == ref_scales == [1024.0, 512.0, 512.0, 1024.0]
    assert {float(opt.state[p]["step"]) for p in projected(opt)} == {3.0}
    assert all_finite(model)
    assert max_param_error(model, reference) <= FLOAT64_TOL


@pytest.mark.parametrize("mode", list(MODES))
def test_a_huge_loss_scale_under_float16_autocast_never_touches_a_weight(mode):
    """float32 weights, forward under float16 autocast (CPU), GradScaler from 2**40 backing off
    by 2**-8: the first steps overflow in float16 and leave every parameter as it was, bit for
    bit, while the scale falls; once it fits, steps go ahead and every weight stays finite."""
    torch.manual_seed(0)
    model = build_model("tiny")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, backoff_factor=2.0**-8)
    opt = optimizer(model, fused=True, scaler=scaler, lr=1e-3)
    run = compiled(model, mode)
    stepped = []
    for step in range(5):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = run(**make_batch("tiny", seq_len=20, seed=step)).loss
        scaler.scale(loss).backward()
        before = [p.detach().clone() for p in model.parameters()]
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        unchanged = [torch.equal(a, p) for a, p in zip(before, model.parameters())]
        assert all(unchanged) or not any(unchanged)  # a step is whole or skipped whole
        stepped.append(not all(unchanged))
        assert scaler.get_scale() == (scale * 2.0**-8 if all(unchanged) else scale)
        assert all_finite(model)
    assert stepped[0] is False and stepped[-1] is True


@pytest.mark.parametrize("mode", list(MODES))
def test_without_a_scaler_a_non_finite_gradient_raises_before_its_weight_changes(mode, handed):
    torch.manual_seed(0)
    model = build_model("tiny")
    opt = optimizer(model, fused=True)
    poison = model.layers[1].mlp.down_proj.weight
    handed.poison = poison
    before = poison.detach().clone()
    with pytest.raises(FloatingPointError, match="layers.1.mlp.down_proj.weight holds an inf"):
        compiled(model, mode)(**make_batch("tiny", seq_len=20)).loss.backward()
    assert torch.equal(poison, before) and poison not in opt.state
    assert poison not in opt._pending  # not counted as handed over
    assert all_finite(model)


def test_a_grad_scaler_the_optimizer_does_not_know_is_refused_at_its_step():
    torch.manual_seed(0)
    model = build_model("tiny")
    opt = optimizer(model, fused=True)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(compiled(model, "partition")(**make_batch("tiny", seq_len=20)).loss).backward()
    with pytest.raises(RuntimeError, match="took the scaled gradients.*grad_scaler=scaler"):
        scaler.step(opt)


def test_with_a_grad_scaler_a_plain_step_is_refused():
    torch.manual_seed(0)
    model = build_model("tiny")
    scaler = torch.amp.GradScaler("cpu")
    opt = optimizer(model, fused=True, scaler=scaler)
    scaler.scale(compiled(model, "partition")(**make_batch("tiny", seq_len=20)).loss).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="scaler.step.optimizer.*nothing was stepped"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_lowrank_refuses_a_grad_scaler_it_cannot_honour():
    scaler = torch.amp.GradScaler("cpu")
    half = build_model("tiny", dtype=torch.float16)
    with pytest.raises(ValueError, match="float16 weights.*torch.autocast"):
        optimizer(half, fused=True, scaler=scaler)
    model = build_model("tiny")
    with pytest.raises(ValueError, match="grad_scaler is for fused_backward=True"):
        lowrank(torch.optim.AdamW(model.parameters()), model=model, rank=8, grad_scaler=scaler)
    with pytest.raises(TypeError, match="torch.amp.GradScaler"):
        lowrank(torch.optim.AdamW(model.parameters()), model=model, rank=8,
                fused_backward=True, grad_scaler=object())


BF16_UNIT_ROUNDOFF = torch.finfo(torch.bfloat16).eps / 2  # 2**-8


@pytest.mark.parametrize("mode", list(MODES))
def test_bfloat16_fused_updates_need_no_scaler(mode):
    """bfloat16 weights, 4 steps (refreshes at 0 and 2), lr 1e-3.

    - Against the unfused optimizer on the same compiled bfloat16 model: equal bit for bit (the
      fused update is the same function of the same gradient; a fused update that did nothing,
      or did something else, fails here).
    - Against the float32 run: the bfloat16 weights start as the float32 ones rounded (relative
      error up to u = 2**-8) and each step's in-place update rounds them once more, so after 4
      steps the bound is (4 + 1)·u = 0.0195 (measured 0.0054 under the partition, 0.0059 under
      stream; the steps' own differences, Adam's sign-like first steps meeting bfloat16's
      rounded gradients, stay below the rounding at this lr).
    """
    def steps(dtype, fused):
        torch.manual_seed(0)
        model = build_model("tiny").to(dtype)
        opt = optimizer(model, fused=fused, lr=1e-3)
        run = compiled(model, mode)
        for step in range(4):
            run(**make_batch("tiny", seq_len=32, seed=step)).loss.backward()
            opt.step()
            opt.zero_grad()
        return model

    model = steps(torch.bfloat16, True)
    unfused = steps(torch.bfloat16, False)
    float32 = steps(torch.float32, True)
    assert all_finite(model)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), unfused.parameters()))
    errors = [((p.float() - q).norm() / q.norm()).item()
              for p, q in zip(model.parameters(), float32.parameters())]
    assert max(errors) <= 5 * BF16_UNIT_ROUNDOFF
