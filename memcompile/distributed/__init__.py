"""Sequence parallelism on torch.distributed: causal attention over a sequence sharded across
ranks (gloo on the CPU, NCCL on GPUs, the same code), and the helpers that shard a batch.

`dist_causal_attention` is the attention (`dist_attention_forward` and
`dist_attention_backward` its halves, for a graph holding forward and backward apart; `ops`
makes them the torch operators the `sequence_parallel` option puts in a captured graph);
`shard_batch` cuts a batch; `shard_loss` is a rank's share of the global loss and
`global_loss` its value over all ranks;
`schedule` says who holds what, who sends what, and what it costs; `comm.count_bytes` counts
the bytes a rank sends.
"""

from __future__ import annotations

from memcompile.distributed.attention import (
    DEFAULT_TIMEOUT,
    dist_attention_backward,
    dist_attention_forward,
    dist_causal_attention,
)
from memcompile.distributed.comm import ByteCounter, PeerError, count_bytes
from memcompile.distributed.loss import global_loss, shard_loss
from memcompile.distributed.schedule import LAYOUTS, attention_work, work_imbalance
from memcompile.distributed.shard import (
    ShardedBatch,
    shard_batch,
    shard_indices,
    shard_sequence,
    unshard_sequence,
    unshard_shards,
)

__all__ = [
    "DEFAULT_TIMEOUT", "LAYOUTS", "ByteCounter", "PeerError", "ShardedBatch", "attention_work",
    "count_bytes", "dist_attention_backward", "dist_attention_forward", "dist_causal_attention",
    "global_loss", "shard_batch", "shard_indices", "shard_loss", "shard_sequence",
    "unshard_sequence", "unshard_shards", "work_imbalance",
]
