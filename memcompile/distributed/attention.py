"""Causal attention over a sequence sharded across ranks (LightSeq's DistAttn, zigzag-balanced).

Each rank holds its shard of the global sequence (`schedule` says which chunks) and computes
its own queries' output. Keys and values of the other ranks arrive point to point, one peer per
step (`schedule.peers`); the next step's transfer is posted before the current step's blocks
are computed, so it runs under them, and at most two remote buffers are alive. Each block is one
call of the kernel the captured graph chose (`runtime.attention_kernels.attend`), and the
partial outputs of a query chunk merge exactly by their log-sum-exps (online softmax).

The backward never recomputes the forward: it runs the same schedule from the saved output and
log-sum-exp. Given the merged output and log-sum-exp, the kernel's backward over one block gives
that block's exact share of the gradients (`attend_backward`, as `runtime/chunk_attention.py`
uses it on one device). A rank receives each peer's keys/values again (keeping them from the
forward would cost the whole sequence's keys/values on every rank), accumulates the query
gradient locally, and sends the key/value gradients it computed back to their owner one step
later, overlapped with the next step's keys/values.

A padding mask enters as `keys`, an additive mask over the global sequence's keys
`(B|1, 1, 1, S)` in global order, the same on every rank (`distributed.masks` builds it): each
block reads the columns of its key chunk; a query that sees no key of a block gets a
log-sum-exp of -inf there (it weighs nothing in the merge), and one that sees no key at all
output 0 and log-sum-exp 0, the kernels' convention (as `runtime/chunk_attention.py`).

Keys/values travel with their own `Hkv` heads (grouped queries are never expanded before
sending), packed chunk-major `(chunks, 2, B, Hkv, c, D)` so that every message, a prefix of the
sender's chunks, is one contiguous tensor. Key/value gradients are accumulated, and sent, in
`accumulation_dtype` (float32 for half precision), as one kernel call would.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from memcompile.distributed import schedule
from memcompile.distributed.comm import Transfer, count_call
from memcompile.runtime.attention_kernels import accumulation_dtype, attend, attend_backward
from memcompile.runtime.chunk_attention import _unseen_to_minus_infinity

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 300.0
"""Seconds a rank waits on a transfer before `PeerError` names the peer it waited on."""


@dataclass(frozen=True)
class _Setup:
    """What one call needs beside the tensors."""

    group: dist.ProcessGroup | None
    rank: int
    world: int
    layout: str
    scale: float | None
    timeout: float
    op: Any
    chunk: int
    """Tokens per chunk."""
    own: int
    """Chunks this rank holds."""
    keys: torch.Tensor | None = None
    """Additive mask over the global sequence's keys `(B|1, 1, 1, S)`, or None (no padding)."""

    def block_mask(self, step: int, block: schedule.Block) -> torch.Tensor | None:
        """The columns of `keys` for the key chunk of `block` at `step` (None: no mask)."""
        if self.keys is None:
            return None
        chunk = schedule.step_keys(self.layout, self.world, self.rank, step)[block.key]
        return self.keys[..., chunk * self.chunk:(chunk + 1) * self.chunk]

    def sends(self, step: int) -> tuple[int, int]:
        """`(peer, chunks)` this rank sends its keys/values to at `step`."""
        dst = schedule.peers(self.world, self.rank, step)[0]
        return dst, schedule.sent_chunks(self.layout, self.world, self.rank, dst)

    def receives(self, step: int) -> tuple[int, int]:
        """`(peer, chunks)` this rank receives keys/values from at `step`."""
        src = schedule.peers(self.world, self.rank, step)[1]
        return src, schedule.sent_chunks(self.layout, self.world, src, self.rank)


def _pack(k: torch.Tensor, v: torch.Tensor, own: int) -> torch.Tensor:
    """Keys and values `(B, H, own·c, D)` as one chunk-major tensor `(own, 2, B, H, c, D)`."""
    both = torch.stack([k, v]).unflatten(3, (own, k.shape[2] // own))
    return both.permute(3, 0, 1, 2, 4, 5).contiguous()


def _unpack(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `_pack`: keys and values `(B, H, own·c, D)`."""
    both = packed.permute(1, 2, 3, 0, 4, 5).flatten(3, 4)
    return both[0], both[1]


def _chunks(x: torch.Tensor, own: int) -> list[torch.Tensor]:
    """`x`'s own chunks along the sequence (dim 2), each contiguous."""
    return [part.contiguous() for part in x.chunk(own, dim=2)]


def _post_keys(setup: _Setup, packed: torch.Tensor, step: int, transfer: Transfer
               ) -> torch.Tensor | None:
    """Queue this step's key/value send and receive on `transfer`; the receive buffer, or None
    if this rank receives nothing at `step`."""
    dst, count = setup.sends(step)
    if count:
        transfer.send(packed[:count], dst)
    src, count = setup.receives(step)
    if not count:
        return None
    return transfer.recv(packed.new_empty((count, *packed.shape[1:])), src)


def _merge(acc: tuple[torch.Tensor, torch.Tensor] | None, out: torch.Tensor, lse: torch.Tensor,
           wide: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Online softmax: the running `(out, lse)` of a query chunk merged with one block's. Every
    query sees its own position, so every merged log-sum-exp is finite."""
    out, lse = out.to(wide), lse.to(wide)
    if acc is None:
        return out, lse
    acc_out, acc_lse = acc
    merged = torch.logaddexp(acc_lse, lse)
    # Under a padding mask a row may have seen no key yet (-inf on both sides): weigh by 0,
    # not by exp(-inf + inf). Without a mask every merged log-sum-exp is finite: unchanged.
    shift = torch.where(torch.isfinite(merged), merged, torch.zeros_like(merged))
    acc_out = (acc_out * torch.exp(acc_lse - shift).unsqueeze(-1)
               + out * torch.exp(lse - shift).unsqueeze(-1))
    return acc_out, merged


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, setup: _Setup
             ) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """`(out, lse, kernel state)` of this rank's queries over all keys before them."""
    packed = _pack(k, v, setup.own)
    queries = _chunks(q, setup.own)
    wide = accumulation_dtype(q.dtype)
    merged: list[Any] = [None] * setup.own
    state = pending = received = None
    for step in range(setup.world):
        buffer = packed
        if step:
            pending.wait()
            buffer = received
        if step + 1 < setup.world:  # the next step's keys travel while this step computes
            pending = Transfer(setup.group, "forward", f"forward keys/values of step {step + 1}",
                               setup.timeout)
            received = _post_keys(setup, packed, step + 1, pending)
            pending.start()
        for block in schedule.blocks(setup.layout, setup.world, setup.rank, step):
            mask = setup.block_mask(step, block)
            out, lse, call_state = attend(queries[block.query], buffer[block.key, 0],
                                          buffer[block.key, 1], block.causal, setup.scale,
                                          setup.op, mask)
            lse = _unseen_to_minus_infinity(lse, mask, block.causal)
            state = call_state if state is None else state
            merged[block.query] = _merge(merged[block.query], out, lse, wide)
    out = torch.cat([acc[0] for acc in merged], dim=2).to(q.dtype)
    lse = torch.cat([acc[1] for acc in merged], dim=2)
    if setup.keys is not None:  # a row that saw no key at all: log-sum-exp 0, as the kernels
        lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return out, lse, state


def _backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              out: torch.Tensor, lse: torch.Tensor, setup: _Setup, state: Any
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of this rank's q, k, v: the forward's schedule again, from the saved output and
    log-sum-exp, each received block's key/value gradients returned to its owner a step later."""
    packed = _pack(k, v, setup.own)
    wide = accumulation_dtype(q.dtype)
    queries, outs = _chunks(q, setup.own), _chunks(out, setup.own)
    grads_out, lses = _chunks(grad_out, setup.own), _chunks(lse, setup.own)
    grad_q = [torch.zeros_like(part, dtype=wide) for part in queries]
    grad_kv = torch.zeros_like(packed, dtype=wide)  # this rank's keys/values, chunk-major
    returning = None  # (step, gradients of the keys/values received at that step)
    pending = incoming = received = None
    for step in range(setup.world + 1):
        if step:
            pending.wait()
            _add_share(grad_kv, incoming)
        buffer = packed if step == 0 else received
        if step < setup.world:
            grads = grad_kv if step == 0 else (
                None if buffer is None else torch.zeros_like(buffer, dtype=wide))
        # Post: gradients of the previous step back to their owner, and the next step's keys.
        pending = Transfer(setup.group, "backward", _backward_what(step, setup.world),
                           setup.timeout)
        incoming = _post_gradients(setup, returning, grad_kv, pending)
        received = (_post_keys(setup, packed, step + 1, pending)
                    if step + 1 < setup.world else None)
        pending.start()
        if step == setup.world:
            break
        for block in schedule.blocks(setup.layout, setup.world, setup.rank, step):
            dq, dk, dv = attend_backward(grads_out[block.query], queries[block.query],
                                         buffer[block.key, 0], buffer[block.key, 1],
                                         outs[block.query], lses[block.query], block.causal,
                                         setup.scale, state, setup.op,
                                         setup.block_mask(step, block))
            grad_q[block.query] += dq
            grads[block.key, 0] += dk
            grads[block.key, 1] += dv
        returning = (step, grads) if step else None
    pending.wait()
    _add_share(grad_kv, incoming)
    grad_k, grad_v = _unpack(grad_kv)
    return (torch.cat(grad_q, dim=2).to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype))


def _add_share(grad_kv: torch.Tensor, incoming: torch.Tensor | None) -> None:
    """Add a peer's share of this rank's key/value gradients (its first chunks) into them."""
    if incoming is not None:
        grad_kv[:incoming.shape[0]] += incoming


def _backward_what(step: int, world: int) -> str:
    """The name, in errors, of the backward's transfer posted at `step`."""
    parts = [f"keys/values of step {step + 1}"] if step + 1 < world else []
    parts += [f"key/value gradients of step {step - 1}"] if step > 1 else []
    return "backward " + " and ".join(parts or ["(nothing)"])


def _post_gradients(setup: _Setup, returning: tuple[int, torch.Tensor | None] | None,
                    like: torch.Tensor, transfer: Transfer) -> torch.Tensor | None:
    """Queue returning the key/value gradients of step `returning[0]` (None: nothing was
    received then) to the rank they came from, and receiving this rank's share from the rank it
    sent keys to at that step, into a buffer shaped and typed as `like`'s chunks."""
    if returning is None:
        return None
    step, grads = returning
    if grads is not None:
        transfer.send(grads, setup.receives(step)[0])
    dst, count = setup.sends(step)
    if not count:
        return None
    return transfer.recv(like.new_empty((count, *like.shape[1:])), dst)


class DistCausalAttention(torch.autograd.Function):
    """Causal attention of this rank's query shard over every rank's keys/values before it
    (`dist_causal_attention`). Saves q, k, v, the output and its log-sum-exp."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                setup: _Setup) -> torch.Tensor:
        count_call()
        out, lse, state = _forward(q, k, v, setup)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.setup, ctx.state = setup, state
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        # Every rank must run this (its peers wait on its transfers), whichever inputs need
        # gradients here: nothing is skipped.
        q, k, v, out, lse = ctx.saved_tensors
        grad_q, grad_k, grad_v = _backward(grad_out.contiguous(), q, k, v, out, lse, ctx.setup,
                                           ctx.state)
        return grad_q, grad_k, grad_v, None


def dist_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                          group: dist.ProcessGroup | None = None, layout: str = "zigzag",
                          scale: float | None = None, timeout: float = DEFAULT_TIMEOUT,
                          op: Any = None) -> torch.Tensor:
    """Causal attention over a sequence sharded across the ranks of `group` (default: the
    default group), as `scaled_dot_product_attention(..., is_causal=True)` on the whole one.

    `q` is `(B, Hq, S_local, D)`, `k` and `v` `(B, Hkv, S_local, D)` with `Hq` a multiple of
    `Hkv` (grouped-query attention), every rank holding its shard of the same global sequence
    in `layout` ("zigzag", balanced; "contiguous", the plain ring: `shard.shard_sequence`).
    Returns this rank's output shard `(B, Hq, S_local, D)`; the backward gives each rank its own
    shards' gradients. `scale` defaults to `D ** -0.5`; `op` is the captured attention op whose
    kernel runs the blocks (`attention_kernels.kernel_kind`; None: the device's). Every rank
    must call it, and its backward, with the same shapes, layout and order of calls. A transfer
    not completed within `timeout` seconds raises `comm.PeerError` naming the peer.
    """
    setup = _setup(q, k, v, group, layout, scale, timeout, op)
    return DistCausalAttention.apply(q, k, v, setup)


def dist_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                           group: dist.ProcessGroup | None = None, layout: str = "zigzag",
                           scale: float | None = None, timeout: float = DEFAULT_TIMEOUT,
                           op: Any = None, keys: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward half of `dist_causal_attention`, without autograd, for a graph that holds
    forward and backward apart: `(out, lse)`, the log-sum-exp `(B, Hq, S_local)` in
    `accumulation_dtype`, as the fused kernels return it. Keep both for
    `dist_attention_backward`, which never recomputes them. `keys`: an additive padding mask
    over the global sequence's keys `(B|1, 1, 1, S)`, in global order, the same on every rank
    (None: no padding; `distributed.masks.global_keys` builds it)."""
    count_call()
    out, lse, _ = _forward(q, k, v, _setup(q, k, v, group, layout, scale, timeout, op, keys))
    return out, lse


def dist_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                            v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, *,
                            group: dist.ProcessGroup | None = None, layout: str = "zigzag",
                            scale: float | None = None, timeout: float = DEFAULT_TIMEOUT,
                            op: Any = None, keys: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward half: `(grad_q, grad_k, grad_v)` of this rank's shards from the output and
    log-sum-exp `dist_attention_forward` returned, with the same keyword arguments."""
    setup = _setup(q, k, v, group, layout, scale, timeout, op, keys)
    # The kernels' backward takes what their forward returned beside the tensors (CUDA's
    # sequence offsets and random state, unused without dropout): a one-token call gives it.
    state = attend(q[:, :, :1], k[:, :, :1], v[:, :, :1], False, scale, op)[2]
    return _backward(grad_out.contiguous(), q, k, v, out, lse, setup, state)


def _setup(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup | None,
           layout: str, scale: float | None, timeout: float, op: Any,
           keys: torch.Tensor | None = None) -> _Setup:
    """The call's `_Setup`, or a ValueError saying which argument is wrong."""
    schedule.check_layout(layout)
    if not timeout > 0:
        raise ValueError(f"dist_causal_attention: timeout must be a positive number of "
                         f"seconds, got {timeout!r}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"dist_causal_attention: q, k, v must share one floating dtype, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"dist_causal_attention: q {tuple(q.shape)} must be (B, Hq, S, D) and "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)} the same (B, Hkv, S, D)")
    if (q.shape[0], q.shape[2], q.shape[3]) != (k.shape[0], k.shape[2], k.shape[3]) \
            or q.shape[1] % k.shape[1]:
        raise ValueError(f"dist_causal_attention: q {tuple(q.shape)} and k {tuple(k.shape)} "
                         "must agree on batch, length and head size, with query heads a "
                         "multiple of key/value heads")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    own = len(schedule.rank_chunks(layout, world, rank))
    length = q.shape[2]
    if length == 0 or length % own:
        raise ValueError(
            f"dist_causal_attention: the {layout} layout cuts the global sequence into "
            f"{schedule.chunk_count(layout, world)} equal chunks ({own} per rank), so the "
            f"global length must be a multiple of {schedule.chunk_count(layout, world)}; "
            f"this rank holds {length} tokens (global {length * world})")
    log.debug("rank %d/%d: %s attention, %d chunk(s) of %d tokens", rank, world, layout, own,
              length // own)
    if keys is not None and (keys.dim() != 4 or keys.shape[-1] != length * world
                             or keys.shape[0] not in (1, q.shape[0])):
        raise ValueError(f"dist_causal_attention: keys {tuple(keys.shape)} must be an additive "
                         f"mask (B|1, 1, 1, {length * world}) over the global sequence's keys")
    return _Setup(group, rank, world, layout, scale, float(timeout), op, length // own, own,
                  keys)
