"""`plan_remat`: choose what the backward recomputes so the step's *peak* meets `memory_budget`.

The planner (`memcompile.planning.remat`) simulates plans on the joint graph and picks one; this
pass runs it, tags each forward value the backward reads `"save"` or `"recompute"` and records the
plan's summary. `memcompile.planning.remat_split` applies the tags when the graph is split.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from memcompile.analysis.cost import cost_model
from memcompile.analysis.memory import concrete
from memcompile.analysis.joint import JointGraph
from memcompile.meta import JOINT, REMAT_PLAN, record_note
from memcompile.passes.registry import register_pass
from memcompile.planning.remat import PASS_NAME, PlanPoint, RematSummary, plan, tag_plan


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
    return gm


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
