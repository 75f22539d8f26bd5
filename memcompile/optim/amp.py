"""What fused updates need from `torch.amp.GradScaler`, in one place.

A GradScaler multiplies the loss by its scale, so every gradient of the backward is scaled; it
unscales them and checks them for inf/NaN in `scaler.step(optimizer)`, after the backward. Fused
updates (`lowrank(..., fused_backward=True)`) take gradients *inside* the backward, before that
check. With `lowrank(..., grad_scaler=scaler)` each fused gradient is unscaled and checked by the
same kernel GradScaler uses (`torch._amp_foreach_non_finite_check_and_unscale_`, with the
reciprocal computed as `GradScaler.unscale_` computes it), and what it finds is added to the
checks `scaler.update()` reads, so the scaler backs off after an overflow of a fused gradient as
after any other.

GradScaler has no public way to add an inf check to an optimizer's, nor to read its scale as a
tensor; the two private attributes used (`_scale`, `_per_optimizer_states`) are read here and
nowhere else, and a GradScaler without them is refused with a message, not worked around.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch


def active(scaler: Any) -> bool:
    """Whether `scaler` scales this run's gradients (given and enabled)."""
    return scaler is not None and scaler.is_enabled()


def check_scaler(scaler: Any) -> None:
    """Refuse what is not a `torch.amp.GradScaler` this module can work with."""
    if not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got "
                        f"{type(scaler).__module__}.{type(scaler).__qualname__}")
    for name in ("_scale", "_per_optimizer_states"):
        if not hasattr(scaler, name):
            raise TypeError(f"this torch's GradScaler has no {name}, which fused updates read "
                            "to unscale gradients inside the backward; use fused_backward=False")


def inverse_scale(scaler: Any) -> torch.Tensor:
    """1/scale in float32, computed in float64 as `GradScaler.unscale_` does."""
    scale = scaler._scale
    if scale is None:
        raise RuntimeError(
            "memcompile: a fused update got a gradient for lowrank(..., grad_scaler=scaler), "
            "but the scaler has not scaled anything yet: call scaler.scale(loss).backward()")
    return scale.double().reciprocal().float()


def unscale_(grads: list[torch.Tensor], inverse: torch.Tensor,
             found: dict[torch.device, torch.Tensor]) -> None:
    """Multiply `grads` by `inverse` in place and record any inf/NaN into `found` (per device,
    created as needed): GradScaler's own kernel, so the result is the one its `unscale_` gives."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    for grad in grads:
        if grad.dtype == torch.float16:
            # As GradScaler.unscale_: float16 master weights lose what unscaling would keep.
            raise ValueError("Attempting to unscale FP16 gradients.")
        groups[grad.device, grad.dtype].append(grad)
    for (device, _), group in groups.items():
        if device not in found:
            found[device] = torch.zeros((), dtype=torch.float32, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(group, found[device],
                                                         inverse.to(device))


def tell_scaler(scaler: Any, optimizer: Any, found: dict[torch.device, torch.Tensor]) -> None:
    """Add the fused gradients' inf checks to those `scaler.update()` reads for `optimizer`, so
    an overflow seen inside the backward backs the scale off like one seen in `.grad`."""
    checks = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
    for device, flag in found.items():
        checks[device] = checks[device] + flag if device in checks else flag.clone()


def any_found(found_inf: torch.Tensor | None, found: dict[torch.device, torch.Tensor]) -> bool:
    """Whether the scaler's checks (`found_inf`) or the fused ones saw an inf/NaN (one host
    read, as `GradScaler.step` makes one)."""
    flags = [f.float().cpu().reshape(()) for f in found.values()]
    if found_inf is not None:
        flags.append(found_inf.float().cpu().reshape(()))
    return bool(sum(flags, torch.zeros(())) > 0) if flags else False
