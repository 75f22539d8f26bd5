"""The loss under sequence parallelism: each rank's share of the global loss, and its value.

The single-device loss of a causal language model is the mean over every target of the batch:
`sum / num_tokens`. Each rank holds some of the targets (`shard_batch`'s `shift_labels`,
shifted over the whole sequence before sharding), so each rank computes `sum over its
targets / num_tokens`, `num_tokens` the count over all ranks (`ShardedBatch.num_tokens`): the
ranks' losses add up to the single-device loss, and each rank calls `backward()` on its own.
Nothing else is needed: the attention backward returns other ranks' shares of the gradients to
their owners, and the weights' gradients are summed by memcompile (`sequence_parallel_grads`).

With a transformers model, the same is `model(..., labels=shift_labels,
shift_labels=shift_labels, num_items_in_batch=num_tokens)`: its `ForCausalLMLoss` sums when
given `num_items_in_batch` and divides by it, and does not shift labels given as
`shift_labels`. Pass `num_tokens` as a tensor, so that a new count does not recompile the step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def shard_loss(logits: torch.Tensor, shift_labels: torch.Tensor,
               num_tokens: int | torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """This rank's share of the global mean next-token cross-entropy: the summed loss of its
    targets `shift_labels` `(B, S_local)` (already shifted; `ignore_index` unscored) under
    `logits` `(B, S_local, V)`, over `num_tokens`, the targets of all ranks. Low-precision
    logits are upcast to float32, as transformers does."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    total = F.cross_entropy(logits.flatten(0, 1), shift_labels.flatten(),
                            ignore_index=ignore_index, reduction="sum")
    return total / num_tokens


def global_loss(loss: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The loss of the whole batch, the same on every rank: the ranks' `shard_loss` summed
    (an all-reduce, detached: for logging; each rank backpropagates its own share)."""
    total = loss.detach().clone()
    dist.all_reduce(total, group=group)
    return total
