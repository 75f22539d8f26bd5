"""The distributed attention as torch operators: `memcompile::sp_attention` and its backward.

The `sequence_parallel` pass (`passes/sequence_parallel.py`) puts `sp_attention` where the
captured graph calls `scaled_dot_product_attention`. A custom operator with a fake
implementation and an autograd formula is one opaque node to AOTAutograd, the partitioner, the
remat planner and Inductor (an extern kernel): its forward returns the output, the
log-sum-exp and the global padding mask; its backward, `sp_attention_backward`, reads them, so
the forward never runs again in the backward. Recomputing it is banned outright
(`analysis.joint.recompute_ban`): a rank that recomputed it alone would post transfers no peer
answers.

Arguments a schema can carry: the process group travels by name (`group_name`), and the
model's mask as a tensor or None (`distributed.masks` reads its padding at run time). Outputs
have contiguous strides, as the fake implementation says, so compiled code that reads them
with those strides reads them right. (No `from __future__ import annotations` here: the
operators' schemas are read from their annotations.)
"""

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch._prims_common import make_contiguous_strides_for
from torch.distributed.distributed_c10d import _resolve_process_group

from memcompile.distributed.attention import dist_attention_backward, dist_attention_forward
from memcompile.distributed.masks import additive, global_keys
from memcompile.runtime.attention_kernels import accumulation_dtype

Tensor = torch.Tensor


def group_name(group: Optional[dist.ProcessGroup]) -> str:
    """The name a graph carries for `group` (None: the default group)."""
    return (group if group is not None else dist.group.WORLD).group_name


def group_size(name: str) -> int:
    """The number of ranks of the process group a graph names `name` (`group_name`)."""
    return dist.get_world_size(_resolve_process_group(name))


def _standard(t: Tensor) -> Tensor:
    """`t` with contiguous strides (size-1 dimensions included), copied only if needed."""
    if tuple(t.stride()) == tuple(make_contiguous_strides_for(t.shape)):
        return t
    return t.clone(memory_format=torch.contiguous_format)


@torch.library.custom_op("memcompile::sp_attention", mutates_args=())
def sp_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: Optional[float],
                 group: str, layout: str, timeout: float) -> tuple[Tensor, Tensor, Tensor]:
    """Causal attention of this rank's shard over the group's sequence (`dist_causal_attention`):
    `(out, lse, keys)`, `keys` the global padding mask `(B, S)` read from the model's `mask`
    (empty without one)."""
    pg = _resolve_process_group(group)
    if mask is None:
        keys = q.new_empty((0,), dtype=torch.bool)
    else:
        keys = global_keys(mask, q.shape[0], q.shape[2], group=pg, layout=layout,
                           timeout=timeout)
    out, lse = dist_attention_forward(q, k, v, group=pg, layout=layout, scale=scale,
                                      timeout=timeout, keys=additive(keys, q.dtype))
    return _standard(out), _standard(lse), keys


@sp_attention.register_fake
def _sp_attention_fake(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
                       scale: Optional[float], group: str, layout: str, timeout: float
                       ) -> tuple[Tensor, Tensor, Tensor]:
    if mask is None:
        keys = q.new_empty((0,), dtype=torch.bool)
    else:
        world = dist.get_world_size(_resolve_process_group(group))
        keys = q.new_empty((q.shape[0], q.shape[2] * world), dtype=torch.bool)
    return (q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=accumulation_dtype(q.dtype)),
            keys)


@torch.library.custom_op("memcompile::sp_attention_backward", mutates_args=())
def sp_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                          lse: Tensor, keys: Tensor, scale: Optional[float], group: str,
                          layout: str, timeout: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of q, k, v of this rank's shard, from `sp_attention`'s outputs."""
    grad_q, grad_k, grad_v = dist_attention_backward(
        grad_out, q, k, v, out, lse, group=_resolve_process_group(group), layout=layout,
        scale=scale, timeout=timeout, keys=additive(keys, q.dtype))
    if grad_k.untyped_storage().data_ptr() == grad_v.untyped_storage().data_ptr():
        # Halves of one buffer: an operator's outputs may not alias each other.
        grad_k, grad_v = grad_k.clone(), grad_v.clone()
    return _standard(grad_q), _standard(grad_k), _standard(grad_v)


@sp_attention_backward.register_fake
def _sp_attention_backward_fake(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                                lse: Tensor, keys: Tensor, scale: Optional[float], group: str,
                                layout: str, timeout: float) -> tuple[Tensor, Tensor, Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    q, k, v, _mask, scale, group, layout, timeout = inputs
    out, lse, keys = output
    ctx.save_for_backward(q, k, v, out, lse, keys)
    ctx.arguments = (scale, group, layout, timeout)


def _backward(ctx: Any, grad_out: Optional[Tensor], _grad_lse: Any, _grad_keys: Any
              ) -> tuple[Any, ...]:
    # Every rank runs this (its peers wait on its transfers), even for an unused output.
    q, k, v, out, lse, keys = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grad_q, grad_k, grad_v = torch.ops.memcompile.sp_attention_backward(
        grad_out, q, k, v, out, lse, keys, *ctx.arguments)
    return grad_q, grad_k, grad_v, None, None, None, None, None


sp_attention.register_autograd(_backward, setup_context=_setup_context)

SP_ATTENTION = torch.ops.memcompile.sp_attention.default
SP_ATTENTION_BACKWARD = torch.ops.memcompile.sp_attention_backward.default
COMMUNICATING_OPS = frozenset({SP_ATTENTION, SP_ATTENTION_BACKWARD})
"""The operators that exchange data with other ranks."""
