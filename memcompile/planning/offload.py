"""Offload to host: which saved values of a remat plan leave device memory between their last
forward reader and their first backward reader (`Options.offload`).

An offloaded value is copied to host memory right after its last forward reader (its producer,
when the forward reads it no more), dropped from the device, and copied back right before its
first backward reader (`runtime.offload`; `planning.remat_split` puts the ops in the graphs).
Its device bytes are free in between; the price is two transfers of its bytes at the
host-device bandwidth, on one side stream. A value is offloaded only when the transfers fit in
the compute between its producer and its first backward reader (seconds from the cost model,
`analysis.cost`), counting the other offloaded values whose windows overlap its own, since the
side stream runs one transfer at a time: then the plan costs no step time. The recompute is
the remat plan's, unchanged, so the step time is the remat plan's.

A greedy chain, as the remat planner's: among the saved values live at the current peak that
fit, offload the one whose simulated plan (`analysis.schedule.simulate_layout`, exact for the
eager runtime) has the lowest peak, while that lowers the peak.

Only a value that owns its storage alone (no view of it, no other output of its op) and is
contiguous is a candidate: dropping it then frees its bytes, and its copy has its layout.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.fx as fx

from memcompile.analysis.cost import CostModel
from memcompile.analysis.joint import JointGraph
from memcompile.analysis.memory import concrete
from memcompile.analysis.schedule import Layout, PlanSimulation, ScheduleFacts, simulate_layout

_WIDTH = 8  # candidates simulated per step of the chain, largest first


@dataclass(frozen=True)
class Offload:
    """One offloaded value: its bytes, its transfers' seconds and the compute they hide under."""

    node: fx.Node
    nbytes: int
    transfer_seconds: float
    """Both transfers, at the planned bandwidth."""
    window: tuple[float, float]
    """Seconds into the step (cost model) at its producer's end and at its first backward
    reader's start."""

    @property
    def window_seconds(self) -> float:
        """The compute between its producer and its first backward reader."""
        return self.window[1] - self.window[0]


@dataclass
class OffloadPlan:
    """The remat plan with offloads: its layout, its simulation and what each offload costs."""

    layout: Layout
    sim: PlanSimulation
    offloads: list[Offload]
    bandwidth: float
    plans_simulated: int
    fitting: int
    """How many saved values could go alone: their transfers fit in their windows."""


def plan_offload(joint: JointGraph, layout: Layout, cost: CostModel, bandwidth: float, *,
                 fusion: bool = False, facts: ScheduleFacts | None = None) -> OffloadPlan:
    """Offload saved values of `layout` while that lowers its simulated peak at no step time."""
    facts = facts or ScheduleFacts.of(joint)

    def simulate(plan: Layout) -> PlanSimulation:
        return simulate_layout(joint, plan, fusion=fusion, drop_outputs=True, facts=facts)

    sim, chosen, tried = simulate(layout), [], 0
    candidates = _candidates(joint, layout, facts, cost, bandwidth)
    while True:
        fitting = [c for n, c in candidates.items()
                   if n in sim.live_at_peak and c not in chosen and _fits([*chosen, c])]
        best: tuple[PlanSimulation, Offload, Layout] | None = None
        for c in sorted(fitting, key=lambda c: (-c.nbytes, joint.order[c.node]))[:_WIDTH]:
            plan = dataclasses.replace(layout, offloaded=frozenset(o.node for o in [*chosen, c]))
            trial = simulate(plan)
            tried += 1
            if best is None or trial.peak_bytes < best[0].peak_bytes:
                best = (trial, c, plan)
        if best is None or best[0].peak_bytes >= sim.peak_bytes:
            break
        sim, layout = best[0], best[2]
        chosen.append(best[1])
    return OffloadPlan(layout, sim, chosen, bandwidth, tried,
                       sum(_fits([c]) for c in candidates.values()))


def _candidates(joint: JointGraph, layout: Layout, facts: ScheduleFacts, cost: CostModel,
                bandwidth: float) -> dict[fx.Node, Offload]:
    """The saved values that may go to the host, with their transfers and windows."""
    # The step's timeline in cost-model seconds: the forward's ops, then the backward's.
    order = [*layout.forward_order, *layout.backward_order]
    ends, clock = [], 0.0
    for node in order:
        clock += cost.node_seconds(node)
        ends.append(clock)
    position = {n: i for i, n in enumerate(layout.forward_order)}
    first_reader: dict[fx.Node, int] = {}
    for i, node in enumerate(layout.backward_order):
        for inp in joint.inputs[node]:
            first_reader.setdefault(inp, len(layout.forward_order) + i)
    outputs = {o for o in joint.fwd_outputs if isinstance(o, fx.Node)}
    found = {}
    for node in layout.saved:
        if (node.op == "placeholder" or node in outputs or node not in position
                or node not in first_reader or not _owns_its_storage(node, facts)):
            continue
        nbytes = facts.own[node][0][1]
        start = ends[position[node]]
        reader = first_reader[node]
        end = ends[reader - 1] if reader else 0.0
        found[node] = Offload(node, nbytes, 2 * nbytes / bandwidth, (start, end))
    return found


def _owns_its_storage(node: fx.Node, facts: ScheduleFacts) -> bool:
    """One contiguous tensor alone in one storage of exactly its bytes, held by no other node."""
    val = node.meta.get("val")
    own = facts.own.get(node, ())
    if not isinstance(val, torch.Tensor) or len(own) != 1 or not own[0][1]:
        return False
    key, nbytes = own[0]
    dense = val.is_contiguous() and concrete(val.storage_offset()) == 0
    return (dense and facts.nodes_of.get(key) == [node]
            and nbytes == concrete(val.numel()) * val.element_size())


def _fits(offloads: list[Offload]) -> bool:
    """Whether every offload's transfers, and those of the offloads whose windows overlap its
    window, fit in its window (one side stream runs the transfers one at a time)."""
    for o in offloads:
        busy = sum(p.transfer_seconds for p in offloads
                   if p is o or (p.window[0] < o.window[1] and o.window[0] < p.window[1]))
        if busy > o.window_seconds:
            return False
    return True

