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

import functools
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
from memcompile.meta import REMAT_PLAN
from memcompile.optim import fused
from memcompile.partition import MemcompilePartitioner
from memcompile.passes.registry import resolve_pipeline
from memcompile.passes.stream_plan import STREAM_PASS
from memcompile.report import GraphRecord, discard_record, new_record
from memcompile.runtime.eager import compile_eager
from memcompile.runtime.inductor import compile_inductor
from memcompile.unmet import origin, warn_unmet

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
                  record: GraphRecord | None = None,
                  unmet: Sequence[tuple[str, str]] = ()) -> Any:
    """Compile one Dynamo graph with memcompile's passes and the runtime the options name.

    `record` is the graph's record when a stream attempt made one already, and `unmet` the
    requests it could not honour, (pass name, reason), warned about with the others.
    """
    if record is None:
        record = new_record(origin(gm))
    parameters = [i for i, x in enumerate(example_inputs) if isinstance(x, torch.nn.Parameter)]
    partitioner = MemcompilePartitioner(options, record, fused.slots_of(example_inputs),
                                        parameters)
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
    _check_requests(record, options, [*unmet, *partitioner.unmet])
    return compiled


def _check_requests(record: GraphRecord, options: Options,
                    unmet: list[tuple[str, str]]) -> None:
    """Warn for each explicit request the compiled graph did not honour; note what "auto" and
    graphs without a backward leave alone."""
    numeric = options.memory_budget not in (None, "auto")
    if record.kind == "training" and numeric and "plan_remat" not in resolve_pipeline(
            options.passes, options.disable_passes, options.runtime):
        unmet.append(("plan_remat", f"memory_budget={options.memory_budget!r}: the plan_remat "
                      "pass is not in the pipeline (options 'passes'/'disable_passes'), so "
                      "nothing plans the step's peak"))
    elif record.kind == "inference" and numeric:
        record.notes.append(("plan_remat", "no backward: memory_budget has no saved values to "
                             "plan on this graph"))
    if (options.stream == "auto" and record.kind == "training"
            and options.memory_budget != "auto"):
        record.notes.append((STREAM_PASS, f"stream 'auto': off: memory_budget="
                             f"{options.memory_budget!r} asks for the remat plan (stream is "
                             "decided under memory_budget 'auto'; stream=True streams)"))
    warn_unmet(record, unmet)


def planned_remat_peak(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Options,
                       name: str) -> int | None:
    """The peak `plan_remat` plans for the graph under `options`, above the step's start (the
    parameters' gradients included: AOTAutograd's backward returns them as new tensors); None
    when it plans none (no backward, or the pass is not in the pipeline).

    The joint graph is traced and planned; nothing is split or compiled. It is what
    `stream="auto"` weighs a stream plan against. Outside Dynamo's tracing context, so the
    compile that follows sees none of it."""
    planner = _PlanOnly(options.replace(dump_dir=None), GraphRecord(name=name))
    if options.runtime == "inductor":
        # The joint graph Inductor would hand its partitioner: its decompositions, its
        # joint-graph passes (pattern rewrites that change what is saved).
        from torch._inductor.compile_fx import partition_fn
        from torch._inductor.decomposition import select_decomp_table

        backend = aot_autograd(
            fw_compiler=compile_eager, bw_compiler=compile_eager,
            partition_fn=functools.partial(partition_fn, partitioner_fn_override=planner),
            decompositions=select_decomp_table(), keep_inference_input_mutations=True)
    else:
        backend = aot_autograd(fw_compiler=compile_eager, bw_compiler=compile_eager,
                               partition_fn=planner, keep_inference_input_mutations=True)
    try:
        with torch._guards.tracing(None), torch._functorch.config.patch(
                enable_autograd_cache=False):
            backend(gm, list(example_inputs))
    except _Planned as planned:
        return planned.peak
    return None  # no joint graph: nothing requires grad


class _Planned(Exception):
    """Raised by `_PlanOnly` to stop AOTAutograd once the plan is made."""

    def __init__(self, peak: int | None):
        super().__init__(peak)
        self.peak = peak


class _PlanOnly(MemcompilePartitioner):
    """Runs the joint graph's passes, then stops with the remat plan's peak."""

    def __call__(self, gm: fx.GraphModule, joint_inputs: Sequence[Any], **kwargs: Any) -> Any:
        kwargs.pop("compiler", None)
        gm = self.run_pipeline(gm, joint_inputs, **kwargs)
        plan = gm.meta.get(REMAT_PLAN)
        raise _Planned(plan.chosen_peak if plan is not None else None)


def _aot_cache_hits() -> int:
    return counters["aot_autograd"]["autograd_cache_hit"]


def is_scalar_input(x: Any) -> bool:
    """A 0-dimensional tensor that is not a weight: a value Dynamo passes in for a module's
    number attribute under `dynamic=True`."""
    return (isinstance(x, torch.Tensor) and x.dim() == 0 and not x.requires_grad
            and not isinstance(x, torch.nn.Parameter))


def trace_static(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> fx.GraphModule:
    """The Dynamo graph as an aten graph with static shapes: those of the tensors given, and
    the integers given for its symbolic sizes.

    A fake mode of its own, without a shape environment: inside a backend, Dynamo's ambient
    fake mode would make sizes symbolic. A scalar tensor input the graph reads with `.item()`
    (a module's float or int attribute, such as a norm's epsilon, which `dynamic=True` makes an
    input) is traced at its value (`is_scalar_input`); callers re-plan when it changes.
    """
    mode = FakeTensorMode(shape_env=None)
    fakes = [mode.from_tensor(x, static_shapes=True) if isinstance(x, torch.Tensor) else x
             for x in example_inputs]
    for x, fake in zip(example_inputs, fakes):
        if is_scalar_input(x):
            fake.item_memo = x.item()
    with torch._guards.tracing(None), mode:
        return make_fx(gm, tracing_mode="real")(*fakes)
