"""`memcompile::eager_attention`: attention spelled as matmul, softmax, matmul, as one op.

transformers' eager attention (Gemma2's softcapped logits, any model asked for
`attn_implementation="eager"`, Bloom's ALiBi) is not one kernel call but a chain of aten ops:
the scores `q @ kᵀ`, scaled, optionally capped (`tanh(s / c) * c`), plus an additive mask, a
softmax (often in float32, cast back), and the probabilities times the values. The sequence
analysis sees two matmuls mixing tokens there, not attention. The `eager_attention` pass
replaces such a chain by this op, which computes the same thing in the same order and dtypes,
so the stream machinery (`ATTENTION_OPS`) can run it a chunk of queries at a time.

Its arguments follow the SDPA kernels' layout (`analysis.attention.AttentionLayout`): queries
`(B, H, Tq, D)`, keys and values `(B, Hkv, Tk, D)` with `H` a multiple of `Hkv` (each key head
serves `H / Hkv` query heads, as transformers' `repeat_kv` spreads them), an additive
`attn_mask` broadcasting to `(B, H, Tq, Tk)`, `dropout_p` (always 0: a chain with dropout is
not replaced) and `is_causal` (aligned at the lower right: query `i` of `Tq` sees keys up to
`Tk - Tq + i`; square, that is the usual rule). Keyword arguments: `scale`, `softcap`, the dtype
the softmax runs in, and `bias`, an additive term before the cap (Bloom's ALiBi, added by
`baddbmm`).

It is `CompositeImplicitAutograd`: run whole (outside a streamed region, or under fake tensors)
it is the same plain ops with autograd through them. The stream runtime calls
`eager_attention_math` itself on a chunk's queries and their prefix of keys.
"""

from __future__ import annotations

import torch

_LIBRARY = torch.library.Library("memcompile", "FRAGMENT")
_LIBRARY.define(
    "eager_attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask=None, "
    "float dropout_p=0.0, bool is_causal=False, *, float scale=1.0, float? softcap=None, "
    "ScalarType? softmax_dtype=None, Tensor? bias=None) -> Tensor")


def eager_attention_math(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                         scale: float = 1.0, softcap: float | None = None,
                         softmax_dtype: torch.dtype | None = None,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """The op's value in plain tensor ops, in the order of transformers' eager path.

    `scores = (q @ kᵀ) * scale (+ bias)`, then `tanh(scores / softcap) * softcap` with a
    softcap, `+ attn_mask`, keys after the lower-right diagonal hidden (-inf) if `is_causal`,
    the softmax over keys in `softmax_dtype` (None: the scores' dtype), the probabilities cast
    to the values' dtype and multiplied by them. With fewer queries than keys (a chunk of
    queries over its prefix of keys), `attn_mask` and `bias` hold the rows of those queries."""
    batch, heads, queries, _ = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    # Each key head serves `groups` consecutive query heads: grouped, no key is copied.
    grouped = query.reshape(batch, kv_heads, groups, queries, query.shape[-1])
    scores = torch.matmul(grouped, key.unsqueeze(2).transpose(-1, -2))
    scores = scores.reshape(batch, heads, queries, keys) * scale
    if bias is not None:
        scores = scores + bias
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attn_mask is not None:
        scores = scores + attn_mask
    if is_causal:
        later = torch.ones(queries, keys, dtype=torch.bool, device=query.device).triu(
            keys - queries + 1)
        scores = scores.masked_fill(later, float("-inf"))
    if softmax_dtype is not None:
        scores = scores.to(softmax_dtype)
    probabilities = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probabilities.reshape(batch, kv_heads, groups, queries, keys),
                       value.unsqueeze(2))
    return out.reshape(batch, heads, queries, value.shape[-1])


def _eager_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                     is_causal: bool = False, *, scale: float = 1.0,
                     softcap: float | None = None, softmax_dtype: torch.dtype | None = None,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    if dropout_p:
        raise ValueError("memcompile::eager_attention takes no dropout (dropout_p must be 0)")
    if query.shape[1] % key.shape[1] or key.shape[1] != value.shape[1]:
        raise ValueError(f"memcompile::eager_attention: {query.shape[1]} query heads over "
                         f"{key.shape[1]} key and {value.shape[1]} value heads")
    return eager_attention_math(query, key, value, attn_mask, is_causal, scale, softcap,
                                softmax_dtype, bias)


_LIBRARY.impl("eager_attention", _eager_attention, "CompositeImplicitAutograd")

EAGER_ATTENTION = torch.ops.memcompile.eager_attention.default
"""The op the `eager_attention` pass puts in the graph (a node's target)."""
