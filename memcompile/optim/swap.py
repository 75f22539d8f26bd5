"""``lowrank``: turn an existing ``torch.optim.Adam``/``AdamW`` into GaLore or Natural GaLore."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import nn

from memcompile.optim import amp, fused
from memcompile.optim.adamw import GaLoreAdamW, NaturalGaLoreAdamW
from memcompile.optim.memory import state_bytes
from memcompile.optim.projector import ProjectorSpec
from memcompile.optim.selection import select_weights

log = logging.getLogger(__name__)

METHODS = {"galore": GaLoreAdamW, "natural_galore": NaturalGaLoreAdamW}
"""Method name → the optimizer class :func:`lowrank` returns."""

_PROJECTOR_KEYS = ("svd", "oversample", "power_iters", "signs")
_NATURAL_KEYS = ("natural_history", "damping")


def lowrank(optimizer: torch.optim.Optimizer, *, model: nn.Module | None = None,
            params: list[torch.Tensor] | None = None, rank: int, update_proj_gap: int = 200,
            scale: float = 0.25, proj_type: str = "std", method: str = "galore",
            fused_backward: bool = False, max_grad_norm: float | None = None,
            micro_batches: int = 1, grad_scaler: torch.amp.GradScaler | None = None,
            **kwargs: Any) -> GaLoreAdamW:
    """A new GaLore (or Natural GaLore) optimizer over ``optimizer``'s parameters.

    The weights in ``params`` (or, from ``model``, those :mod:`memcompile.optim.selection`
    picks) step in a rank-``rank`` subspace with the optimizer's lr, betas, eps and weight decay
    (decoupled, GaLore's rule); every other parameter keeps ``torch.optim.Adam``/``AdamW``'s own
    rule and hyperparameters exactly. Extra keyword arguments: ``svd``, ``oversample``,
    ``power_iters`` and, for ``method="natural_galore"``, ``natural_history`` and ``damping``.

    ``fused_backward=True``: a model compiled with memcompile *after* this call steps each
    projected weight inside its backward, as soon as the weight's gradient is complete, and
    frees the gradient (`memcompile.passes.fused_updates`). ``max_grad_norm`` makes ``step()``
    clip the global gradient norm first (then do not call ``clip_grad_norm_`` yourself: fused
    weights have no ``.grad`` for it to see); ``micro_batches`` is the number of backward passes
    per ``step()`` (gradient accumulation). Either makes fused updates wait for ``step()``,
    holding low-rank buffers (see the README for their memory).

    Mixed precision. A fused update runs inside the backward, before anything after it could
    veto the step, so it never changes a weight or its state from a gradient holding an inf or
    NaN:

    - ``grad_scaler=scaler`` (a ``torch.amp.GradScaler``, float16 under ``torch.autocast``):
      each fused gradient is unscaled and checked inside the backward, with the scaler's own
      kernel, and projected into a low-rank buffer (the full gradient is still freed there);
      the weights step in ``scaler.step(optimizer)``, all of them or, after an inf/NaN in any
      gradient (fused or not), none: the step is skipped whole, as GradScaler skips it, and
      ``scaler.update()`` backs the scale off. Memory: the projected gradients (one Adam
      moment's size per weight) live until ``scaler.step``, as with ``max_grad_norm``. Step with
      ``scaler.step(optimizer)``; a plain ``optimizer.step()`` is refused. The weights must be
      float32 or wider (float16 weights are refused, as ``GradScaler.unscale_`` refuses float16
      gradients).
    - no ``grad_scaler`` (float32, bfloat16, float64): each weight steps inside the backward;
      a gradient holding an inf or NaN raises ``FloatingPointError`` before its weight is
      touched (weights updated earlier in that backward keep their finite step). Stepping such
      an optimizer through a GradScaler is refused at ``scaler.step``: its fused updates took
      scaled gradients.

    Returns a new optimizer object: the old one must not be stepped afterwards. For each original
    group the new one has the unprojected part, then the projected part (empty parts dropped).
    State the old optimizer already holds is carried over for the unprojected parameters (the
    same tensors, not copies); the projected ones start fresh, with a warning, since full-size
    moments have no meaning in a subspace not chosen yet.
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not supported; valid: {sorted(METHODS)}")
    _check_kwargs(kwargs, method)
    if not isinstance(fused_backward, bool):
        raise TypeError(f"fused_backward must be True or False, got {fused_backward!r}")
    if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"micro_batches must be an int >= 1, got {micro_batches!r}")
    if grad_scaler is not None:
        _check_grad_scaler(grad_scaler, optimizer, fused_backward)
    if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float))
                                          and not isinstance(max_grad_norm, bool)
                                          and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be a number > 0 or None, got {max_grad_norm!r}")
    _check_optimizer(optimizer)
    chosen = _chosen_weights(optimizer, model, params)
    spec = ProjectorSpec(rank=rank, update_proj_gap=update_proj_gap, scale=scale,
                         proj_type=proj_type, **{k: kwargs[k] for k in _PROJECTOR_KEYS
                                                 if k in kwargs})
    for name, weight in chosen.items():
        spec.check_shape(weight.shape, name)
    projection = {"rank": rank, "update_proj_gap": update_proj_gap, "scale": scale,
                  "proj_type": proj_type, **kwargs}
    groups = _split_groups(optimizer, {id(w) for w in chosen.values()}, projection)
    new = METHODS[method](groups)
    new.fused_backward = fused_backward
    new.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
    new.micro_batches = micro_batches
    new.grad_scaler = grad_scaler
    if fused_backward:
        fused.register(new, chosen)
    _carry_state(optimizer, new, chosen)
    log.info("lowrank: %d weight(s) projected at rank %d (%s), %d group(s)", len(chosen), rank,
             method, len(new.param_groups))
    return new


def _check_kwargs(kwargs: dict[str, Any], method: str) -> None:
    valid = _PROJECTOR_KEYS + (_NATURAL_KEYS if method == "natural_galore" else ())
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        hint = " (natural_history and damping need method='natural_galore')" if set(
            unknown) & set(_NATURAL_KEYS) else ""
        raise TypeError(f"lowrank() got unknown keyword(s) {unknown}{hint}; valid: {list(valid)}")


def _check_grad_scaler(scaler: Any, optimizer: torch.optim.Optimizer,
                       fused_backward: bool) -> None:
    amp.check_scaler(scaler)
    if not fused_backward:
        raise ValueError("lowrank(): grad_scaler is for fused_backward=True (updates inside the "
                         "backward); without it, use the scaler as usual: scaler.step(optimizer)")
    half = [i for i, g in enumerate(optimizer.param_groups) for p in g["params"]
            if p.dtype == torch.float16]
    if half:
        raise ValueError(
            f"lowrank(): group(s) {sorted(set(half))} hold float16 weights; a GradScaler "
            "unscales float32 gradients (GradScaler.unscale_ refuses float16 ones): keep the "
            "weights in float32 and run the forward under torch.autocast(dtype=torch.float16)")


def _check_optimizer(optimizer: Any) -> None:
    # AdamW subclasses Adam in torch 2.13; both share the group keys read below.
    if not isinstance(optimizer, torch.optim.Adam):
        raise TypeError(
            f"lowrank() converts torch.optim.Adam or torch.optim.AdamW, got "
            f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"
        )
    for i, group in enumerate(optimizer.param_groups):
        for key in ("amsgrad", "maximize"):
            if group.get(key):
                raise ValueError(f"lowrank(): group {i} has {key}=True; GaLore supports only "
                                 f"{key}=False")
        if isinstance(group["lr"], torch.Tensor) or any(
                isinstance(b, torch.Tensor) for b in group["betas"]):
            raise ValueError(f"lowrank(): group {i} has a tensor lr or betas; use floats")
        if group["weight_decay"] and not group.get("decoupled_weight_decay", False):
            raise ValueError(
                f"lowrank(): group {i} of torch.optim.Adam has weight_decay="
                f"{group['weight_decay']}, an L2 penalty added to the gradient, which GaLore's "
                "rule has no form for; use torch.optim.AdamW (decoupled decay) or weight_decay=0"
            )


def _chosen_weights(optimizer: torch.optim.Optimizer, model: nn.Module | None,
                    params: list[torch.Tensor] | None) -> dict[str, torch.Tensor]:
    if (model is None) == (params is None):
        raise ValueError("lowrank() takes exactly one of model= or params=")
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if model is not None:
        chosen = {name: w for name, w in select_weights(model).items() if id(w) in in_optimizer}
        if not chosen:
            raise ValueError("lowrank(): the model has no nn.Linear weight in the optimizer to "
                             "project (embeddings and the output head are left out)")
        return chosen
    if isinstance(params, torch.Tensor):
        raise TypeError("lowrank(params=...) takes a list of tensors, not one tensor")
    chosen = {}
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"lowrank(): params[{i}] is a {type(p).__name__}, not a tensor")
        if p.dim() != 2:
            raise ValueError(f"lowrank(): params[{i}] has shape {tuple(p.shape)}; only 2-D "
                             "weights can be projected")
        if id(p) not in in_optimizer:
            raise ValueError(f"lowrank(): params[{i}] (shape {tuple(p.shape)}) is not in the "
                             "optimizer's parameter groups")
        chosen.setdefault(f"params[{i}]", p)
    if not chosen:
        raise ValueError("lowrank(): params is empty")
    return chosen


def _split_groups(optimizer: torch.optim.Optimizer, projected: set[int],
                  projection: dict[str, Any]) -> list[dict[str, Any]]:
    groups = []
    for group in optimizer.param_groups:
        hyper = {k: v for k, v in group.items() if k != "params"}
        plain = [p for p in group["params"] if id(p) not in projected]
        lowrank_params = [p for p in group["params"] if id(p) in projected]
        if plain:
            # torch's own rule for these: the group keeps every key torch.optim.Adam reads.
            groups.append({**hyper, "params": plain, "adam_rule": "torch",
                           "decoupled_weight_decay": group.get("decoupled_weight_decay", False)})
        if lowrank_params:
            groups.append({"params": lowrank_params, "lr": group["lr"], "betas": group["betas"],
                           "eps": group["eps"], "weight_decay": group["weight_decay"],
                           "correct_bias": True, **projection})
    return groups


def _carry_state(old: torch.optim.Optimizer, new: GaLoreAdamW,
                 chosen: dict[str, torch.Tensor]) -> None:
    projected = {id(w) for w in chosen.values()}
    dropped = [p for p in old.state if id(p) in projected and old.state[p]]
    if dropped:
        warnings.warn(
            f"lowrank(): the optimizer already holds state for {len(dropped)} projected "
            f"weight(s) ({state_bytes(old, dropped):,} bytes); their projected moments start "
            "from zero. Unprojected parameters keep their state.", stacklevel=3)
    for p, state in old.state.items():
        if id(p) not in projected and state:
            new.state[p] = dict(state)
