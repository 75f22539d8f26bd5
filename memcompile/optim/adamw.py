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

from memcompile.optim import amp, functional, fused, projector
from memcompile.optim.projector import ProjectorSpec

log = logging.getLogger(__name__)

PROJECTION_DEFAULTS: dict[str, Any] = {
    "update_proj_gap": 200, "scale": 0.25, "proj_type": "std", "svd": "exact",
    "oversample": 8, "power_iters": 2, "signs": "continuous",
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
                         oversample=group["oversample"], power_iters=group["power_iters"],
                         signs=group["signs"])


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
        """Whether compiled backwards hand projected weights' gradients to `_fused_update`."""
        self.max_grad_norm: float | None = None
        """Clip the global gradient norm (all parameters) to this in `step`, as
        `torch.nn.utils.clip_grad_norm_` would; None: no clipping."""
        self.micro_batches = 1
        """Backward passes per step (gradient accumulation); checked with fused updates."""
        self.grad_scaler: torch.amp.GradScaler | None = None
        """The GradScaler that scales the loss, for fused updates (`lowrank(grad_scaler=)`):
        they unscale and check each gradient inside the backward and wait for
        `scaler.step(optimizer)`, which skips the whole step after any overflow."""
        self._pending: dict[torch.Tensor, dict[str, Any]] = {}  # fused gradients not stepped yet
        self._fused_found: dict[torch.device, torch.Tensor] = {}  # inf checks of fused grads
        self._group_of: dict[int, dict[str, Any]] = {}

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """GradScaler's hook for optimizers that handle scaling themselves: with it, a
        GradScaler's `step` calls `step()` with `grad_scale` and `found_inf` set instead of
        unscaling `.grad` and maybe skipping `step()`. Fused updates need every such step: to
        count an overflow seen inside the backward, to drop what a skipped step left pending,
        and to refuse a step whose weights were updated with scaled gradients."""
        return self.fused_backward

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
        """One step of every parameter with a gradient; returns ``closure()`` if given.

        With ``max_grad_norm`` the gradients are first clipped to that global norm. Projected
        weights whose gradients a compiled backward already took (``fused_backward``) are
        finished from what the backward left, or were stepped inside it.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._scaler_allows_step():
            return loss
        coef = self._clip_coefficient() if self.max_grad_norm is not None else None
        for group in self.param_groups:
            if "rank" in group:
                # Clipped after projection: the projector is refreshed from the gradient as the
                # backward produced it, in this path and the fused one alike (module docstring).
                self._step_projected(group, coef)
                continue
            if coef is not None:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(coef)
            if group["adam_rule"] == "torch":
                self._step_torch_rule(group)
            else:
                self._step_plain(group)
        self._pending.clear()
        return loss

    def _scaler_allows_step(self) -> bool:
        """Whether this step goes ahead, under a GradScaler (see `lowrank`'s `grad_scaler`).

        `GradScaler.step` sets `grad_scale` and `found_inf` before calling `step()` (see
        `_step_supports_amp_scaling`). Then a step with an inf/NaN in `.grad` or in a fused
        gradient is skipped whole (nothing pending is kept, no state changes) and the scaler is
        told, so `scaler.update()` backs off; otherwise `.grad` is unscaled here, as
        `scaler.unscale_` would. Fused updates that took gradients without knowing the scaler
        (no `grad_scaler` given) are refused, as is a plain `step()` with an active scaler.
        """
        if not self.fused_backward:  # a GradScaler unscales .grad itself (no amp hook)
            return True
        found, self._fused_found = self._fused_found, {}
        scaler = self.grad_scaler if amp.active(self.grad_scaler) else None
        if not hasattr(self, "grad_scale"):  # not called by a GradScaler
            if scaler is not None and self._pending:
                self._pending.clear()
                raise RuntimeError(
                    "memcompile: this optimizer was given grad_scaler=, so its fused updates "
                    "took scaled gradients and wait for scaler.step(optimizer), which "
                    "unscales the rest and skips the step after an overflow; "
                    "optimizer.step() was called instead (nothing was stepped)")
            return True
        if scaler is None and self._pending:
            names = ", ".join(fused.name_of_param(p) for p in list(self._pending)[:3])
            self._pending.clear()
            raise RuntimeError(
                "memcompile: a GradScaler steps this optimizer, but its fused updates "
                f"({names}, ...) took the scaled gradients inside the backward without knowing "
                "the scale (and without skipping an overflow). Pass grad_scaler=scaler to "
                "memcompile.optim.lowrank(..., fused_backward=True)")
        if scaler is not None and found:
            amp.tell_scaler(scaler, self, found)
        if amp.any_found(self.found_inf, found):
            self._pending.clear()
            return False
        if self.grad_scale is not None:  # None: the user called scaler.unscale_ already
            grads = [p.grad for g in self.param_groups for p in g["params"]
                     if p.grad is not None]
            amp.unscale_(grads, self.grad_scale.double().reciprocal().float(), {})
        return True

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

    def _step_projected(self, group: dict[str, Any], coef: torch.Tensor | None = None) -> None:
        spec = projector_spec(group)
        for p in group["params"]:
            pending = self._pending.get(p)
            if pending is not None:
                self._finish_fused(p, pending, group, spec, coef)
            elif p.grad is not None:
                _reject_sparse(p.grad)
                self._step_projected_one(p, p.grad, group, spec, coef)

    def _projected_state(self, p: torch.Tensor, group: dict[str, Any],
                         spec: ProjectorSpec) -> dict[str, torch.Tensor]:
        state = self._init_state(p, group, spec.lowrank_shape(p.shape))
        if "projector" not in state:
            state["projector"] = torch.zeros(spec.projector_shape(p.shape), dtype=p.dtype,
                                             device=p.device)
            if self.natural:
                numel = state["exp_avg"].numel()
                state["history"] = torch.zeros((group["natural_history"], numel),
                                               dtype=p.dtype, device=p.device)
        return state

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        return {"lr": group["lr"], "betas": group["betas"], "eps": group["eps"],
                "weight_decay": group["weight_decay"], "correct_bias": group["correct_bias"],
                "damping": group["damping"] if self.natural else None}

    def _step_projected_one(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any],
                            spec: ProjectorSpec, coef: torch.Tensor | None = None) -> None:
        state = self._projected_state(p, group, spec)
        if coef is None:
            functional.projected_adamw_step(p, grad, state, spec=spec, **self._hyper(group))
            return
        lowrank, flag = functional.absorb_gradient(grad, state, spec)
        functional.lowrank_adamw_step(p, lowrank * coef, flag, state, spec=spec,
                                      **self._hyper(group))

    # -- updates inside the backward (fused_backward) -------------------------------------------

    @property
    def defers_fused_updates(self) -> bool:
        """Whether fused gradients wait for `step`: clipping needs the global norm first,
        accumulation the last micro-batch, and a GradScaler the verdict on every gradient."""
        return (self.max_grad_norm is not None or self.micro_batches > 1
                or amp.active(self.grad_scaler))

    def _fused_update(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        """Take the complete gradient of projected weight ``p`` from inside a backward.

        Without clipping, accumulation or a GradScaler the weight steps at once. Otherwise the
        gradient is projected and summed into a low-rank buffer (exact: the projection is
        linear and the projector fixed within a step), or, when the subspace must be refreshed
        from the summed gradient or clipping needs the summed gradient's norm, summed at full
        size.

        No weight or state is changed from a gradient holding an inf or NaN. With a GradScaler
        the gradient is unscaled and checked in place, and an overflow skips the whole step in
        `scaler.step` (the projector a refresh computes waits in the pending buffers until
        then). Without one, a non-finite gradient raises `FloatingPointError` before this
        weight is touched (one host read per weight).
        """
        group = self._projected_group(p)
        spec = projector_spec(group)
        scaler = self.grad_scaler if amp.active(self.grad_scaler) else None
        found: dict[torch.device, torch.Tensor] = {}
        if scaler is not None:
            amp.unscale_([grad], amp.inverse_scale(scaler), found)
            for device, flag in found.items():
                total = self._fused_found.get(device)
                self._fused_found[device] = flag.clone() if total is None else total.add_(flag)
        elif not bool(torch.isfinite(grad).all()):
            raise FloatingPointError(
                f"memcompile: the gradient of {fused.name_of_param(p)} holds an inf or NaN; its "
                "fused update refused it, leaving the weight and its state as they were (weights "
                "updated earlier in this backward kept their finite step). With float16 and a "
                "torch.amp.GradScaler, pass grad_scaler=scaler to memcompile.optim.lowrank")
        pending = self._pending.setdefault(p, {"count": 0})
        pending["count"] += 1
        if not self.defers_fused_updates:
            if pending["count"] > 1:
                raise RuntimeError(
                    "memcompile: a fused backward stepped this weight a second time before "
                    "optimizer.step(); for gradient accumulation pass micro_batches=<backward "
                    "passes per step> to memcompile.optim.lowrank")
            self._step_projected_one(p, grad, group, spec)
            return
        state = self._projected_state(p, group, spec)
        refresh_due = bool(torch.remainder(state["step"], spec.update_proj_gap) == 0)
        if self.micro_batches > 1 and (refresh_due or self.max_grad_norm is not None):
            _accumulate(pending, "grad_sum", grad)
            return
        if self.micro_batches == 1:
            if scaler is not None and refresh_due:
                if amp.any_found(None, found):
                    return  # the step is skipped: no SVD of a non-finite gradient
                # Kept aside: a step skipped for another weight's overflow leaves the state.
                pending["projector"] = functional.new_projector(grad, state["projector"], spec)
                lowrank = projector.project(grad, pending["projector"], spec.side(p.shape))
            else:
                lowrank, _ = functional.absorb_gradient(grad, state, spec, traced=False)
            if self.max_grad_norm is not None:
                pending["norm"] = torch.linalg.vector_norm(grad, 2)
        else:
            lowrank = projector.project(grad, state["projector"], spec.side(p.shape))
        _accumulate(pending, "lowrank", lowrank)

    def _finish_fused(self, p: torch.Tensor, pending: dict[str, Any], group: dict[str, Any],
                      spec: ProjectorSpec, coef: torch.Tensor | None) -> None:
        expected = self.micro_batches if self.defers_fused_updates else 1
        if pending["count"] != expected:
            raise RuntimeError(
                f"memcompile: {pending['count']} backward pass(es) reached this weight since the "
                f"last optimizer.step(), but the optimizer was set up for {expected} "
                "(micro_batches of memcompile.optim.lowrank)")
        if "grad_sum" in pending:
            self._step_projected_one(p, pending["grad_sum"], group, spec, coef)
        elif "lowrank" in pending:
            state = self.state[p]
            if "projector" in pending:
                state["projector"].copy_(pending["projector"])
            lowrank = pending["lowrank"] if coef is None else pending["lowrank"].mul_(coef)
            flag = torch.remainder(state["step"], spec.update_proj_gap) == 0
            functional.lowrank_adamw_step(p, lowrank, flag, state, spec=spec,
                                          **self._hyper(group))
        # else: stepped inside the backward already

    def _projected_group(self, p: torch.Tensor) -> dict[str, Any]:
        group = self._group_of.get(id(p))
        # Rebuilt when a group is gone: load_state_dict replaces the group dicts.
        if group is None or not any(group is g for g in self.param_groups):
            self._group_of = {id(q): g for g in self.param_groups if "rank" in g
                              for q in g["params"]}
            group = self._group_of.get(id(p))
            if group is None:
                raise RuntimeError("memcompile: a fused backward handed over the gradient of a "
                                   "weight this optimizer does not project")
        return group

    def _clip_coefficient(self) -> torch.Tensor:
        """``clip_grad_norm_``'s coefficient over every gradient, fused ones included."""
        norms = []
        for group in self.param_groups:
            for p in group["params"]:
                pending = self._pending.get(p)
                if pending is not None and "norm" in pending:
                    norms.append(pending["norm"])
                elif pending is not None and "grad_sum" in pending:
                    norms.append(torch.linalg.vector_norm(pending["grad_sum"], 2))
                elif p.grad is not None:
                    norms.append(torch.linalg.vector_norm(p.grad, 2))
        if not norms:
            return torch.tensor(1.0)
        total = torch.linalg.vector_norm(torch.stack(norms), 2)
        return torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0)

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


def _accumulate(pending: dict[str, Any], key: str, value: torch.Tensor) -> None:
    if key in pending:
        pending[key].add_(value)
    else:
        pending[key] = value.clone()


def _reject_sparse(grad: torch.Tensor) -> None:
    if grad.is_sparse:
        raise RuntimeError("GaLoreAdamW does not support sparse gradients")
