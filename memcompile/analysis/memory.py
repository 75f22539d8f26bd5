"""The memory simulator: bytes live at every step of a forward-then-backward schedule.

It reads only the graphs (each node's `meta["val"]`, a FakeTensor) and models how the eager
runtime runs them, so its numbers equal the tracked peak of `memcompile.measure` to the byte:

- a node's outputs are new storages, unless they alias one already live (views share their
  base's storage; the FakeTensors share it too, so aliasing is read off `untyped_storage()`);
- the runtime drops each value right after its last use (FX's codegen: unused outputs at once,
  unused inputs at the end), and a storage is freed when no live value refers to it;
- a multi-output op holds all its outputs until the last `getitem` on it has run;
- between the graphs: the forward's outputs (user outputs and saved values) stay live (a caller
  that drops an output before the backward, such as logits next to a loss, or AOTAutograd's
  outputs for mutated inputs, make the simulated peak an upper bound rather than exact); autograd
  allocates one tangent per output (`ones_like(loss)`) that lives to the end of the backward;
  the backward's gradients go to `.grad`, copied once when their strides break autograd's
  layout contract with the parameter;
- a value in host memory (an offloaded copy, marked `HOST_VALUE`) holds no device bytes.

Bytes are storage bytes (`nbytes` of the storage), in the sizes of the example inputs or of
`sizes`, a binding of the graphs' size symbols to other values.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch._prims_common import is_non_overlapping_and_dense_or_false
try:
    from torch.fx.experimental.symbolic_shapes import optimization_hint
except ImportError:  # torch < 2.13 (a lent GPU machine's image) names it hint_int
    from torch.fx.experimental.symbolic_shapes import hint_int as optimization_hint

from memcompile.errors import MemcompileError

Sizes = Mapping[sympy.Symbol, int] | None


def concrete(value: Any, sizes: Sizes = None) -> int:
    """An int from an int or a SymInt: the SymInt's hint, or its value under `sizes`."""
    if isinstance(value, torch.SymInt):
        if sizes:
            expr = value.node.expr.xreplace(dict(sizes))
            if expr.free_symbols:
                raise ValueError(
                    f"sizes binds {sorted(map(str, sizes))} but {value.node.expr} also needs "
                    f"{sorted(map(str, expr.free_symbols))}"
                )
            return int(expr)
        return optimization_hint(value)
    return int(value)


def is_tangent(node: fx.Node) -> bool:
    """Whether a placeholder of a joint or backward graph is a tangent (an output's gradient)."""
    return node.op == "placeholder" and node.name.startswith("tangents")


class MissingMetadataError(MemcompileError, ValueError):
    """A node without FakeTensor metadata: its bytes are unknown, so the simulation would lie."""


def _node_tensors(node: fx.Node) -> list[torch.Tensor]:
    """The tensors a node produces, from its FakeTensor metadata (which every pass must keep)."""
    if "val" not in node.meta:
        raise MissingMetadataError(
            f"node {node.name!r} ({node.target}) has no meta['val']: the memory simulator needs "
            "every node's FakeTensor metadata; a pass that adds nodes must set it"
        )
    return _tensors(node.meta["val"])


HOST_VALUE = "memcompile.host"
"""`node.meta` key, True on a node whose value lives in host memory (an offloaded value's copy,
`runtime.offload`): it holds no device bytes, as the tracked measure does not count it."""


def _device_tensors(node: fx.Node) -> list[torch.Tensor]:
    """`_node_tensors`, less a host value's: the tensors that hold device memory."""
    return [] if node.meta.get(HOST_VALUE) else _node_tensors(node)


def _tensors(val: Any) -> list[torch.Tensor]:
    if isinstance(val, torch.Tensor):
        return [val]
    if isinstance(val, (list, tuple)):
        return [t for v in val for t in _tensors(v)]
    return []


def storage_key(t: torch.Tensor) -> int:
    """Identity of the storage behind `t`: views share their base's (FakeTensors too)."""
    return t.untyped_storage()._cdata


def storage_bytes(t: torch.Tensor, sizes: Sizes = None) -> int:
    """Bytes of the storage behind `t` (its base's storage for a view)."""
    return concrete(t.untyped_storage().nbytes(), sizes)


def tensor_bytes(node: fx.Node, sizes: Sizes = None) -> int:
    """Storage bytes of every tensor a node produces (0 for non-tensor values)."""
    return sum(storage_bytes(t, sizes) for t in _node_tensors(node))


def new_bytes(node: fx.Node, sizes: Sizes = None) -> int:
    """Bytes of the storages a node allocates: its outputs less those that alias an input."""
    # Lenient on missing metadata (0 bytes): this only sizes a decision for the report.
    inputs = {storage_key(t) for a in node.all_input_nodes for t in _tensors(a.meta.get("val"))}
    fresh = {storage_key(t): storage_bytes(t, sizes)
             for t in _tensors(node.meta.get("val")) if storage_key(t) not in inputs}
    return sum(fresh.values())


@dataclass(frozen=True)
class MemoryEvent:
    """The live bytes right after one node ran (before anything it let go was freed)."""

    phase: str
    node: str
    live_bytes: int


@dataclass
class MemorySimulation:
    """The simulated timeline of one step, its peak, and what stays live between the graphs."""

    events: list[MemoryEvent] = field(default_factory=list)
    saved_bytes: int = 0
    """Bytes live between the forward and the backward (saved values and user outputs)."""

    @property
    def peak_bytes(self) -> int:
        """The most bytes live at once above what was live when the step started."""
        return max((e.live_bytes for e in self.events), default=0)

    @property
    def peak_event(self) -> MemoryEvent | None:
        """The first event at the peak."""
        return max(self.events, key=lambda e: e.live_bytes, default=None)


class _LiveStorages:
    """Reference counts per storage; bytes of storages the step allocated and still holds."""

    def __init__(self, sizes: Sizes):
        self.sizes = sizes
        self.refs: dict[int, int] = {}
        self.nbytes: dict[int, int] = {}
        self.live = 0

    def hold(self, tensors: Iterable[torch.Tensor], *, external: bool = False) -> None:
        for t in tensors:
            key = storage_key(t)
            if key not in self.refs:
                self.refs[key] = 0
                # Storages that existed before the step (parameters, inputs) cost nothing new.
                self.nbytes[key] = 0 if external else storage_bytes(t, self.sizes)
                self.live += self.nbytes[key]
            self.refs[key] += 1

    def release(self, tensors: Iterable[torch.Tensor]) -> None:
        for t in tensors:
            key = storage_key(t)
            self.refs[key] -= 1
            if self.refs[key] == 0:
                self.live -= self.nbytes.pop(key)
                del self.refs[key]


def _last_users(gm: fx.GraphModule) -> dict[fx.Node, list[fx.Node]]:
    """For each node, the values whose last use it is (as FX's codegen frees them)."""
    last_use: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        for inp in node.all_input_nodes:
            last_use[inp] = node
    frees: dict[fx.Node, list[fx.Node]] = {n: [] for n in gm.graph.nodes}
    for value, user in last_use.items():
        if user.op != "output":
            frees[user].append(value)
    for node in gm.graph.nodes:
        if node.op not in ("placeholder", "output") and not node.users:
            frees[node].append(node)
    return frees


def simulate_graph(
    gm: fx.GraphModule,
    live: _LiveStorages,
    phase: str,
    events: list[MemoryEvent],
    *,
    external_inputs: Iterable[str] = (),
    handover: Iterable[torch.Tensor] = (),
) -> list[list[torch.Tensor]]:
    """Run `gm` on the live-storage model; return the tensors of each output, held for the caller.

    Placeholders named in `external_inputs` existed before the step. `handover` are references
    the caller drops once the graph holds its inputs (autograd clears its saved tensors when the
    backward starts, leaving the backward graph the only holder).
    """
    external = set(external_inputs)
    frees = _last_users(gm)
    output = gm.graph.find_nodes(op="output")[0]
    for node in gm.graph.find_nodes(op="placeholder"):
        live.hold(_device_tensors(node), external=node.name in external)
    live.release(handover)
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        live.hold(_device_tensors(node))
        events.append(MemoryEvent(phase, node.name, live.live))
        for value in frees[node]:
            live.release(_device_tensors(value))
    results = [
        _device_tensors(a) if isinstance(a, fx.Node) else []
        for a in _output_args(output)
    ]
    for tensors in results:
        live.hold(tensors)
    # The graph's locals go when it returns: values last used by the return, unused inputs.
    for node in gm.graph.nodes:
        returned = node in output.all_input_nodes  # the return is always the last use
        unused_input = node.op == "placeholder" and not node.users
        if returned or unused_input:
            live.release(_device_tensors(node))
    return results


def _output_args(output: fx.Node) -> list[Any]:
    args = output.args[0]
    return list(args) if isinstance(args, (list, tuple)) else [args]


def _obeys_layout_contract(grad: torch.Tensor, param: torch.Tensor) -> bool:
    """Whether autograd may keep `grad` as `param.grad` as is, else it copies it
    (torch/csrc/autograd/utils/grad_layout_contract.h)."""
    if is_non_overlapping_and_dense_or_false(param):
        return all(
            gs == ps if size != 1 else gs != 0
            for size, gs, ps in zip(grad.shape, grad.stride(), param.stride())
        )
    return grad.is_contiguous()


def simulate_step(
    fw: fx.GraphModule, bw: fx.GraphModule, *, num_user_outputs: int, sizes: Sizes = None
) -> MemorySimulation:
    """Simulate one training step: the forward graph, then autograd running the backward graph.

    `num_user_outputs` is how many of the forward's outputs the user gets (the rest are saved
    for the backward). Bytes are counted above what was live when the step started.
    """
    live, sim = _LiveStorages(sizes), MemorySimulation()
    primals = fw.graph.find_nodes(op="placeholder")
    outs = simulate_graph(fw, live, "forward", sim.events,
                          external_inputs=[n.name for n in primals])
    sim.saved_bytes = live.live
    saved = [t for ts in outs[num_user_outputs:] for t in ts]
    # autograd.backward makes one tangent per output (ones_like(loss)) and holds it throughout.
    tangents = [t for n in bw.graph.find_nodes(op="placeholder") if is_tangent(n)
                for t in _tensors(n.meta["val"])]
    live.hold(tangents)
    sim.events.append(MemoryEvent("backward", "tangents", live.live))
    grads = simulate_graph(bw, live, "backward", sim.events, handover=saved)
    for primal, grad in zip(primals, grads):
        param = primal.meta.get("val")
        if grad and isinstance(param, torch.Tensor) and not _obeys_layout_contract(grad[0], param):
            # AccumulateGrad copies the gradient into the parameter's layout, then drops it.
            live.live += concrete(param.numel(), sizes) * param.element_size()
            sim.events.append(MemoryEvent("accumulate", primal.name, live.live))
            live.release(grad)
    live.release(tangents)
    return sim
