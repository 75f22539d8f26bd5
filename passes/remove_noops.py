"""`remove_noops_pass`: drop ops whose result is their input, unchanged (value and layout).

The joint graph carries identities left over from tracing: `alias`, `detach` (gradients are
already explicit in a joint graph), and views, expands and reshapes to the shape and strides the
input already has. Each costs a Python dispatch in the eager runtime and clutters the report.
A node that is itself a graph output is kept: AOTAutograd fixed the graph's output aliasing
before the passes ran, and replacing an output by its input could change it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from memcompile.passes.registry import register_pass

aten = torch.ops.aten
_ALWAYS_IDENTITY = {aten.alias.default, aten.detach.default}
_SHAPE_OPS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default,
              aten.expand.default}


def _is_identity(node: fx.Node) -> bool:
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.target in _ALWAYS_IDENTITY:
        return True
    if node.target not in _SHAPE_OPS:
        return False
    out, inp = node.meta.get("val"), node.args[0].meta.get("val")
    if not isinstance(out, torch.Tensor) or not isinstance(inp, torch.Tensor):
        return False
    # Only what is provably equal: with dynamic shapes a plain `==` on SymInts would install a
    # guard (and specialize the length) just to decide whether to drop a view.
    same = statically_known_true
    return (
        out.dtype == inp.dtype
        and len(out.shape) == len(inp.shape)
        and all(same(a == b) for a, b in zip(out.shape, inp.shape))
        and all(same(a == b) for a, b in zip(out.stride(), inp.stride()))
        and same(out.storage_offset() == inp.storage_offset())
    )


@register_pass("remove_noops", default=True)
def remove_noops_pass(
    gm: fx.GraphModule, example_inputs: Sequence[Any], *, options: Any = None
) -> fx.GraphModule:
    """Replace every identity op by its input and erase it; graph outputs are kept as they are."""
    outputs = set(gm.graph.find_nodes(op="output")[0].all_input_nodes)
    for node in list(gm.graph.nodes):
        if node not in outputs and _is_identity(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.recompile()
    return gm
