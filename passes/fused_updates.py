"""`fuse_optimizer_updates`: step projected weights inside the backward graph, one at a time.

With post-accumulate-grad hooks, a compiled model gains nothing: its backward graph returns every
gradient at once, so all of them are alive together before the first hook runs (research note
galore_lightseq.md, section 7.1). This pass moves the update into the graph instead. For each
weight registered by `memcompile.optim.lowrank(..., fused_backward=True)`, the backward

- calls `memcompile::lowrank_update(grad, after, slot)` as soon as the gradient is complete and
  every op that reads the weight has run: the weight itself, or any view of it the forward
  saved (a transpose, say; found by storage). Those ops' outputs are the op's `after` inputs,
  so no scheduler can move a read of the weight past its update;
- returns no gradient for the weight, so autograd accumulates nothing and the gradient's buffer
  is freed right after the update.

It runs on the backward graph after the split (the joint graph's outputs are the gradients
themselves). Under `sequence_parallel` a weight's gradient is complete only once it is summed
over the ranks: `sequence_parallel_grads` returns `wait_tensor(all_reduce(part))`, placed at the
end of the backward. The update reads that sum, never the rank's part (which would step each
rank with its own share and let the ranks' weights drift apart); and this pass moves the sum up
to right after the part is computed, since an update anchored on a sum at the end of the
backward would keep every projected gradient alive until then, all of them together. Every
rank runs the same backward graph (`capture_parallel` agrees on one cost model, so on one remat
plan), so the moved all-reduces and the attention's transfers still come in the same order on
every rank. Over a sequence-parallel subgroup (data parallelism over the other ranks) nothing
is fused, with a note: the replicas' average must come before any step. Weights whose gradient
it cannot route (a gradient returned twice, a graph whose
inputs do not line up with its gradients) keep their ordinary gradient, with a note saying why.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx

from memcompile.analysis.memory import storage_key, tensor_bytes
from memcompile.meta import Decision, record_decision, record_unmet
import memcompile.optim.fused  # noqa: F401  (defines memcompile::lowrank_update)

log = logging.getLogger(__name__)

PASS_NAME = "fuse_optimizer_updates"
_ALL_REDUCE = torch.ops._c10d_functional.all_reduce.default
_WAIT = torch.ops._c10d_functional.wait_tensor.default


def fuse_optimizer_updates(bw: fx.GraphModule, slots: Mapping[int, int],
                           weight_storages: Mapping[int, int], num_primals: int) -> fx.GraphModule:
    """Rewrite `bw` so the weights of `slots` (primal input index -> registry slot) are updated
    in the graph. `weight_storages`: primal index -> storage key of the weight (as
    `analysis.memory.storage_key` reads it); `num_primals`: how many inputs the joint had."""
    output = bw.graph.output_node()
    grads = list(output.args[0])
    if len(grads) != num_primals:
        record_unmet(bw, PASS_NAME, f"the backward returns {len(grads)} gradients for "
                     f"{num_primals} inputs: cannot tell which is whose, so every weight keeps "
                     "its .grad and steps in optimizer.step()")
        return bw
    placeholders = bw.graph.find_nodes(op="placeholder")
    returned_count = Counter(g for g in grads if isinstance(g, fx.Node))
    subgroup = _sequence_parallel_subgroup(grads[i] for i in slots)
    if subgroup is not None:
        record_unmet(bw, PASS_NAME, f"the gradients are summed over a sequence-parallel group "
                     f"of {subgroup[0]} of {subgroup[1]} ranks: the other ranks are data-parallel "
                     "replicas whose average must come before the step, and an update inside "
                     "the backward would step each replica on its own; every weight keeps its "
                     ".grad and steps in optimizer.step() after the data-parallel reduction")
        return bw
    for index in slots:
        if isinstance(grads[index], fx.Node) and returned_count[grads[index]] == 1:
            _reduce_when_complete(grads[index])
    order = {n: i for i, n in enumerate(bw.graph.nodes)}
    fused = 0
    for index, slot in sorted(slots.items()):
        grad = grads[index]
        if not isinstance(grad, fx.Node) or returned_count[grad] > 1:
            if isinstance(grad, fx.Node):  # no gradient: the graph does not use the weight
                record_unmet(bw, PASS_NAME, f"input {index}: its gradient is returned for "
                             "another input too; it keeps its .grad and steps in "
                             "optimizer.step()")
            continue
        aliases = [p for p in placeholders if isinstance(p.meta.get("val"), torch.Tensor)
                   and storage_key(p.meta["val"]) == weight_storages[index]]
        readers = _readers(aliases)
        anchor = max([grad, *readers], key=order.__getitem__)
        after = [r for r in readers if isinstance(r.meta.get("val"), torch.Tensor)]
        with bw.graph.inserting_after(anchor):
            update = bw.graph.call_function(
                torch.ops.memcompile.lowrank_update.default, (grad, after, slot))
        update.meta["val"] = None
        grads[index] = None
        fused += 1
        record_decision(bw, Decision(
            PASS_NAME, "fused update", grad.name, tensor_bytes(grad),
            f"the optimizer takes this weight's gradient inside the backward (after "
            f"{anchor.name}); it is never returned or accumulated"))
    output.args = (grads,)
    bw.graph.lint()
    bw.recompile()
    log.info("%s: %d weight(s) updated inside the backward", PASS_NAME, fused)
    return bw


def _sequence_parallel_subgroup(grads: Iterable[Any]) -> tuple[int, int] | None:
    """(group size, world size) when a gradient is summed over a group of fewer ranks than the
    world (`sequence_parallel_grads` over a subgroup); None otherwise."""
    for grad in grads:
        if not (isinstance(grad, fx.Node) and grad.target is _WAIT
                and isinstance(grad.args[0], fx.Node) and grad.args[0].target is _ALL_REDUCE):
            continue
        group = dist.distributed_c10d._resolve_process_group(grad.args[0].args[2])
        size, world = dist.get_world_size(group), dist.get_world_size()
        if size < world:
            return size, world
    return None


def _reduce_when_complete(grad: fx.Node) -> None:
    """When `grad` is a sum over ranks, `wait_tensor(all_reduce(part))` used by nothing else,
    move that sum to right after `part` is computed: the update that follows it then runs as
    soon as the weight's gradient is complete everywhere, not at the end of the backward."""
    started = grad.args[0] if grad.target is _WAIT and len(grad.users) == 1 else None
    if not (isinstance(started, fx.Node) and started.target is _ALL_REDUCE
            and len(started.users) == 1):
        return
    part = started.args[0]
    if isinstance(part, fx.Node) and part.op == "call_function":
        part.append(started)
        started.append(grad)


def _readers(aliases: list[fx.Node]) -> list[fx.Node]:
    """Every op that reads one of `aliases` (the weight's storage), directly or through views."""
    readers: list[fx.Node] = []
    stack = [u for a in aliases for u in a.users]
    seen: set[fx.Node] = set()
    while stack:
        node = stack.pop()
        if node in seen or node.op == "output":
            continue
        seen.add(node)
        readers.append(node)
        if isinstance(node.target, torch._ops.OpOverload) and node.target.is_view:
            stack.extend(node.users)
        elif not isinstance(node.meta.get("val"), torch.Tensor):
            stack.extend(node.users)  # a tuple: its getitems are what later ops read
    return readers
