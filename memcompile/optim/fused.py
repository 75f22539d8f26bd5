"""Per-layer updates inside the compiled backward: the registry and the op the backward calls.

`lowrank(..., fused_backward=True)` registers each projected weight here under a *slot* number.
When memcompile compiles a training graph whose inputs include registered weights, the pass
`fuse_optimizer_updates` (`memcompile.passes.fused_updates`) makes the backward graph call
`memcompile::lowrank_update(grad, after, slot)` right after the weight's last use and return no
gradient for it; the op hands the gradient to the optimizer, which projects it (and, unless it
must wait for clipping or more micro-batches, steps the weight) before the gradient is freed.

Under StreamBP (`options={"stream": True}`) there is no backward graph: the stream runtime
(`memcompile.runtime.stream_fused`) calls :func:`update` itself, once per weight, as soon as the
weight's gradient is complete, and drops the gradient.

A weight whose backward was not rewritten (the model ran eagerly, or was compiled before the
swap) gets an ordinary `.grad`, and `optimizer.step()` steps it the usual way: the fused path
is an optimization, never a requirement.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)

_slots: dict[int, tuple[weakref.ref, weakref.ref]] = {}
_slot_of_param: dict[int, int] = {}  # id(param) -> slot, while the parameter lives
_names: dict[int, str] = {}  # slot -> the weight's name, for messages
_next_slot = itertools.count()


def register(optimizer: Any, params: Sequence[torch.Tensor] | Mapping[str, torch.Tensor]
             ) -> None:
    """Route the gradients of `params` (a list, or names -> weights) to
    `optimizer._fused_update` from compiled backwards.

    A parameter registered again (a second swap) moves to the new optimizer.
    """
    opt_ref = weakref.ref(optimizer)
    named = (params.items() if isinstance(params, Mapping)
             else ((f"params[{i}]", p) for i, p in enumerate(params)))
    for name, param in named:
        slot = next(_next_slot)
        old = _slot_of_param.get(id(param))
        if old is not None:
            _slots.pop(old, None)
            _names.pop(old, None)
        _slots[slot] = (opt_ref, weakref.ref(param))
        _names[slot] = name
        _slot_of_param[id(param)] = slot
        weakref.finalize(param, _forget, id(param), slot)


def _forget(param_id: int, slot: int) -> None:
    _slots.pop(slot, None)
    _names.pop(slot, None)
    if _slot_of_param.get(param_id) == slot:
        del _slot_of_param[param_id]


def slots_of(inputs: Sequence[Any]) -> dict[int, int]:
    """Input index -> slot of the registered weights among a graph's `inputs` (its example
    inputs, in order): the weights whose updates a compiled backward may make."""
    return {i: slot for i, t in enumerate(inputs) if (slot := slot_of(t)) is not None}


def weight_of(slot: int) -> torch.Tensor | None:
    """The weight registered as `slot`, or None once it is gone."""
    entry = _slots.get(slot)
    return entry[1]() if entry else None


def name_of(slot: int) -> str:
    """The name `lowrank` gave the weight of `slot` (its module path), for messages."""
    return _names.get(slot, f"slot {slot}")


def name_of_param(param: torch.Tensor) -> str:
    """The name of a registered weight, or a description by shape."""
    slot = slot_of(param)
    return name_of(slot) if slot is not None else f"a weight of shape {tuple(param.shape)}"


def update(slot: int, grad: torch.Tensor) -> None:
    """Hand `grad`, the complete gradient of the weight registered as `slot`, to its
    optimizer (`_fused_update`: it steps the weight, or keeps what `step()` needs). The caller
    drops `grad` afterwards; `grad` may be changed in place (unscaled by a GradScaler)."""
    entry = _slots.get(slot)
    optimizer = entry[0]() if entry else None
    weight = entry[1]() if entry else None
    if optimizer is None or weight is None:
        raise RuntimeError(
            f"memcompile: a compiled backward updates the weight of slot {slot}, but its "
            "optimizer (or the weight) no longer exists; recompile the model after "
            "memcompile.optim.lowrank(..., fused_backward=True)")
    with torch.no_grad():
        optimizer._fused_update(weight, grad)


def slot_of(tensor: Any) -> int | None:
    """The slot of a registered parameter, or None."""
    if not isinstance(tensor, torch.Tensor):
        return None
    slot = _slot_of_param.get(id(tensor))
    if slot is None:
        return None
    _, param_ref = _slots[slot]
    return slot if param_ref() is tensor else None


@torch.library.custom_op("memcompile::lowrank_update", mutates_args=("grad",))
def lowrank_update(grad: torch.Tensor, after: list[torch.Tensor], slot: int) -> None:
    """Hand `grad` (the complete gradient of the weight registered as `slot`) to its optimizer.

    `after` are the outputs of every op of the backward that reads the weight: inputs of this
    op only so that no scheduler can run the update before them. `grad` is declared mutated so
    that no compiler drops the op, which returns nothing (and since a GradScaler's gradients
    are unscaled in place).
    """
    update(slot, grad)


@lowrank_update.register_fake
def _(grad: torch.Tensor, after: list[torch.Tensor], slot: int) -> None:
    return None
