"""Compile one Dynamo graph under `options["sequence_parallel"]`.

The captured graph goes through the "capture" pipeline first (the `sequence_parallel` pass:
each attention across the ranks), then the default path (`capture.compile_graph`: the joint
pipeline, where `sequence_parallel_grads` sums the weights' gradients, the partition and the
runtime). A byte budget over symbolic sizes is planned per size, each size coming back here.

With `stream=True` (or a dict) each rank streams its own shard instead (`capture_stream`): a
layer's chunks attend over the keys of every rank (`runtime.stream_shard`), and the weights'
gradients are summed over the ranks by the streamed step (`runtime.stream_shard_grads`), there
being no joint graph. Stream "auto" stays off under sequence parallelism: its estimate does not
weigh the gathered keys and values against the point-to-point schedule.

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
from memcompile.config import Options, StreamOptions
from memcompile.errors import NotAvailableError
from memcompile.optim import fused
from memcompile.passes.stream_plan import STREAM_PASS
from memcompile.per_size import CompiledPerSize, is_symbolic
from memcompile.report import GraphRecord, discard_record, new_record, recording
from memcompile.runner import run_passes
from memcompile.unmet import origin

_STREAM_NOTE = ("stream 'auto': off under sequence_parallel (its estimate does not weigh the "
                "keys and values a streamed shard gathers; stream=True streams each rank's "
                "shard; memory_budget plans the step's peak)")


def compile_sequence_parallel(gm: fx.GraphModule, example_inputs: Sequence[Any],
                              options: Options) -> Callable[..., Any]:
    """The captured graph through the "capture" pipeline (each attention across the ranks),
    then the stream path under `stream=True` (or a dict), else the default path."""
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
    if options.stream is True or isinstance(options.stream, StreamOptions):
        discard_record(record)  # the stream path makes the graph's record
        return _compile_streamed(gm, example_inputs, options, record)
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


def _compile_streamed(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Options,
                      capture: GraphRecord) -> Callable[..., Any]:
    """Each rank streams its shard: the stream path on the rewritten graph, its program's
    gradients summed over the group (`ShardedStep`). `capture` holds the capture passes'
    record, copied into the record the stream path makes."""
    from memcompile.capture_stream import StreamPerSize, compile_stream
    from memcompile.runtime.stream_program import StreamProgram
    from memcompile.runtime.stream_shard_grads import ShardedStep

    if fused.slots_of(example_inputs):
        raise NotAvailableError(
            "sequence_parallel with stream: fused optimizer updates inside the streamed "
            "backward (lowrank(..., fused_backward=True)) are not built (they would read a "
            "weight's gradient before its sum over the ranks); valid: fused_backward=False, "
            "or stream False / 'auto' (off under sequence_parallel)")
    with recording() as made:
        compiled = compile_stream(gm, example_inputs, options)
    for record in made:
        record.passes = [*capture.passes, *record.passes]
        record.notes[:0] = capture.notes
    sp = options.sequence_parallel
    parameters = [i for i, x in enumerate(example_inputs) if isinstance(x, torch.nn.Parameter)]

    def sharded(program: Any) -> Any:
        if program is None:  # StreamPerSize would run the captured graph: no gradient sums
            raise NotAvailableError(
                "sequence_parallel with stream: no stream plan at these sizes, and the graph "
                "run as captured would not sum the weights' gradients over the ranks; valid: "
                "stream False / 'auto' (off under sequence_parallel)")
        if not isinstance(program, StreamProgram):
            return program  # the default path (stream could not apply: a warning says why)
        return ShardedStep(program, parameters, sp.group, sp.timeout)

    if isinstance(compiled, StreamPerSize):  # scalar inputs: one program per value
        compiled.programs = _Sharded(compiled.programs, sharded)
        return compiled
    return sharded(compiled)


class _Sharded(dict):
    """`StreamPerSize.programs` whose programs, made at each new size, get `ShardedStep`."""

    def __init__(self, programs: dict, wrap: Callable[[Any], Any]):
        super().__init__()
        self.wrap = wrap
        for key, program in programs.items():
            self[key] = program

    def __setitem__(self, key: Any, program: Any) -> None:
        super().__setitem__(key, self.wrap(program))
