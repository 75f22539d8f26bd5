"""Compile one Dynamo graph under `options["sequence_parallel"]`.

The captured graph goes through the "capture" pipeline first (the `sequence_parallel` pass:
each attention across the ranks), then the default path (`capture.compile_graph`: the joint
pipeline, where `sequence_parallel_grads` sums the weights' gradients, the partition and the
runtime). StreamBP stays off: streaming a rank's shard is not built. A byte budget over
symbolic sizes is planned per size, each size coming back here.

Every rank compiles the same graphs in the same order, so a collective here is safe: ranks
agree on rank 0's measured cost model, so they plan the same remat and run the same graphs
(`_agreed_cost_model`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx

from memcompile.capture import compile_graph
from memcompile.config import Options
from memcompile.passes.stream_plan import STREAM_PASS
from memcompile.per_size import CompiledPerSize, is_symbolic
from memcompile.report import discard_record, new_record
from memcompile.runner import run_passes
from memcompile.unmet import origin

_STREAM_NOTE = ("stream 'auto': off under sequence_parallel (streaming a rank's shard is not "
                "built; memory_budget plans the step's peak)")


def compile_sequence_parallel(gm: fx.GraphModule, example_inputs: Sequence[Any],
                              options: Options) -> Callable[..., Any]:
    """The captured graph through the "capture" pipeline (each attention across the ranks),
    then the default path; StreamBP stays off."""
    from memcompile.backend import memcompile  # the backend calls this module

    if isinstance(options.memory_budget, int) and is_symbolic(example_inputs):
        return CompiledPerSize(gm, options, memcompile)  # each size comes back here
    options = _agreed_cost_model(options, example_inputs)
    record = new_record(origin(gm))
    try:
        gm, records = run_passes(gm, example_inputs, options=options, graph_name=record.name,
                                 graph="capture")
    except BaseException:
        discard_record(record)
        raise
    record.passes = records
    record.notes.extend((done.name, text) for done in records for text in done.notes)
    if options.stream == "auto":
        record.notes.append((STREAM_PASS, _STREAM_NOTE))
    return compile_graph(gm, example_inputs, options, record)


def _agreed_cost_model(options: Options, example_inputs: Sequence[Any]) -> Options:
    """`options` with rank 0's measured cost model on every rank of the group.

    Each rank would time the ops itself and might plan a different remat; then its graphs, and
    where Inductor schedules their transfers and all-reduces, could differ from its peers',
    and ranks would wait on each other. The same constants give the same plan everywhere."""
    if options.cost_model != "measured":
        return options
    from memcompile.analysis.cost import cost_model

    floats = [x for x in example_inputs if isinstance(x, torch.Tensor) and x.is_floating_point()]
    device = floats[0].device.type if floats else "cpu"
    dtype = max(floats, key=lambda x: x.numel() * x.element_size()).dtype if floats \
        else torch.float32
    box = [cost_model("measured", device, dtype).to_dict()]
    dist.broadcast_object_list(box, group=options.sequence_parallel.group, group_src=0)
    return options.replace(cost_model=box[0])
