"""StreamBP on a sequence-parallel shard: a layer's chunks attend over the keys of every rank.

Under `sequence_parallel`, each rank streams its own shard (`memcompile.distributed.shard_batch`)
and a layer's attention is `memcompile::sp_attention`. A chunk of the shard's queries must see
every key before it in the global sequence, most of which other ranks hold. So, once per layer
pass (the forward, and each re-run in the backward), when keys and values are computed over the
shard ("once", `stream_layers`), every rank sends them to every other rank
(`gather_keys_values`): a layer's keys and values of the whole sequence exist while that layer
runs, nothing more. Each chunk then attends over

- the other ranks' keys that lie before its queries in the global sequence: whole chunks of the
  layout, so no mask is needed, and
- its own shard's keys up to the chunk's end, causal at the lower right (a shard holds its
  tokens in increasing global order, so its own causal rule is the global one),

as one `prefix_causal_attention` call per layout piece the chunk covers (a zigzag shard holds
two pieces far apart: a chunk across them is cut there). Padding comes from the model's mask,
read and agreed on by every rank as `sp_attention` does (`distributed.masks.global_keys`).

In the backward, the gradients of the other ranks' keys and values are summed over the layer's
chunks and then sent back to their owners (`return_gradients`), who add them into their own
sums before backpropagating through the projections: all-gather forward, reduce-scatter
backward. Every rank runs the same layers with the same chunks (shards are equal), so the
transfers pair up; each goes through `distributed.comm.Transfer`, with the user's deadline and
a `PeerError` naming a rank that does not answer.

A layer run whole (one chunk, or no keys and values computed once) runs `sp_attention` itself,
with its point-to-point schedule: `shard_attention` dispatches.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx
from torch.distributed.distributed_c10d import _resolve_process_group

from memcompile.distributed import schedule
from memcompile.distributed.comm import Transfer
from memcompile.distributed.masks import global_keys
from memcompile.distributed.ops import SP_ATTENTION
from memcompile.runtime.attention_kernels import accumulation_dtype
from memcompile.runtime.chunk_attention import prefix_causal_attention


@dataclass
class _Gathered:
    """One `sp_attention` call's view of the other ranks during one layer pass."""

    remote: torch.Tensor
    """Keys and values of the other ranks' pieces `(2, B, Hkv, R, D)`, pieces in global order."""
    remote_pieces: list[int]
    """Global index of each remote piece, ascending (piece `i` is `remote[..., i*c:(i+1)*c, :]`)."""
    owners: list[tuple[int, int]]
    """`(rank, its local piece)` of each remote piece."""
    pieces: tuple[int, ...]
    """Global index of each of this rank's pieces, in its order."""
    piece: int
    """Tokens per piece."""
    keys: torch.Tensor
    """Global padding `(B, S)` (True: seen), or empty: no padding."""
    group: dist.ProcessGroup
    layout: str
    timeout: float
    grads: torch.Tensor | None = None
    """Sums of the remote keys' and values' gradients (accumulation dtype), once a chunk adds."""

    def add_gradients(self, count: int, grad_k: torch.Tensor, grad_v: torch.Tensor) -> None:
        """Add a chunk's gradients of the first `count` remote keys and values."""
        if self.grads is None:
            self.grads = torch.zeros_like(self.remote, dtype=accumulation_dtype(self.remote.dtype))
        self.grads[0, :, :, :count].add_(grad_k)
        self.grads[1, :, :, :count].add_(grad_v)


_STATE: weakref.WeakKeyDictionary[Any, dict[fx.Node, _Gathered]] = weakref.WeakKeyDictionary()
"""ChunkRunner -> its sequence-parallel calls' gathered keys, during one layer pass."""


def shard_calls(runner: Any) -> list[fx.Node]:
    """The region's `sp_attention` calls."""
    return [n for n in runner.region.nodes if n.target is SP_ATTENTION]


def chunkable(runner: Any) -> bool:
    """Whether the layer may run in chunks: a layer with `sp_attention` needs its keys and values
    computed once per pass (they are what every rank sends); without them it runs whole."""
    calls = shard_calls(runner)
    if not calls:
        return True
    return runner.region.keys_values == "once" and all(
        n.args[1] in runner.boundary and n.args[2] in runner.boundary for n in calls)


def gather_keys_values(runner: Any, keys_values: dict[fx.Node, torch.Tensor],
                       whole: dict[fx.Node, Any], phase: str) -> None:
    """Receive every other rank's keys and values of this layer pass (and send ours), for each
    `sp_attention` call of the region; `keys_values` holds the shard's, `whole` the model's mask.
    `phase` ("forward" or "backward") is the pass the bytes are counted under."""
    calls = shard_calls(runner)
    if calls:
        _STATE[runner] = {node: _gather(node, keys_values, whole, phase) for node in calls}


def release(runner: Any) -> None:
    """Drop the gathered keys and values of the layer pass that ended."""
    _STATE.pop(runner, None)


def return_gradients(runner: Any, sums: dict[fx.Node, torch.Tensor]) -> None:
    """Send the other ranks' key/value gradient sums back to them, and add what they send back
    for this rank's keys and values into `sums` (the shard's, whole length); then release."""
    for node, gathered in _STATE.pop(runner, {}).items():
        own_k, own_v = sums[node.args[1]], sums[node.args[2]]
        received = _exchange_gradients(gathered, own_k)
        for piece, part in received:
            rows = slice(piece * gathered.piece, (piece + 1) * gathered.piece)
            own_k[:, :, rows].add_(part[0])
            own_v[:, :, rows].add_(part[1])


def shard_attention(runner: Any, node: fx.Node, args: tuple, kwargs: dict, first: int,
                    end: int) -> Any:
    """`sp_attention`'s outputs for the shard's queries `[first, end)`: over the gathered keys
    when this layer pass gathered them, else (a layer run whole) the op itself."""
    gathered = _STATE.get(runner, {}).get(node)
    if gathered is None:
        if first != 0 or end != runner.length:
            raise RuntimeError(
                f"stream runtime: {node.name}, the sequence-parallel attention, ran on tokens "
                f"[{first}, {end}) of {runner.length} without the other ranks' keys and values; "
                "a chunked layer must compute its keys and values once per pass")
        return node.target(*args, **kwargs)
    q, k, v = args[:3]
    scale = args[4] if len(args) > 4 else kwargs.get("scale")
    outs, lses = [], []
    for a, b in _pieces_of(gathered, first, end):
        visible = _visible_pieces(gathered, a) * gathered.piece
        keys, values = _WithRemote.apply(k[:, :, :b], v[:, :, :b], gathered, visible)
        mask = _key_mask(gathered, visible, b, q.dtype)
        out, lse = prefix_causal_attention(q[:, :, a - first:b - first], keys, values, scale,
                                           None, None, mask)
        outs.append(out)
        lses.append(lse)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    lse = lses[0] if len(lses) == 1 else torch.cat(lses, dim=2)
    return out, lse, gathered.keys


class _WithRemote(torch.autograd.Function):
    """Keys and values `(B, Hkv, n + e, D)`: the first `n` remote keys and values of this layer
    pass, then the shard's own `[0, e)`. The backward adds the remote part's gradients into the
    layer pass's sums (`_Gathered.add_gradients`) and returns the shard's part."""

    @staticmethod
    def forward(ctx: Any, k: torch.Tensor, v: torch.Tensor, gathered: _Gathered, count: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.gathered, ctx.count = gathered, count
        if not count:
            return k.view_as(k), v.view_as(v)
        remote = gathered.remote[:, :, :, :count]
        return torch.cat([remote[0], k], dim=2), torch.cat([remote[1], v], dim=2)

    @staticmethod
    def backward(ctx: Any, grad_k: torch.Tensor, grad_v: torch.Tensor) -> tuple[Any, ...]:
        count = ctx.count
        if count:
            ctx.gathered.add_gradients(count, grad_k[:, :, :count], grad_v[:, :, :count])
        return grad_k[:, :, count:], grad_v[:, :, count:], None, None


def _gather(node: fx.Node, keys_values: dict[fx.Node, torch.Tensor], whole: dict[fx.Node, Any],
            phase: str) -> _Gathered:
    """One call's remote keys and values and global padding, exchanged with every peer."""
    group_name, layout, timeout = node.args[5:8]
    group = _resolve_process_group(group_name)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    k, v = keys_values[node.args[1]], keys_values[node.args[2]]
    pieces = schedule.rank_chunks(layout, world, rank)
    piece = k.shape[2] // len(pieces)
    mine = torch.stack([k, v])
    transfer = Transfer(group, phase, f"{phase} keys/values of {node.name} (stream)", timeout)
    received = {}
    for peer in range(world):
        if peer == rank:
            continue
        # Only the pieces some query of the receiver sees travel (a prefix of the sender's).
        count = schedule.sent_chunks(layout, world, rank, peer)
        if count:
            transfer.send(mine[:, :, :, :count * piece], peer)
        count = schedule.sent_chunks(layout, world, peer, rank)
        if count:
            shape = (*mine.shape[:3], count * piece, mine.shape[4])
            received[peer] = transfer.recv(mine.new_empty(shape), peer)
    transfer.start().wait()
    owned = sorted((schedule.rank_chunks(layout, world, peer)[j], peer, j)
                   for peer, got in received.items() for j in range(got.shape[3] // piece))
    parts = [received[peer][:, :, :, j * piece:(j + 1) * piece] for _, peer, j in owned]
    remote = torch.cat(parts, dim=3) if parts else mine[:, :, :, :0]
    mask = node.args[3]
    mask = whole.get(mask) if isinstance(mask, fx.Node) else mask
    keys = (k.new_empty((0,), dtype=torch.bool) if mask is None else
            global_keys(mask, k.shape[0], k.shape[2], group=group, layout=layout,
                        timeout=timeout))
    return _Gathered(remote, [g for g, _, _ in owned], [(p, j) for _, p, j in owned], pieces,
                     piece, keys, group, layout, timeout)


def _exchange_gradients(gathered: _Gathered, like: torch.Tensor
                        ) -> list[tuple[int, torch.Tensor]]:
    """Send each remote piece's gradient sums to its owner; `(local piece, (2, B, Hkv, c, D))`
    for each piece of this rank's that a peer sent gradients of (those it received)."""
    group, layout = gathered.group, gathered.layout
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    c = gathered.piece
    grads = gathered.grads
    if grads is None:  # no chunk saw a remote key
        grads = torch.zeros_like(gathered.remote, dtype=like.dtype)
    transfer = Transfer(group, "backward", "backward key/value gradients (stream)",
                        gathered.timeout)
    incoming = []
    for peer in range(world):
        if peer == rank:
            continue
        rows = [i for i, (owner, _) in enumerate(gathered.owners) if owner == peer]
        if rows:
            message = torch.cat([grads[:, :, :, i * c:(i + 1) * c] for i in rows], dim=3)
            transfer.send(message.to(like.dtype), peer)
        count = schedule.sent_chunks(layout, world, rank, peer)
        if count:
            shape = (2, *like.shape[:2], count * c, like.shape[3])
            incoming.append(transfer.recv(like.new_empty(shape), peer))
    transfer.start().wait()
    return [(j, message[:, :, :, j * c:(j + 1) * c]) for message in incoming
            for j in range(message.shape[3] // c)]


def _pieces_of(gathered: _Gathered, first: int, end: int) -> list[tuple[int, int]]:
    """`[first, end)` cut where the shard's layout pieces meet (global positions jump there)."""
    c = gathered.piece
    cuts = [first] + [j * c for j in range(1, len(gathered.pieces)) if first < j * c < end]
    return list(zip(cuts, cuts[1:] + [end]))


def _visible_pieces(gathered: _Gathered, start: int) -> int:
    """How many remote pieces (a prefix of them, in global order) lie before the piece holding
    the shard's token `start`."""
    here = gathered.pieces[start // gathered.piece]
    return sum(g < here for g in gathered.remote_pieces)


def _key_mask(gathered: _Gathered, visible: int, end: int, dtype: torch.dtype
              ) -> torch.Tensor | None:
    """Additive padding mask `(B, 1, 1, visible + end)` over the keys `_WithRemote` lines up,
    or None when none of them is padding."""
    if gathered.keys.numel() == 0:
        return None
    c = gathered.piece
    before = gathered.remote_pieces[:visible // c]
    positions = [torch.arange(g * c, (g + 1) * c) for g in before]
    positions += [torch.arange(g * c, (g + 1) * c) for g in gathered.pieces]
    index = torch.cat(positions)[:visible + end].to(gathered.keys.device)
    seen = gathered.keys[:, index]
    if bool(seen.all()):
        return None
    zero = torch.zeros((), dtype=dtype, device=seen.device)
    return torch.where(seen, zero, float("-inf")).to(dtype)[:, None, None, :]
