"""From the joint graph to a forward and a backward graph, through memcompile's passes.

AOTAutograd (eager runtime) or Inductor (inductor runtime) calls `MemcompilePartitioner` with the
joint forward+backward graph. It runs the pass pipeline on it, splits it into forward and
backward, and records what the split saved and what it recomputes as `Decision`s.

The split honours `torch.utils.checkpoint` regions and selective-checkpoint tags (they arrive as
`node.meta["recompute"]`); values outside them are saved or recomputed by torch's min-cut
partitioner, which treats fusible pointwise ops as cheap to recompute.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch._inductor.custom_graph_pass import CustomPartitionerFn, get_hash_for_files
from torch.utils.checkpoint import CheckpointPolicy

from memcompile.analysis.memory import new_bytes, tensor_bytes
from memcompile.config import Options
from memcompile.meta import Decision, record_decision
from memcompile.report import GraphRecord
from memcompile.runner import run_passes

log = logging.getLogger(__name__)

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SOURCE_FILES = tuple(sorted(
    os.path.join(root, name)
    for folder in ("memcompile", "passes")
    for root, _, names in os.walk(os.path.join(_PACKAGE, folder))
    for name in names if name.endswith(".py")
))

PARTITION = "partition"
"""The name decisions of the split carry in the report."""


class MemcompilePartitioner(CustomPartitionerFn):
    """Runs memcompile's passes on a joint graph, then splits it; fills a `GraphRecord`."""

    def __init__(self, options: Options, record: GraphRecord):
        self.options = options
        self.record = record

    def __call__(
        self, gm: fx.GraphModule, joint_inputs: Sequence[Any], **kwargs: Any
    ) -> tuple[fx.GraphModule, fx.GraphModule]:
        kwargs.pop("compiler", None)
        self.record.kind = "training"
        self.record.num_user_outputs = kwargs["num_fwd_outputs"]
        self.record.joint_before = gm.code
        gm, self.record.passes = run_passes(
            gm, _flat_inputs(joint_inputs), options=self.options, graph_name=self.record.name
        )
        forward_names = _forward_node_names(gm)
        fw, bw = min_cut_rematerialization_partition(gm, joint_inputs, "inductor", **kwargs)
        _record_split_decisions(gm, fw, bw, forward_names)
        self.record.set_split(gm, fw, bw)
        if self.options.dump_dir:
            self.record.dump(self.options.dump_dir)
        log.info(
            "%s: forward %d nodes, backward %d nodes, %d saved, %d recomputed",
            self.record.name, len(fw.graph.nodes), len(bw.graph.nodes),
            len(self.record.decisions_of("saved")), len(self.record.decisions_of("recomputed")),
        )
        return fw, bw

    def uuid(self) -> Any:
        """What Inductor's caches key this partitioner by: memcompile's code and the options.

        (The Inductor runtime also turns AOTAutograd's cache off, so the passes always run.)
        """
        return get_hash_for_files(_SOURCE_FILES, extra=repr(self.options))


def _flat_inputs(joint_inputs: Sequence[Any]) -> list[Any]:
    flat: list[Any] = []
    for group in joint_inputs:
        flat.extend(group if isinstance(group, (list, tuple)) else [group])
    return flat


def _forward_node_names(joint: fx.GraphModule) -> set[str]:
    """Names of the joint graph's nodes that do not depend on a tangent: the forward."""
    from_tangents: set[fx.Node] = set()
    for node in joint.graph.nodes:
        if (node.op == "placeholder" and "tangents" in node.name) or any(
            a in from_tangents for a in node.all_input_nodes
        ):
            from_tangents.add(node)
    return {n.name for n in joint.graph.nodes if n not in from_tangents and n.op != "output"}


def _policy_reason(node: fx.Node) -> str | None:
    policy = node.meta.get("recompute")
    if policy in (CheckpointPolicy.MUST_RECOMPUTE, CheckpointPolicy.PREFER_RECOMPUTE):
        return f"inside a torch.utils.checkpoint region ({policy.name})"
    if policy in (CheckpointPolicy.MUST_SAVE, CheckpointPolicy.PREFER_SAVE):
        return f"the model's selective checkpoint policy says {policy.name}"
    return None


def _record_split_decisions(
    joint: fx.GraphModule, fw: fx.GraphModule, bw: fx.GraphModule, forward_names: set[str]
) -> None:
    joint_nodes = {n.name: n for n in joint.graph.nodes}
    first_saver: dict[int, str] = {}  # storage -> the saved value whose decision counts its bytes
    for node in bw.graph.find_nodes(op="placeholder"):
        source = joint_nodes.get(node.name)
        val = node.meta.get("val")
        if source is None or source.op == "placeholder" or "tangents" in node.name:
            continue  # inputs and parameters are live anyway: saving them costs nothing
        if not isinstance(val, torch.Tensor):
            continue
        reason = _policy_reason(source) or "needed by the backward; min-cut keeps it saved"
        key = val.untyped_storage()._cdata
        if key in first_saver:
            reason += f" (shares its storage with {first_saver[key]})"
        nbytes = 0 if key in first_saver else tensor_bytes(node)
        first_saver.setdefault(key, node.name)
        record_decision(fw, Decision(PARTITION, "saved", node.name, nbytes, reason))
    for node in bw.graph.nodes:
        if node.op == "call_function" and node.name in forward_names and new_bytes(node) > 0:
            reason = _policy_reason(joint_nodes[node.name]) or (
                "min-cut: cheaper to recompute in the backward than to save"
            )
            record_decision(
                bw, Decision(PARTITION, "recomputed", node.name, new_bytes(node), reason)
            )
