"""Apply a rematerialization plan: split the joint graph by its save/recompute tags.

`plan_remat` decides and tags the joint graph (`meta.REMAT`); this module applies the tags: it
builds the forward and backward graphs with torch's `_extract_fwd_bwd_modules` from exactly the
saved set the tags imply, then puts both graphs in the order the plan was simulated in
(`memcompile.analysis.schedule.layout`): recomputation right before its first use in the
backward, segment by segment, and each getitem right after its tuple. Torch's own reordering
would pull every recomputed op to the start of the backward and undo the plan's peak.

A value tagged "offload" (`planning.offload`) is saved through host memory: the forward copies
it to the host right after its last reader there (`memcompile::offload`) and returns the copy;
the backward copies it back right before its first reader (`memcompile::fetch`). Both copies
are marked `analysis.memory.HOST_VALUE`: they hold no device bytes.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import torch.fx as fx
from torch._functorch.partitioners import _extract_fwd_bwd_modules, is_sym_node
from torch.utils._ordered_set import OrderedSet

from memcompile.analysis.joint import JointGraph
from memcompile.analysis.memory import HOST_VALUE
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
    offloaded = frozenset(n for n in joint.gm.graph.nodes if n.meta.get(REMAT) == "offload")
    return dataclasses.replace(layout(joint, evicted), offloaded=offloaded)


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
    if plan.offloaded:
        _insert_transfers(fw, bw, sorted(n.name for n in plan.offloaded))
    return fw, bw, plan


def _insert_transfers(fw: fx.GraphModule, bw: fx.GraphModule, names: list[str]) -> None:
    """Put an offload after each named value's last forward reader, its copy in the forward's
    returns, and a fetch before its first backward reader (the placeholder of that name)."""
    # The ops are registered where they run; importing them here registers them for the graph.
    from memcompile.runtime.offload import FETCH, OFFLOAD
    fw_nodes, bw_nodes = {n.name: n for n in fw.graph.nodes}, {n.name: n for n in bw.graph.nodes}
    fw_order = {n: i for i, n in enumerate(fw.graph.nodes)}
    bw_order = {n: i for i, n in enumerate(bw.graph.nodes)}
    output = fw.graph.find_nodes(op="output")[0]
    for name in names:
        value, saved = fw_nodes[name], bw_nodes[name]
        val = value.meta["val"]
        with val.fake_mode:
            host_val = OFFLOAD(val)
        readers = [u for u in value.users if u is not output]
        with fw.graph.inserting_after(max(readers, key=fw_order.__getitem__, default=value)):
            host = fw.graph.call_function(OFFLOAD, (value,))
        host.meta.update(val=host_val, **{HOST_VALUE: True})
        output.replace_input_with(value, host)
        with bw.graph.inserting_before(min(saved.users, key=bw_order.__getitem__)):
            fetched = bw.graph.call_function(FETCH, (saved, val.device))
        fetched.meta["val"] = saved.meta["val"]
        saved.replace_all_uses_with(fetched, delete_user_cb=lambda user: user is not fetched)
        saved.meta.update(val=host_val, **{HOST_VALUE: True})
    for gm in (fw, bw):
        gm.graph.lint()
        gm.recompile()


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
