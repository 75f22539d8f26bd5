"""The eager runtime: FX graphs run as Python code that frees each value after its last use.

FX's boxed code generator already does what a memory-minded interpreter would: the generated
function takes the argument list, clears it (so inputs die when their last use has run, not when
the caller returns), and sets every local to None right after its last use. The memory simulator
(`memcompile.analysis.memory`) models exactly this order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch.fx as fx
from torch.fx.graph import _BoxedCodeGen


def compile_eager(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[[list], Any]:
    """A boxed callable (takes one list and clears it) that runs `gm` with eager frees."""
    gm.graph.set_codegen(_BoxedCodeGen())
    gm.recompile()
    forward = gm.forward

    def run(args: list) -> Any:
        return forward(args)

    run._boxed_call = True  # type: ignore[attr-defined]
    return run
