"""Attention's outputs kept from a streamed layer's forward pass for its backward
(`stream={"keep_attention": True}`).

A layer's backward re-runs its chunks with autograd, attention included. The fused kernels'
backward needs only the queries, keys and values (which the chunk recomputes anyway: they
are cheap projections) and the attention's output and log-sum-exp. Recomputing those is the
costly part at long lengths: a causal forward over the chunk's whole prefix, about a third of
the attention's work. Keeping them costs one hidden-state-sized buffer per layer (the output
has the queries' shape) and a float32 `(B, H, T)` log-sum-exp; the backward then calls the
kernel's backward on the kept values (`chunk_attention.KeptCausalAttention`). This is the
trade PyTorch users make with selective activation checkpointing when they save the
attention op's outputs; the stream estimate counts the buffers for every held layer.

Only attention that `chunk_attention.prefix_causal_attention` computes is kept: causal, on a
fused kernel, with a key mask at most. Eager attention, document masks and attention across
ranks recompute as before.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from memcompile.runtime.chunk_attention import (KeptCausalAttention, check_key_mask,
                                                prefix_causal_forward)


class KeptAttention:
    """One layer's attention outputs over the whole length, written chunk by chunk while its
    forward pass runs (`recording`), read back chunk by chunk by its backward."""

    def __init__(self) -> None:
        self.recording = True
        self.out: dict[fx.Node, torch.Tensor] = {}
        """Per attention node, `(B, H, T, D)` in the memory order of the kernel's output."""
        self.lse: dict[fx.Node, torch.Tensor] = {}
        """Per attention node, `(B, H, T)`, what the backward normalizes by."""
        self.states: dict[tuple[fx.Node, int], Any] = {}
        """The kernel's per-call state (`attention_kernels.attend`), by node and chunk start."""

    def attend(self, node: fx.Node, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               first: int, end: int, scale: float | None,
               sinks: tuple[torch.Tensor, torch.Tensor] | None, op: Any,
               mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal attention of queries `[first, end)` over keys `[0, end)`: computed and kept
        while recording, else the kept values with `prefix_causal_attention`'s backward."""
        check_key_mask(mask)
        if self.recording:
            out, lse, state = prefix_causal_forward(q, k, v, scale, op, mask)
            self._write(node, first, end, out, lse, length=_length(node))
            self.states[node, first] = state
            return out, lse
        if node not in self.out or (node, first) not in self.states:
            raise RuntimeError(f"kept attention: no output of {node.name} kept for the chunk "
                               f"starting at {first}; the backward's chunks must be the "
                               "forward's")
        kept = (self.out[node].narrow(2, first, end - first),
                self.lse[node].narrow(2, first, end - first), self.states[node, first])
        return KeptCausalAttention.apply(q, k, v, kept, scale, sinks, op, mask)

    def _write(self, node: fx.Node, first: int, end: int, out: torch.Tensor,
               lse: torch.Tensor, length: int) -> None:
        if node not in self.out:
            self.out[node] = _empty_in_order_of(out, length)
            self.lse[node] = lse.new_empty((*lse.shape[:2], length))
        self.out[node].narrow(2, first, end - first).copy_(out)
        self.lse[node].narrow(2, first, end - first).copy_(lse)

    def nbytes(self) -> int:
        """Bytes the kept buffers hold."""
        return sum(t.numel() * t.element_size() for t in [*self.out.values(),
                                                           *self.lse.values()])


def _length(node: fx.Node) -> int:
    """The whole length of attention `node`'s queries: its output's dimension 2."""
    return node.meta["val"][0].shape[2]


def _empty_in_order_of(out: torch.Tensor, length: int) -> torch.Tensor:
    """An empty `out`-shaped buffer with `length` rows along dimension 2 whose dimensions lie in
    memory in `out`'s order (the kernels return `(B, H, L, D)` stored as `(B, L, H, D)`): the
    rows read back have the strides the graph's next ops were compiled for."""
    shape = list(out.shape)
    shape[2] = length
    order = sorted(range(out.dim()), key=lambda d: (-out.stride(d), d))
    buffer = out.new_empty([shape[d] for d in order])
    return buffer.permute([order.index(d) for d in range(out.dim())])
