"""Evaluating a region's values outside its chunks: its input-only values, and the tail
computed from the chunks' results."""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from memcompile.runtime.document_mask import evaluate_input_only
from memcompile.runtime.stream import ChunkRunner


def fill_whole(runner: ChunkRunner, whole: dict[fx.Node, Any]) -> None:
    """Compute the region's input-only values (they never depend on activations); a document
    mask is kept as its ids (`document_mask.DocumentIds`)."""
    for node in runner.region.nodes:
        if node not in runner.activations and node not in whole:
            whole[node] = evaluate_input_only(node, resolve(node.args, whole),
                                              resolve(node.kwargs, whole))


def resolve(value: Any, env: dict[fx.Node, Any]) -> Any:
    """`value` (an op's args) with its nodes replaced by their values in `env`."""
    return fx.node.map_aggregate(value, lambda a: env[a] if isinstance(a, fx.Node) else a)


def run_tail(runner: ChunkRunner, reduced: dict[fx.Node, Any], whole: dict[fx.Node, Any]
             ) -> list[Any]:
    """The region's outputs from its chunks' results (`reduced`: reductions or boundary
    values, and a head's returned sequence values if filled) and its whole values, running the
    tail's ops once; a returned sequence value not given is None."""
    env = {**whole, **reduced}
    for node in runner.region.nodes:
        if node in runner.region.tail:
            env[node] = node.target(*resolve(node.args, env), **resolve(node.kwargs, env))
    returned = runner.region.sequence_outputs
    return [env.get(o) if o in returned else env[o] for o in runner.region.outputs]
