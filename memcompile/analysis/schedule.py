"""What a rematerialization plan implies, and its simulated peak, without building any graph.

A plan is the set of storage groups (`JointGraph.group_of`) the backward recomputes instead of
saving. `layout(joint, evicted)` derives from it what is saved, what is recomputed, and the order
both graphs run in. A value the backward reads is saved unless its group is evicted; then it is
recomputed from its inputs, each of which is in turn saved (even one the backward never read
before, such as the input of a cheap op) or, if evicted too, recomputed.

- the forward runs in graph order and returns its outputs and the saved values;
- the backward runs its tangent-dependent ops in graph order (autograd's order) and every other
  op *lazily*: right before the first op that needs it. Recomputation thus happens segment by
  segment, next to its use, rather than all at the start of the backward, where torch's
  partitioner puts it (research/torch_remat.md, section 2.4);
- in both, each `getitem` runs right after the op it reads, so a tuple is not held longer.

`simulate_layout` counts the bytes live at every step of that schedule, exactly as
`memcompile.analysis.memory.simulate_step` counts them on the graphs the split builds (tests check
the two agree to the byte), but on integers read once, so a planner can afford hundreds of
simulations per graph.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from operator import getitem

import torch
import torch.fx as fx

from memcompile.analysis.fusion import OpKind, kernel_order, kinds, unmaterialized
from memcompile.analysis.joint import JointGraph
from memcompile.analysis.memory import _obeys_layout_contract, concrete

_EXTERNAL, _FORWARD, _BACKWARD, _TANGENT = "X", "F", "B", "T"


@dataclass
class Layout:
    """What a plan saves and recomputes, and the order each graph runs in."""

    evicted: frozenset[int]
    saved: list[fx.Node]
    """Forward values handed to the backward (inputs and symbolic sizes included), graph order."""
    recomputed: list[fx.Node]
    """Forward nodes the backward runs again, in graph order."""
    forward_order: list[fx.Node]
    backward_order: list[fx.Node]
    offloaded: frozenset[fx.Node] = frozenset()
    """Saved values that go to host memory after their last forward reader and come back
    right before their first backward reader (`planning.offload`); each owns its storage."""


def layout(joint: JointGraph, evicted: Iterable[int]) -> Layout:
    """The saved set, recomputed set and both schedules of the plan that recomputes `evicted`."""
    evicted = frozenset(evicted)
    saved: set[fx.Node] = set()
    recomputed: set[fx.Node] = set()
    stack = list(joint.needed)
    while stack:
        value = stack.pop()
        if value in saved or value in recomputed:
            continue
        group = joint.group_of.get(value)
        if (group is None or group not in evicted or value in joint.banned
                or not joint.is_tensor(value)):
            saved.add(value)  # an input, a symbolic size, or a value the plan keeps
        else:
            recomputed.add(value)
            stack.extend(i for i in joint.inputs[value] if i in joint.forward)
    by_order = joint.order.__getitem__
    fwd_roots = [o for o in joint.fwd_outputs if isinstance(o, fx.Node)]
    fwd_roots += [v for v in saved if v.op != "placeholder"] + joint.forward_effects
    forward_nodes = _closure(fwd_roots, joint.forward, joint.inputs)
    forward_order = _raise_getitems(
        sorted((n for n in forward_nodes if n.op != "placeholder"), key=by_order), forward_nodes)
    backward_order = _lazy_backward_order(joint, recomputed)
    return Layout(evicted, sorted(saved, key=by_order), sorted(recomputed, key=by_order),
                  forward_order, backward_order)


def _closure(roots: Iterable[fx.Node], within: set[fx.Node],
             inputs: dict[fx.Node, list[fx.Node]]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [r for r in roots if r in within]
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(i for i in inputs[node] if i in within and i not in seen)
    return seen


def _raise_getitems(order: list[fx.Node], members: set[fx.Node]) -> list[fx.Node]:
    """`order` with each getitem moved right after the op whose tuple it reads."""
    items = {n for n in order if n.target is getitem and n.args[0] in members}
    result: list[fx.Node] = []
    for node in order:
        if node in items:
            continue
        result.append(node)
        result.extend(u for u in node.users if u in items)
    return result


def _lazy_backward_order(joint: JointGraph, recomputed: set[fx.Node]) -> list[fx.Node]:
    """Tangent-dependent ops in graph order; every other op right before its first consumer."""
    members = recomputed.union(joint.backward)
    placed: set[fx.Node] = set()
    order: list[fx.Node] = []
    inputs = joint.inputs

    def append(node: fx.Node) -> None:
        placed.add(node)
        order.append(node)
        for user in node.users:  # getitems right after their tuple
            if user.target is getitem and user in members and user not in placed:
                placed.add(user)
                order.append(user)

    def place(root: fx.Node) -> None:
        # Iterative post-order: a chain of recomputed layers can be thousands of nodes deep.
        stack: list[tuple[fx.Node, bool]] = [(root, False)]
        while stack:
            node, inputs_done = stack.pop()
            if node in placed:
                continue
            if inputs_done:
                append(node)
                continue
            stack.append((node, True))
            for inp in reversed(inputs[node]):
                if inp in members and inp not in placed:
                    stack.append((inp, False))

    for node in joint.backward:
        if node in joint.tangent_dependent and node not in placed:
            # Most ops find their inputs placed already: no stack needed.
            if all(i in placed or i not in members for i in inputs[node]):
                append(node)
            else:
                place(node)
    for out in joint.bwd_outputs:
        if isinstance(out, fx.Node) and out in members:
            place(out)
    return order


@dataclass
class PlanSimulation:
    """The simulated step of one layout."""

    peak_bytes: int
    peak_phase: str
    peak_node: str
    saved_bytes: int
    """Bytes live between the forward and the backward."""
    live_at_peak: set[fx.Node]
    """Saved forward values whose storage is live at the peak."""


@dataclass(frozen=True)
class ScheduleFacts:
    """What every simulated plan of one joint graph reads the same: computed once per graph."""

    joint: JointGraph
    """The graph these facts were read from."""
    forward_values: dict[fx.Node, tuple]
    """Each node's storages as the forward holds them (external storages dropped)."""
    own: dict[fx.Node, tuple[tuple[int, int], ...]]
    """Each node's (storage key, bytes) pairs, external storages dropped."""
    backward_values: dict[fx.Node, tuple]
    """Each node's storages as the backward holds them when none is saved or a tangent."""
    nodes_of: dict[int, list[fx.Node]]
    """The nodes holding each storage key."""
    relaid: tuple[tuple[int, int], ...]
    """(index among the gradients, the parameter's bytes) of each gradient whose strides break
    its parameter's layout: AccumulateGrad copies it."""
    kinds: dict[fx.Node, OpKind]
    """`analysis.fusion.kinds` of every node."""
    _kernel_orders: dict[tuple[fx.Node, ...], list[fx.Node]] = field(
        default_factory=dict, repr=False, compare=False)
    """`analysis.fusion.kernel_order` of each graph order seen (one per distinct backward; the
    plans of one graph share the forward's)."""

    def kernel_order(self, order: list[fx.Node]) -> list[fx.Node]:
        """How Inductor runs `order` (`analysis.fusion.kernel_order`), remembered."""
        key = tuple(order)
        found = self._kernel_orders.get(key)
        if found is None:
            found = self._kernel_orders[key] = kernel_order(
                order, self.kinds, self.joint.aliases, self.joint.inputs)
        return found

    @classmethod
    def of(cls, joint: JointGraph) -> ScheduleFacts:
        """The facts of `joint`."""
        own = {n: tuple((k, b) for k, b in s if k not in joint.external)
               for n, s in joint.storages.items()}
        relaid = []
        for i, (primal, grad) in enumerate(zip(joint.primals, joint.bwd_outputs)):
            param = primal.meta.get("val")
            if (isinstance(grad, fx.Node) and own.get(grad) and isinstance(param, torch.Tensor)
                    and not _obeys_layout_contract(grad.meta["val"], param)):
                relaid.append((i, concrete(param.numel()) * param.element_size()))
        nodes_of: dict[int, list[fx.Node]] = {}
        for n, s in own.items():
            for k, _ in s:
                nodes_of.setdefault(k, []).append(n)
        forward = {n: tuple(((_FORWARD, k), b) for k, b in s) for n, s in own.items()}
        backward = {n: tuple(((_BACKWARD, k), b) for k, b in s) for n, s in own.items()}
        return cls(joint, forward, own, backward, nodes_of, tuple(relaid),
                   kinds(joint.gm.graph.nodes))


class _Live:
    """Reference counts per storage instance; live bytes; when each saved storage lived."""

    def __init__(self) -> None:
        self.refs: dict[tuple[str, int], int] = {}
        self.nbytes: dict[tuple[str, int], int] = {}
        self.live = 0
        self.events = 0
        self.born: dict[int, int] = {}
        self.died: dict[int, int] = {}

    def hold(self, storages: tuple[tuple[tuple[str, int], int], ...]) -> None:
        for inst, nbytes in storages:
            count = self.refs.get(inst, 0)
            if count == 0:
                self.nbytes[inst] = nbytes
                self.live += nbytes
                if inst[0] == _FORWARD:
                    self.born.setdefault(inst[1], self.events)
            self.refs[inst] = count + 1

    def release(self, storages: tuple[tuple[tuple[str, int], int], ...]) -> None:
        for inst, _ in storages:
            count = self.refs[inst] - 1
            if count:
                self.refs[inst] = count
            else:
                del self.refs[inst]
                self.live -= self.nbytes.pop(inst)
                if inst[0] == _FORWARD:
                    self.died[inst[1]] = self.events


def simulate_layout(joint: JointGraph, plan: Layout, *, fusion: bool = False,
                    drop_outputs: bool = False, facts: ScheduleFacts | None = None,
                    timeline: list[tuple[str, str, int]] | None = None) -> PlanSimulation:
    """Simulate one step of `plan`: bytes above what was live at its start, at every op.

    `fusion=True` models Inductor's code instead of the eager runtime's: values Inductor inlines
    into their readers' kernels hold no buffer (`analysis.fusion.unmaterialized`), ops run in
    the order of Inductor's kernels (`analysis.fusion.kernel_order`), and the ops between two
    extern kernels run as one kernel (`_run`).
    `drop_outputs=True`: the caller keeps only scalar outputs (the loss it calls `backward` on)
    and drops the others (logits) before the backward, as `model(**batch).loss.backward()`
    does; by default every output stays live, as in `memcompile.analysis.memory`.
    `facts`: `ScheduleFacts.of(joint)`, for a caller simulating many plans of one graph.
    `timeline`: a list that gets (phase, node, live bytes) of every step, for a report's plot
    (the planner passes none).
    """
    if facts is None:
        facts = ScheduleFacts.of(joint)
    elif facts.joint is not joint:
        raise ValueError("simulate_layout: facts were read from another joint graph; pass "
                         "ScheduleFacts.of(joint) for this one, or none")
    live = _Live()
    peak = [-1, "", "", 0]  # bytes, phase, node, event number

    def event(phase: str, name: str) -> None:
        live.events += 1
        if timeline is not None:
            timeline.append((phase, name, live.live))
        if live.live > peak[0]:
            peak[:] = [live.live, phase, name, live.events]

    saved_keys = {k for v in plan.saved for k, _ in joint.storages[v]}
    tangent_keys = {k for t in joint.tangents for k, _ in joint.storages[t]}

    fwd_value = facts.forward_values.__getitem__
    # Backward values tagged by whose storage they hold: most own backward storages alone, so
    # only the nodes sharing a saved or tangent storage are tagged afresh.
    own = facts.own
    tagged = dict(facts.backward_values)
    for key in saved_keys | tangent_keys:
        for node in facts.nodes_of.get(key, ()):
            tagged[node] = tuple(((_TANGENT if k in tangent_keys else _FORWARD
                                   if k in saved_keys else _BACKWARD, k), b) for k, b in own[node])
    bwd_value = tagged.__getitem__

    # The forward graph: the inputs cost nothing; each value dies after its last use, except
    # what it returns (the user's outputs, then the saved values).
    def inlined(order: list[fx.Node], graph_returns: set[fx.Node]) -> set[fx.Node] | None:
        if not fusion:
            return None
        return unmaterialized(order, graph_returns, joint.storages, joint.aliases, facts.kinds)

    # Inductor runs an op where its scheduler fuses it, not where the graph puts it.
    forward_order, backward_order = plan.forward_order, plan.backward_order
    if fusion:
        forward_order = facts.kernel_order(forward_order)
        backward_order = facts.kernel_order(backward_order)

    fwd_outputs = [o for o in joint.fwd_outputs if isinstance(o, fx.Node)]
    returned = [*fwd_outputs, *plan.saved]
    fwd_returned = set(returned)
    # An offloaded value dies on the device after its last forward reader (the offload op reads
    # it there); the forward hands over its host copy, which holds no device bytes.
    away = plan.offloaded
    _run(forward_order, fwd_value, {}, fwd_returned - away, live, event, "forward",
         joint.inputs, inlined(forward_order, fwd_returned), facts.kinds, joint.aliases)
    handed_over = [() if v in away else fwd_value(v) for v in returned]
    for value in handed_over:
        live.hold(value)
    for node in set(returned) - away:
        live.release(fwd_value(node) if node.op != "placeholder" else ())
    saved_bytes = live.live

    if drop_outputs:
        for node, value in zip(fwd_outputs, handed_over):
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and val.dim() > 0:
                live.release(value)
    # The backward: the eager runtime's autograd holds the tangents throughout (Inductor's
    # compiled backward takes them over and frees each after its last use); the saved values
    # move to the graph.
    for tangent in joint.tangents:
        live.hold(bwd_value(tangent))
    event("backward", "tangents")
    if fusion:
        for tangent in joint.tangents:
            live.release(bwd_value(tangent))
    placeholders = {v: () if v in away else bwd_value(v) for v in [*plan.saved, *joint.tangents]}
    for value in placeholders.values():
        live.hold(value)
    for value in handed_over[len(fwd_outputs):]:
        live.release(value)
    grads = list(joint.bwd_outputs)
    grad_nodes = {g for g in grads if isinstance(g, fx.Node)}
    # The fetch makes a new device storage right before the value's first backward reader.
    fetched = {v: facts.backward_values[v] for v in away}
    _run(backward_order, bwd_value, placeholders, grad_nodes, live, event, "backward",
         joint.inputs, inlined(backward_order, grad_nodes), facts.kinds, joint.aliases,
         fetched)
    grad_values = [bwd_value(g) if isinstance(g, fx.Node) else () for g in grads]
    for value in grad_values:
        live.hold(value)
    for node in grad_nodes:
        live.release(bwd_value(node))
    # AccumulateGrad copies a gradient whose strides break the parameter's layout, then drops it.
    for i, nbytes in facts.relaid:
        live.live += nbytes
        event("accumulate", joint.primals[i].name)
        live.release(grad_values[i])

    peak_bytes, phase, name, at = peak
    live_at_peak = {
        v for v in plan.saved for k, _ in joint.storages[v]
        if k in live.born and live.born[k] < at <= live.died.get(k, at)
    }
    return PlanSimulation(max(peak_bytes, 0), phase, name, saved_bytes, live_at_peak)


def _run(order, value_of, placeholders, returned, live, event, phase, inputs,
         inlined=None, node_kinds=None, alias_nodes=frozenset(), fetched=None) -> None:
    """One graph: hold each op's value, then drop what this op used for the last time.

    With `inlined` (Inductor's code: the set of values its kernels compute inline), such a value
    owns no storage: it stands for its inputs' storages, so they stay live until its own last
    reader, the kernel that computes it. And the ops between two extern kernels run as one
    generated kernel, as Inductor's scheduler fuses them (`_kernels`): all its outputs are
    allocated before it runs and its inputs freed after. An output takes over an input buffer
    of its size that dies in the kernel and that only the output's own ancestors in the kernel
    read besides it, as Inductor's in-place reuse does (a scatter: its first input only).
    `node_kinds`: `analysis.fusion.kinds` of the order's nodes; `alias_nodes`: the views.
    `fetched`: placeholders held on the host, each with the device storages its fetch makes
    right before the first op (or kernel) that reads it.
    """
    members = set(order)
    if inlined is not None and node_kinds is None:
        node_kinds = kinds(order)
    last_use: dict[fx.Node, fx.Node] = {}
    for node in order:
        for inp in inputs[node]:
            if inp in members or inp in placeholders:
                last_use[inp] = node
    frees: dict[fx.Node, list[fx.Node]] = {}
    for value, user in last_use.items():
        if value not in returned:
            frees.setdefault(user, []).append(value)
    values = dict(placeholders)
    hold, release, dies_at = live.hold, live.release, frees.get  # bound once: called per op
    pending = dict(fetched or {})

    def fetch(group: list[fx.Node]) -> None:
        for node in group:
            for inp in inputs[node]:
                if inp in pending:
                    values[inp] = pending.pop(inp)
                    hold(values[inp])
                    event(phase, f"fetch {inp.name}")

    def finish(group: list[fx.Node]) -> None:
        for node in group:
            for dead in dies_at(node, ()):
                release(values[dead])
            if node not in last_use and node not in returned:
                release(values[node])

    if inlined is None:
        for node in order:
            if pending:
                fetch([node])
            values[node] = value_of(node)
            hold(values[node])
            event(phase, node.name)
            finish([node])
        return

    for group in _kernels(order, node_kinds, alias_nodes):
        if pending:
            fetch(group)
        for node in group:
            values[node] = (tuple(s for i in inputs[node] for s in values.get(i, ()))
                            if node in inlined else value_of(node))
        taken = 0
        released: dict[tuple, int] = {}  # holds the kernel's earlier ops drop when it ends
        claimed: set[tuple] = set()  # input buffers an output of this kernel took over
        readers: dict[tuple, list[fx.Node]] | None = None
        for node in group:
            value = values[node]
            dying = frees_here = dies_at(node, ())
            kind = node_kinds[node]
            if kind.scatter:
                first = node.args[0] if node.args else None
                dying = [first] if first in dying else []
            elif not kind.absorbs:
                dying = []
            if dying and len(value) == 1:  # only an output of one buffer reuses one
                nbytes = value[0][1]
                dying = [d for d in dying if any(b == nbytes for _, b in values[d])]
            else:
                dying = []
            if dying and len(group) > 1:
                # An output takes over an input buffer only when the other ops of the kernel
                # that read it come before it (Inductor's `decide_inplace_update` ignores a
                # reader that is an ancestor of the writer, not a sibling).
                if readers is None:
                    readers = _readers(group, inputs, values, inlined)
                    ancestry = _Ancestry(group, inputs)
                dying = [d for d in dying if all(
                    ancestry.all_before(others, node)
                    for others in (readers.get(inst, ()) for inst, _ in values[d])
                    if len(others) > 1 or (others and others[0] is not node))]
            reused = _reusable_bytes(value, [values[d] for d in dying], live, released,
                                     claimed) if dying else 0
            hold(value)
            live.live -= reused  # the output took over a dying input's buffer
            taken += reused
            event(phase, node.name)
            for dead in frees_here:
                for inst, _ in values[dead]:
                    released[inst] = released.get(inst, 0) + 1
        live.live += taken
        finish(group)


def _readers(group: list[fx.Node], inputs, values: dict, inlined: set[fx.Node]
             ) -> dict[tuple, list[fx.Node]]:
    """The ops of one kernel that read each storage (through the values it inlines too)."""
    readers: dict[tuple, list[fx.Node]] = {}
    for node in group:
        if node not in inlined:
            for inst in {inst for i in inputs[node] for inst, _ in values.get(i, ())}:
                readers.setdefault(inst, []).append(node)
    return readers


class _Ancestry:
    """Ancestors of the ops of one kernel within it: a bit set per op (bit i: the kernel's i-th
    op), built in one pass over the kernel. It relies on the kernel listing its ops in a
    topological order, as the orders `_run` gets do (the graph's, or `kernel_order`'s, whose
    validity a hypothesis test checks)."""

    def __init__(self, group: list[fx.Node], inputs) -> None:
        self.bit = {n: 1 << i for i, n in enumerate(group)}
        self.below: dict[fx.Node, int] = {}
        for node in group:
            reach = 0
            for i in inputs[node]:
                if i in self.bit:
                    reach |= self.below.get(i, 0) | self.bit[i]
            self.below[node] = reach

    def all_before(self, others: list[fx.Node], node: fx.Node) -> bool:
        """Whether every node of `others` but `node` is an ancestor of `node`."""
        below = self.below[node]
        return all(below & self.bit[o] for o in others if o is not node)


def _kernels(order: list[fx.Node], node_kinds: Mapping[fx.Node, OpKind],
             alias_nodes: frozenset[fx.Node] = frozenset()) -> list[list[fx.Node]]:
    """`order` cut into the kernels Inductor runs: each extern op alone (a matmul, attention),
    and each run of ops between two extern ops as one generated kernel (its scheduler fuses
    them; in the backward of `small` at 1,024 tokens, 2 of 86 gaps between extern ops held two
    generated kernels, the rest one or none). Views run nowhere."""
    groups: list[list[fx.Node]] = []
    run: list[fx.Node] = []
    for node in order:
        if node_kinds[node].generated or node in alias_nodes:  # inlined values are too
            run.append(node)
            continue
        if run:
            groups.append(run)
            run = []
        groups.append([node])
    if run:
        groups.append(run)
    return groups


def _reusable_bytes(value: tuple, dying: list[tuple], live: _Live,
                    released: dict[tuple, int], claimed: set[tuple]) -> int:
    """Bytes of a buffer the op's inputs release for good with its kernel, of the size of the
    op's new output (0 if none): Inductor then writes the output into that buffer. `released`:
    the holds the kernel's earlier ops drop at its end; `claimed`: buffers already taken over
    by another output of the kernel (it gets the first one that fits)."""
    if len(value) != 1 or value[0][0] in live.refs:
        return 0
    nbytes = value[0][1]
    dropped: dict[tuple, int] = {}
    for storages in dying:
        for inst, _ in storages:
            dropped[inst] = dropped.get(inst, 0) + 1
    for inst, count in dropped.items():
        if (live.refs.get(inst) == count + released.get(inst, 0) and inst not in claimed
                and live.nbytes[inst] == nbytes):
            claimed.add(inst)
            return nbytes
    return 0
