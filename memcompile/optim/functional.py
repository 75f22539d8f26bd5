"""One optimizer step of one weight, as a pure function of tensors (updated in place).

The optimizers in :mod:`memcompile.optim.adamw` call these per parameter; a graph pass that puts
the update inside the backward can call them the same way, with the state's tensors as inputs.

The step follows galore-torch 1.0's ``GaLoreAdamW`` (itself transformers' old ``AdamW``):

1. at steps 0, T, 2T, ... (counted before the increment) refresh the projector from the gradient;
2. project the gradient; for Natural GaLore, precondition it (:mod:`memcompile.optim.natural`);
3. Adam's moments in the projected space; ``N = m / (√v + ε)``; bias correction folded into the
   step size ``lr·√(1−β₂ᵗ)/(1−β₁ᵗ)``;
4. ``W ← W − step_size · α · back(N)``, then decoupled decay ``W ← W − lr·wd·W``.

No coefficient rides on an ``alpha=`` of an add whose operand is a matmul: Inductor rewrites
``add(W, mm, alpha=c)`` to ``addmm`` and drops c (research note §7.3), so every coefficient is a
multiplication of its own.
"""

from __future__ import annotations

from collections.abc import MutableMapping

import torch

from memcompile.optim import natural, projector
from memcompile.optim.projector import ProjectorSpec

State = MutableMapping[str, torch.Tensor]


def _step_size(step: torch.Tensor, lr: float, betas: tuple[float, float],
               correct_bias: bool) -> torch.Tensor | float:
    """lr, or lr·√(1−β₂ᵗ)/(1−β₁ᵗ) as a float64 scalar tensor (t is already incremented)."""
    if not correct_bias:
        return lr
    t = step.to(torch.float64)
    beta1, beta2 = betas
    return lr * torch.sqrt(1.0 - torch.pow(beta2, t)) / (1.0 - torch.pow(beta1, t))


def adam_direction(grad: torch.Tensor, state: State, *, betas: tuple[float, float],
                   eps: float) -> torch.Tensor:
    """Update Adam's moments with ``grad`` and return ``m / (√v + ε)`` (no bias correction)."""
    beta1, beta2 = betas
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    # (1-β) multiplies the gradient itself: the gradient is often a matmul's output, and
    # add(x, mm, alpha=c) is the pattern Inductor miscompiles.
    exp_avg.mul_(beta1).add_(grad * (1.0 - beta1))
    exp_avg_sq.mul_(beta2).add_(grad * grad * (1.0 - beta2))
    return exp_avg / (exp_avg_sq.sqrt() + eps)


def _apply(param: torch.Tensor, update: torch.Tensor, step_size: torch.Tensor | float,
           lr: float, weight_decay: float) -> None:
    param.sub_(update * step_size)
    if weight_decay > 0.0:
        # Decay after the step, on the updated weight, as the reference does.
        param.sub_(param * (lr * weight_decay))


def adamw_step(param: torch.Tensor, grad: torch.Tensor, state: State, *, lr: float,
               betas: tuple[float, float], eps: float, weight_decay: float,
               correct_bias: bool) -> None:
    """The reference's plain AdamW step of a weight that is not projected (step and moments)."""
    state["step"].add_(1)
    direction = adam_direction(grad, state, betas=betas, eps=eps)
    _apply(param, direction, _step_size(state["step"], lr, betas, correct_bias), lr, weight_decay)


def refresh_projector(grad: torch.Tensor, state: State, spec: ProjectorSpec, *,
                      traced: bool | None = None) -> torch.Tensor:
    """Recompute ``state["projector"]`` when the (not yet incremented) step is a multiple of T.

    Returns the refresh flag as a bool tensor. Eagerly the flag is read on the host and the SVD
    runs only when needed; while tracing (``traced`` None means "while torch.compile traces"),
    both branches go into one ``torch.cond``, so the step compiles with no graph break and no
    recompilation when the flag changes.
    """
    flag = torch.remainder(state["step"], spec.update_proj_gap) == 0
    current = state["projector"]
    if traced is None:
        traced = torch.compiler.is_compiling()

    def do_refresh(g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return new_projector(g, p, spec)

    if not traced:
        if bool(flag):
            current.copy_(do_refresh(grad, current))
        return flag

    def keep(g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return p.clone()

    current.copy_(torch.cond(flag, do_refresh, keep, (grad, current)))
    return flag


def new_projector(grad: torch.Tensor, current: torch.Tensor, spec: ProjectorSpec) -> torch.Tensor:
    """The projector a refresh computes from ``grad`` (its vectors turned the way ``current``'s
    point, with ``signs="continuous"``); ``current`` is left as it is."""
    new = projector.refresh(grad, spec)
    if spec.signs == "continuous":
        new = projector.align_signs(new, current, spec.side(grad.shape))
    return new


def absorb_gradient(grad: torch.Tensor, state: State, spec: ProjectorSpec, *,
                    traced: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1 and 2 for a weight's complete gradient: refresh the projector when due, then
    project. Returns the low-rank gradient and the refresh flag (a bool tensor)."""
    flag = refresh_projector(grad, state, spec, traced=traced)
    return projector.project(grad, state["projector"], spec.side(grad.shape)), flag


def lowrank_adamw_step(param: torch.Tensor, lowrank: torch.Tensor, flag: torch.Tensor,
                       state: State, *, lr: float, betas: tuple[float, float], eps: float,
                       weight_decay: float, correct_bias: bool, spec: ProjectorSpec,
                       damping: float | None = None) -> None:
    """Steps 2 (Natural GaLore's preconditioner) to 4 from a projected gradient, in place.

    `flag` says whether this step refreshed the projector (the history is cleared then).
    """
    if damping is not None:
        history = state["history"]
        # Clearing by a mask, not a branch: the same code eagerly and in one compiled graph.
        history.masked_fill_(flag, 0.0)
        since_refresh = torch.remainder(state["step"], spec.update_proj_gap)
        natural.push_history(history, lowrank,
                             torch.remainder(since_refresh, history.shape[0]).long())
        lowrank = natural.natural_gradient(lowrank, history, damping)
    state["step"].add_(1)
    direction = adam_direction(lowrank, state, betas=betas, eps=eps)
    update = projector.project_back(direction, state["projector"], spec.side(param.shape),
                                    spec.scale)
    _apply(param, update, _step_size(state["step"], lr, betas, correct_bias), lr, weight_decay)


def projected_adamw_step(param: torch.Tensor, grad: torch.Tensor, state: State, *, lr: float,
                         betas: tuple[float, float], eps: float, weight_decay: float,
                         correct_bias: bool, spec: ProjectorSpec, damping: float | None = None,
                         traced: bool | None = None) -> None:
    """One GaLore (``damping`` None) or Natural GaLore step of one 2-D weight, in place.

    ``state`` holds ``step`` (float32 scalar), ``projector``, ``exp_avg``, ``exp_avg_sq`` and,
    for Natural GaLore, ``history`` (s × k). Moments are kept across a refresh (as galore-torch
    does); the natural-gradient history is cleared there, since its rows are coordinates in the
    old basis and would mix two bases in one Fisher estimate.
    """
    lowrank, flag = absorb_gradient(grad, state, spec, traced=traced)
    lowrank_adamw_step(param, lowrank, flag, state, lr=lr, betas=betas, eps=eps,
                       weight_decay=weight_decay, correct_bias=correct_bias, spec=spec,
                       damping=damping)
