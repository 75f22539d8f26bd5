"""The stream path: a Dynamo graph run by StreamBP's runtime (`options["stream"]`).

The Dynamo graph is traced to an aten forward graph with static sizes, and the runner runs the
stream pipeline on it (`eager_attention`, `causal_mask`, `key_mask`, `document_mask`,
`stream_plan`; `options["passes"]` and `"disable_passes"` name them). The plan runs in
`runtime.stream_program.StreamProgram`. Under `stream="auto"`, `planning.stream_auto.decide`
chooses between that program and the default path.

A graph Dynamo captured with a symbolic length (its automatic dynamic recompile at a second
length, or `mark_dynamic`) is planned at the length it was captured at, and then once per length
it runs at: its plan's regions and chunk ranges are sizes of one length. Where no plan results,
the graph takes the default path (`capture.compile_graph`) with a `MemcompileWarning` saying why
when the user asked for stream explicitly, a note under "auto".
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from memcompile.analysis.sequence import is_token_tensor
from memcompile.capture import (compile_graph, is_scalar_input, planned_remat_peak,
                                trace_static)
from memcompile.config import Options
from memcompile.meta import DECISIONS, NOTES, STREAM_PLAN, UNMET
from memcompile.optim import fused
from memcompile.per_size import sizes_key
from memcompile.passes.registry import resolve_pipeline
from memcompile.passes.stream_plan import STREAM_PASS
from memcompile.planning.stream_auto import decide, streamed_gradient_bytes
from memcompile.report import GraphRecord, discard_record, new_record
from memcompile.runner import run_passes
from memcompile.runtime.stream_program import StreamProgram
from memcompile.unmet import origin, warn_unmet

log = logging.getLogger(__name__)


def compile_stream(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Options, *,
                   auto: bool = False) -> Any:
    """Compile one Dynamo graph with StreamBP, or by the default path where it cannot apply.

    `auto` (`stream="auto"`): stream only where `stream_auto.decide` says it pays; the default
    path otherwise, with a note (no warning: the user asked for nothing)."""
    where = origin(gm)
    record = new_record(where)
    if any(isinstance(x, torch.Tensor) and _has_symbolic_shape(x) for x in example_inputs):
        reason = "a tensor input has symbolic sizes"
        return _without_stream(gm, example_inputs, options, record, reason, auto)
    if not all(isinstance(x, (torch.Tensor, int, torch.SymInt)) for x in example_inputs):
        kinds = sorted({type(x).__name__ for x in example_inputs
                        if not isinstance(x, (torch.Tensor, int, torch.SymInt))})
        return _without_stream(gm, example_inputs, options, record,
                               f"inputs of types {', '.join(kinds)}", auto)
    if auto and not torch.is_grad_enabled():
        return _without_stream(gm, example_inputs, options, record, "no backward", auto)
    if auto and not any(is_token_tensor(x) for x in example_inputs):
        return _without_stream(gm, example_inputs, options, record,
                               "no integer (batch, length) input: no sequence to chunk", auto)
    concrete = [_hint(x) for x in example_inputs]
    try:
        program = _stream_program(gm, concrete, options, record, auto)
    except Exception as error:  # noqa: BLE001 - "auto" never fails a compile it could do
        if not auto:
            raise
        log.info("%s: stream 'auto': the stream attempt failed: %r", record.name, error)
        return _without_stream(gm, example_inputs, options, new_record(where),
                               f"the stream path could not trace the graph "
                               f"({type(error).__name__}: {error})", auto)
    if program is None:
        return _without_stream(gm, example_inputs, options, record,
                               _no_plan_reason(record, options), auto)
    if any(isinstance(x, torch.SymInt) or is_scalar_input(x) for x in example_inputs):
        return StreamPerSize(gm, options, where, concrete, program)
    return program


class StreamPerSize:
    """A graph with symbolic sizes, streamed: one `StreamProgram` per set of sizes it runs at,
    planned when those sizes first arrive (the first at compile time). Scalar tensor inputs
    (`capture.is_scalar_input`, traced at their values) are part of the key too.

    A size whose graph cannot be planned (it never happened in the tests: the plan depends on
    the graph's structure, not its length) runs the captured graph as it is, with a warning.
    """

    def __init__(self, gm: fx.GraphModule, options: Options, where: str,
                 example: Sequence[Any], program: StreamProgram):
        self.gm, self.options, self.where = gm, options, where
        self.programs: dict[tuple, StreamProgram | None] = {_key(example): program}

    def __call__(self, *args: Any) -> Any:
        key = _key(args)
        if key not in self.programs:
            record = new_record(self.where)
            self.programs[key] = _stream_program(self.gm, list(args), self.options, record)
            if self.programs[key] is None:
                warn_unmet(record, [(STREAM_PASS, f"at sizes {key}: "
                                     f"{_no_plan_reason(record, self.options)}; this size runs "
                                     "the captured graph unchanged")])
        program = self.programs[key]
        return self.gm(*args) if program is None else program(*args)


def _stream_program(gm: fx.GraphModule, inputs: Sequence[Any], options: Options,
                    record: GraphRecord, auto: bool = False) -> StreamProgram | None:
    """Trace `gm` at the sizes of `inputs`, run the stream pipeline, and fill `record`; the
    program, or None (the record's notes say why) when no plan results or, with `auto`, when
    streaming does not pay."""
    try:
        forward, record.passes = stream_forward(gm, inputs, options, record.name)
    except BaseException:
        discard_record(record)
        raise
    plan = forward.meta.get(STREAM_PLAN)
    record.notes = list(forward.meta.get(NOTES, []))
    if plan is None:
        return None
    if auto:
        parameters = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
        held = streamed_gradient_bytes(plan, list(forward.graph.find_nodes(op="placeholder")),
                                       list(inputs))
        decision = decide(plan, parameters, held,
                          lambda: _remat_peak(gm, inputs, options, record.name))
        log.info("%s: %s", record.name, decision)
        record.notes.append((STREAM_PASS, str(decision)))
        if not decision.on:
            return None
    record.kind = "stream"
    record.stream_plan = plan
    record.forward = forward
    record.forward_code = forward.code
    compiled = options.runtime == "inductor"
    if compiled:
        record.notes.append((STREAM_PASS, "stream regions run their chunk bodies as "
                                          "Inductor-compiled segments, shared across chunks "
                                          "and layers"))
    log.info("%s: stream: %d layers chunked, head %s", record.name, len(plan.layers),
             "chunked" if plan.head else "whole")
    program = StreamProgram(forward, plan, fused.slots_of(inputs),  # records fused updates
                            compiled=compiled)
    for made, (chain, _) in program.rebuilt.items():
        reads = sorted({n.name for node in chain for n in node.all_input_nodes} - set(
            n.name for n in chain))
        record.notes.append((STREAM_PASS, f"first layer input {made.name}: made again in the "
                             f"backward ({len(chain)} ops from {', '.join(reads)}) instead of "
                             "held"))
    record.decisions = list(forward.meta.get(DECISIONS, []))
    unmet = list(forward.meta.get(UNMET, []))
    if options.offload:
        reason = ("the graph streams (StreamBP), whose runtime holds only layer inputs and "
                  "moves nothing to the host; offload applies to the remat plan's saved values "
                  "(stream=False)")
        record.notes.append(("offload", f"not applied: {reason}"))
        unmet.append(("offload", reason))
    if options.dump_dir:
        record.dump(options.dump_dir)
    warn_unmet(record, unmet)
    return program


def _remat_peak(gm: fx.GraphModule, inputs: Sequence[Any], options: Options,
                name: str) -> int | None:
    """The remat plan's planned peak for `stream="auto"` to weigh; None (the whole-length
    estimate stands in) when planning it fails."""
    try:
        return planned_remat_peak(gm, inputs, options, name)
    except Exception as error:  # noqa: BLE001 - the decision has a stand-in
        log.info("%s: stream 'auto': planning the remat plan failed: %r", name, error)
        return None


def stream_forward(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Options,
                   graph_name: str) -> tuple[fx.GraphModule, list[Any]]:
    """The Dynamo graph as a static aten graph, through the stream pipeline; its plan, if one
    was made, is in `meta[STREAM_PLAN]`. Returns it and the runner's pass records."""
    return run_passes(trace_static(gm, example_inputs), list(example_inputs), options=options,
                      graph_name=graph_name, graph="stream")


def _no_plan_reason(record: GraphRecord, options: Options) -> str:
    if STREAM_PASS not in resolve_pipeline(options.passes, options.disable_passes,
                                           options.runtime, graph="stream"):
        return (f"the {STREAM_PASS} pass is not in the pipeline (options 'passes'/"
                "'disable_passes')")
    return "; ".join(text for name, text in record.notes if name == STREAM_PASS)


def _key(args: Sequence[Any]) -> tuple:
    """The sizes of a call and the values of its scalar tensor inputs."""
    return (sizes_key(args), tuple(x.item() for x in args if is_scalar_input(x)))


def _hint(x: Any) -> Any:
    """A symbolic size as the value Dynamo captured it at (no guard is installed)."""
    return int(x.node.hint) if isinstance(x, torch.SymInt) else x


def _has_symbolic_shape(x: torch.Tensor) -> bool:
    return any(isinstance(s, torch.SymInt) for s in x.shape)


def _without_stream(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Options,
                    record: GraphRecord, reason: str, auto: bool = False) -> Any:
    """Compile as `compile_graph` does, keeping the stream attempt's record and warning why
    (noting why, for `auto`)."""
    log.info("%s: stream not applied: %s", record.name, reason)
    if auto:  # the attempt's passes and notes describe a plan not taken: keep the decision
        record.passes = []
        record.notes = [n for n in record.notes if n[1].startswith("stream 'auto'")] or [
            (STREAM_PASS, f"stream 'auto': off: {reason}")]
        return compile_graph(gm, example_inputs, options, record)
    record.notes.append((STREAM_PASS, f"not applied: {reason}"))
    return compile_graph(gm, example_inputs, options, record, [(STREAM_PASS, reason)])
