"""A run's first layer input rebuilt in the backward from the token ids, instead of held.

The first layer of a language model reads the embedding of the token ids (scaled, in Gemma):
a hidden state per token, 4 KiB in float32 at hidden size 1,024, made from 8 bytes of ids and a
weight the step holds anyway. Holding it through the backward costs as much as any other layer
input; gathering it again costs one lookup. So when the ops that make a run's input are few,
deterministic, and read nothing sequence-long but integer tensors much smaller than the input,
the run keeps those ops and their inputs instead of the value, and re-runs them when its
backward reaches the first layer (or re-runs a layer forward from it). The values are the same
bits: the same ops on the same inputs, and the weights do not change before the backward has
returned the input's gradient (a fused optimizer update of the embedding waits for it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx

from memcompile.runtime.stream_tail import resolve

MAX_REBUILD_OPS = 16
"""More ops than this to make the input: not a lookup any more; hold the value."""

REBUILD_BYTES_RATIO = 16
"""The sequence-long inputs the ops read must be this many times smaller than the value."""


def rebuild_chain(input_node: fx.Node, in_region: Mapping[fx.Node, Any], info: Any
                  ) -> list[fx.Node] | None:
    """The ops that make `input_node` from the graph's inputs, in graph order, if re-running
    them in the backward is cheaper than holding their result (the module docstring says
    when); None otherwise. `in_region`: nodes that regions compute (never re-run here); `info`:
    the graph's sequence analysis."""
    chain: set[fx.Node] = set()
    leaves: set[fx.Node] = set()
    todo = [input_node]
    while todo:
        node = todo.pop()
        if node in chain or node in leaves:
            continue
        if node.op in ("placeholder", "get_attr"):
            leaves.add(node)
            continue
        if node.op != "call_function" or node in in_region or not _pure(node.target):
            return None
        chain.add(node)
        if len(chain) > MAX_REBUILD_OPS:
            return None
        todo.extend(node.all_input_nodes)
    read = 0
    for leaf in leaves:
        val = leaf.meta.get("val")
        if info.dim_of(leaf) is None or not isinstance(val, torch.Tensor):
            continue  # a weight or a constant: held by the step anyway
        if val.is_floating_point() or val.is_complex():
            return None  # a float input along the sequence: no cheaper than the value
        read += val.numel() * val.element_size()
    made = input_node.meta.get("val")
    if not isinstance(made, torch.Tensor) or read * REBUILD_BYTES_RATIO > _bytes(made):
        return None
    order = {n: i for i, n in enumerate(input_node.graph.nodes)}
    return sorted(chain, key=order.__getitem__)


class Rebuild:
    """The first input of a run, made again on demand from what `chain` reads (captured from
    the program's values when the run's forward ran)."""

    def __init__(self, chain: list[fx.Node], env: Mapping[fx.Node, Any]):
        self.chain = chain
        inside = set(chain)
        self.leaves = {n: env[n] for node in chain for n in node.all_input_nodes
                       if n not in inside}

    def __call__(self) -> torch.Tensor:
        values = dict(self.leaves)
        with torch.no_grad():
            for node in self.chain:
                values[node] = node.target(*resolve(node.args, values),
                                           **resolve(node.kwargs, values))
        return values[self.chain[-1]]


def held(x: torch.Tensor | Rebuild) -> torch.Tensor:
    """A layer input: the held tensor, or the rebuilt one."""
    return x() if isinstance(x, Rebuild) else x


def _pure(target: Any) -> bool:
    """An op that returns the same values for the same inputs and changes none of them."""
    if not isinstance(target, torch._ops.OpOverload):
        return getattr(target, "__module__", None) == "_operator"  # getitem and arithmetic on Python numbers
    return (not target._schema.is_mutable
            and torch.Tag.nondeterministic_seeded not in target.tags)


def _bytes(val: torch.Tensor) -> int:
    return val.numel() * val.element_size()
