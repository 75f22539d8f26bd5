"""`sequence_parallel_grads`: sum the weights' gradients over the sequence-parallel ranks.

Every rank holds the same weights and backpropagates its shard's share of the loss (each rank's
loss is its targets' sum over the global target count: the ranks' losses add up to the
single-device loss). A weight's gradient on one rank is its shard's share; the single-device
gradient is their sum. This pass adds, in the joint graph, an all-reduce (sum over
`options.sequence_parallel.group`, a functional collective) on each gradient the backward
returns for a parameter, so each rank ends the backward with the whole gradient, as one device
would, before anything reads it (`.grad`, a fused optimizer update, a hook).

Why in the graph and not in a gradient hook: a hook fires per accumulation, so a weight used by
two graphs (or a step with gradient accumulation) would be reduced again with the part already
reduced; here each graph's contribution is reduced once, and sums of reduced contributions are
the reduced sum. Why at the end of the backward graph: every rank then posts its all-reduces
after all of its attention transfers and in the same order (the backward's outputs'), whatever
the remat plan recomputed on that rank, so collectives and point-to-point transfers never wait
on each other across ranks. The exception: the gradient of a weight that a
`lowrank(..., fused_backward=True)` optimizer steps inside the backward. After the split,
`fuse_optimizer_updates` moves its sum up to right after this rank's part is computed and
steps the weight from the sum, so that the gradient dies there instead of at the end of the
backward; the ranks run one backward graph (one agreed remat plan), so the order of collectives
and transfers is still the same on every rank. Gradients of inputs that are not parameters (a
sharded embedding output the user passes) are per-shard: not reduced.

Which inputs are parameters comes from the captured graph's real inputs
(`meta[JOINT]["parameter_inputs"]`): AOTAutograd's fake inputs do not keep `nn.Parameter`.

A streamed step (`stream=True`) has no joint graph, so this pass does not run there:
`runtime.stream_shard_grads` sums the same gradients in the streamed backward, once each.

Data parallelism over other ranks composes: this sum runs over the sequence-parallel group
inside the backward; DDP (or any data-parallel reduction) then averages the summed gradients
over its own group, e.g. with 4 ranks, sequence-parallel groups {0,1},{2,3} and data-parallel
groups {0,2},{1,3}. A fused update would step its weight inside the backward from the sum over
the sequence-parallel group alone, before the data-parallel average, so over a subgroup
`fuse_optimizer_updates` fuses nothing and says so: the weights step in `optimizer.step()`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from memcompile.analysis.memory import is_tangent
from memcompile.meta import JOINT, record_note
from memcompile.passes.registry import register_pass

PASS_NAME = "sequence_parallel_grads"
_functional = torch.ops._c10d_functional


@register_pass(PASS_NAME, default=True, rank=95,  # before plan_remat: it plans their buffers
               option="sequence_parallel")
def sequence_parallel_grads_pass(gm: fx.GraphModule, example_inputs: Sequence[Any], *,
                                 options: Any = None) -> fx.GraphModule:
    """All-reduce (sum) each parameter's gradient over the sequence-parallel group before the
    backward returns it (no-op when `options.sequence_parallel` is off)."""
    sp = getattr(options, "sequence_parallel", False)
    if not sp:
        return gm
    info = gm.meta.get(JOINT)
    if info is None:
        record_note(gm, PASS_NAME, "not a joint graph from memcompile's partition: unchanged")
        return gm
    from memcompile.distributed.ops import group_name

    primals = [n for n in gm.graph.find_nodes(op="placeholder") if not is_tangent(n)]
    output = gm.graph.output_node()
    outputs = list(output.args[0])
    first = info["num_fwd_outputs"]
    grads = outputs[first:first + len(primals)]
    group = group_name(sp.group)
    reduced = []
    for index in info.get("parameter_inputs", ()):
        grad = grads[index] if index < len(grads) else None
        if not isinstance(grad, fx.Node):
            continue  # a frozen weight
        _check_same(primals[index], example_inputs, index)
        outputs[first + index] = _all_reduce(gm, output, grad, group)
        reduced.append(primals[index].name)
    output.args = (outputs,)
    gm.recompile()
    record_note(gm, PASS_NAME, f"{len(reduced)} parameter gradient(s) summed over the "
                f"sequence-parallel group {group!r} at the end of the backward")
    return gm


def _check_same(primal: fx.Node, example_inputs: Sequence[Any], index: int) -> None:
    """Raise unless joint input `index` is shaped as the captured graph's input `index` (a
    parameter): AOTAutograd keeps the captured graph's inputs in order; if some rewrite of
    its inputs broke that, reducing the wrong gradient would be a silent error."""
    value = primal.meta.get("val")
    given = example_inputs[index] if index < len(example_inputs) else None
    if not (isinstance(value, torch.Tensor) and isinstance(given, torch.Tensor)
            and value.shape == given.shape and value.dtype == given.dtype):
        raise RuntimeError(f"sequence_parallel_grads: joint input {index} ({primal.name}) does "
                           "not match the captured graph's parameter input of that index; "
                           "cannot tell which gradients belong to weights")


def _all_reduce(gm: fx.GraphModule, output: fx.Node, grad: fx.Node, group: str) -> fx.Node:
    """`wait_tensor(all_reduce(grad, "sum", group))` inserted before `output`, with values."""
    with gm.graph.inserting_before(output):
        started = gm.graph.call_function(_functional.all_reduce.default, (grad, "sum", group))
        done = gm.graph.call_function(_functional.wait_tensor.default, (started,))
    value = grad.meta.get("val")
    mode = detect_fake_mode([value]) if isinstance(value, torch.Tensor) else None
    if mode is not None:
        with mode:
            started.meta["val"] = _functional.all_reduce.default(value, "sum", group)
            done.meta["val"] = _functional.wait_tensor.default(started.meta["val"])
    return done
