"""Padding masks under sequence parallelism: read a shard's mask, agree on it across ranks.

A captured attention may carry a mask the model built from its own shard: transformers builds
`causal & padding` as a `(B, 1, S_local, S_local)` mask over the shard's local positions. Under
sequence parallelism the causal rule is the distributed attention's own (over global
positions), so of that mask only its part over keys (the padding) carries over, and every rank
needs it for every key of the global sequence.

`local_keys(mask, length)` checks that a shard's mask is the causal rule over the shard and a
mask over keys alone, and returns the keys' part. `global_keys` sends it to every peer (point
to point, under the user's deadline, so a dead peer is named) with whether this rank's mask
passed the check: every rank then raises together when any rank's mask is something else (a
mask built from positions, a sliding window, a bias), instead of one rank raising while its
peers wait on it. The check costs one comparison over the shard's mask per call, less than the
attention itself; the exchange sends `B·S_local` bytes to each peer.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from memcompile.distributed.comm import Transfer
from memcompile.distributed.shard import unshard_shards
from memcompile.errors import NotAvailableError

log = logging.getLogger(__name__)

HINT = ("with a transformers model, pass attention_mask (the shard's from shard_batch, or "
        "torch.ones_like(input_ids)) alongside position_ids: without it transformers builds a "
        "packed-sequence mask from the global positions, which the zigzag layout breaks")


def local_keys(mask: torch.Tensor, length: int) -> tuple[torch.Tensor | None, str | None]:
    """`(keys, None)`: the boolean mask over keys `(B|1, length)` (True: seen) of `mask`, a
    boolean or additive (0 / -inf or the dtype's lowest) mask `(B|1, H|1, length, length)`
    that is the causal rule over the shard's positions and that mask over keys; else
    `(None, why not)`."""
    if mask.dtype == torch.bool:
        allowed = mask
    else:
        # transformers' eager masks hide with the dtype's lowest value, SDPA users with -inf.
        hidden = mask <= torch.finfo(mask.dtype).min
        if not bool(((mask == 0) | hidden).all()):
            return None, "an additive bias (entries other than 0 and -inf)"
        allowed = mask == 0
    while allowed.dim() < 4:
        allowed = allowed.unsqueeze(0)
    if allowed.dim() != 4 or tuple(allowed.shape[-2:]) != (length, length):
        return None, f"shaped {tuple(mask.shape)}, not (B|1, H|1, {length}, {length})"
    keys = allowed[:, :, -1, :]  # the last query: the causal rule lets it see every key
    if not bool((keys == keys[:, :1]).all()):
        return None, "different for different heads"
    keys = keys[:, 0]
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    if not torch.equal(allowed, (causal & keys[:, None, None, :]).expand_as(allowed)):
        return None, ("not the causal rule over the shard's positions and a mask over keys "
                      "(a mask built from positions or documents, or a sliding window)")
    return keys, None


def global_keys(mask: torch.Tensor, batch: int, length: int, *,
                group: dist.ProcessGroup | None, layout: str, timeout: float) -> torch.Tensor:
    """The boolean mask over the global sequence's keys `(batch, length·P)` in global order,
    from every rank's shard `mask` (`local_keys`); a `NotAvailableError` on every rank, naming
    the ranks, when some rank's mask is not the causal rule and padding."""
    keys, why = local_keys(mask, length)
    message = torch.zeros(1 + batch * length, dtype=torch.uint8, device=mask.device)
    if keys is not None:
        message[0] = 1
        message[1:] = keys.expand(batch, length).reshape(-1)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    transfer = Transfer(group, "masks", "padding masks", timeout)
    received = {rank: message}
    for peer in range(world):
        if peer != rank:
            transfer.send(message, peer)
            received[peer] = transfer.recv(torch.empty_like(message), peer)
    transfer.start().wait()
    bad = [peer for peer in range(world) if not bool(received[peer][0])]
    if bad:
        mine = f" (this rank's: {why})" if why is not None else ""
        raise NotAvailableError(
            f"sequence_parallel: the attention mask of rank(s) {bad} is not the causal rule "
            f"with padding over keys{mine}; the distributed attention applies the causal rule "
            f"over the whole sequence and takes only padding from the model's mask; {HINT}")
    shards = [received[peer][1:].view(batch, length).bool() for peer in range(world)]
    return unshard_shards(shards, 1, layout)


def additive(keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """`keys` `(B, S)` as the additive mask `(B, 1, 1, S)` the distributed attention takes, or
    None when it hides nothing (no padding: the unmasked kernels, bit for bit)."""
    if keys.numel() == 0 or bool(keys.all()):
        return None
    zero = torch.zeros((), dtype=dtype, device=keys.device)
    return torch.where(keys, zero, float("-inf")).to(dtype)[:, None, None, :]
