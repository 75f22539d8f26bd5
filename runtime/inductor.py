"""The Inductor runtime: Inductor compiles the forward and backward graphs memcompile made.

Inductor drives AOTAutograd itself; memcompile takes its place as the partitioner (Inductor's
`custom_partitioner_fn`), so memcompile's passes see the joint graph after Inductor's own
joint-graph passes and Inductor generates code for the graphs memcompile returns.

AOTAutograd's cache is off for these compilations: a hit would hand back forward and backward
graphs without calling the partitioner, so no pass would run and the report would be empty.
Inductor's own cache of generated code (keyed on each forward or backward graph) stays on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch._inductor.compile_fx import compile_fx
from torch._inductor.custom_graph_pass import CustomPartitionerFn


def compile_inductor(
    gm: fx.GraphModule, example_inputs: Sequence[Any], partitioner: CustomPartitionerFn
) -> Callable[..., Any]:
    """Compile a Dynamo graph with Inductor, splitting its joint graph with `partitioner`."""
    with torch._functorch.config.patch(enable_autograd_cache=False):
        return compile_fx(
            gm, list(example_inputs), config_patches={"custom_partitioner_fn": partitioner}
        )
