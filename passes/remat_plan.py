"""`plan_remat`: choose what the backward recomputes so the step's *peak* meets `memory_budget`.

The planner (`memcompile.planning.remat`) simulates plans on the joint graph and picks one; this
pass runs it, tags each forward value the backward reads `"save"` or `"recompute"` and records the
plan's summary. `memcompile.planning.remat_split` applies the tags when the graph is split.

With `offload` on, the planner then moves saved values of the chosen plan to host memory where
their transfers hide under compute (`memcompile.planning.offload`), tagging them `"offload"`.
A CPU graph has no separate host memory: offload there applies only with `on_cpu` (a test of
the mechanics), and otherwise warns, as a request that cannot apply.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from memcompile.analysis.cost import CostModel, cost_model, transfer_bandwidth
from memcompile.analysis.memory import concrete
from memcompile.analysis.joint import JointGraph
from memcompile.analysis.schedule import ScheduleFacts
from memcompile.config import OffloadOptions
from memcompile.meta import (DECISIONS, JOINT, REMAT, REMAT_PLAN, Decision, record_decision,
                             record_note, record_unmet)
from memcompile.passes.registry import register_pass
from memcompile.planning.offload import plan_offload
from memcompile.planning.remat import PASS_NAME, PlanPoint, RematSummary, plan, tag_plan


OFFLOAD_FEATURE = "offload"
"""The name offload's notes and warnings carry (the option's, `Options.offload`)."""


@register_pass(PASS_NAME, default=True, rank=100)  # last: it plans the graph the others left
def plan_remat_pass(
    gm: fx.GraphModule, example_inputs: Sequence[Any], *, options: Any = None
) -> fx.GraphModule:
    """Tag what the backward saves and recomputes so the step's peak meets `memory_budget`."""
    info = gm.meta.get(JOINT)
    if info is None:
        record_note(gm, PASS_NAME, "not a joint graph from memcompile's partition: unchanged")
        return gm
    budget = getattr(options, "memory_budget", "auto")
    joint = JointGraph.read(gm, info["num_fwd_outputs"])
    if not joint.needed:
        record_note(gm, PASS_NAME, "the backward reads nothing from the forward: unchanged")
        return gm
    fusion = getattr(options, "runtime", "eager") == "inductor"
    device, dtype = _device_and_dtype(joint)
    cost = cost_model(getattr(options, "cost_model", "measured"), device, dtype)
    point, summary, planner = plan(joint, budget, cost, fusion=fusion)
    tag_plan(joint, point, planner.node_seconds)
    gm.meta[REMAT_PLAN] = summary
    record_note(gm, PASS_NAME, describe(summary, point))
    offload = getattr(options, "offload", False)
    if offload:
        _offload(gm, joint, point, cost, offload, device, planner.facts)
    return gm


def _offload(gm: fx.GraphModule, joint: JointGraph, point: PlanPoint, cost: CostModel,
             offload: OffloadOptions, device: str, facts: ScheduleFacts) -> None:
    """Tag the chosen plan's values that go to the host, or say why none does."""
    if device == "cpu" and not offload.on_cpu:
        record_unmet(gm, OFFLOAD_FEATURE, "the graph runs on the CPU, which has no separate "
                     "host memory to offload to")
        return
    if device not in ("cpu", "cuda"):
        record_unmet(gm, OFFLOAD_FEATURE, f"the transfers are built for CUDA devices, and the "
                     f"graph runs on {device!r}")
        return
    bandwidth = (transfer_bandwidth(device) if offload.bandwidth == "measured"
                 else offload.bandwidth)
    fusion = gm.meta[REMAT_PLAN].priced_on == "inductor"
    found = plan_offload(joint, point.layout, cost, bandwidth, fusion=fusion, facts=facts)
    if not found.offloads:
        record_unmet(gm, OFFLOAD_FEATURE, (
            f"none of the {found.fitting} saved values whose transfers fit under the compute "
            f"before their first backward reader ({bandwidth:.3g} B/s) lowers the planned peak"
            if found.fitting else f"no saved value's transfers fit under the compute between "
            f"its producer and its first backward reader at {bandwidth:.3g} B/s"))
        return
    names = {o.node.name for o in found.offloads}
    gm.meta[DECISIONS] = [d for d in gm.meta.get(DECISIONS, [])
                          if not (d.kind == "saved" and d.node in names)]
    for o in found.offloads:
        o.node.meta[REMAT] = "offload"
        record_decision(gm, Decision(PASS_NAME, "offloaded", o.node.name, o.nbytes, (
            f"to host after its last forward reader, back before its first backward reader: "
            f"two transfers ~{o.transfer_seconds * 1e6:.0f} us at {bandwidth:.3g} B/s under "
            f"~{o.window_seconds * 1e6:.0f} us of compute")))
    summary = gm.meta[REMAT_PLAN]
    mib = 2 ** 20
    record_note(gm, OFFLOAD_FEATURE, (
        f"{len(found.offloads)} values ({sum(o.nbytes for o in found.offloads) / mib:.2f}"
        f" MiB) to host; planned peak {summary.chosen_peak / mib:.2f} -> "
        f"{found.sim.peak_bytes / mib:.2f} MiB at the same recompute; {found.plans_simulated} "
        f"plans simulated"))
    summary.chosen_peak = found.sim.peak_bytes


def describe(summary: RematSummary, point: PlanPoint) -> str:
    """One line on the plan: budget, peaks, recompute and planning time."""
    mib = 2 ** 20
    if summary.budget_bytes is not None:
        wanted = f"budget {summary.budget!r} = {summary.budget_bytes / mib:.2f} MiB"
    else:
        wanted = f"budget {summary.budget!r}"
    least = (f", least reachable {summary.least_peak / mib:.2f} MiB"
             if summary.least_peak is not None else "")
    share = (point.recompute_seconds / summary.forward_seconds
             if summary.forward_seconds else 0.0)
    return (f"{wanted}: planned peak {summary.chosen_peak / mib:.2f} MiB on {summary.priced_on}'s "
            f"buffers (saving everything: "
            f"{summary.save_all_peak / mib:.2f} MiB{least}); recomputes "
            f"{len(point.layout.recomputed)} ops, ~{share:.2f} of a forward; "
            f"{summary.plans_simulated} plans simulated in {summary.seconds:.2f} s; "
            f"cost_model={summary.cost.to_dict() if summary.cost else None}")


def _device_and_dtype(joint: JointGraph) -> tuple[str, torch.dtype]:
    """The device kind of the graph's inputs and its floating dtype with the most input bytes
    (the weights' dtype, usually): what the measured cost model times."""
    device, weights = "cpu", Counter()
    for node in joint.primals:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            device = val.device.type
            if val.dtype.is_floating_point:
                weights[val.dtype] += concrete(val.numel()) * val.element_size()
    return device, (weights.most_common(1)[0][0] if weights else torch.float32)
