"""Which values of a graph Inductor computes inside a consumer's kernel and never stores.

Inductor lowers pointwise ops, views and index gathers to expressions that are inlined into the
kernels of the ops that read them: `silu(gate) * up` is one kernel and one buffer, not two, and
the chain `x - amax(x)`, `exp`, `sum`, `log` of a log-softmax leaves buffers only for the
reductions and for what the graph returns. Extern kernels (matmuls, attention, anything Inductor
falls back on) read materialized buffers, so their inputs are stored.

`unmaterialized(order, returned, storages)` applies that rule to one graph: a value is never
stored when its op inlines, the graph does not return it, and every op of the graph that reads
it inlines it in turn. The memory simulator (`analysis.schedule`) then counts such a value as an
alias of its inputs: it holds no bytes of its own and keeps its inputs alive until its last
reader runs, which is when a fused kernel really reads them.

This is a model, not Inductor: Inductor may still store a value it judges too costly to inline
into several readers, and its kernels' scratch (packed matmul operands, attention workspaces)
is invisible here. The bench reports the allocator's peak beside the plan for that reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.fx as fx

aten = torch.ops.aten
prims = torch.ops.prims

# Ops Inductor lowers to an inlinable expression although torch does not tag them pointwise:
# dtype casts, constant fills and index gathers (read through an indirect load).
_INLINED = frozenset({
    aten._to_copy.default, aten.full.default, aten.scalar_tensor.default, aten.zeros.default,
    aten.ones.default, aten.embedding.default, aten.index.Tensor, aten.gather.default,
    prims.iota.default,
})


# Scatters Inductor lowers to a write into a copy of their first input, which becomes the output:
# when that input dies here (a fresh `zeros`, say), the copy is elided and its buffer reused.
_SCATTERS = frozenset({
    aten.index_put.default, aten._unsafe_index_put.default,
    aten._unsafe_masked_index_put_accumulate.default, aten.scatter.src, aten.scatter.value,
    aten.scatter_add.default, aten.scatter_reduce.two, aten.index_add.default,
    aten.select_scatter.default, aten.slice_scatter.default,
})


_KINDS: dict[int, tuple[object, tuple[bool, bool, bool]]] = {}
"""Op kinds by the op's id (an OpOverload hashes in Python; a planner asks millions of times);
the op is kept beside its kind so its id is never reused."""


def _op_kind(target: object) -> tuple[bool, bool, bool]:
    """(inlines, absorbs inputs, writes into its first input) of an op (`kinds`)."""
    found = _KINDS.get(id(target))
    if found is None:
        tags = target.tags if isinstance(target, torch._ops.OpOverload) else ()
        inlined = target in _INLINED or torch.Tag.pointwise in tags
        found = _KINDS[id(target)] = (
            target, (inlined, inlined or torch.Tag.reduction in tags, target in _SCATTERS))
    return found[1]


def is_alias(node: fx.Node, storages: Mapping[fx.Node, tuple[tuple[int, int], ...]]) -> bool:
    """Whether `node`'s value only views storages its inputs own (a view, a reshape)."""
    own = {key for key, _ in storages.get(node, ())}
    if not own or node.op != "call_function":
        return False
    inherited = {key for i in node.all_input_nodes for key, _ in storages.get(i, ())}
    return own <= inherited


def aliases(nodes: Iterable[fx.Node],
            storages: Mapping[fx.Node, tuple[tuple[int, int], ...]]) -> frozenset[fx.Node]:
    """The nodes among `nodes` that only view their inputs' storages (`is_alias`)."""
    return frozenset(n for n in nodes if is_alias(n, storages))


def kinds(nodes: Iterable[fx.Node]) -> dict[fx.Node, tuple[bool, bool, bool]]:
    """Per node, whether Inductor

    - inlines it: turns its op into an expression a consumer's kernel computes (pointwise ops,
      casts, fills, index gathers);
    - absorbs its inputs: its kernel can compute an inlinable input itself instead of loading
      it (pointwise ops and reductions; extern kernels such as matmul and attention cannot);
    - writes it into (a copy of) its first input (a scatter).
    """
    return {n: _op_kind(n.target) if n.op == "call_function" else (False, False, False)
            for n in nodes}


def unmaterialized(
    order: Iterable[fx.Node],
    returned: set[fx.Node],
    storages: Mapping[fx.Node, tuple[tuple[int, int], ...]],
    alias_nodes: frozenset[fx.Node] | None = None,
    node_kinds: Mapping[fx.Node, tuple[bool, bool, bool]] | None = None,
) -> set[fx.Node]:
    """The nodes of one graph (`order`, topological) whose values Inductor never stores.

    A node qualifies when its op inlines (or it is an alias of its inputs), the graph does not
    return it, and each of its readers in this graph absorbs it: a pointwise op or reduction, an
    alias that itself qualifies, or a scatter reading it as anything but its destination (its
    added values are computed inside the scatter's kernel; the destination is a real buffer). Readers outside `order` (the other graph) are not this
    graph's concern: a value the other graph reads is in `returned` when it is handed over.
    """
    order = list(order)
    members = set(order)
    if alias_nodes is None:
        alias_nodes = aliases(order, storages)
    if node_kinds is None:
        node_kinds = kinds(order)
    fused: set[fx.Node] = set()
    for node in reversed(order):  # readers come later, so they are decided first
        if node in returned or not (node_kinds[node][0] or node in alias_nodes):
            continue
        readers = [u for u in node.users if u in members]
        if readers and all(u in fused or (u not in alias_nodes and (
                node_kinds[u][1] or (node_kinds[u][2] and u.args[0] is not node)))
                for u in readers):
            fused.add(node)
    return fused
