"""`StreamProgram`: a forward aten graph run with autograd, its stream regions as single
autograd nodes (`StreamLayers`, `StreamHead`, `StreamBatch`), each value freed after its last
use; weights of a `lowrank(..., fused_backward=True)` optimizer are updated inside the backward
(`stream_fused`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.fx as fx

from memcompile.analysis.readers import sole_readers
from memcompile.planning.stream_schedule import Reversal
from memcompile.runtime.stream import ChunkRunner
from memcompile.runtime.stream_compiled import CompiledBodies
from memcompile.runtime.stream_layers import StreamLayers, group_side
from memcompile.runtime.stream_loss import StreamBatch, StreamHead
from memcompile.runtime.stream_fused import StreamUpdates, on_grad, plan_updates
from memcompile.runtime.stream_rebuild import Rebuild, rebuild_chain
from memcompile.runtime.stream_tail import resolve


class StreamProgram:
    """Runs a forward aten graph with autograd; stream regions run as one autograd node each.

    `fused_slots` (graph input index -> slot, `memcompile.optim.fused.slots_of` of the
    compiled function's inputs): the weights whose optimizer updates them inside the backward.
    `compiled`: chunk bodies run as Inductor-compiled segments (`stream_compiled`), not node
    by node in Python.
    """

    def __init__(self, gm: fx.GraphModule, plan: Any,
                 fused_slots: Mapping[int, int] | None = None, *, compiled: bool = False):
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.runners = [ChunkRunner(r, plan) for r in plan.regions]
        if compiled:
            for runner in self.runners:
                runner.bodies = CompiledBodies(runner)
        self.owner: dict[fx.Node, ChunkRunner] = {}
        for runner in self.runners:
            for node in runner.region.nodes:
                self.owner[node] = runner
        # Each run of layers (the plan's) is one autograd node, walked by its reversal; the
        # head and a batch region are one each. A group runs when its last node is reached.
        runner_of = {id(r.region): r for r in self.runners}
        groups: list[tuple[list[ChunkRunner], Reversal | None]] = [
            ([runner_of[id(region)] for region in run], plan.reversal(len(run)))
            for run in plan.runs]
        groups += [([r], None) for r in self.runners if r.region.kind != "layer"]
        self.trigger = {group[-1].region.nodes[-1]: (group, walk) for group, walk in groups}
        self.trigger_of = {r: node for node, (group, _) in self.trigger.items() for r in group}
        # Runs whose first input is cheaper to make again than to hold (`stream_rebuild`).
        # Each maps to the ops that make it and the node its run starts at.
        self.rebuilt: dict[fx.Node, tuple[list[fx.Node], fx.Node]] = {}
        for run in plan.runs:
            chain = rebuild_chain(run[0].input, self.owner, plan.info)
            if chain is not None:
                self.rebuilt[run[0].input] = (chain, self.trigger_of[runner_of[id(run[0])]])
        self.dies_after = self._lifetimes()
        self.updates: StreamUpdates = plan_updates(gm, fused_slots or {}, self.owner)
        self.own = sole_readers(gm, self.owner)

    def _lifetimes(self) -> dict[int, list[fx.Node]]:
        index = {n: i for i, n in enumerate(self.nodes)}
        last: dict[fx.Node, int] = {}
        outputs = {o for r in self.runners for o in r.region.outputs}
        for node in self.nodes:
            if node in self.owner and node not in outputs:
                continue
            uses = []
            for user in node.users:
                runner = self.owner.get(user)
                uses.append(index[self.trigger_of[runner]] if runner else index[user])
            last[node] = max(uses, default=index[node])
        for chain, run_at in self.rebuilt.values():  # what a rebuild reads lives to its run
            for node in chain:
                for read in node.all_input_nodes:
                    if read in last:
                        last[read] = max(last[read], index[run_at])
        dies: dict[int, list[fx.Node]] = {}
        for node, i in last.items():
            if self.nodes[i].op != "output":
                dies.setdefault(i, []).append(node)
        return dies

    def __call__(self, *args: Any) -> Any:
        env: dict[fx.Node, Any] = {}
        inputs = iter(args)
        for i, node in enumerate(self.nodes):
            if node.op == "placeholder":
                env[node] = next(inputs)
                if node in self.updates.on_grad:
                    env[node] = on_grad(env[node], self.updates.on_grad[node])
            elif node.op == "get_attr":  # a constant the trace lifted (an empty KV cache)
                env[node] = _attribute(self.gm, node.target)
            elif node.op == "output":
                return resolve(node.args[0], env)
            elif node in self.trigger:
                self._run_region(*self.trigger[node], env)
            elif node not in self.owner:
                env[node] = node.target(*resolve(node.args, env), **resolve(node.kwargs, env))
            for dead in self.dies_after.get(i, ()):
                env.pop(dead, None)
        raise RuntimeError("stream program: the graph has no output node")

    def _run_region(self, group: list[ChunkRunner], walk: Reversal | None,
                    env: dict[fx.Node, Any]) -> None:
        region, updates = group[0].region, self.updates
        if region.kind == "layer":
            side = [env[n] for n in group_side(group)]
            layer_updates = [updates.of(r.region) for r in group]
            own = [self.own.get(id(r.region), set()) for r in group]
            chain, _ = self.rebuilt.get(region.input, (None, None))
            rebuild = Rebuild(chain, env) if chain is not None else None
            env[group[-1].region.outputs[0]] = StreamLayers.apply(
                group, walk, layer_updates, own, rebuild, env[region.input], *side)
        elif region.kind == "batch":
            outs = StreamBatch.apply(group[0], updates.of(region),
                                     *(env[n] for n in region.side_inputs))
            for node, value in zip(region.outputs, outs):
                env[node] = value
        else:
            runner = group[0]
            side = [env[n] for n in region.side_inputs]
            outs = StreamHead.apply(runner, updates.of(region), env[region.input], *side)
            for node, value in zip(region.outputs, outs):
                env[node] = value


def _attribute(gm: fx.GraphModule, target: str) -> Any:
    """The module attribute a `get_attr` node names (a dotted path)."""
    value: Any = gm
    for name in target.split("."):
        value = getattr(value, name)
    return value
