"""How many layer inputs a stream plan may hold at once under `memory_budget`.

The stream runtime's peak is estimated from the plan, not simulated op by op: its chunk loops
run eagerly, outside any graph. At the traced length, the step holds at once

- the parameters' gradients (they accumulate through the backward),
- the layer inputs the reversal holds (`c` of them, `stream_schedule`),
- a layer's whole-length values built from the inputs alone (rotary tables),
- one chunk's working values (everything a layer chunk or a head chunk computes, the
  scores of transformers' eager attention included: plain ops hold them), and
- in a forward, two more hidden states (a layer's input and output, or the head's input and
  its gradient) and attention's keys and values;
- in a backward, one more hidden state (a layer's output and input gradients share a buffer),
  attention's keys and values and their gradient sums (the kernel adds into those; float32
  for half-precision keys and values);
- with `keep_attention`, each held layer's attention outputs and log-sum-exps.

Every term is a bound on what the runtime holds, so the estimate sits above the measured peak
(see BENCHMARKS.md, "StreamBP with a budget", for both side by side). A float budget is a fraction
of the estimate for keeping every layer input, the stream plan that recomputes least.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from memcompile.analysis.attention import SEQUENCE_ATTENTION_OPS, gathered_copies
from memcompile.analysis.eager_attention import EAGER_ATTENTION
from memcompile.analysis.masks import DOCUMENT_MASK
from memcompile.errors import MemoryBudgetError
from memcompile.planning.stream_schedule import least_checkpoints


@dataclass(frozen=True)
class StreamMemory:
    """The terms of a stream plan's estimated peak, in bytes at the traced length."""

    gradients: int
    """The parameters' gradients."""
    hidden: int
    """One layer input (a whole-length hidden state)."""
    keys_values: int
    """The largest layer's keys and values."""
    gradient_sums: int
    """Their gradients' sums over chunks (float32 for half-precision keys and values)."""
    tables: int
    """The largest layer's whole-length values built from the inputs alone."""
    layer_chunk: int
    """What one chunk of the largest layer computes."""
    head_chunk: int
    """What one chunk of the head computes."""
    layers: int
    """Layers in the longest run of consecutive layers."""
    kept_attention: int = 0
    """The attention outputs and log-sum-exps one held layer keeps (`keep_attention`)."""

    def peak(self, checkpoints: int) -> int:
        """The estimated peak when a run holds at most `checkpoints` layer inputs at once (and
        as many layers' kept attention outputs: only a layer whose input the forward keeps
        keeps them)."""
        held = min(checkpoints, self.layers)
        kept = held * self.kept_attention
        forward = (held + 2) * self.hidden + self.keys_values + kept
        backward = (held + 1) * self.hidden + self.keys_values + self.gradient_sums + kept
        return (self.gradients + self.tables + max(self.layer_chunk, self.head_chunk)
                + max(forward, backward))


def estimate(plan: Any, parameters: list[torch.Tensor], *, whole: bool = False) -> StreamMemory:
    """The peak's terms for `plan`, whose graph was traced with `parameters` as inputs (or
    given the parameters whose gradients the step allocates).

    `whole=True`: the same regions with every chunk the whole length, what recomputing each
    layer whole (per-layer checkpointing, the least a remat plan reaches for one extra
    forward) holds: one layer's and the head's values at full length."""
    layers = plan.layers
    head = plan.head
    return StreamMemory(
        gradients=sum(p.numel() * p.element_size() for p in parameters if p.requires_grad),
        hidden=max((_bytes(r.input) for r in layers), default=0),
        keys_values=max((_keys_values(r) for r in layers), default=0),
        gradient_sums=max((_keys_values(r, widened=True) for r in layers), default=0),
        tables=max((_tables(r, plan, whole) for r in layers), default=0),
        layer_chunk=max((_chunk_bytes(r, plan, whole) for r in layers), default=0),
        head_chunk=_chunk_bytes(head, plan, whole) if head is not None else 0,
        layers=max((len(run) for run in plan.runs), default=0),
        kept_attention=max((_kept_attention(r) for r in layers), default=0),
    )


def checkpoints_for(budget: Any, memory: StreamMemory) -> int | None:
    """The most layer inputs a run may hold at once under `budget` (`Options.memory_budget`);
    None when every input may be kept (no numeric budget). Raises `MemoryBudgetError` with the
    least estimated peak when even the fewest cannot meet it."""
    if budget is None or budget == "auto" or memory.layers == 0:
        return None
    n = memory.layers
    limit = int(budget * memory.peak(n)) if isinstance(budget, float) else int(budget)
    fitting = [c for c in range(least_checkpoints(n), n + 1) if memory.peak(c) <= limit]
    if not fitting:
        least = memory.peak(least_checkpoints(n))
        raise MemoryBudgetError(
            limit, least, f"stream: the estimated peak holding {least_checkpoints(n)} of "
            f"{n} layer inputs at once; a shorter sequence or smaller chunks lower it",
            budget=budget if isinstance(budget, float) else None, reference_bytes=memory.peak(n))
    return max(fitting)


def _keys_values(region: Any, widened: bool = False) -> int:
    """Bytes of a layer's keys and values; `widened`, at least float32's element size. Under
    sequence parallelism a layer pass holds every rank's (`gathered_copies`), and the sums of
    their gradients before each goes back to its owner."""
    inside = set(region.nodes)
    return sum(_bytes(arg, widened) * gathered_copies(node) for node in region.nodes
               if node.target in SEQUENCE_ATTENTION_OPS
               for arg in node.args[1:3] if isinstance(arg, fx.Node) and arg in inside)


def _kept_attention(region: Any) -> int:
    """Bytes a layer keeps of its attention calls' outputs and log-sum-exps (float32 or
    wider, `(B, H, T)`) when `region.keep_attention`."""
    if not getattr(region, "keep_attention", False):
        return 0
    total = 0
    for node in region.nodes:
        out = node.meta.get("val") if node.target in SEQUENCE_ATTENTION_OPS else None
        if isinstance(out, (tuple, list)) and isinstance(out[0], torch.Tensor):
            batch, heads, length = out[0].shape[:3]
            total += (out[0].numel() * out[0].element_size()
                      + batch * heads * length * max(out[0].element_size(), 4))
    return total


def _tables(region: Any, plan: Any, whole: bool = False) -> int:
    """Bytes of the values a layer builds from the inputs alone, views excluded; each call
    keeps them whole while it runs. A document mask is never built whole: a chunk's rows of
    it, at most `chunk × T`, are counted instead."""
    total = 0
    for n in region.nodes:
        if n in plan.activations or not isinstance(n.meta.get("val"), torch.Tensor):
            continue
        if n.target is DOCUMENT_MASK:
            length = plan.info.length
            rows = length if whole else min(region.chunk_size or length, length)
            total += _bytes(n) * rows // max(length, 1)
        elif not n.meta["val"]._is_view():
            total += _bytes(n)
    return total


def _chunk_bytes(region: Any, plan: Any, whole: bool = False) -> int:
    """What a chunk of `region` computes: its whole-length values' bytes, scaled to the chunk
    (`whole`: to the whole length), and the scores of eager attention in it."""
    length = plan.info.length
    chunk = length if whole else min(region.chunk_size or length, length)
    whole = sum(_bytes(n) for n in region.nodes
                if n in plan.activations and n not in region.prefix and plan.info.dim_of(n))
    scores = sum(_eager_scores(n) for n in region.nodes if n.target is EAGER_ATTENTION)
    return (whole + scores) * chunk // max(length, 1)


EAGER_SCORES_HELD = 4
"""Scores-sized values a chunk of `memcompile::eager_attention` holds at once: plain ops keep
the capped scores, the softmax's output and the probabilities for the backward, and one more
is being computed."""


def _eager_scores(node: fx.Node) -> int:
    """Bytes of eager attention's scores over the whole length, `EAGER_SCORES_HELD` times: the
    op computes them in plain tensor ops (`runtime.chunk_attention.prefix_eager_attention`),
    `(B, H, queries, keys)`, in the widest of the values' and the softmax's dtypes."""
    out = node.meta.get("val")
    key = node.args[1].meta.get("val") if isinstance(node.args[1], fx.Node) else None
    if not isinstance(out, torch.Tensor) or not isinstance(key, torch.Tensor):
        return 0
    dtype = node.kwargs.get("softmax_dtype") or out.dtype
    size = max(out.element_size(), torch.empty((), dtype=dtype).element_size())
    return EAGER_SCORES_HELD * out.numel() // out.shape[-1] * key.shape[2] * size


def _bytes(node: fx.Node, widened: bool = False) -> int:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return 0
    size = max(val.element_size(), 4) if widened else val.element_size()
    return val.numel() * size
