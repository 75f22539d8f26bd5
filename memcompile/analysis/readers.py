"""Which regions read a graph input: a weight one region alone reads has complete gradients as
soon as that region's backward is done (`runtime.stream_accumulate` delivers them then)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch.fx as fx


def readers(node: fx.Node, owner: Mapping[fx.Node, Any]) -> tuple[dict[int, Any], list[fx.Node]]:
    """The regions reading `node` (id -> region) and its readers outside every region; `owner`
    maps a node to the runner of the region holding it."""
    regions = {id(owner[u].region): owner[u].region for u in node.users if u in owner}
    return regions, [u for u in node.users if u not in owner]


def sole_readers(gm: fx.GraphModule, owner: Mapping[fx.Node, Any]) -> dict[int, set[fx.Node]]:
    """id(region) -> the graph inputs that region alone reads (its weights' gradients are
    complete when its backward is done)."""
    return sole_readers_of(gm.graph.find_nodes(op="placeholder"), owner)


def sole_readers_of(inputs: Sequence[fx.Node], owner: Mapping[fx.Node, Any]
                    ) -> dict[int, set[fx.Node]]:
    """`sole_readers` among the graph inputs `inputs`."""
    own: dict[int, set[fx.Node]] = {}
    for node in inputs:
        regions, outside = readers(node, owner)
        if len(regions) == 1 and not outside:
            own.setdefault(next(iter(regions)), set()).add(node)
    return own
