"""``GaLoreAdamW`` and ``NaturalGaLoreAdamW``: AdamW whose 2-D weights step in a rank-r subspace.

Parameter groups are galore-torch's: a group with a ``rank`` key is projected, with
``update_proj_gap`` (T, default 200), ``scale`` (α, default 0.25) and ``proj_type`` (default
``"std"``); memcompile adds ``svd`` (``"exact"`` or ``"randomized"``), ``oversample`` and
``power_iters``. ``NaturalGaLoreAdamW`` adds ``natural_history`` (s, default 20) and ``damping``
(λ, default 1e-3). Groups without ``rank`` follow the reference's plain AdamW rule, or, when the
group says ``adam_rule="torch"`` (what :func:`memcompile.optim.lowrank` sets), exactly
``torch.optim.Adam``/``AdamW``'s rule through its functional form.

Every piece of state is a tensor in ``optimizer.state[p]`` (``step`` as a float32 scalar, as
torch.optim keeps it, so torch.compile guards on no Python int), hence ``state_dict()`` /
``load_state_dict()`` resume bit for bit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.adam import adam as torch_adam

from memcompile.optim import functional
from memcompile.optim.projector import ProjectorSpec

log = logging.getLogger(__name__)

PROJECTION_DEFAULTS: dict[str, Any] = {
    "update_proj_gap": 200, "scale": 0.25, "proj_type": "std", "svd": "exact",
    "oversample": 8, "power_iters": 2,
}
"""Keys a projected group gets when it does not name them."""

NATURAL_DEFAULTS: dict[str, Any] = {"natural_history": 20, "damping": 1e-3}
"""Keys a projected group of :class:`NaturalGaLoreAdamW` gets when it does not name them."""

ADAM_RULES = ("transformers", "torch")
"""Rules for groups without ``rank``: the reference's AdamW, or torch.optim.Adam/AdamW's."""

_TORCH_RULE_DEFAULTS: dict[str, Any] = {
    "foreach": None, "fused": None, "capturable": False, "differentiable": False,
    "decoupled_weight_decay": True,
}


def projector_spec(group: dict[str, Any]) -> ProjectorSpec:
    """The :class:`ProjectorSpec` a projected parameter group describes."""
    return ProjectorSpec(rank=group["rank"], proj_type=group["proj_type"], scale=group["scale"],
                         update_proj_gap=group["update_proj_gap"], svd=group["svd"],
                         oversample=group["oversample"], power_iters=group["power_iters"])


class GaLoreAdamW(Optimizer):
    """GaLore's AdamW (galore-torch 1.0's ``GaLoreAdamW`` rule); see the module docstring."""

    natural = False
    """Whether projected groups precondition by the inverse empirical Fisher (Natural GaLore)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, correct_bias: bool = True) -> None:
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr!r}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must lie in [0, 1), got {betas!r}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                    "correct_bias": correct_bias}
        super().__init__(params, defaults)
        self.fused_backward = False

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, filling in and checking its projection keys when it has ``rank``."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if "rank" in group:
            for key, value in PROJECTION_DEFAULTS.items():
                group.setdefault(key, value)
            spec = projector_spec(group)  # validates rank, proj_type, svd, ...
            for i, p in enumerate(group["params"]):
                spec.check_shape(p.shape, f"parameter {i} of group {len(self.param_groups) - 1}")
            if self.natural:
                self._check_natural(group)
        else:
            rule = group.setdefault("adam_rule", "transformers")
            if rule not in ADAM_RULES:
                raise ValueError(f"adam_rule {rule!r} is not supported; valid: {list(ADAM_RULES)}")
            if rule == "torch":
                for key, value in _TORCH_RULE_DEFAULTS.items():
                    group.setdefault(key, value)

    def _check_natural(self, group: dict[str, Any]) -> None:
        for key, value in NATURAL_DEFAULTS.items():
            group.setdefault(key, value)
        s = group["natural_history"]
        if isinstance(s, bool) or not isinstance(s, int) or s <= 0:
            raise ValueError(f"natural_history must be a positive int, got {s!r}")
        if not group["damping"] > 0:
            raise ValueError(f"damping must be > 0, got {group['damping']!r}")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step of every parameter with a gradient; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if "rank" in group:
                self._step_projected(group)
            elif group["adam_rule"] == "torch":
                self._step_torch_rule(group)
            else:
                self._step_plain(group)
        return loss

    def _init_state(self, p: torch.Tensor, group: dict[str, Any],
                    moments_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        state = self.state[p]
        if not state:
            # A float32 scalar on the host, as torch.optim keeps it: reading it (for the refresh
            # decision) costs no device sync, and compile guards on no Python int.
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros(moments_shape, dtype=p.dtype, device=p.device)
            state["exp_avg_sq"] = torch.zeros(moments_shape, dtype=p.dtype, device=p.device)
        return state

    def _step_projected(self, group: dict[str, Any]) -> None:
        spec = projector_spec(group)
        damping = group["damping"] if self.natural else None
        for p in group["params"]:
            if p.grad is None:
                continue
            _reject_sparse(p.grad)
            state = self._init_state(p, group, spec.lowrank_shape(p.shape))
            if "projector" not in state:
                state["projector"] = torch.zeros(spec.projector_shape(p.shape), dtype=p.dtype,
                                                 device=p.device)
                if self.natural:
                    numel = state["exp_avg"].numel()
                    state["history"] = torch.zeros((group["natural_history"], numel),
                                                   dtype=p.dtype, device=p.device)
            functional.projected_adamw_step(
                p, p.grad, state, lr=group["lr"], betas=group["betas"], eps=group["eps"],
                weight_decay=group["weight_decay"], correct_bias=group["correct_bias"],
                spec=spec, damping=damping)

    def _step_plain(self, group: dict[str, Any]) -> None:
        for p in group["params"]:
            if p.grad is None:
                continue
            _reject_sparse(p.grad)
            state = self._init_state(p, group, tuple(p.shape))
            functional.adamw_step(p, p.grad, state, lr=group["lr"], betas=group["betas"],
                                  eps=group["eps"], weight_decay=group["weight_decay"],
                                  correct_bias=group["correct_bias"])

    def _step_torch_rule(self, group: dict[str, Any]) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            _reject_sparse(p.grad)
            state = self.state[p]
            if not state:
                # The state torch.optim.Adam's _init_group makes, so its functional form (and a
                # state carried over from a torch optimizer) works unchanged.
                on_device = group["capturable"] or group["fused"]
                state["step"] = torch.zeros((), dtype=torch.float32,
                                            device=p.device if on_device else None)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        torch_adam(params, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=group["foreach"],
                   capturable=group["capturable"], differentiable=group["differentiable"],
                   fused=group["fused"], decoupled_weight_decay=group["decoupled_weight_decay"],
                   amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                   weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


class NaturalGaLoreAdamW(GaLoreAdamW):
    """GaLoreAdamW whose projected gradient is first multiplied by the inverse empirical Fisher
    (λI + G Gᵀ)⁻¹ over its last ``natural_history`` low-rank gradients (the paper's one-sided
    Natural GaLore; :mod:`memcompile.optim.natural`). The history is cleared at each projector
    refresh; Adam's moments are kept, as in GaLore."""

    natural = True


def _reject_sparse(grad: torch.Tensor) -> None:
    if grad.is_sparse:
        raise RuntimeError("GaLoreAdamW does not support sparse gradients")
