"""Apply a rematerialization plan: split the joint graph by its save/recompute tags.

`plan_remat` decides and tags the joint graph (`meta.REMAT`); this module applies the tags: it
builds the forward and backward graphs with torch's `_extract_fwd_bwd_modules` from exactly the
saved set the tags imply, then puts both graphs in the order the plan was simulated in
(`memcompile.analysis.schedule.layout`): recomputation right before its first use in the
backward, segment by segment, and each getitem right after its tuple. Torch's own reordering
would pull every recomputed op to the start of the backward and undo the plan's peak.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch.fx as fx
from torch._functorch.partitioners import _extract_fwd_bwd_modules, is_sym_node
from torch.utils._ordered_set import OrderedSet

from memcompile.analysis.joint import JointGraph
from memcompile.analysis.schedule import Layout, layout
from memcompile.meta import REMAT

log = logging.getLogger(__name__)


def has_remat_tags(gm: fx.GraphModule) -> bool:
    """Whether a planner tagged this joint graph."""
    return any(REMAT in n.meta for n in gm.graph.nodes)


def tagged_layout(joint: JointGraph) -> Layout:
    """The layout the tags describe: every group with a node tagged "recompute" is recomputed."""
    evicted = {joint.group_of[n] for n in joint.gm.graph.nodes
               if n.meta.get(REMAT) == "recompute" and n in joint.group_of}
    return layout(joint, evicted)


def split_by_remat_tags(
    gm: fx.GraphModule,
    *,
    num_fwd_outputs: int,
    static_lifetime_input_indices: Sequence[int] | None = None,
    joint: JointGraph | None = None,
) -> tuple[fx.GraphModule, fx.GraphModule, Layout]:
    """The forward and backward graphs of the tagged plan, in its schedule, and its layout."""
    joint = joint or JointGraph.read(gm, num_fwd_outputs)
    plan = tagged_layout(joint)
    saved_syms = [n for n in plan.saved if is_sym_node(n)]
    saved_values = [n for n in plan.saved if not is_sym_node(n) and joint.is_tensor(n)]
    static = set(static_lifetime_input_indices or ())
    static_nodes = OrderedSet(p for i, p in enumerate(joint.primals) if i in static)
    fw, bw = _extract_fwd_bwd_modules(
        gm, saved_values, saved_sym_nodes=saved_syms, num_fwd_outputs=num_fwd_outputs,
        static_lifetime_input_nodes=static_nodes,
    )
    _reorder(fw, [n.name for n in plan.forward_order])
    _reorder(bw, [n.name for n in plan.backward_order])
    return fw, bw, plan


def _reorder(gm: fx.GraphModule, names: list[str]) -> None:
    """Put the graph's ops in the order `names` gives (placeholders first, output last)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    ops = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    if {n.name for n in ops} != set(names):
        extra = sorted({n.name for n in ops} - set(names))[:5]
        missing = sorted(set(names) - {n.name for n in ops})[:5]
        # The plan's schedule covers every op the split keeps (outputs' ancestors, what the
        # backward reads, in-place writes into inputs: `JointGraph.forward_effects`): a
        # difference is memcompile's bug, and the measured peak may then exceed the plan's.
        log.warning("the split's graph differs from the plan's schedule (extra %s, missing %s): "
                    "kept torch's order, so the peak may differ from the plan's; please report "
                    "this to memcompile with the graph (options={'dump_dir': ...})",
                    extra, missing)
        return
    anchor = gm.graph.find_nodes(op="placeholder")
    cursor = anchor[-1] if anchor else None
    for name in names:
        node = nodes[name]
        if cursor is None:
            gm.graph._root.append(node)
        else:
            cursor.append(node)
        cursor = node
    gm.graph.lint()
    gm.recompile()
