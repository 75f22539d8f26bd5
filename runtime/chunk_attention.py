"""Causal attention for a chunk of queries over its whole prefix of keys, without a mask.

Queries `[s, e)` may see keys `[0, e)` with the causal rule aligned to the lower right. The
kernel's `is_causal` aligns the top left when there are fewer queries than keys, and an
explicit mask costs `chunk × e` floats and makes the kernel score every masked pair. Instead,
two calls: keys `[0, s)` are all visible (no mask), keys `[s, e)` form a square causal block.
Their outputs merge by their log-sum-exps. The backward calls the kernel's own backward once
per block with the merged output and log-sum-exp, which gives each block's share of the
gradient exactly (the softmax's normalizer is the merged one).
"""

from __future__ import annotations

from typing import Any

import torch

from memcompile.runtime.attention_kernels import accumulation_dtype, attend, attend_backward


class PrefixCausalAttention(torch.autograd.Function):
    """`(out, logsumexp)` of queries `(B, H, c, D)` over keys and values `(B, Hkv, e, D)`,
    query `i` seeing keys up to `e - c + i`. The log-sum-exp output carries no gradient (as
    the kernel's own).

    The backward runs per block of at most `KEY_BLOCK` keys (or the chunk's length), so its
    transients are block-sized. With `sinks` (two buffers shaped as `k` and `v`), the keys' and
    values' gradients are added into them and none is returned: a caller summing those
    gradients over chunks then holds no whole-length gradient per chunk.
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                scale: float | None, sinks: tuple[torch.Tensor, torch.Tensor] | None,
                op: Any) -> tuple[torch.Tensor, torch.Tensor]:
        prefix = k.shape[2] - q.shape[2]
        out, lse, state = attend(q, k[:, :, prefix:], v[:, :, prefix:], True, scale, op)
        if prefix:
            out_p, lse_p, _ = attend(q, k[:, :, :prefix], v[:, :, :prefix], False, scale, op)
            merged = torch.logaddexp(lse_p, lse)
            out = (out_p * torch.exp(lse_p - merged).unsqueeze(-1)
                   + out * torch.exp(lse - merged).unsqueeze(-1)).to(q.dtype)
            lse = merged
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.sinks, ctx.state, ctx.op = scale, sinks, state, op
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor, _grad_lse: Any) -> tuple[Any, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        queries, keys = q.shape[2], k.shape[2]
        grad_out = grad_out.contiguous()
        # Sums over blocks stay in float32 for half-precision tensors, as in one kernel call.
        wide = accumulation_dtype(q.dtype)
        grad_k, grad_v = ctx.sinks or (torch.zeros_like(k, dtype=wide),
                                       torch.zeros_like(v, dtype=wide))
        grad_q = None
        # With the merged output and log-sum-exp, the kernel's backward over a block of keys
        # gives that block's exact share: the softmax's normalizer is the merged one.
        for a, b, causal in _key_blocks(keys - queries, keys, max(queries, KEY_BLOCK)):
            dq, dk, dv = attend_backward(grad_out, q, k[:, :, a:b], v[:, :, a:b], out, lse,
                                         causal, ctx.scale, ctx.state, ctx.op)
            grad_q = dq.to(wide) if grad_q is None else grad_q.add_(dq)
            grad_k[:, :, a:b].add_(dk)
            grad_v[:, :, a:b].add_(dv)
        grad_q = grad_q.to(q.dtype)
        if ctx.sinks is not None:
            return grad_q, None, None, None, None, None
        return grad_q, grad_k.to(k.dtype), grad_v.to(v.dtype), None, None, None


KEY_BLOCK = 1024
"""Keys per call of the kernel's backward over the visible prefix."""


def _key_blocks(prefix: int, keys: int, block: int) -> list[tuple[int, int, bool]]:
    """`[a, b)` key ranges: the visible prefix in blocks, then the causal diagonal block."""
    ranges = [(a, min(a + block, prefix), False) for a in range(0, prefix, block)]
    return ranges + [(prefix, keys, True)]


def prefix_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            scale: float | None = None,
                            sinks: tuple[torch.Tensor, torch.Tensor] | None = None,
                            op: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of the last `q.shape[2]` positions over keys `[0, k.shape[2])` on the
    kernel of the captured attention op `op` (`attention_kernels.kernel_kind`); with `sinks`,
    the keys' and values' gradients are added into them (`PrefixCausalAttention`)."""
    if k.shape[2] == q.shape[2] and sinks is None:
        return attend(q, k, v, True, scale, op)[:2]
    return PrefixCausalAttention.apply(q, k, v, scale, sinks, op)
