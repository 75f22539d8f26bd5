"""`stream="auto"` (the default): whether StreamBP pays for a graph, weighed against the remat plan.

With `memory_budget="auto"` the alternative to streaming is the remat plan: the least peak
`plan_remat` reaches for at most one extra forward of recompute. StreamBP recomputes about one
forward too (each layer re-runs in chunks in the backward), so the two cost about the same
compute; they differ in peak. The rule compares the two peaks, both above the step's start:

    stream on  <=>  some region runs in more than one chunk, and
                    estimated streamed peak <= AUTO_PEAK_RATIO x the remat plan's planned peak

- The streamed peak is `stream_memory.estimate`, a bound on what the stream runtime holds. Of
  the gradients it counts what the step holds (`streamed_gradient_bytes`): every gradient of a
  weight with no `.grad` when the graph is compiled, and the largest of the others that no
  single layer reads alone (the embedding's, the head's: each lives until autograd adds it into
  `.grad`). A weight one layer alone reads gets its gradient added into an existing `.grad` in
  place as that layer finishes (`runtime.stream_accumulate`), so under gradient accumulation
  (or `zero_grad(set_to_none=False)`) it costs the step nothing.
- The remat plan's peak is the one `plan_remat` plans for the graph (`capture.
  planned_remat_peak`: traced and planned, not compiled). It always includes the gradients:
  AOTAutograd's backward returns them as new tensors, which autograd then adds into `.grad`.
  Where no remat plan results (the pass is disabled), the stream estimate with every chunk the
  whole length stands in for it (`estimate(..., whole=True)`, what recomputing each layer whole
  holds).

The ratio is below 1 because the stream estimate is a bound and the plan a prediction, and
because on the CPU StreamBP runs its chunks eagerly (Python, op by op) while the remat plan runs
Inductor's kernels: the time it costs is about per-layer checkpointing's (BENCHMARKS.md), so it
should buy a clearly lower peak.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from memcompile.analysis.readers import sole_readers_of
from memcompile.planning.stream_memory import estimate

AUTO_PEAK_RATIO = 0.9
"""Stream when its estimated peak is at most this fraction of the remat plan's."""


@dataclass(frozen=True)
class AutoDecision:
    """The decision of `stream="auto"` for one graph, with the numbers it was made on."""

    on: bool
    streamed: int
    """Estimated streamed peak bytes above the step's start."""
    remat: int
    """The remat plan's planned peak (or the whole-length estimate, see `against`)."""
    against: str
    """What `remat` is: "the remat plan's planned peak" or the whole-length stand-in."""
    chunked: bool
    """Whether any region runs in more than one chunk."""

    @property
    def ratio(self) -> float:
        return self.streamed / max(self.remat, 1)

    def __str__(self) -> str:
        verdict = "on" if self.on else "off"
        if not self.chunked:
            return ("stream 'auto': off: every region fits in one chunk at this length, so "
                    "streaming would change nothing")
        relation = "<=" if self.on else ">"
        return (f"stream 'auto': {verdict}: estimated peak {self.streamed:,} bytes streamed, "
                f"{self.remat:,} by {self.against} ({self.ratio:.2f}x {relation} "
                f"{AUTO_PEAK_RATIO}x)")


def streamed_gradient_bytes(plan: Any, placeholders: list[fx.Node], inputs: list[Any]) -> int:
    """Bytes of gradients the streamed step holds at most, for the graph's `placeholders` fed
    `inputs`: every gradient of a weight without a `.grad` (they accumulate through the
    backward into new `.grad`s), and the largest of those weights with a `.grad` that no single
    layer region alone reads (the embedding's, the head's): each exists from its producer until
    autograd adds it into `.grad`. A layer's own weights' gradients are added in place."""
    owner = {n: _Owner(r) for r in plan.regions for n in r.nodes}
    in_place = {node for region in plan.regions if region.kind == "layer"
                for node in sole_readers_of(placeholders, owner).get(id(region), ())}
    growing, transient = 0, 0
    for node, x in zip(placeholders, inputs):
        if not (isinstance(x, torch.Tensor) and x.requires_grad):
            continue
        size = x.numel() * x.element_size()
        if x.grad is None:
            growing += size
        elif node not in in_place:
            transient = max(transient, size)
    return growing + transient


@dataclass(frozen=True)
class _Owner:
    """What `analysis.readers.readers` looks up for a node: the region holding it."""

    region: Any


def decide(plan: Any, parameters: list[torch.Tensor], gradient_bytes: int,
           remat_peak: Callable[[], int | None]) -> AutoDecision:
    """Whether to stream the graph `plan` was made for, traced with `parameters` as inputs;
    `gradient_bytes`: what the streamed step holds of their gradients
    (`streamed_gradient_bytes`). `remat_peak()` plans the remat plan's peak for it (None when
    it makes none); it is called only when a region chunks."""
    layers = max((len(run) for run in plan.runs), default=0)
    memory = dataclasses.replace(estimate(plan, []), gradients=gradient_bytes)
    streamed = memory.peak(layers)
    length = plan.info.length
    if not any((r.chunk_size or length) < length for r in plan.regions):
        return AutoDecision(False, streamed, 0, "", chunked=False)
    remat = remat_peak()
    if remat is None:
        remat = estimate(plan, parameters, whole=True).peak(layers)
        against = "recomputing each layer whole (no remat plan to weigh)"
    else:
        against = "the remat plan's planned peak"
    return AutoDecision(streamed <= AUTO_PEAK_RATIO * remat, streamed, remat, against,
                        chunked=True)
