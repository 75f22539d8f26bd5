"""Each layer's weight gradients reach `.grad` as soon as that layer's backward is done.

A run of layers is one autograd node (`stream_layers.StreamLayers`): autograd receives its
gradients only when the whole run's backward returns. Until then every layer's weight gradients
would be held by the runtime, a second full copy of them beside the `.grad` that gradient
accumulation (micro-batches, `zero_grad(set_to_none=False)`) keeps. But a weight that one region
alone reads has complete gradients as soon as that region's backward is done, so they are
accumulated there as autograd's `AccumulateGrad` would: added in place into `.grad`, or becoming
`.grad` when there is none. The run then returns no gradient for the weight; autograd still
reaches the weight's accumulator (with nothing to add) and runs its post-accumulate hooks
(`register_post_accumulate_grad_hook`, a reducer's) once, when the run's backward is done, with
`.grad` complete.

Where that would change what the user sees, the gradient goes back to autograd as before: when
this backward does not accumulate into the weight (`torch.autograd.grad`, or `backward(inputs=)`
not naming it), when the weight has tensor hooks (`register_hook` may rewrite the gradient before
it is accumulated), and under `create_graph=True`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx



def deliver_complete(own: set[fx.Node], nodes: Sequence[fx.Node], values: Sequence[Any],
                     grads: list[torch.Tensor | None]) -> None:
    """Accumulate the gradients among `grads` (of `nodes`, whose tensors are `values`) that are
    complete (`own`) into their leaf weights now, and drop them (None in `grads`)."""
    for i, node in enumerate(nodes):
        grad, weight = grads[i], values[i]
        if grad is None or node not in own or not _accumulates(weight):
            continue
        grads[i] = None
        _accumulate(weight, grad)


def _accumulates(weight: Any) -> bool:
    """Whether the running backward accumulates into `weight`'s `.grad` unaltered."""
    if not (isinstance(weight, torch.Tensor) and weight.is_leaf and weight.requires_grad):
        return False
    if weight._backward_hooks or torch.is_grad_enabled():  # tensor hooks; create_graph=True
        return False
    node = torch.autograd.graph.get_gradient_edge(weight).node
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except RuntimeError:  # raised for a leaf under `torch.autograd.grad`, which accumulates none
        return False


def _accumulate(weight: torch.Tensor, grad: torch.Tensor) -> None:
    """`weight.grad += grad` in place, or `grad` as `.grad` (in the weight's strides, as
    autograd lays a new gradient out) when there is none."""
    if weight.grad is None:
        weight.grad = (grad if grad.stride() == weight.stride()
                       else torch.empty_like(weight).copy_(grad))
    else:
        weight.grad.add_(grad)
