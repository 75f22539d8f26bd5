"""The weights' gradients of a streamed step under sequence parallelism, summed over the ranks.

Each rank backpropagates its shard's share of the loss, so a weight's gradient on one rank is
its shard's share and the single-device gradient is their sum (`passes/sequence_parallel_grads`
says why, for the joint graph). A streamed step has no joint graph: its backward is autograd's
over the forward graph, with the layers' backward run by `stream_layers`. So each weight's
gradient of this step is summed once, where it is complete:

- a weight only one layer reads (a layer's projections and norms): in that layer's backward,
  before `stream_accumulate` puts it into `.grad` (`reduce_complete`), so the per-layer delivery
  stays and each layer's sum overlaps nothing it waits on;
- any other weight (the embedding, the final norm, the head, a weight several regions read):
  through `SumOnGrad`, an identity on the weight whose backward autograd runs once per
  backward, after every reader's share has been added.

A gradient taken by `torch.autograd.grad` or `backward(inputs=...)` is the same sum: both
routes act on the gradient before it leaves the step. Every rank runs the same graph, layers
and chunks, so the all-reduces are posted in the same order on every rank.

Fused optimizer updates inside the streamed backward (`lowrank(..., fused_backward=True)`)
would read a weight's gradient before some of these sums: they are refused with this option.
"""

from __future__ import annotations

import datetime
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx

from memcompile.distributed.comm import PeerError

_LAYER_SUMS: weakref.WeakKeyDictionary[Any, _Sums] = weakref.WeakKeyDictionary()
"""ChunkRunner of a layer -> the weights its backward sums."""


@dataclass(frozen=True)
class _Sums:
    """Where a gradient is summed: the group, the deadline, and (for a layer) its weights."""

    group: dist.ProcessGroup | None
    timeout: float
    nodes: frozenset[fx.Node] = frozenset()


def all_reduce(grad: torch.Tensor, sums: _Sums) -> torch.Tensor:
    """`grad` summed over the group, in place; a `PeerError` when a rank does not join in time."""
    work = dist.all_reduce(grad, group=sums.group, async_op=True)
    try:
        if work.wait(datetime.timedelta(seconds=sums.timeout)) is False:
            raise TimeoutError(f"timed out after {sums.timeout:g} s")
    except Exception as error:  # gloo and NCCL raise RuntimeError or DistBackendError
        rank, world = dist.get_rank(sums.group), dist.get_world_size(sums.group)
        raise PeerError(rank, [r for r in range(world) if r != rank],
                        "the sum of a weight's gradient (stream)", sums.timeout,
                        error) from error
    return grad


class SumOnGrad(torch.autograd.Function):
    """The identity on a weight; its backward sums the weight's gradient over the group."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, sums: _Sums) -> torch.Tensor:
        ctx.sums = sums
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return all_reduce(grad.contiguous().clone(), ctx.sums), None


def reduce_complete(runner: Any, grads: list[torch.Tensor | None]) -> None:
    """Sum over the ranks, in place, the complete gradients among `grads` (of the layer's side
    inputs, in order) of the weights `runner`'s layer alone reads (no-op without sequence
    parallelism)."""
    sums = _LAYER_SUMS.get(runner)
    if sums is None:
        return
    for node, grad in zip(runner.region.side_inputs, grads):
        if grad is not None and node in sums.nodes:
            all_reduce(grad, sums)


class ShardedStep:
    """A streamed program whose weights' gradients are summed over the sequence-parallel group.

    `program` is a `StreamProgram`; `parameters` the indices of its inputs that are weights
    (`nn.Parameter`s). The weights one layer alone reads are summed by that layer's backward;
    the others are passed through `SumOnGrad`."""

    def __init__(self, program: Any, parameters: Sequence[int], group: dist.ProcessGroup | None,
                 timeout: float):
        self.program = program
        placeholders = list(program.gm.graph.find_nodes(op="placeholder"))
        weights = {placeholders[i] for i in parameters}
        in_layers: set[fx.Node] = set()
        for runner in program.runners:
            if runner.region.kind != "layer":
                continue
            own = weights & program.own.get(id(runner.region), set())
            _LAYER_SUMS[runner] = _Sums(group, timeout, frozenset(own))
            in_layers |= own
        self.sums = _Sums(group, timeout)
        self.wrapped = [i for i in parameters if placeholders[i] not in in_layers]
        """Inputs passed through `SumOnGrad`."""

    def __call__(self, *args: Any) -> Any:
        args = list(args)
        if torch.is_grad_enabled():
            for i in self.wrapped:
                if isinstance(args[i], torch.Tensor) and args[i].requires_grad:
                    args[i] = SumOnGrad.apply(args[i], self.sums)
        return self.program(*args)
