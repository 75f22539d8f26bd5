"""How Inductor turns a graph into kernels: which values it never stores, and the order its
kernels run in.

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

Inductor still stores some of those values, by its own rules (`should_realize_on_reuse` and
`has_exceeded_max_reads` in `torch/_inductor/ir.py`), and so does this model: a value read by
several kernels is stored when its expression holds an expensive op (exp, log, sigmoid, tanh: on
CPU only) or loads more than 4 buffers; any value is stored when its expression loads more than
12 buffers (8 on GPU) or grows past Inductor's op count. `silu(gate)` read by both the SwiGLU
product and its backward is a stored buffer on CPU, not two inlined copies of a sigmoid. Such a
value still costs nothing when its readers end up in one kernel (nothing extern runs between
them): a buffer read only inside one kernel is a local of that kernel.

`kernel_order(order, kinds)` is the order Inductor's scheduler runs the graph in: an op inlined
into a reader runs with that reader (a copy of it in every kernel that reads it), and kernels of
one size that read a common buffer fuse into one, which pulls ahead what the later one needs
(in a SwiGLU backward, the matmul giving the product's gradient runs before the kernel
recomputing the product, which then writes all three
outputs at once). The simulator runs the ops between two extern kernels as one kernel: its
outputs are allocated together before it runs, its inputs freed after.

Against the allocator on `small` at 1,024 tokens, the model's peak equals the measured one on
the six plans the bench draws from memcompile's chain (budgets 1.0 to 0.6 and `auto`); without
the kernel order it is 4 MiB low on four of them. On Hugging Face Llama and Qwen2 at 512
tokens it equals the measured peak at `auto`, 0.9 and 1.0; before inlined ops were copied into
each reading kernel and reductions joined readers through views, it was 1.3-2.0 MiB low there
(Inductor fuses the first norm's backward with its output's recomputation, ahead of the q, k
and v weight-gradient matmuls). Before the stored SwiGLU values were modelled,
`auto` chose a plan that measured 215.7 MiB against 195.6 planned: its real peak was in an MLP
backward the model thought cheaper. It is a model, not Inductor: its kernels' scratch (packed
matmul operands, attention workspaces) and the reordering Inductor does for peak memory are
invisible here. The bench reports the allocator's peak beside the plan for that reason.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping
from typing import NamedTuple

import logging

import torch
import torch.fx as fx

from memcompile.analysis.memory import concrete

log = logging.getLogger(__name__)

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


# Ops whose Inductor expression holds an op it calls heavy (`should_realize_on_reuse`): on CPU
# such a value is computed once and stored when several kernels read it.
_HEAVY = frozenset({
    aten.exp.default, aten.log.default, aten.log10.default, aten.log1p.default,
    aten.log2.default, aten.sigmoid.default, aten.tanh.default, aten.silu.default,
    aten.silu_backward.default, aten.softplus.default, aten.mish.default,
})

# Inductor's thresholds (`torch/_inductor/config.py`): a value read by several kernels is stored
# past this many buffer loads; any value past the second number (on CPU, elsewhere); and past
# this many ops in its expression (on CPU, elsewhere).
_REUSED_READS = 4
_MAX_READS = (12, 8)
_MAX_OPS = (50, 30)


class OpKind(NamedTuple):
    """How Inductor lowers one node (`kinds`)."""

    inlines: bool
    """Its op turns into an expression a consumer's kernel computes (pointwise ops, casts,
    fills, index gathers)."""
    absorbs: bool
    """Its kernel can compute an inlinable input itself instead of loading it (pointwise ops
    and reductions; extern kernels such as matmul and attention cannot)."""
    scatter: bool
    """It writes into (a copy of) its first input."""
    heavy: bool
    """Its op is one Inductor will not compute twice on this device (`_HEAVY`)."""
    on_cpu: bool
    """Its value lives on the CPU, where Inductor's thresholds differ."""
    numel: int = -1
    """Elements of its value (-1: not one tensor): kernels of one size fuse side by side."""
    nbytes: int = 0
    """Bytes of its value."""
    generated: bool = False
    """Whether Inductor computes it in a kernel it generates (not an extern kernel): it
    inlines, absorbs or scatters."""


_KINDS: dict[int, tuple[object, tuple[bool, bool, bool, bool]]] = {}
"""Op kinds by the op's id (an OpOverload hashes in Python; a planner asks millions of times);
the op is kept beside its kind so its id is never reused."""


def _op_kind(target: object) -> tuple[bool, bool, bool, bool]:
    """(inlines, absorbs inputs, writes into its first input, heavy anywhere) of an op."""
    found = _KINDS.get(id(target))
    if found is None:
        tags = target.tags if isinstance(target, torch._ops.OpOverload) else ()
        inlined = target in _INLINED or torch.Tag.pointwise in tags
        found = _KINDS[id(target)] = (
            target, (inlined, inlined or torch.Tag.reduction in tags, target in _SCATTERS,
                     target in _HEAVY))
    return found[1]


def _value_facts(node: fx.Node) -> tuple[bool, int, int]:
    """(on the CPU, elements, bytes) of a node's value."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return True, -1, 0
    numel = concrete(val.numel())  # a hint: int() on a symbolic size would add a guard
    return val.device.type == "cpu", numel, numel * val.element_size()


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


def kinds(nodes: Iterable[fx.Node]) -> dict[fx.Node, OpKind]:
    """Per node, how Inductor lowers it (`OpKind`)."""
    found = {}
    for n in nodes:
        on_cpu, numel, nbytes = _value_facts(n)
        if n.op != "call_function":
            found[n] = OpKind(False, False, False, False, on_cpu, numel, nbytes)
            continue
        inlines, absorbs, scatter, heavy = _op_kind(n.target)
        found[n] = OpKind(inlines, absorbs, scatter, heavy and on_cpu, on_cpu, numel, nbytes,
                          inlines or absorbs or scatter)
    return found


def unmaterialized(
    order: Iterable[fx.Node],
    returned: set[fx.Node],
    storages: Mapping[fx.Node, tuple[tuple[int, int], ...]],
    alias_nodes: frozenset[fx.Node] | None = None,
    node_kinds: Mapping[fx.Node, OpKind] | None = None,
) -> set[fx.Node]:
    """The nodes of one graph (`order`, topological) whose values Inductor never stores.

    A node qualifies when its op inlines (or it is an alias of its inputs), the graph does not
    return it, and each of its readers in this graph absorbs it: a pointwise op or reduction, an
    alias that itself qualifies, or a scatter reading it as anything but its destination (its
    added values are computed inside the scatter's kernel; the destination is a real buffer).
    Readers outside `order` (the other graph) are not this graph's concern: a value the other
    graph reads is in `returned` when it is handed over. Of those, the values Inductor's
    realization rules store anyway (module docstring) are then taken out.
    """
    order = list(order)
    members = set(order)
    if alias_nodes is None:
        alias_nodes = aliases(order, storages)
    if node_kinds is None:
        node_kinds = kinds(order)
    fused: set[fx.Node] = set()
    reused: set[fx.Node] = set()  # read by several kernels, directly or through aliases
    for node in reversed(order):  # readers come later, so they are decided first
        if node in returned or not (node_kinds[node].inlines or node in alias_nodes):
            continue
        readers = [u for u in node.users if u in members]
        if readers and all(u in fused or (u not in alias_nodes and (
                node_kinds[u].absorbs or (node_kinds[u].scatter and u.args[0] is not node)))
                for u in readers):
            fused.add(node)
            if len(readers) > 1 or any(u in reused for u in readers if u in alias_nodes):
                reused.add(node)
    return fused - _realized(order, fused, reused, alias_nodes, node_kinds)


def _realized(order: list[fx.Node], fused: set[fx.Node], reused: set[fx.Node],
              alias_nodes: frozenset[fx.Node], node_kinds: Mapping[fx.Node, OpKind]
              ) -> set[fx.Node]:
    """The nodes of `fused` Inductor stores all the same, by the size and cost of the expression
    it would inline (module docstring). An alias's own readers count toward its base's reuse,
    as Inductor's `mark_reuse` on a view reaches the buffer under it.

    A value realized that way is still no buffer when its readers run back to back, with no
    extern kernel between them: Inductor's scheduler fuses them into one kernel with it, and a
    buffer read only inside one kernel becomes a local of that kernel. So only values whose
    readers are split by an extern kernel are stored."""
    position = {n: i for i, n in enumerate(order)}
    externs_before = [0]  # extern kernels among order[:i]
    for n in order:
        extern = n.op == "call_function" and not node_kinds[n].generated and (
            n not in alias_nodes)
        externs_before.append(externs_before[-1] + extern)

    def split_by_extern(node: fx.Node) -> bool:
        spots = [position[r] for r in _kernel_readers(node, fused, alias_nodes, position)]
        return bool(spots) and externs_before[max(spots)] > externs_before[min(spots) + 1]

    stored: set[fx.Node] = set()
    # Per inlined value: the buffers its expression loads and the inlined nodes it computes.
    loads: dict[fx.Node, frozenset[fx.Node]] = {}
    computes: dict[fx.Node, frozenset[fx.Node]] = {}
    heavy: dict[fx.Node, bool] = {}
    for node in order:
        if node not in fused:
            continue
        kind = node_kinds[node]
        reads: set[fx.Node] = set()
        inner = {node}
        is_heavy = kind.heavy
        for i in node.all_input_nodes:
            if i in loads:
                reads |= loads[i]
                inner |= computes[i]
                is_heavy = is_heavy or heavy[i]
            else:
                reads.add(i)
        if node not in alias_nodes:
            max_reads, max_ops = (_MAX_READS[0], _MAX_OPS[0]) if kind.on_cpu else (
                _MAX_READS[1], _MAX_OPS[1])
            ops = len(inner) + len(reads)
            realize = len(reads) > max_reads or ops > max_ops or (node in reused and (
                is_heavy or len(reads) > _REUSED_READS))
            if realize and split_by_extern(node):
                stored.add(node)
                continue
        loads[node] = frozenset(reads)
        computes[node] = frozenset(inner)
        heavy[node] = is_heavy
    return stored


def _kernel_readers(node: fx.Node, fused: set[fx.Node], alias_nodes: frozenset[fx.Node],
                    members: Container[fx.Node]) -> list[fx.Node]:
    """The readers of `node` in this graph that are kernels, looking through inlined aliases."""
    found = []
    for user in node.users:
        if user not in members:
            continue
        if user in alias_nodes and user in fused:
            found.extend(_kernel_readers(user, fused, alias_nodes, members))
        else:
            found.append(user)
    return found


_FUSION_WINDOW = 64  # kernels apart at most for two to fuse (Inductor tries 64 pairs per buffer)
_SHARED_BYTES = 10  # and only kernels that share at least this many bytes of reads


def kernel_order(order: list[fx.Node], node_kinds: Mapping[fx.Node, OpKind],
                 alias_nodes: frozenset[fx.Node] = frozenset(),
                 inputs: Mapping[fx.Node, list[fx.Node]] | None = None) -> list[fx.Node]:
    """`order` as Inductor's scheduler runs it, after it fuses generated kernels:

    - vertically: an inlined op runs in its first reader's kernel when only generated kernels
      read it, and so does a reduction whose readers loop over what it reduces; views count as
      index expressions of the kernels that read them, so a reduction read through `expand`
      joins its reader. An inlined op is copied into every kernel that reads it, so those
      kernels wait on what it reads, not on the kernel it was first placed with (it runs
      right before its first reader in the final order);
    - horizontally: two kernels of the same size that read a common buffer and do not depend
      on each other run as one, where the earlier stood; what the later one needs runs first
      (Inductor's topological sort after fusion). In a SwiGLU backward this pulls the matmul
      that computes the gradient of the product ahead of the kernel recomputing the product,
      which then also computes both gradients.

    Extern ops and views stay where the graph put them unless a fused kernel needs them
    earlier. A fusion that would make two kernels wait on each other is not made. `inputs`:
    each node's input nodes (`JointGraph.inputs`), if the caller has them.
    """
    index = {n: i for i, n in enumerate(order)}
    if inputs is None:
        inputs = {n: n.all_input_nodes for n in order}
    loads = inputs  # what each node loads, the graph's inputs and saved values included
    inputs = {n: [i for i in inputs[n] if i in index] for n in order}  # this graph's only

    generated = {n for n in order if node_kinds[n].generated} - alias_nodes
    anchor: dict[fx.Node, fx.Node] = {}

    def joins_readers(node: fx.Node, readers: list[fx.Node]) -> bool:
        """Whether `node` runs in its readers' kernel: an inlined op always; a reduction only
        when the kernels reading it loop over what it reduces (a softmax's sum, a norm's mean
        with the ops over the row), not over its result alone (a loss's sum with the scalar
        add after it: Inductor runs that sum right after the matmul it reads)."""
        if not all(u in joining for u in readers):
            return False
        if node in alias_nodes or node_kinds[node].inlines:
            return True  # a view is an index expression in each kernel that reads it
        reduced = max((node_kinds[i].numel for i in loads[node]), default=-1)
        return all(node_kinds[anchor[u]].numel == reduced for u in readers)

    joined_views: set[fx.Node] = set()  # views only kernels read: they run with the first
    joining = set(generated)  # what a joining op's readers must be: generated or joined views
    for node in reversed(order):
        anchor[node] = node
        if node not in generated and node not in alias_nodes and not node_kinds[node].inlines:
            continue  # an extern op (or a getitem) stays its own unit
        readers = [u for u in node.users if u in index]
        if readers and joins_readers(node, readers):
            anchor[node] = anchor[min(readers, key=lambda u: index[anchor[u]])]
            if node in alias_nodes:
                joined_views.add(node)
                joining.add(node)
    members: dict[fx.Node, list[fx.Node]] = {}
    for node in order:
        members.setdefault(anchor[node], []).append(node)
    kernels = [n for n in order if anchor[n] is n and n in generated]
    unit = dict(anchor)  # each node's fused kernel, named by one node
    # An inlined op (or view) is computed inside every kernel that reads it (Inductor copies
    # the expression), so a kernel reading it loads, and waits on, what the op reads: not the
    # kernel it was first placed with.
    copied = {n for n in order if anchor[n] is not n
              and (node_kinds[n].inlines or n in joined_views)}
    behind = _behind(order, copied, inputs)
    readers = {u for d in behind for u in d.users if u in index}
    needs, reads = _through(inputs, behind, readers), _through(loads, behind, readers)
    roots = _fuse_siblings(kernels, members, unit, index, needs, reads, node_kinds, alias_nodes)
    fused = _topological(order, unit, index, needs, roots)
    if fused is None:  # the sibling fusions made a cycle: keep the inlining only
        log.debug("kernel_order: fusing kernels side by side made a cycle; not fused")
        return sorted(order, key=lambda n: (index[anchor[n]], index[n]))
    return _copied_first(fused, copied, inputs, readers) if copied else fused


def _behind(order: list[fx.Node], copied: set[fx.Node],
            inputs: Mapping[fx.Node, list[fx.Node]]) -> dict[fx.Node, list[fx.Node]]:
    """Each `copied` op's inputs, looking through copied inputs in turn."""
    behind: dict[fx.Node, list[fx.Node]] = {}
    for node in order:
        if node in copied:
            behind[node] = _expanded(inputs[node], behind)
    return behind


def _expanded(edges: list[fx.Node], behind: dict[fx.Node, list[fx.Node]]) -> list[fx.Node]:
    """`edges` with each copied op replaced by what it reads, without repeats."""
    found: list[fx.Node] = []
    for i in edges:
        through = behind.get(i)
        if through is None:
            found.append(i)
        else:
            found.extend(through)
    return list(dict.fromkeys(found)) if len(found) > 1 else found


def _through(edges: Mapping[fx.Node, list[fx.Node]], behind: dict[fx.Node, list[fx.Node]],
             readers: Iterable[fx.Node]) -> Mapping[fx.Node, list[fx.Node]]:
    """`edges` (each node's inputs or loads) with every copied op replaced by what it reads
    (`_behind`); only the copied ops' `readers` change."""
    if not behind:
        return edges
    result = dict(edges)
    for node in readers:
        result[node] = _expanded(edges[node], behind)
    return result


def _copied_first(order: list[fx.Node], copied: set[fx.Node],
                  inputs: Mapping[fx.Node, list[fx.Node]], readers: set[fx.Node]
                  ) -> list[fx.Node]:
    """`order` with each copied op moved right before the first op that reads it (its
    kernel's order may have put a later reader first); its inputs ran before that reader.
    `readers`: the ops that read a copied op."""
    result: list[fx.Node] = []
    placed: set[fx.Node] = set()
    for node in order:
        if node in placed:
            continue
        if node not in readers or not any(i in copied and i not in placed for i in inputs[node]):
            placed.add(node)  # the common case: nothing copied is waiting to run
            result.append(node)
            continue
        stack = [(node, False)]
        while stack:
            n, ready = stack.pop()
            if n in placed:
                continue
            if ready:
                placed.add(n)
                result.append(n)
                continue
            stack.append((n, True))
            stack.extend((i, False) for i in inputs[n] if i in copied and i not in placed)
    return result


def _fuse_siblings(kernels: list[fx.Node], members: dict[fx.Node, list[fx.Node]],
                   unit: dict[fx.Node, fx.Node], index: dict[fx.Node, int],
                   inputs: Mapping[fx.Node, list[fx.Node]],
                   loads: Mapping[fx.Node, list[fx.Node]],
                   node_kinds: Mapping[fx.Node, OpKind], alias_nodes: frozenset[fx.Node]
                   ) -> set[fx.Node]:
    """Merge each kernel into the earliest kernel of its size it shares reads with and may
    join (`unit`); returns the kernels others merged into. The earliest: Inductor's rounds of
    fusion tend to gather all the kernels of a region that read the same buffers into one (on
    `small`, a norm's recomputation with its backward; measured, not derived).

    Whether a kernel may join another is a question of paths: not if it needs the other
    through a third unit. Each unit's ancestors are kept as a bit set (one bit per unit, in
    order), so the question costs a few integer ands; a merge widens the sets of the units
    between the two that reach them. A unit ranked before both that reaches them through a
    kernel merged into it earlier keeps its old set: a fusion that then closes a cycle is
    caught by `_topological`, and the order falls back to inlining only (never seen on 1,500
    random programs in the tests, nor planning 4- and 32-layer `small`-shaped graphs)."""

    bases: dict[fx.Node, fx.Node] = {}

    def base(node: fx.Node) -> fx.Node:
        if node not in alias_nodes:
            return node
        found = bases.get(node)
        if found is None:
            found = node
            while found in alias_nodes and found.all_input_nodes:
                found = found.all_input_nodes[0]
            bases[node] = found
        return found

    units = sorted(members, key=lambda u: index[u])  # by anchor: each after what it needs
    rank = {u: r for r, u in enumerate(units)}
    mask = {u: 1 << r for u, r in rank.items()}  # a merged unit holds the bits of its parts
    merged_into: dict[fx.Node, fx.Node] = {}

    def current(u: fx.Node) -> fx.Node:
        while u in merged_into:
            u = merged_into[u]
        return u

    needs = {u: {unit[i] for m in ms for i in inputs[m]} - {u} for u, ms in members.items()}
    ancestors: dict[fx.Node, int] = {}
    first = {k: index[members[k][0]] for k in kernels}  # earliest member of each kernel
    is_kernel = set(kernels)
    # (buffer, kernel size) -> {kernel (as merged so far): the last position it read the
    # buffer at}, oldest first. A kernel merged into another has the other's size, and a kernel
    # others merged into never merges itself, so one entry per merged kernel is enough.
    readers_of: dict[tuple[fx.Node, int], dict[fx.Node, int]] = {}
    position = 0
    for u in units:
        reach = 0
        for need in needs[u]:
            need = current(need)
            reach |= ancestors[need] | mask[need]
        ancestors[u] = reach
        if u not in is_kernel:
            continue
        position += 1
        size = node_kinds[u].numel
        if size < 0:
            continue  # of unknown size: fuses with nothing
        group = set(members[u])
        reads = {base(i) if i in alias_nodes else i
                 for m in members[u] for i in loads[m] if i not in group}
        reads = [r for r in reads if node_kinds[r].nbytes >= _SHARED_BYTES]
        candidates: set[fx.Node] = set()
        for buffer in reads:
            seen = readers_of.get((buffer, size))
            if not seen:
                continue
            gone = []  # out of the window for good: positions only grow
            for k, at in seen.items():
                if position - at <= _FUSION_WINDOW:
                    break
                gone.append(k)
            for k in gone:
                del seen[k]
            candidates.update(seen)
        direct = {current(n) for n in needs[u]}
        for root in sorted(candidates, key=first.__getitem__):
            if any(ancestors[n] & mask[root] for n in direct if n is not root):
                continue  # u needs root through a third unit: fused, it would wait on itself
            merged_into[u] = root
            for m in members[u]:
                unit[m] = root
            members[root] = members[root] + members[u]
            mask[root] |= mask[u]
            ancestors[root] = (ancestors[root] | reach) & ~mask[root]
            # The units between the two that reach the merged kernel now reach what it needs.
            for between in units[rank[root] + 1:rank[u]]:
                if between not in merged_into and ancestors[between] & mask[root]:
                    ancestors[between] |= ancestors[root] | mask[root]
            break
        as_merged = merged_into.get(u, u)
        for buffer in reads:
            seen = readers_of.setdefault((buffer, size), {})
            seen.pop(as_merged, None)  # re-entered last: the entries stay in position order
            seen[as_merged] = position
    return set(merged_into.values())


def _topological(order: list[fx.Node], unit: dict[fx.Node, fx.Node], index: dict[fx.Node, int],
                 inputs: Mapping[fx.Node, list[fx.Node]], roots: set[fx.Node]
                 ) -> list[fx.Node] | None:
    """The order in which Inductor runs the fused kernels: each where the kernel it was fused
    into stood (the values inlined into a kernel run with it), after whatever it needs. None if
    two kernels would wait on each other. `roots`: the kernels others were merged into; only
    they can need a unit that stands later (each other unit stands after its inputs' units,
    and a merge goes into an earlier kernel), so only they are checked. That relies on `order`
    being topological and `inputs` listing each node's inputs within it."""
    groups: dict[fx.Node, list[fx.Node]] = {}
    for node in order:
        groups.setdefault(unit[node], []).append(node)
    groups = dict(sorted(groups.items(), key=lambda item: index[item[0]]))
    result: list[fx.Node] = []
    placed: set[fx.Node] = set()
    visiting: set[fx.Node] = set()

    def pending(group: fx.Node) -> list[fx.Node]:
        needs = {unit[i] for m in groups[group] for i in inputs[m]}
        return sorted((n for n in needs if n not in placed and n is not group),
                      key=lambda g: -index[g])

    for start in groups:
        if start in placed:
            continue
        waiting = pending(start) if start in roots else ()
        if not waiting:  # the common case: everything it needs already ran
            placed.add(start)
            result.extend(groups[start])
            continue
        stack = [(start, True), *((w, False) for w in waiting)]
        visiting.add(start)
        while stack:
            group, expanded = stack.pop()
            if expanded:
                visiting.discard(group)
                placed.add(group)
                result.extend(groups[group])
                continue
            if group in placed:
                continue
            if group in visiting:
                return None
            visiting.add(group)
            stack.append((group, True))
            stack.extend((w, False) for w in pending(group))
    return result
