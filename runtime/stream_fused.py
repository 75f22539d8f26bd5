"""Fused optimizer updates inside the streamed backward (`lowrank(..., fused_backward=True)`).

StreamBP has no backward graph for `passes.fused_updates` to rewrite: its backward is the stream
regions' own (`stream_layers`, `stream_loss`), run as autograd nodes. So the runtime makes the
updates itself, once per weight and backward, where the weight's gradient is complete, and then
drops the gradient (the weight gets no `.grad`):

- a weight read by one region only (a layer's projections; the head's, when projected) is
  updated by that region's backward as soon as the region has added its last share: a layer's
  after its last chunk and, with keys and values computed once, after the pass that
  backpropagates their gradient sums. In a run of layers, whose backward is one autograd node,
  that is per layer, inside the run's backward: no two layers' weight gradients coexist.
- any other weight (read by two regions, as tied embeddings and LM head are; by two layers; by
  ops outside every region, such as a layer left whole) passes through `UpdateOnGrad`, an
  identity whose backward autograd runs once, when every reader's share has been summed, and
  which updates the weight there. No reader's backward runs after it, so none reads the weight
  after its update.

The math is the unfused optimizer's: the same complete gradient reaches the same update.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from memcompile.analysis.memory import tensor_bytes
from memcompile.errors import MemcompileWarning
from memcompile.meta import Decision, record_decision
from memcompile.optim import fused
from memcompile.analysis.readers import readers

log = logging.getLogger(__name__)

PASS_NAME = "fuse_optimizer_updates"
"""The name decisions are recorded under: the pass that makes the same updates in a backward
graph (`passes.fused_updates`)."""

RegionUpdates = Mapping[fx.Node, int]
"""The weights (graph inputs) a region's backward updates, with their registry slots."""


@dataclass
class StreamUpdates:
    """Where each fused weight of a streamed graph is updated."""

    by_region: dict[int, dict[fx.Node, int]] = field(default_factory=dict)
    """id(region) -> the weights only that region reads (updated by its backward)."""
    on_grad: dict[fx.Node, int] = field(default_factory=dict)
    """Weights read elsewhere, or by several regions (updated through `UpdateOnGrad`)."""

    def of(self, region: Any) -> dict[fx.Node, int]:
        """The weights `region`'s backward updates."""
        return self.by_region.get(id(region), {})


def plan_updates(gm: fx.GraphModule, slots: Mapping[int, int], owner: Mapping[fx.Node, Any]
                 ) -> StreamUpdates:
    """Decide where each weight of `slots` (graph input index -> registry slot) is updated;
    `owner` maps a node to the region runner that runs it (nodes outside regions are absent).
    Each decision is recorded in `gm.meta` (a "fused update" `Decision` per weight)."""
    updates = StreamUpdates()
    placeholders = gm.graph.find_nodes(op="placeholder")
    for index, slot in sorted(slots.items()):
        node = placeholders[index] if index < len(placeholders) else None
        reason = _unroutable(node, slot)
        if reason:
            warnings.warn(f"memcompile: fused optimizer update of {fused.name_of(slot)} not "
                          f"applied under stream: {reason}; its optimizer steps it from .grad "
                          "in step()", MemcompileWarning, stacklevel=2)
            continue
        regions, outside = readers(node, owner)
        if len(regions) == 1 and not outside:
            (key, region), = regions.items()
            updates.by_region.setdefault(key, {})[node] = slot
            where = f"by the {region.kind} reading it, as soon as its backward is done"
        elif node.users:
            updates.on_grad[node] = slot
            where = (f"on its summed gradient, after all its readers ({len(regions)} region(s), "
                     f"{len(outside)} op(s) outside regions)")
        else:
            continue
        record_decision(gm, Decision(
            PASS_NAME, "fused update", node.name, tensor_bytes(node),
            f"{fused.name_of(slot)} is updated inside the streamed backward {where}; its "
            "gradient is dropped there"))
    log.info("stream: %d weight(s) updated by their region's backward, %d on their summed "
             "gradient", sum(map(len, updates.by_region.values())), len(updates.on_grad))
    return updates


def _unroutable(node: fx.Node | None, slot: int) -> str | None:
    """Why the weight of `slot` cannot be found as graph input `node`, or None."""
    weight = fused.weight_of(slot)
    val = node.meta.get("val") if node is not None else None
    if weight is None or not isinstance(val, torch.Tensor):
        return "the graph's inputs do not line up with the compiled function's"
    if tuple(val.shape) != tuple(weight.shape):
        return (f"graph input {node.name} has shape {tuple(val.shape)}, the weight "
                f"{tuple(weight.shape)}")
    return None


class UpdateOnGrad(torch.autograd.Function):
    """The identity on a weight; its backward hands the weight's summed gradient to the
    optimizer and returns none (autograd calls it once per backward, after every reader)."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, slot: int) -> torch.Tensor:
        ctx.slot = slot
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None]:
        fused.update(ctx.slot, grad)
        return None, None


def on_grad(value: Any, slot: int) -> Any:
    """`value` (a weight) routed through `UpdateOnGrad` when autograd will reach it."""
    if isinstance(value, torch.Tensor) and value.requires_grad and torch.is_grad_enabled():
        return UpdateOnGrad.apply(value, slot)
    return value


def update_complete(updates: RegionUpdates, nodes: Sequence[fx.Node],
                    grads: list[torch.Tensor | None]) -> None:
    """Hand the complete gradients among `grads` (of `nodes`, in order) of the weights in
    `updates` to their optimizer, and drop them (None in `grads`)."""
    for i, node in enumerate(nodes):
        slot = updates.get(node)
        if slot is not None and grads[i] is not None:
            grad, grads[i] = grads[i], None
            fused.update(slot, grad)
