"""`StreamProgram`: a forward aten graph run with autograd, its stream regions as single
autograd nodes (`StreamLayers`, `StreamHead`, `StreamBatch`), each value freed after its last
use."""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from memcompile.passes.stream_schedule import Reversal
from memcompile.runtime.stream import ChunkRunner
from memcompile.runtime.stream_layers import StreamLayers, group_side
from memcompile.runtime.stream_loss import StreamBatch, StreamHead
from memcompile.runtime.stream_tail import resolve


def _groups(runners: list[ChunkRunner]) -> list[list[ChunkRunner]]:
    """Runs of layers, each following the previous one directly; the head alone."""
    groups: list[list[ChunkRunner]] = []
    for runner in runners:
        last = groups[-1] if groups else None
        if (runner.region.kind == "layer" and last and last[-1].region.kind == "layer"
                and runner.region.input is last[-1].region.outputs[0]):
            last.append(runner)
        else:
            groups.append([runner])
    return groups


class StreamProgram:
    """Runs a forward aten graph with autograd; stream regions run as one autograd node each."""

    def __init__(self, gm: fx.GraphModule, plan: Any):
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.runners = [ChunkRunner(r, plan) for r in plan.regions]
        self.owner: dict[fx.Node, ChunkRunner] = {}
        for runner in self.runners:
            for node in runner.region.nodes:
                self.owner[node] = runner
        self.trigger: dict[fx.Node, list[ChunkRunner]] = {}
        self.reversals: dict[int, Reversal] = {}
        for group in _groups(self.runners):
            self.trigger[group[-1].region.nodes[-1]] = group
            if group[0].region.kind == "layer":
                self.reversals[id(group[0])] = plan.reversal(len(group))
        self.trigger_of = {r: node for node, group in self.trigger.items() for r in group}
        self.dies_after = self._lifetimes()

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
            elif node.op == "output":
                return resolve(node.args[0], env)
            elif node in self.trigger:
                self._run_region(self.trigger[node], env)
            elif node not in self.owner:
                env[node] = node.target(*resolve(node.args, env), **resolve(node.kwargs, env))
            for dead in self.dies_after.get(i, ()):
                env.pop(dead, None)
        raise RuntimeError("stream program: the graph has no output node")

    def _run_region(self, group: list[ChunkRunner], env: dict[fx.Node, Any]) -> None:
        region = group[0].region
        if region.kind == "layer":
            side = [env[n] for n in group_side(group)]
            env[group[-1].region.outputs[0]] = StreamLayers.apply(
                group, self.reversals[id(group[0])], env[region.input], *side)
        elif region.kind == "batch":
            outs = StreamBatch.apply(group[0], *(env[n] for n in region.side_inputs))
            for node, value in zip(region.outputs, outs):
                env[node] = value
        else:
            runner = group[0]
            side = [env[n] for n in region.side_inputs]
            outs = StreamHead.apply(runner, env[region.input], *side)
            for node, value in zip(region.outputs, outs):
                env[node] = value
