"""From the joint graph to a forward and a backward graph, through memcompile's passes.

AOTAutograd (eager runtime) or Inductor (inductor runtime) calls `MemcompilePartitioner` with the
joint forward+backward graph. It runs the pass pipeline on it, splits it into forward and
backward, and records what the split saved and what it recomputes as `Decision`s.

Before the passes, the joint graph is prepared as torch's min-cut partitioner prepares it
(dead code and common subexpressions removed, checkpoint-region boundaries and collectives,
effectful ops and mutated sources marked MUST_SAVE), so a planner sees the graph that is split.
When `plan_remat` tagged the graph, `remat_split` applies its plan; otherwise (the pass disabled
or not applicable) torch's min-cut partitioner splits it, honouring `torch.utils.checkpoint`
regions and selective-checkpoint tags (`node.meta["recompute"]`).
"""

from __future__ import annotations

import logging
import os
from operator import getitem
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch._functorch import config as functorch_config
from torch._functorch.compile_utils import fx_graph_cse
from torch._functorch.partitioners import (
    cleanup_recompute_tags,
    force_save_bw_mutation_src,
    force_save_collectives,
    force_save_effectful_ops,
    has_recomputable_ops,
    min_cut_rematerialization_partition,
)
from torch._guards import detect_fake_mode
from torch._inductor.custom_graph_pass import CustomPartitionerFn, get_hash_for_files
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import CheckpointPolicy

from memcompile.analysis.memory import is_tangent, new_bytes, storage_key, tensor_bytes
import memcompile as memcompile_package
import memcompile.passes as memcompile_passes
from memcompile.config import Options
from memcompile.meta import JOINT, UNMET, Decision, record_decision
from memcompile.passes.fused_updates import fuse_optimizer_updates
from memcompile.planning.remat_split import has_remat_tags, split_by_remat_tags
from memcompile.report import GraphRecord
from memcompile.runner import run_passes

log = logging.getLogger(__name__)

_SOURCE_FILES = tuple(sorted({
    os.path.join(root, name)
    for package in (memcompile_package, memcompile_passes)
    for folder in package.__path__
    for root, _, names in os.walk(folder)
    for name in names if name.endswith(".py")
}))

PARTITION = "partition"
"""The name decisions of the split carry in the report."""


class MemcompilePartitioner(CustomPartitionerFn):
    """Runs memcompile's passes on a joint graph, then splits it; fills a `GraphRecord`."""

    def __init__(self, options: Options, record: GraphRecord,
                 fused_slots: dict[int, int] | None = None,
                 parameter_inputs: Sequence[int] = ()):
        self.options = options
        self.record = record
        self.fused_slots = fused_slots or {}
        """Input index -> slot of the weights a `lowrank(..., fused_backward=True)` optimizer
        steps inside the backward (`passes.fused_updates`)."""
        self.parameter_inputs = tuple(parameter_inputs)
        """Indices of the graph's inputs that are `nn.Parameter`s (AOTAutograd's fake inputs
        do not say): `meta[JOINT]["parameter_inputs"]` for the passes."""
        self.unmet: list[tuple[str, str]] = []
        """(pass name, reason): explicit requests the passes could not honour (`meta.UNMET`)."""

    def __call__(
        self, gm: fx.GraphModule, joint_inputs: Sequence[Any], **kwargs: Any
    ) -> tuple[fx.GraphModule, fx.GraphModule]:
        kwargs.pop("compiler", None)
        gm = self.run_pipeline(gm, joint_inputs, **kwargs)
        if has_remat_tags(gm):
            fw, bw, _ = split_by_remat_tags(
                gm, num_fwd_outputs=kwargs["num_fwd_outputs"],
                static_lifetime_input_indices=kwargs.get("static_lifetime_input_indices"))
        else:
            fw, bw = min_cut_rematerialization_partition(gm, joint_inputs, "inductor", **kwargs)
        for graph in (fw, bw):
            _fill_rng_wrapper_vals(graph)
        if self.fused_slots:
            primals = [n for n in gm.graph.find_nodes(op="placeholder") if not is_tangent(n)]
            storages = {i: storage_key(primals[i].meta["val"]) for i in self.fused_slots
                        if i < len(primals) and isinstance(primals[i].meta.get("val"),
                                                           torch.Tensor)}
            slots = {i: s for i, s in self.fused_slots.items() if i in storages}
            fuse_optimizer_updates(bw, slots, storages, len(primals))
        if not has_remat_tags(gm):
            _record_split_decisions(gm, fw, bw)  # the planner recorded its own decisions
        self.record.set_split(gm, fw, bw)
        self.unmet = [*gm.meta.get(UNMET, []), *bw.meta.get(UNMET, [])]
        if self.options.dump_dir:
            self.record.dump(self.options.dump_dir)
        log.info(
            "%s: forward %d nodes, backward %d nodes, %d saved, %d recomputed",
            self.record.name, len(fw.graph.nodes), len(bw.graph.nodes),
            len(self.record.decisions_of("saved")), len(self.record.decisions_of("recomputed")),
        )
        return fw, bw

    def run_pipeline(self, gm: fx.GraphModule, joint_inputs: Sequence[Any],
                     **kwargs: Any) -> fx.GraphModule:
        """The joint graph prepared as torch's partitioner prepares it, through the passes
        (the remat plan, if one results, in `meta[REMAT_PLAN]`)."""
        self.record.kind = "training"
        self.record.num_user_outputs = kwargs["num_fwd_outputs"]
        self.record.joint_before = gm.code
        gm = prepare_joint(gm)
        gm.meta[JOINT] = {
            "num_fwd_outputs": kwargs["num_fwd_outputs"],
            "static_lifetime_input_indices": list(kwargs.get("static_lifetime_input_indices")
                                                  or ()),
            "parameter_inputs": list(self.parameter_inputs),
        }
        gm, records = run_passes(
            gm, _flat_inputs(joint_inputs), options=self.options, graph_name=self.record.name
        )
        self.record.passes = [*self.record.passes, *records]  # after a stream attempt's
        return gm

    def uuid(self) -> Any:
        """What Inductor's caches key this partitioner by: memcompile's code and the options.

        (The Inductor runtime also turns AOTAutograd's cache off, so the passes always run.)
        """
        return get_hash_for_files(_SOURCE_FILES, extra=repr(self.options))


def prepare_joint(gm: fx.GraphModule) -> fx.GraphModule:
    """The joint graph as torch's min-cut partitioner prepares it before choosing what to save:
    without dead code or repeated subexpressions, with MUST_SAVE on checkpoint-region boundaries,
    collectives, effectful ops and the sources of mutations the backward replays."""
    gm.graph.eliminate_dead_code()
    if functorch_config.cse:
        gm.graph = fx_graph_cse(gm.graph)
    if has_recomputable_ops(gm):
        gm = cleanup_recompute_tags(gm, is_default_partition=False)
    if not functorch_config.unsafe_allow_optimization_of_collectives:
        force_save_collectives(gm)
    force_save_effectful_ops(gm)
    force_save_bw_mutation_src(gm)
    gm.recompile()
    return gm


def _flat_inputs(joint_inputs: Sequence[Any]) -> list[Any]:
    flat: list[Any] = []
    for group in joint_inputs:
        flat.extend(group if isinstance(group, (list, tuple)) else [group])
    return flat


def _fill_rng_wrapper_vals(gm: fx.GraphModule) -> None:
    """Give torch's RNG-state wrappers the FakeTensor metadata the partitioner leaves off.

    Random ops in a checkpointed region (CPU flash attention counts: it takes a dropout
    probability) are wrapped in `run_and_save_rng_state(op, *args)` -> (state, out) in the
    forward and `run_with_rng_state(state, op, *args)` -> out in the backward, without
    `meta["val"]`. The memory simulator needs it: the tuple is built from its getitems' values
    (so storages stay shared with them), the single output by running the op on fake inputs.
    """
    for node in gm.graph.nodes:
        if node.op != "call_function" or "val" in node.meta:
            continue
        if node.target is torch.ops.higher_order.run_and_save_rng_state:
            items = {u.args[1]: u.meta.get("val") for u in node.users if u.target is getitem}
            if set(items) == {0, 1} and all(v is not None for v in items.values()):
                node.meta["val"] = (items[0], items[1])
        elif node.target is torch.ops.higher_order.run_with_rng_state:
            op, args = node.args[1], node.args[2:]
            vals = fx.node.map_arg(args, lambda a: a.meta.get("val"))
            mode = detect_fake_mode(tree_leaves(vals))
            if mode is not None:
                with mode:
                    node.meta["val"] = op(*vals, **fx.node.map_arg(
                        node.kwargs, lambda a: a.meta.get("val")))


_RECOMPUTE_POLICIES = (CheckpointPolicy.MUST_RECOMPUTE, CheckpointPolicy.PREFER_RECOMPUTE)
_SAVE_POLICIES = (CheckpointPolicy.MUST_SAVE, CheckpointPolicy.PREFER_SAVE)


def _policy_reason(node: fx.Node | None, kind: str) -> str | None:
    """The model's checkpoint policy as the reason, when it agrees with the decision made.

    `node` is the joint graph's node of that name; None for values the split made itself
    (such as the RNG state a checkpointed region saves for its recomputation).
    """
    policy = node.meta.get("recompute") if node is not None else None
    if kind == "recomputed" and policy in _RECOMPUTE_POLICIES:
        return f"inside a torch.utils.checkpoint region ({policy.name})"
    if kind == "saved" and policy in _SAVE_POLICIES:
        return f"checkpoint policy {policy.name} (the model's, or the boundary of two regions)"
    return None


def _record_split_decisions(joint: fx.GraphModule, fw: fx.GraphModule, bw: fx.GraphModule) -> None:
    joint_nodes = {n.name: n for n in joint.graph.nodes}
    primal_storages = {storage_key(t) for n in fw.graph.find_nodes(op="placeholder")
                       if isinstance(t := n.meta.get("val"), torch.Tensor)}
    first_saver: dict[int, str] = {}  # storage -> the saved value whose decision counts its bytes
    for node in bw.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if is_tangent(node) or not isinstance(val, torch.Tensor):
            continue
        key = storage_key(val)
        if key in primal_storages:
            continue  # inputs, parameters and their views are live anyway: saving costs nothing
        reason = (_policy_reason(joint_nodes.get(node.name), "saved")
                  or "needed by the backward; min-cut keeps it saved")
        if key in first_saver:
            reason += f" (shares its storage with {first_saver[key]})"
        nbytes = 0 if key in first_saver else tensor_bytes(node)
        first_saver.setdefault(key, node.name)
        record_decision(fw, Decision(PARTITION, "saved", node.name, nbytes, reason))
    computed_in_forward = {n.name for n in fw.graph.nodes if n.op == "call_function"}
    for node in bw.graph.nodes:
        # Computed in both graphs: recomputed. (Tangent-free ops only the backward needs are
        # computed once, in the backward: not recomputation.)
        if node.op == "call_function" and node.name in computed_in_forward and new_bytes(node):
            reason = (_policy_reason(joint_nodes.get(node.name), "recomputed")
                      or "min-cut: cheaper to recompute in the backward than to save")
            record_decision(
                bw, Decision(PARTITION, "recomputed", node.name, new_bytes(node), reason)
            )
