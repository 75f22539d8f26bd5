"""`extern_embedding_backward`: run an embedding's weight gradient as one extern kernel.

Inductor decomposes `embedding_dense_backward` into a zero-filled `(vocabulary, dim)` buffer and
a masked scatter-add of the output gradient into it (`_unsafe_masked_index_put_accumulate`,
masked by `0 <= ids < vocabulary` and `ids != padding_idx`). Its scatter kernel computes the
added values inline, so every input of that value chain (a layer's partial gradients, the
embedding's output, a norm's statistics) stays live while the buffer, often the largest gradient
of a language model, is allocated: on a 4-layer Llama at 512 tokens, 9 MiB at the step's peak
that the remat planner's model of Inductor does not see (research notes in BENCHMARKS.md).

This pass puts the op back as `memcompile::embedding_dense_backward`, which Inductor runs as an
extern kernel: the added values are stored first (one `(tokens, dim)` buffer), their inputs die,
then the kernel allocates the gradient. Same sums (the eager op's), same result. It runs only
for the Inductor runtime, before the planner prices the graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from memcompile.meta import record_note
from memcompile.passes.registry import register_pass

aten = torch.ops.aten
PASS_NAME = "extern_embedding_backward"


@torch.library.custom_op("memcompile::embedding_dense_backward", mutates_args=())
def embedding_dense_backward(grad: torch.Tensor, ids: torch.Tensor, num_weights: int,
                             padding_idx: int) -> torch.Tensor:
    """The embedding weight's gradient (`aten.embedding_dense_backward`, unscaled), as an op
    Inductor cannot decompose."""
    return aten.embedding_dense_backward(grad, ids, num_weights, padding_idx, False)


@embedding_dense_backward.register_fake
def _(grad: torch.Tensor, ids: torch.Tensor, num_weights: int, padding_idx: int) -> torch.Tensor:
    return grad.new_empty((num_weights, grad.shape[-1]))


@register_pass(PASS_NAME, default=True, rank=90, runtimes=("inductor",))  # before plan_remat
def extern_embedding_backward_pass(
    gm: fx.GraphModule, example_inputs: Sequence[Any], *, options: Any = None
) -> fx.GraphModule:
    """Replace each decomposed embedding weight gradient by `memcompile::embedding_dense_backward`
    (in the Inductor runtime's pipeline; asked for under another runtime, it does nothing)."""
    if getattr(options, "runtime", "inductor") != "inductor":
        return gm
    replaced = 0
    for node in list(gm.graph.nodes):
        found = _embedding_backward(node)
        if found is None:
            continue
        values, ids, num_weights, padding_idx = found
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(torch.ops.memcompile.embedding_dense_backward.default,
                                         (values, ids, num_weights, padding_idx))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        replaced += 1
    if replaced:
        gm.graph.eliminate_dead_code()
        gm.recompile()
        record_note(gm, PASS_NAME, f"{replaced} embedding weight gradient(s) run as one extern "
                    "kernel: the scatter's fused value chain no longer holds its inputs while "
                    "the gradient is allocated")
    return gm


def _embedding_backward(node: fx.Node) -> tuple[fx.Node, fx.Node, int, int] | None:
    """(values, ids, vocabulary, padding_idx) when `node` is a decomposed embedding backward:
    a masked scatter-add of `(*ids.shape, dim)` values into a zero `(vocabulary, dim)` buffer,
    masked by nothing but the bounds of `ids` and `ids != padding_idx`."""
    if node.target is not aten._unsafe_masked_index_put_accumulate.default:
        return None
    dest, mask, indices, values = node.args
    if not (isinstance(dest, fx.Node) and dest.target is aten.full.default
            and dest.args[1] == 0 and len(dest.args[0]) == 2 and len(indices) == 1):
        return None
    ids = indices[0]
    num_weights = dest.args[0][0]
    ids_val, values_val = ids.meta.get("val"), values.meta.get("val")
    if not (isinstance(ids_val, torch.Tensor) and isinstance(values_val, torch.Tensor)
            and tuple(values_val.shape) == (*ids_val.shape, dest.args[0][1])):
        return None
    padding_idx = _padding_idx(mask, ids, num_weights)
    return None if padding_idx is None else (values, ids, num_weights, padding_idx)


def _padding_idx(mask: Any, ids: fx.Node, num_weights: int) -> int | None:
    """`p` when `mask` is `ids != p` anded with the bounds checks `ids >= 0`, `ids < vocabulary`
    (any of them, in any order, unsqueezed); -1 with no `!=` term; None for anything else."""
    while isinstance(mask, fx.Node) and mask.target is aten.unsqueeze.default:
        mask = mask.args[0]
    terms, stack = [], [mask]
    while stack:
        term = stack.pop()
        if isinstance(term, fx.Node) and term.target is aten.bitwise_and.Tensor:
            stack.extend(term.args)
        else:
            terms.append(term)
    padding_idx = -1
    for term in terms:
        if not isinstance(term, fx.Node) or term.args[0] is not ids:
            return None
        if term.target is aten.ne.Scalar and padding_idx == -1:
            padding_idx = int(term.args[1])
        elif not ((term.target is aten.ge.Scalar and term.args[1] == 0)
                  or (term.target is aten.lt.Scalar and term.args[1] == num_weights)):
            return None
    return padding_idx
