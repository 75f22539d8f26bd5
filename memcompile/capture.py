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

import torch.fx as fx
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters

from memcompile.config import Options
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


def compile_graph(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Options) -> Any:
    """Compile one Dynamo graph with memcompile's passes and the runtime the options name."""
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
    return compiled


def _aot_cache_hits() -> int:
    return counters["aot_autograd"]["autograd_cache_hit"]
