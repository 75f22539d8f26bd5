"""`stream="auto"` (the default): whether StreamBP pays for a graph, from its plan's estimate.

StreamBP and the remat plan that `memory_budget="auto"` makes cost about the same time: each
recomputes at most one forward of the layers in the backward (measured on CPU: a streamed step
at 1.04x per-layer checkpointing's time, BENCHMARKS.md). What differs is the peak. The remat
plan can at best hold the layer inputs and recompute one layer at a time whole: one layer's and
the loss head's values at the full length. StreamBP holds the same inputs and a chunk of those.
So the rule compares the stream plan's estimated peak with the same estimate at chunks of the
whole length (`stream_memory.estimate(..., whole=True)`, a lower bound on the remat plan's):

    stream on  <=>  at least one layer chunks, and
                    estimated streamed peak <= AUTO_PEAK_RATIO x estimated whole-length peak

Short sequences, small vocabularies and graphs whose parameters' gradients dominate the peak
stay on the remat plan: chunking would save little there and run more, smaller kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from memcompile.planning.stream_memory import estimate

AUTO_PEAK_RATIO = 0.5
"""Stream when its estimated peak is at most this fraction of the whole-length estimate."""


@dataclass(frozen=True)
class AutoDecision:
    """The decision of `stream="auto"` for one graph, with the numbers it was made on."""

    on: bool
    streamed: int
    """Estimated peak bytes above the step's start, streamed."""
    whole: int
    """The same estimate with every chunk the whole length."""

    @property
    def ratio(self) -> float:
        return self.streamed / max(self.whole, 1)

    def __str__(self) -> str:
        verdict = "on" if self.on else "off"
        relation = "<=" if self.on else ">"
        return (f"stream 'auto': {verdict}: estimated peak {self.streamed:,} bytes streamed, "
                f"{self.whole:,} with each layer and the head recomputed whole "
                f"({self.ratio:.2f}x {relation} {AUTO_PEAK_RATIO}x)")


def decide(plan: Any, parameters: list[torch.Tensor]) -> AutoDecision:
    """Whether to stream the graph `plan` was made for (traced with `parameters` as inputs)."""
    layers = max((len(run) for run in plan.runs), default=0)
    streamed = estimate(plan, parameters).peak(layers)
    whole = estimate(plan, parameters, whole=True).peak(layers)
    return AutoDecision(bool(plan.layers) and streamed <= AUTO_PEAK_RATIO * whole, streamed, whole)
