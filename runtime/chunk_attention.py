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

aten = torch.ops.aten
_FORWARD = aten._scaled_dot_product_flash_attention_for_cpu.default
_BACKWARD = aten._scaled_dot_product_flash_attention_for_cpu_backward.default


class PrefixCausalAttention(torch.autograd.Function):
    """`(out, logsumexp)` of queries `(B, H, c, D)` over keys and values `(B, Hkv, e, D)`,
    query `i` seeing keys up to `e - c + i`. The log-sum-exp output carries no gradient (as
    the kernel's own)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        prefix = k.shape[2] - q.shape[2]
        out_p, lse_p = _FORWARD(q, k[:, :, :prefix], v[:, :, :prefix], 0.0, False, scale=scale)
        out_d, lse_d = _FORWARD(q, k[:, :, prefix:], v[:, :, prefix:], 0.0, True, scale=scale)
        lse = torch.logaddexp(lse_p, lse_d)
        out = (out_p * torch.exp(lse_p - lse).unsqueeze(-1)
               + out_d * torch.exp(lse_d - lse).unsqueeze(-1)).to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor, _grad_lse: Any) -> tuple[Any, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        prefix = k.shape[2] - q.shape[2]
        grad_out = grad_out.contiguous()
        dq_p, dk_p, dv_p = _BACKWARD(grad_out, q, k[:, :, :prefix], v[:, :, :prefix], out, lse,
                                     0.0, False, scale=ctx.scale)
        dq_d, dk_d, dv_d = _BACKWARD(grad_out, q, k[:, :, prefix:], v[:, :, prefix:], out, lse,
                                     0.0, True, scale=ctx.scale)
        return dq_p + dq_d, torch.cat((dk_p, dk_d), 2), torch.cat((dv_p, dv_d), 2), None


def prefix_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of the last `q.shape[2]` positions over keys `[0, k.shape[2])`."""
    if k.shape[2] == q.shape[2]:
        return _FORWARD(q, k, v, 0.0, True, scale=scale)
    return PrefixCausalAttention.apply(q, k, v, scale)
