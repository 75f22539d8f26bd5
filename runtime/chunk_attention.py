"""Causal attention for a chunk of queries over its whole prefix of keys, without a mask.

Queries `[s, e)` may see keys `[0, e)` with the causal rule aligned to the lower right. The
kernel's `is_causal` aligns the top left when there are fewer queries than keys, and an
explicit mask costs `chunk × e` floats and makes the kernel score every masked pair. Instead,
two calls: keys `[0, s)` are all visible (no mask), keys `[s, e)` form a square causal block.
Their outputs merge by their log-sum-exps. The backward calls the kernel's own backward once
per block with the merged output and log-sum-exp, which gives each block's share of the
gradient exactly (the softmax's normalizer is the merged one).

transformers' eager path (`memcompile::eager_attention`: softcapped or biased scores, a softmax in
float32) has no fused kernel: `prefix_eager_attention` computes a chunk's scores over its whole
prefix in plain ops instead.
"""

from __future__ import annotations

from typing import Any

import torch

from memcompile.analysis.eager_attention import eager_attention_math
from memcompile.runtime.attention_kernels import accumulation_dtype, attend, attend_backward


class PrefixCausalAttention(torch.autograd.Function):
    """`(out, logsumexp)` of queries `(B, H, c, D)` over keys and values `(B, Hkv, e, D)`,
    query `i` seeing keys up to `e - c + i`. The log-sum-exp output carries no gradient (as
    the kernel's own).

    The backward runs per block of at most `KEY_BLOCK` keys (or the chunk's length), so its
    transients are block-sized. With `sinks` (two buffers shaped as `k` and `v`), the keys' and
    values' gradients are added into them and none is returned: a caller summing those
    gradients over chunks then holds no whole-length gradient per chunk.

    With `mask`, an additive mask over keys alone (`(B|1, H|1, 1, e)`: padding) or over the
    chunk's queries and its keys (`(B|1, H|1, c, e)`: a chunk's rows of a document mask, which
    must hide every later key), each block sees its columns of it. A query that sees no key of
    a block (all its keys padded, or of another document) gets a log-sum-exp of -inf there, so
    the block weighs nothing in the merge; one that sees no key at all gets output 0 and
    log-sum-exp 0, the kernels' own convention for such a row.
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                scale: float | None, sinks: tuple[torch.Tensor, torch.Tensor] | None,
                op: Any, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        prefix = k.shape[2] - q.shape[2]
        out, lse, state = attend(q, k[:, :, prefix:], v[:, :, prefix:], True, scale, op,
                                 _columns(mask, prefix, None))
        lse = _unseen_to_minus_infinity(lse, _columns(mask, prefix, None), causal=True)
        if prefix:
            out_p, lse_p, _ = attend(q, k[:, :, :prefix], v[:, :, :prefix], False, scale, op,
                                     _columns(mask, 0, prefix))
            lse_p = _unseen_to_minus_infinity(lse_p, _columns(mask, 0, prefix), causal=False)
            merged = torch.logaddexp(lse_p, lse)
        else:
            merged = lse
        if mask is not None or prefix:
            # A row that sees no key: output 0, log-sum-exp 0 (no NaN from -inf - -inf).
            merged = torch.where(torch.isfinite(merged), merged, torch.zeros_like(merged))
            out = out * torch.exp(lse - merged).unsqueeze(-1)
            if prefix:
                out = out + out_p * torch.exp(lse_p - merged).unsqueeze(-1)
            out, lse = out.to(q.dtype), merged
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.scale, ctx.sinks, ctx.state, ctx.op = scale, sinks, state, op
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor, _grad_lse: Any) -> tuple[Any, ...]:
        q, k, v, out, lse, mask = ctx.saved_tensors
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
                                         causal, ctx.scale, ctx.state, ctx.op,
                                         _columns(mask, a, b))
            grad_q = dq.to(wide) if grad_q is None else grad_q.add_(dq)
            grad_k[:, :, a:b].add_(dk)
            grad_v[:, :, a:b].add_(dv)
        grad_q = grad_q.to(q.dtype)
        if ctx.sinks is not None:
            return grad_q, None, None, None, None, None, None
        return grad_q, grad_k.to(k.dtype), grad_v.to(v.dtype), None, None, None, None


def _columns(mask: torch.Tensor | None, start: int, stop: int | None) -> torch.Tensor | None:
    """A key mask's columns `[start, stop)` (None stays None)."""
    return None if mask is None else mask[..., start:stop]


def _unseen_to_minus_infinity(lse: torch.Tensor, mask: torch.Tensor | None,
                              causal: bool) -> torch.Tensor:
    """`lse` with -inf where a query sees none of the block's keys under the key `mask`: the
    kernels return 0 there, which a merge would count as a real block."""
    if mask is None:
        return lse
    if mask.shape[-2] > 1:  # a row per query: (B|1, H|1, queries, keys)
        visible = mask > float("-inf")
        if causal:  # a square block: row r sees keys 0..r
            visible = visible & torch.ones(visible.shape[-2:], dtype=torch.bool,
                                           device=mask.device).tril()
        seen = visible.any(-1)
    else:
        visible = mask[..., 0, :] > float("-inf")  # (B|1, H|1, keys)
        # Square causal block: row r sees keys 0..r; otherwise every row sees every key.
        seen = visible.cumsum(-1) > 0 if causal else visible.any(-1, keepdim=True)
    return torch.where(seen, lse, torch.full_like(lse, float("-inf")))


KEY_BLOCK = 1024
"""Keys per call of the kernel's backward over the visible prefix."""


def _key_blocks(prefix: int, keys: int, block: int) -> list[tuple[int, int, bool]]:
    """`[a, b)` key ranges: the visible prefix in blocks, then the causal diagonal block."""
    ranges = [(a, min(a + block, prefix), False) for a in range(0, prefix, block)]
    return ranges + [(prefix, keys, True)]


def prefix_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            scale: float | None = None,
                            sinks: tuple[torch.Tensor, torch.Tensor] | None = None,
                            op: Any = None, mask: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of the last `q.shape[2]` positions over keys `[0, k.shape[2])` on the
    kernel of the captured attention op `op` (`attention_kernels.kernel_kind`), under an
    additive `mask` over keys alone if given; with `sinks`, the keys' and values' gradients
    are added into them (`PrefixCausalAttention`)."""
    if mask is not None and (mask.dim() != 4 or mask.shape[-2] != 1):
        raise ValueError(f"prefix_causal_attention: mask {tuple(mask.shape)} must be over keys "
                         "alone, (B|1, H|1, 1, keys); a mask over queries and keys is sliced "
                         "by the caller instead")
    if k.shape[2] == q.shape[2] and sinks is None and mask is None:
        return attend(q, k, v, True, scale, op)[:2]
    return PrefixCausalAttention.apply(q, k, v, scale, sinks, op, mask)


def prefix_masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            mask: torch.Tensor, scale: float | None = None,
                            sinks: tuple[torch.Tensor, torch.Tensor] | None = None,
                            op: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`prefix_causal_attention` under an additive `mask` over the chunk's queries and its keys,
    `(B|1, H|1, q.shape[2], k.shape[2])`, which must hide every key after its query (a chunk's
    rows of a document mask): the causal rule the blocks apply then changes nothing."""
    if mask.dim() != 4 or mask.shape[-2:] != (q.shape[2], k.shape[2]):
        raise ValueError(f"prefix_masked_attention: mask {tuple(mask.shape)} must have a row "
                         f"per query and a column per key, (B|1, H|1, {q.shape[2]}, "
                         f"{k.shape[2]})")
    return PrefixCausalAttention.apply(q, k, v, scale, sinks, op, mask)


def prefix_eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           mask: torch.Tensor | None, causal: bool, scale: float,
                           softcap: float | None, softmax_dtype: torch.dtype | None,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' eager attention (`memcompile::eager_attention`) of the last `q.shape[2]`
    positions over keys `[0, k.shape[2])`: the same plain ops as the whole op, on the chunk's
    scores alone (`chunk × keys` per head), the causal rule aligned at the lower right. `mask`
    and `bias` hold the chunk's rows (or one row for every query) and a column per key.

    No log-sum-exp merge is needed: every query's row of scores is whole here, so its softmax
    is the whole one, and autograd through the plain ops gives the gradients (the keys' and
    values' included; they are returned, not added into sinks)."""
    for name, extra in (("mask", mask), ("bias", bias)):
        if extra is not None and (extra.shape[-1] not in (1, k.shape[2])
                                  or extra.shape[-2] not in (1, q.shape[2])):
            raise ValueError(f"prefix_eager_attention: {name} {tuple(extra.shape)} must have a "
                             f"row per query ({q.shape[2]}) or one, and a column per key "
                             f"({k.shape[2]}) or one")
    return eager_attention_math(q, k, v, mask, causal, scale, softcap, softmax_dtype, bias)
