"""A graph with symbolic sizes compiled once per set of sizes it runs at.

A byte `memory_budget` is a promise about a step's peak, and the peak grows with the length:
a plan made at the length Dynamo captured a symbolic graph at can exceed the budget at a longer
one. So a symbolic graph under a byte budget is specialized at each new set of sizes (its
symbolic size inputs replaced by the integers of the call) and compiled again, statically,
with the same options: each length gets the cheapest plan that meets the budget there, or a
`MemoryBudgetError` with that length's least peak. The cost is one compile per distinct length,
which is what `dynamic=False` would cost, without Dynamo's recompile limit (the specialized
graphs are separate modules, not recompiles of the user's frame).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch._dynamo.exc import BackendCompilerFailed

from memcompile.config import Options
from memcompile.errors import MemcompileError, MemoryBudgetError


def is_symbolic(example_inputs: Sequence[Any]) -> bool:
    """Whether Dynamo captured the graph with symbolic sizes (a size input, or a tensor whose
    shape holds a symbol)."""
    return any(isinstance(x, torch.SymInt) or (
        isinstance(x, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in x.shape))
        for x in example_inputs)


def sizes_key(args: Sequence[Any]) -> tuple:
    """What a per-size compile is keyed by: each tensor's shape, and each integer input."""
    return tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args)


def specialize(gm: fx.GraphModule, args: Sequence[Any]) -> fx.GraphModule:
    """A copy of `gm` whose integer inputs are the constants of `args` (the sizes of one call);
    it takes the other inputs, in order."""
    graph = fx.Graph()
    graph._codegen = gm.graph._codegen  # how the module takes and returns its values
    graph.output(graph.graph_copy(gm.graph, {}))
    static = fx.GraphModule(gm, graph)
    for node, value in zip(list(static.graph.find_nodes(op="placeholder")), args):
        if isinstance(value, int) and not isinstance(value, bool):
            node.replace_all_uses_with(value)  # type: ignore[arg-type]
            static.graph.erase_node(node)
    static.recompile()
    return static


class CompiledPerSize:
    """Calls `gm` compiled statically by `backend` at the sizes of each call, one compile per
    distinct set of sizes (a tensor's shape, an integer input)."""

    def __init__(self, gm: fx.GraphModule, options: Options,
                 backend: Callable[..., Any]):
        self.gm = gm
        self.backend = functools.partial(backend, options=options)
        self.compiled: dict[tuple, Callable[..., Any]] = {}

    def __call__(self, *args: Any) -> Any:
        key = sizes_key(args)
        fn = self.compiled.get(key)
        if fn is None:
            fn = torch.compile(specialize(self.gm, args), backend=self.backend, dynamic=False,
                               fullgraph=True)
            self.compiled[key] = fn
        tensors = [a for a in args if not (isinstance(a, int) and not isinstance(a, bool))]
        try:
            return fn(*tensors)
        except BackendCompilerFailed as e:
            inner = e.inner_exception
            if isinstance(inner, MemoryBudgetError):  # the budget's message, and where
                inner.args = (f"{inner} (at input sizes {_shapes(key)})",)
            if isinstance(inner, MemcompileError):
                raise inner from None
            raise


def _shapes(key: tuple) -> str:
    """The call's integer size inputs (its symbolic sizes), else its tensors' shapes."""
    sizes = [str(k) for k in key if not isinstance(k, tuple)]
    return ", ".join(sizes or ["x".join(map(str, k)) for k in key])
