"""Cut a batch along the sequence into the ranks' shards (`schedule`'s layouts), and back.

`shard_batch` prepares a causal language-model batch for sequence parallelism. Labels are
shifted over the whole sequence before sharding, so the last token of a shard predicts the first
token of the next shard (a model shifting its shard's labels itself would lose that target and
pair tokens across the zigzag's gap). Positions are the global ones (rotary embeddings must see
where a token sits in the whole sequence). The loss normalizer is the number of targets over all
ranks: each rank sums its tokens' losses and divides by it, and the ranks' losses add up to the
single-device loss.

Padding must be on the right: causal attention then never lets a real token see a pad, so the
distributed attention needs no key mask. Left padding is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from memcompile.distributed import schedule


def _rank_world(group: dist.ProcessGroup | None, rank: int | None,
                world_size: int | None) -> tuple[int, int]:
    """`(rank, world_size)`: those given, else the group's (default group for None)."""
    if rank is None:
        rank = dist.get_rank(group)
    if world_size is None:
        world_size = dist.get_world_size(group)
    return rank, world_size


def shard_indices(seq_len: int, world_size: int, rank: int, layout: str = "zigzag"
                  ) -> torch.Tensor:
    """Global positions of the tokens rank `rank` holds, in its order; a ValueError when
    `seq_len` does not cut into the layout's equal chunks."""
    chunks = schedule.chunk_count(layout, world_size)
    if seq_len % chunks:
        raise ValueError(f"the {layout} layout cuts the sequence into {chunks} equal chunks "
                         f"over {world_size} ranks: the length must be a multiple of {chunks}, "
                         f"got {seq_len} (pad it on the right)")
    size = seq_len // chunks
    return torch.cat([torch.arange(c * size, (c + 1) * size)
                      for c in schedule.rank_chunks(layout, world_size, rank)])


def shard_sequence(tensor: torch.Tensor, dim: int, *, layout: str = "zigzag",
                   group: dist.ProcessGroup | None = None, rank: int | None = None,
                   world_size: int | None = None) -> torch.Tensor:
    """This rank's shard of `tensor` along `dim` (rank and world size from `group` unless
    given): a copy holding the positions `shard_indices` names."""
    rank, world_size = _rank_world(group, rank, world_size)
    index = shard_indices(tensor.shape[dim], world_size, rank, layout).to(tensor.device)
    return tensor.index_select(dim, index)


def unshard_shards(shards: list[torch.Tensor], dim: int, layout: str = "zigzag"
                   ) -> torch.Tensor:
    """The whole tensor from every rank's shard (`shards[r]` is rank r's), in global order."""
    world = len(shards)
    length = shards[0].shape[dim] * world
    whole = shards[0].new_empty((*shards[0].shape[:dim], length, *shards[0].shape[dim + 1:]))
    for rank, shard in enumerate(shards):
        index = shard_indices(length, world, rank, layout).to(shard.device)
        whole.index_copy_(dim, index, shard)
    return whole


def unshard_sequence(tensor: torch.Tensor, dim: int, *, layout: str = "zigzag",
                     group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The whole tensor on every rank: the shards all-gathered (no autograd), put in order."""
    shards = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, tensor.contiguous(), group=group)
    return unshard_shards(shards, dim, layout)


@dataclass(frozen=True)
class ShardedBatch:
    """One rank's shard of a causal language-model batch (`shard_batch`)."""

    input_ids: torch.Tensor
    """`(B, S/P)` this rank's tokens."""
    shift_labels: torch.Tensor
    """`(B, S/P)` each token's next-token target, shifted over the whole sequence before
    sharding; `ignore_index` where there is none (the last token, padding). Pass it to a loss
    that does not shift again (transformers' `shift_labels`)."""
    position_ids: torch.Tensor
    """`(B, S/P)` each token's position in the whole sequence."""
    attention_mask: torch.Tensor | None
    """`(B, S/P)` this rank's part of the padding mask, if one was given."""
    num_tokens: int
    """Targets over all ranks: divide the summed loss of every rank by it."""


def shard_batch(input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, *, layout: str = "zigzag",
                group: dist.ProcessGroup | None = None, rank: int | None = None,
                world_size: int | None = None, ignore_index: int = -100) -> ShardedBatch:
    """This rank's `ShardedBatch` of the whole batch `input_ids` `(B, S)` (every rank passes
    the same): `labels` default to the ids; `attention_mask` (1 for tokens, 0 for padding) must
    pad on the right."""
    rank, world_size = _rank_world(group, rank, world_size)
    labels = input_ids if labels is None else labels
    shifted = torch.full_like(labels, ignore_index)
    shifted[:, :-1] = labels[:, 1:]
    if attention_mask is not None:
        if (attention_mask[:, 1:] > attention_mask[:, :-1]).any():
            raise ValueError("shard_batch: the attention mask pads on the left (a token after "
                             "padding); sequence parallelism needs padding on the right")
        shifted[:, :-1].masked_fill_(attention_mask[:, 1:] == 0, ignore_index)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)

    def cut(tensor: torch.Tensor) -> torch.Tensor:
        return shard_sequence(tensor, 1, layout=layout, rank=rank, world_size=world_size)

    return ShardedBatch(
        input_ids=cut(input_ids), shift_labels=cut(shifted), position_ids=cut(positions),
        attention_mask=None if attention_mask is None else cut(attention_mask),
        num_tokens=int((shifted != ignore_index).sum()))
