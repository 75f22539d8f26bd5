"""Facts about a joint forward+backward graph that a rematerialization planner needs.

`JointGraph.read(gm, num_fwd_outputs)` reads, once, everything a plan is built from:

- which nodes the forward computes (ancestors of the forward's outputs), which belong to the
  backward, and which of those depend on a tangent (everything else the backward may compute
  whenever it likes);
- the values the backward reads from the forward directly (`needed`): the candidates to save;
- each node's storages with their bytes, and *storage groups*: forward values that share a
  storage (a view and its base, a tuple and its items) are saved or recomputed together, so a
  storage is never both saved and recomputed;
- what may not be recomputed, and why (the model's MUST_SAVE/PREFER_SAVE policy, random ops
  with a nonzero dropout, mutations, higher-order ops, ops that communicate with other ranks),
  and what the model asked to recompute
  (`torch.utils.checkpoint` regions).

Reading a FakeTensor's storage is slow; doing it once here keeps planning in seconds.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, field
from operator import getitem

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from memcompile.analysis.fusion import aliases as fusion_aliases
from memcompile.analysis.memory import _tensors, concrete, is_tangent, storage_key

_SAVE_POLICIES = (CheckpointPolicy.MUST_SAVE, CheckpointPolicy.PREFER_SAVE)
_RECOMPUTE_POLICIES = (CheckpointPolicy.MUST_RECOMPUTE, CheckpointPolicy.PREFER_RECOMPUTE)
_COMMUNICATING = frozenset({"memcompile::sp_attention", "memcompile::sp_attention_backward"})
"""memcompile's operators that exchange data with other ranks (`distributed.ops`), by name, so
that this analysis need not import torch.distributed."""


def _storages(node: fx.Node) -> tuple[tuple[int, int], ...]:
    """(storage key, storage bytes) of each distinct storage the node's value refers to."""
    seen: dict[int, int] = {}
    for t in _tensors(node.meta.get("val")):
        key = storage_key(t)
        if key not in seen:
            seen[key] = concrete(t.untyped_storage().nbytes())
    return tuple(seen.items())


def recompute_ban(node: fx.Node) -> str | None:
    """Why `node` may not be recomputed in the backward, or None if it may."""
    policy = node.meta.get("recompute")
    if policy in _SAVE_POLICIES:
        return f"the model's checkpoint policy says {policy.name}"
    if "val" not in node.meta:
        return "no FakeTensor metadata"
    target = node.target
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"higher-order operator {target.name()}"
    if not isinstance(target, torch._ops.OpOverload):
        return None if target is getitem else f"not an ATen op ({target})"
    schema = target._schema
    if schema.name in _COMMUNICATING or target.namespace == "_c10d_functional":
        # Also what keeps the distributed attention's forward out of the backward: its
        # backward reads the saved output and log-sum-exp instead.
        return "communicates with other ranks: recomputed on one rank, no peer would answer"
    if schema.is_mutable or any(a.alias_info is not None and a.alias_info.is_write
                                for a in schema.arguments):
        return "mutates an input"
    if torch.Tag.nondeterministic_seeded in target.tags and not _dropout_free(node):
        return "random: recomputing it would draw new numbers"
    return None


def _dropout_free(node: fx.Node) -> bool:
    """Whether a seeded op is deterministic here: attention kernels are tagged random for their
    dropout, and draw nothing when `dropout_p` is 0."""
    schema = node.target._schema
    for index, arg in enumerate(schema.arguments):
        if arg.name == "dropout_p":
            if arg.name in node.kwargs:
                value = node.kwargs[arg.name]
            elif index < len(node.args):
                value = node.args[index]
            else:
                value = arg.default_value
            return isinstance(value, (int, float)) and value == 0
    return False


@dataclass
class JointGraph:
    """What a planner reads off a joint graph (see the module docstring)."""

    gm: fx.GraphModule
    num_fwd_outputs: int
    order: dict[fx.Node, int]
    forward: set[fx.Node]
    """Nodes the forward computes: ancestors of the forward's outputs."""
    backward: list[fx.Node]
    """Nodes only the backward computes, in graph order (tangent-free ones included)."""
    tangent_dependent: set[fx.Node]
    needed: list[fx.Node]
    """Forward values the backward reads directly, in graph order."""
    primals: list[fx.Node]
    tangents: list[fx.Node]
    fwd_outputs: list[fx.Node | None]
    bwd_outputs: list[fx.Node | None]
    storages: dict[fx.Node, tuple[tuple[int, int], ...]]
    external: set[int]
    """Storage keys of the graph's inputs: live before the step, they cost nothing."""
    group_of: dict[fx.Node, int]
    """Forward node -> its storage group (groups are numbered in graph order)."""
    group_members: list[list[fx.Node]]
    banned: dict[fx.Node, str]
    """Forward nodes that may not be recomputed, with the reason."""
    model_recompute: set[fx.Node] = field(default_factory=set)
    """Forward nodes the model asked to recompute (a checkpoint region's policy)."""
    forward_effects: list[fx.Node] = field(default_factory=list)
    """Forward ops that write into a tensor in place and feed no output (a buffer's `copy_`):
    the forward runs them although no output needs them."""

    @classmethod
    def read(cls, gm: fx.GraphModule, num_fwd_outputs: int) -> JointGraph:
        """Read the facts off `gm`, whose first `num_fwd_outputs` outputs are the forward's."""
        nodes = list(gm.graph.nodes)
        order = {n: i for i, n in enumerate(nodes)}
        output = gm.graph.find_nodes(op="output")[0]
        outs = list(output.args[0])
        fwd_outputs, bwd_outputs = outs[:num_fwd_outputs], outs[num_fwd_outputs:]
        placeholders = gm.graph.find_nodes(op="placeholder")
        tangents = [p for p in placeholders if is_tangent(p)]
        primals = [p for p in placeholders if not is_tangent(p)]

        tangent_dependent: set[fx.Node] = set(tangents)
        for node in nodes:
            if node.op != "output" and any(i in tangent_dependent for i in node.all_input_nodes):
                tangent_dependent.add(node)
        # In-place writes into the graph's inputs (a buffer updated in place: AOTAutograd's
        # `copy_` epilogue) feed no output, but the split runs them: they are roots too.
        effects = [n for n in nodes if _mutates(n)]
        forward = _ancestors([*(o for o in fwd_outputs if isinstance(o, fx.Node)),
                              *(n for n in effects if n not in tangent_dependent)], stop=set())
        forward -= set(tangents)
        # A tuple's items belong with it: the backward may only read the items (saving a tuple
        # is not possible), so every getitem on a forward tuple is computed in the forward.
        forward |= {u for n in list(forward) for u in n.users if u.target is getitem}
        bw_all = _ancestors([*(o for o in bwd_outputs if isinstance(o, fx.Node)),
                             *(n for n in effects if n in tangent_dependent)], stop=forward)
        backward = sorted((n for n in bw_all if n not in forward and n.op != "placeholder"),
                          key=order.__getitem__)
        needed = sorted({i for n in backward for i in n.all_input_nodes if i in forward}
                        | {o for o in bwd_outputs if isinstance(o, fx.Node) and o in forward},
                        key=order.__getitem__)

        storages = {n: _storages(n) for n in nodes if n.op != "output"}
        external = {k for p in primals for k, _ in storages[p]}
        group_of, group_members = _storage_groups(
            [n for n in nodes if n in forward and n.op != "placeholder"], storages, external
        )
        banned = {n: why for n in forward if n.op != "placeholder"
                  if (why := recompute_ban(n)) is not None}
        model_recompute = {n for n in forward
                           if n.meta.get("recompute") in _RECOMPUTE_POLICIES}
        return cls(gm, num_fwd_outputs, order, forward, backward, tangent_dependent, needed,
                   primals, tangents, fwd_outputs, bwd_outputs, storages, external, group_of,
                   group_members, banned, model_recompute,
                   [n for n in effects if n in forward])

    @functools.cached_property
    def inputs(self) -> dict[fx.Node, list[fx.Node]]:
        """Each node's input nodes (`Node.all_input_nodes` builds a new list per call)."""
        return {n: n.all_input_nodes for n in self.gm.graph.nodes}

    @functools.cached_property
    def aliases(self) -> frozenset[fx.Node]:
        """Nodes whose values only view their inputs' storages (views, reshapes)."""
        return fusion_aliases(self.gm.graph.nodes, self.storages)

    def is_tensor(self, node: fx.Node) -> bool:
        """Whether the node's value holds tensors (symbolic ints and None do not)."""
        return bool(self.storages.get(node))

    def bytes_of(self, node: fx.Node) -> int:
        """Bytes of the storages a forward value holds that are not the graph's inputs."""
        return sum(b for k, b in self.storages[node] if k not in self.external)

    def group_bytes(self, group: int) -> int:
        """Bytes of a storage group (each storage once)."""
        return self._group_bytes[group]

    @functools.cached_property
    def _group_bytes(self) -> list[int]:
        # Read once: the planner asks for every candidate at every step of its chain.
        return [sum({k: b for n in members for k, b in self.storages[n]
                     if k not in self.external}.values())
                for members in self.group_members]

    def group_banned(self, group: int) -> str | None:
        """Why a group may not be recomputed (the first banned member's reason), or None."""
        for n in self.group_members[group]:
            if n in self.banned:
                return f"{n.name}: {self.banned[n]}"
        return None


def _mutates(node: fx.Node) -> bool:
    """An op that writes into one of its inputs and that nothing reads (its only purpose)."""
    target = node.target
    return (node.op == "call_function" and not node.users
            and isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable)


def _ancestors(roots: Iterable[fx.Node], stop: set[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [r for r in roots if r not in stop]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(i for i in node.all_input_nodes if i not in seen and i not in stop)
    return seen


def _storage_groups(
    nodes: list[fx.Node], storages: dict[fx.Node, tuple[tuple[int, int], ...]], external: set[int]
) -> tuple[dict[fx.Node, int], list[list[fx.Node]]]:
    """Group forward nodes that share a storage (not counting the graph's inputs' storages)."""
    parent: dict[fx.Node, fx.Node] = {n: n for n in nodes}

    def find(n: fx.Node) -> fx.Node:
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    owner: dict[int, fx.Node] = {}
    for node in nodes:
        for key, _ in storages[node]:
            if key in external:
                continue
            if key in owner:
                parent[find(node)] = find(owner[key])
            else:
                owner[key] = node
        if node.target is getitem and isinstance(node.args[0], fx.Node) \
                and node.args[0] in parent:
            parent[find(node)] = find(node.args[0])
    index: dict[fx.Node, int] = {}
    members: list[list[fx.Node]] = []
    group_of: dict[fx.Node, int] = {}
    for node in nodes:
        root = find(node)
        if root not in index:
            index[root] = len(members)
            members.append([])
        group_of[node] = index[root]
        members[index[root]].append(node)
    return group_of, members
