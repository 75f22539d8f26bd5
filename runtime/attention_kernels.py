"""One attention block, forward and backward, on the fused kernel the captured graph chose.

`chunk_attention` splits a chunk's attention into blocks of keys and merges them by their
log-sum-exps; it needs, per block, the output with its log-sum-exp and, given the merged output
and log-sum-exp, the block's share of the gradient. The fused kernels give both, but each device
spells them differently. The blocks run on the kernel the captured graph holds (`op`), so a
user's or SDPA's choice stands:

- the CPU flash kernel (any float dtype, grouped heads);
- CUDA's flash kernel (half precision, grouped heads); cuDNN's, which has the same reach, is
  replaced by it;
- CUDA's memory-efficient kernel (equal head counts; its log-sum-exp is padded to a multiple of
  32 rows);
- with no captured kernel, the device's (as above, by dtype); on any other device,
  `math_forward` / `math_backward`, the same formulas in plain tensor ops on the block's scores
  (a warning says so: they hold a block's scores, which the stream estimate does not count).

Every path returns the log-sum-exp in float32 or wider, `(B, H, queries)`, unpadded.
"""

from __future__ import annotations

from typing import Any

import logging

import torch

log = logging.getLogger(__name__)
aten = torch.ops.aten

_KIND_OF_OP = {
    aten._scaled_dot_product_flash_attention_for_cpu.default: "cpu",
    aten._scaled_dot_product_flash_attention.default: "flash",
    aten._scaled_dot_product_cudnn_attention.default: "flash",
    aten._scaled_dot_product_efficient_attention.default: "efficient",
}
_WARNED: set[tuple[str, torch.dtype]] = set()

_LSE_ROWS = 32
"""The memory-efficient kernel's log-sum-exp holds a multiple of this many rows."""


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
           scale: float | None, op: Any = None, mask: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """`(out, logsumexp, state)` of queries `q` over keys `k` (square and causal if `causal`)
    on the kernel of the captured attention op `op` (`kernel_kind`), plus an additive `mask`
    if given; `state` is what `attend_backward` needs from this call beside the tensors."""
    kind = kernel_kind(q, k, op)
    _check_mask(kind, mask)
    if kind == "cpu":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal,
                                                                    attn_mask=mask, scale=scale)
        return out, lse, None
    if kind == "flash":
        out, lse, cum_q, cum_k, _, _, seed, offset, _ = aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal, False, scale=scale)
        return out, lse, (cum_q, cum_k, seed, offset)
    if kind == "efficient":
        out, lse, seed, offset = aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, causal, scale=scale)
        return out, lse[..., :q.shape[2]], (seed, offset)
    out, lse = math_forward(q, k, v, causal, scale, mask)
    return out, lse, None


def attend_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    out: torch.Tensor, lse: torch.Tensor, causal: bool, scale: float | None,
                    state: Any, op: Any = None, mask: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of queries, keys and values of one block, given the (merged) output and
    log-sum-exp the block's softmax is normalized by, the block's additive `mask` if any, and
    `state` from an `attend` call with the same `op`, device and dtype."""
    kind = kernel_kind(q, k, op)
    _check_mask(kind, mask)
    if kind == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale)
    if kind == "flash":
        cum_q, cum_k, seed, offset = state
        return aten._scaled_dot_product_flash_attention_backward(
            grad_out, q, k, v, out, lse, cum_q, cum_k, q.shape[2], k.shape[2], 0.0, causal,
            seed, offset, scale=scale)
    if kind == "efficient":
        seed, offset = state
        rows = -(-q.shape[2] // _LSE_ROWS) * _LSE_ROWS
        padded = torch.nn.functional.pad(lse, (0, rows - lse.shape[-1])).contiguous()
        dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
            grad_out, q, k, v, None, out, padded, seed, offset, 0.0, [True, True, True, False],
            causal, scale=scale)
        return dq, dk, dv
    return math_backward(grad_out, q, k, v, out, lse, causal, scale, mask)


def _check_mask(kind: str, mask: torch.Tensor | None) -> None:
    if mask is not None and kind not in ("cpu", "math"):
        raise ValueError(f"chunk attention takes a key mask on the CPU kernel or plain ops, "
                         f"not on the {kind} kernel (the key-mask pass rewrites CPU graphs only)")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype gradient sums over blocks and chunks are kept in: float32 for half-precision
    tensors (as the kernels accumulate inside one call), else their own."""
    return torch.promote_types(dtype, torch.float32)


def kernel_kind(q: torch.Tensor, k: torch.Tensor, op: Any = None) -> str:
    """Which kernel runs attention on these tensors: "cpu", "flash", "efficient" or "math".

    The captured op's own kernel when `op` is one (cuDNN's is run as flash), else the device's
    (`device_kernel`)."""
    kind = _KIND_OF_OP.get(op) or device_kernel(q.device.type, q.dtype, q.shape[1] == k.shape[1])
    if kind == "math" and (q.device.type, q.dtype) not in _WARNED:
        _WARNED.add((q.device.type, q.dtype))
        log.warning("chunk attention on %s in %s: no fused kernel for its blocks; plain tensor "
                    "ops hold each block's scores (not counted by the stream estimate)",
                    q.device.type, q.dtype)
    return kind


def device_kernel(device: str, dtype: torch.dtype, same_heads: bool) -> str:
    """The fused kernel a device has for this dtype and head layout, or "math" for none."""
    if device == "cpu":
        return "cpu"
    if device == "cuda":
        if dtype in (torch.float16, torch.bfloat16):
            return "flash"
        if dtype == torch.float32 and same_heads:
            return "efficient"
    return "math"


def _grouped(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Queries `(B, H, L, D)` as `(B, Hkv, H / Hkv, L, D)`, so one key head serves its group."""
    batch, heads, length, dim = q.shape
    return q.reshape(batch, k.shape[1], heads // k.shape[1], length, dim)


def _probabilities(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor | None, causal: bool,
                   scale: float | None, mask: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled scores `(B, Hkv, G, L, S)` in at least float32 (plus the additive `mask`) and,
    given `lse`, the softmax."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = _grouped(q, k).to(dtype) @ k.to(dtype).unsqueeze(2).transpose(-1, -2) * scale
    if mask is not None:
        # (B|1, H|1, L|1, S) over query heads: grouped as the scores are, or broadcast.
        heads = mask.unsqueeze(2) if mask.shape[1] == 1 else _grouped(mask, k)
        scores = scores + heads.to(dtype)
    if causal:
        hidden = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(hidden, float("-inf"))
    if lse is None:
        return scores, scores
    return scores, torch.exp(scores - _grouped(lse.unsqueeze(-1), k))


def math_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                 scale: float | None, mask: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """`(out, logsumexp)` of attention in plain tensor ops (grouped heads broadcast, not copied).
    A query that sees no key gets output 0 and log-sum-exp 0, as the fused kernels give."""
    scores, _ = _probabilities(q, k, None, causal, scale, mask)
    lse = torch.logsumexp(scores, dim=-1)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    out = torch.exp(scores - lse.unsqueeze(-1)) @ v.to(scores.dtype).unsqueeze(2)
    return out.reshape(q.shape).to(q.dtype), lse.reshape(q.shape[:3])


def math_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  out: torch.Tensor, lse: torch.Tensor, causal: bool, scale: float | None,
                  mask: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused kernels' backward in plain tensor ops: the softmax is rebuilt from `lse`."""
    _, probs = _probabilities(q, k, lse, causal, scale, mask)
    dtype = probs.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    d_out = _grouped(grad_out, k).to(dtype)
    grad_v = (probs.transpose(-1, -2) @ d_out).sum(2)
    d_probs = d_out @ v.to(dtype).unsqueeze(2).transpose(-1, -2)
    rowsum = (d_out * _grouped(out, k).to(dtype)).sum(-1, keepdim=True)
    d_scores = probs * (d_probs - rowsum) * scale
    grad_q = (d_scores @ k.to(dtype).unsqueeze(2)).reshape(q.shape)
    grad_k = (d_scores.transpose(-1, -2) @ _grouped(q, k).to(dtype)).sum(2)
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)
