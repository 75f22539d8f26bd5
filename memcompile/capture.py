"""Capture: a Dynamo graph to AOTAutograd's joint graph, memcompile's passes, and a runtime.

With the eager runtime, memcompile drives AOTAutograd itself (`aot_autograd`), with its own
partitioner and FX graphs run in Python. With the Inductor runtime, Inductor drives AOTAutograd
and memcompile is its partitioner. Either way `MemcompilePartitioner` runs the passes on the
joint graph and records what it did in a `GraphRecord`.

Graphs without a backward (no input requires grad, or `torch.no_grad()`) have no joint graph:
memcompile's passes are about training memory, so they run as captured (eager runtime) or as
Inductor compiles them, with a note saying so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from memcompile.config import Options
from memcompile.meta import DECISIONS, NOTES
from memcompile.optim import fused
from memcompile.partition import MemcompilePartitioner
from memcompile.report import GraphRecord, discard_record, new_record
from memcompile.runtime.eager import compile_eager
from memcompile.runtime.inductor import compile_inductor

log = logging.getLogger(__name__)

_INFERENCE_NOTE = "no backward (no input requires grad): graph run as captured"
_INFERENCE_NOTE_INDUCTOR = "no backward (no input requires grad): compiled by Inductor as is"
_CACHED_NOTE = (
    "loaded from AOTAutograd's cache (forced on by TORCHINDUCTOR_AUTOGRAD_CACHE=1): the graphs "
    "memcompile made for this code and these options before; its passes did not run again"
)


def _inference_compiler(record: GraphRecord) -> Callable[..., Any]:
    def compile_inference(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
        record.kind = "inference"
        record.notes.append(("capture", _INFERENCE_NOTE))
        record.forward_code = gm.code
        log.info("%s: %s", record.name, _INFERENCE_NOTE)
        return compile_eager(gm, example_inputs)

    return compile_inference


def compile_graph(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Options,
                  notes: Sequence[tuple[str, str]] = ()) -> Any:
    """Compile one Dynamo graph with memcompile's passes and the runtime the options name.

    `notes` (pass name, text) are added to the graph's record (why stream did not apply).
    """
    record = new_record()
    fused_slots = {i: slot for i, t in enumerate(example_inputs)
                   if (slot := fused.slot_of(t)) is not None}
    partitioner = MemcompilePartitioner(options, record, fused_slots)
    log.info("%s: captured %d nodes, runtime=%s", record.name, len(gm.graph.nodes),
             options.runtime)
    cache_hits = _aot_cache_hits()
    try:
        if options.runtime == "inductor":
            compiled = compile_inductor(gm, example_inputs, partitioner)
        else:
            backend = aot_autograd(
                fw_compiler=compile_eager,
                bw_compiler=compile_eager,
                inference_compiler=_inference_compiler(record),
                partition_fn=partitioner,
                keep_inference_input_mutations=True,
            )
            compiled = backend(gm, example_inputs)
    except BaseException:
        discard_record(record)
        raise
    if record.kind == "pending" and _aot_cache_hits() > cache_hits:
        # TORCHINDUCTOR_AUTOGRAD_CACHE=1 forces AOTAutograd's cache on: a hit returns the graphs
        # memcompile made earlier for the same code and options, without calling it again.
        record.kind = "cached"
        record.notes.append(("capture", _CACHED_NOTE))
        log.info("%s: %s", record.name, _CACHED_NOTE)
    elif record.kind == "pending":
        # Inductor compiled it without calling the partitioner: there was no backward.
        record.kind = "inference"
        record.notes.append(("capture", _INFERENCE_NOTE_INDUCTOR))
        log.info("%s: %s", record.name, _INFERENCE_NOTE_INDUCTOR)
    record.notes.extend(notes)
    return compiled


def _aot_cache_hits() -> int:
    return counters["aot_autograd"]["autograd_cache_hit"]


def compile_stream(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Options) -> Any:
    """Compile one Dynamo graph with StreamBP (`options["stream"]`), or, where the graph has
    nothing to chunk, as `compile_graph` does, with a note saying why."""
    from memcompile.runtime.stream_program import StreamProgram
    from memcompile.passes.causal_mask import replace_causal_masks
    from memcompile.passes.stream_plan import STREAM_PASS, plan_stream

    if any(not isinstance(x, torch.Tensor) or _has_symbolic_shape(x) for x in example_inputs):
        reason = "stream needs static shapes (a graph with symbolic sizes was captured)"
        return _without_stream(gm, example_inputs, options, reason)
    forward = replace_causal_masks(trace_static(gm, example_inputs))
    plan = plan_stream(forward, list(example_inputs), options)
    if plan is None:
        reason = "; ".join(text for name, text in forward.meta.get(NOTES, [])
                           if name == STREAM_PASS)
        return _without_stream(gm, example_inputs, options, reason)
    record = new_record()
    record.kind = "stream"
    record.stream_plan = plan
    record.forward_code = forward.code
    record.decisions = list(forward.meta.get(DECISIONS, []))
    record.notes = list(forward.meta.get(NOTES, []))
    if options.runtime == "inductor":
        record.notes.append((STREAM_PASS, "stream regions run their chunks eagerly (not through "
                                          "Inductor)"))
    log.info("%s: stream: %d layers chunked, head %s", record.name, len(plan.layers),
             "chunked" if plan.head else "whole")
    return StreamProgram(forward, plan)


def trace_static(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> fx.GraphModule:
    """The Dynamo graph as an aten graph with static shapes.

    A fake mode of its own, without a shape environment: inside a backend, Dynamo's ambient
    fake mode would make sizes symbolic.
    """
    mode = FakeTensorMode(shape_env=None)
    fakes = [mode.from_tensor(x, static_shapes=True) for x in example_inputs]
    with torch._guards.tracing(None), mode:
        return make_fx(gm, tracing_mode="real")(*fakes)


def _has_symbolic_shape(x: torch.Tensor) -> bool:
    return any(isinstance(s, torch.SymInt) for s in x.shape)


def _without_stream(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Options,
                    reason: str) -> Any:
    log.info("stream not applied: %s", reason)
    return compile_graph(gm, example_inputs, options, [("stream_plan", f"not applied: {reason}")])
