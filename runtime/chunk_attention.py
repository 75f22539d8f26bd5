"""Causal attention for a chunk of queries over its whole prefix of keys, without a mask.

Queries `[s, e)` may see keys `[0, e)` with the causal rule aligned to the lower right. The
kernel's `is_causal` aligns the top left when there are fewer queries than keys, and an
explicit mask costs `chunk × e` floats and makes the kernel score every masked pair. Instead,
keys `[0, s)` are all visible (no mask) and keys `[s, e)` form a square causal block: a call
for each, their outputs merged by their log-sum-exps. The backward calls the kernel's own
backward once per block with the merged output and log-sum-exp, which gives each block's share
of the gradient exactly (the softmax's normalizer is the merged one).

The visible prefix is one call where memory allows, not blocks of a fixed size: `key_block`
estimates the bytes a call holds per key it is given (a fused kernel's backward returns the
block's key and value gradients; plain ops hold its scores, `queries × keys` per head) and
gives each call as many keys as fit under what the chunk's attention holds anyway
(`chunk_bound`). A fused kernel's forward holds nothing per key: its prefix is always one call.

transformers' eager path (`memcompile::eager_attention`: softcapped or biased scores, a softmax in
float32) has no fused kernel: `prefix_eager_attention` computes a chunk's scores over its whole
prefix in plain ops instead.
"""

from __future__ import annotations

from typing import Any

import torch

from memcompile.analysis.eager_attention import eager_attention_math
from memcompile.runtime.attention_kernels import (accumulation_dtype, attend, attend_backward,
                                                  kernel_kind)


class PrefixCausalAttention(torch.autograd.Function):
    """`(out, logsumexp)` of queries `(B, H, c, D)` over keys and values `(B, Hkv, e, D)`,
    query `i` seeing keys up to `e - c + i`. The log-sum-exp output carries no gradient (as
    the kernel's own).

    Forward and backward call the kernel once over the causal diagonal and over the visible
    prefix in blocks of `key_block` keys (the whole prefix where it fits). With `sinks` (two
    buffers shaped as `k` and `v`), the keys' and values' gradients are added into them and
    none is returned: a caller summing those gradients over chunks then holds no whole-length
    gradient per chunk.

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
        out, lse, state = prefix_causal_forward(q, k, v, scale, op, mask)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.scale, ctx.sinks, ctx.state, ctx.op = scale, sinks, state, op
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor, _grad_lse: Any) -> tuple[Any, ...]:
        q, k, v, out, lse, mask = ctx.saved_tensors
        grad_q, grad_k, grad_v = prefix_causal_backward(grad_out, q, k, v, out, lse, mask,
                                                        ctx.scale, ctx.sinks, ctx.state, ctx.op)
        return grad_q, grad_k, grad_v, None, None, None, None


class KeptCausalAttention(torch.autograd.Function):
    """`PrefixCausalAttention` whose output and log-sum-exp were computed before (a layer's
    forward pass kept them, `runtime.kept_attention`): the forward returns them, the backward
    is `PrefixCausalAttention`'s. The kernels are deterministic, so they are the values a
    recompute would give, and the attention forward is not run again.

    `kept` is `(out, lse, state)`, passed as one argument so that autograd does not take the
    kept tensors for inputs: no gradient flows to them."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kept: tuple[torch.Tensor, torch.Tensor, Any], scale: float | None,
                sinks: tuple[torch.Tensor, torch.Tensor] | None, op: Any,
                mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse, state = kept
        ctx.save_for_backward(q, k, v, mask)
        ctx.out, ctx.lse = out, lse
        ctx.scale, ctx.sinks, ctx.state, ctx.op = scale, sinks, state, op
        # Fresh tensor objects over the kept storage: autograd attaches this node to them.
        out, lse = out.detach(), lse.detach()
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor, _grad_lse: Any) -> tuple[Any, ...]:
        q, k, v, mask = ctx.saved_tensors
        grad_q, grad_k, grad_v = prefix_causal_backward(grad_out, q, k, v, ctx.out, ctx.lse,
                                                        mask, ctx.scale, ctx.sinks, ctx.state,
                                                        ctx.op)
        ctx.out = ctx.lse = None
        return grad_q, grad_k, grad_v, None, None, None, None, None


def prefix_causal_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          scale: float | None, op: Any, mask: torch.Tensor | None
                          ) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """`PrefixCausalAttention`'s forward without autograd: `(out, lse, state)`, where `lse` is
    what its backward reads (0 for a query that sees no key) and `state` the diagonal call's
    (`attention_kernels.attend`)."""
    keys = k.shape[2]
    prefix = keys - q.shape[2]
    out = lse = diagonal_state = None
    # The diagonal first, then the prefix's blocks: with one prefix block, the merge is
    # the two-call merge in that order.
    for a, b, causal in _key_blocks(prefix, keys, key_block(q, k, op, backward=False)):
        block_out, block_lse, state = attend(q, k[:, :, a:b], v[:, :, a:b], causal, scale,
                                             op, _columns(mask, a, b))
        block_lse = _unseen_to_minus_infinity(block_lse, _columns(mask, a, b), causal)
        if out is None:
            out, lse, diagonal_state = block_out, block_lse, state
        else:
            out, lse, finite = _merge(out, lse, block_out, block_lse)
    if mask is not None and not prefix:
        out, lse, finite = _merge(out, lse, None, None)
    if mask is not None or prefix:
        # A row that sees no key: output 0 (the merge gives it), log-sum-exp 0.
        out, lse = out.to(q.dtype), finite
    return out, lse, diagonal_state


def prefix_causal_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                           v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                           mask: torch.Tensor | None, scale: float | None,
                           sinks: tuple[torch.Tensor, torch.Tensor] | None, state: Any,
                           op: Any) -> tuple[torch.Tensor, Any, Any]:
    """Gradients of queries, keys and values of `PrefixCausalAttention` given its output and
    log-sum-exp; with `sinks`, the keys' and values' are added into them and None returned."""
    queries, keys = q.shape[2], k.shape[2]
    grad_out = grad_out.contiguous()
    # Sums over blocks stay in float32 for half-precision tensors, as in one kernel call.
    wide = accumulation_dtype(q.dtype)
    grad_k, grad_v = sinks or (torch.zeros_like(k, dtype=wide), torch.zeros_like(v, dtype=wide))
    grad_q = None
    # With the merged output and log-sum-exp, the kernel's backward over a block of keys
    # gives that block's exact share: the softmax's normalizer is the merged one.
    for a, b, causal in _key_blocks(keys - queries, keys, key_block(q, k, op, backward=True)):
        dq, dk, dv = attend_backward(grad_out, q, k[:, :, a:b], v[:, :, a:b], out, lse,
                                     causal, scale, state, op, _columns(mask, a, b))
        grad_q = dq.to(wide) if grad_q is None else grad_q.add_(dq)
        grad_k[:, :, a:b].add_(dk)
        grad_v[:, :, a:b].add_(dv)
    grad_q = grad_q.to(q.dtype)
    if sinks is not None:
        return grad_q, None, None
    return grad_q, grad_k.to(k.dtype), grad_v.to(v.dtype)


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


def _merge(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor | None,
           block_lse: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two blocks' outputs merged by their log-sum-exps (None: an empty block), the merged
    log-sum-exp, and the same with 0 for -inf: a row that sees no key of either keeps -inf
    (a later block then weighs alone) and gets output 0."""
    merged = lse if block_lse is None else torch.logaddexp(lse, block_lse)
    # -inf - -inf is NaN: such a row is weighed against 0 instead, which gives it weight 0.
    finite = torch.where(torch.isfinite(merged), merged, torch.zeros_like(merged))
    out = out * torch.exp(lse - finite).unsqueeze(-1)
    if block_out is not None:
        out = out + block_out * torch.exp(block_lse - finite).unsqueeze(-1)
    return out, merged, finite


def _key_blocks(prefix: int, keys: int, block: int) -> list[tuple[int, int, bool]]:
    """`[a, b)` key ranges: the causal diagonal block, then the visible prefix in blocks."""
    ranges = [(a, min(a + block, prefix), False) for a in range(0, prefix, block)]
    return [(prefix, keys, True)] + ranges


def chunk_bound(q: torch.Tensor) -> int:
    """Bytes a chunk's attention holds through its backward whatever the blocks: its queries,
    output and output's gradient, the gradient of its queries summed over blocks (float32 or
    wider) and one call's share of it. A call given keys within this bound at most doubles what
    the chunk's attention holds; all of it is of the chunk's own values, which the stream
    estimate counts whole in a layer chunk (with the projections' and the MLP's, several times
    more), and not of the sequence's length."""
    return q.numel() * (4 * q.element_size() + _wide_size(q.dtype))


def transient_per_key(q: torch.Tensor, k: torch.Tensor, kind: str, backward: bool) -> int:
    """Bytes one kernel call holds per key it is given, beyond the chunk-sized ones
    (`chunk_bound`): the key and value gradients of a fused kernel's backward (the flash
    kernel builds them for every query head first when heads are grouped; the efficient
    kernel's sums are float32 for half precision), the scores of plain ops (the backward holds
    scores, probabilities and their gradients at once, plus grouped-head key and value
    gradients; the forward, scores and their exponentials). A fused forward holds none."""
    batch, heads, queries, dim = q.shape
    key_heads, size, wide = k.shape[1], k.element_size(), _wide_size(q.dtype)
    if kind == "math":
        scores = batch * heads * queries * wide
        return 4 * scores + 2 * batch * heads * dim * wide if backward else 2 * scores
    if not backward:
        return 0
    if kind == "flash":
        return 2 * batch * dim * size * (key_heads + (heads if heads != key_heads else 0))
    if kind == "efficient":
        return 2 * batch * key_heads * dim * (size + (4 if size < 4 else 0))
    return 2 * batch * key_heads * dim * size


def _wide_size(dtype: torch.dtype) -> int:
    """Bytes of an element of `accumulation_dtype(dtype)` for a float dtype (without
    `torch.promote_types`, which the profiler counts as an operator call)."""
    return max(dtype.itemsize, 4)


def key_block(q: torch.Tensor, k: torch.Tensor, op: Any = None, *, backward: bool,
              bound: int | None = None) -> int:
    """Keys per kernel call over the visible prefix of queries `q` over keys `k` on the kernel
    of `op`: the whole prefix when a call's transient for it (`transient_per_key`) fits
    `bound` (default `chunk_bound(q)`), else as many keys as fit, but never fewer than the
    chunk's queries (the diagonal block, one call whatever the bound, holds that many)."""
    queries, prefix = q.shape[2], k.shape[2] - q.shape[2]
    per_key = transient_per_key(q, k, kernel_kind(q, k, op), backward)
    bound = chunk_bound(q) if bound is None else bound
    if per_key * prefix <= bound:
        return max(prefix, 1)
    return max(queries, bound // per_key)


def prefix_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            scale: float | None = None,
                            sinks: tuple[torch.Tensor, torch.Tensor] | None = None,
                            op: Any = None, mask: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of the last `q.shape[2]` positions over keys `[0, k.shape[2])` on the
    kernel of the captured attention op `op` (`attention_kernels.kernel_kind`), under an
    additive `mask` over keys alone if given; with `sinks`, the keys' and values' gradients
    are added into them (`PrefixCausalAttention`)."""
    check_key_mask(mask)
    if k.shape[2] == q.shape[2] and sinks is None and mask is None:
        return attend(q, k, v, True, scale, op)[:2]
    return PrefixCausalAttention.apply(q, k, v, scale, sinks, op, mask)


def check_key_mask(mask: torch.Tensor | None) -> None:
    """Raise unless `mask` is None or an additive mask over keys alone, `(B|1, H|1, 1, keys)`."""
    if mask is not None and (mask.dim() != 4 or mask.shape[-2] != 1):
        raise ValueError(f"prefix_causal_attention: mask {tuple(mask.shape)} must be over keys "
                         "alone, (B|1, H|1, 1, keys); a mask over queries and keys is sliced "
                         "by the caller instead")


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
