"""Compiled chunk bodies: a stream region's token-local ops run as Inductor-compiled segments
instead of one Python call per FX node (`runtime="inductor"`; `runtime="eager"` keeps
`ChunkRunner`'s loop, the reference the tests compare with).

A chunk's work is cut at the nodes the runtime must evaluate itself (`_own_step`): attention
over the sequence (prefix kernels, key blocks, sinks), the head's reductions when a
`reduce_hook` takes them, and `getitem`s of values made outside the segment. Each maximal run
of other activation nodes between them, of one range class (computed on `[start, end)`, or on
`[0, end)` for what keys and values are made from), is one segment: a GraphModule whose inputs
are the values it reads (chunk activations, side inputs, input-only values already narrowed to
the chunk) and whose outputs are only the values read by a later step or kept, so `ChunkRunner`'s
memory rule (a value dies after its last reader) holds at segment granularity and Inductor
frees what lives inside one.

Views and element-wise ops of weights that require grad (a projection's transposed weight)
are made inside the graph (`_weight_views`): a backward chunk would otherwise make them, and
backpropagate through them, in Python for every chunk.

A segment's graph is written with canonical names and its sequence sizes in terms of one
symbolic chunk length (read off an input's size), so the layers of a model produce the same code;
its compiled callable is cached on that code and its inputs' shapes modulo the chunk length
(`_CACHE`). The chunk dimension of every input is marked dynamic: the last, shorter chunk and a
prefix `[0, end)` that grows from chunk to chunk reuse one compiled graph. A chunk of one token
specializes (Dynamo's 0/1 rule): one more graph, once; so does a prefix `[0, end)` that reaches
the whole length in a batch of several sequences (the slice turns contiguous). Autograd runs
through a compiled callable, so a backward chunk (its forward with autograd, then
`autograd.grad`) gets a compiled backward.

A segment whose compile fails runs its nodes in Python (`ChunkRunner.evaluate`), after one
warning that names the cause; `STATS` counts graphs compiled, cache hits and fallbacks.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from memcompile.analysis.sequence import SeqDim
from memcompile.runtime.document_mask import evaluate_input_only
from memcompile.runtime.stream import _RESHAPE, _SIZE_ARG_OPS, ChunkRunner, narrow_seq

log = logging.getLogger(__name__)


@dataclass
class CompileStats:
    """What the compiled bodies did in this process (tests read it; `reset` zeroes it)."""

    graphs: int = 0
    """Graphs Inductor compiled (a segment's forward under autograd and without count once
    each; AOTAutograd's backward of one is part of it)."""
    kinds: int = 0
    """Distinct segments (by `_segment_key`): cache misses."""
    hits: int = 0
    """Segments of a layer or config that found their compiled callable in the cache."""
    calls: int = 0
    """Compiled segment calls (one per segment per chunk)."""
    fallbacks: int = 0
    """Segments that failed to compile and run in Python."""
    failures: list[str] = field(default_factory=list)
    """Why each fallback happened."""

    def reset(self) -> None:
        """Zero every count."""
        self.__init__()


STATS = CompileStats()

_CACHE: dict[tuple, Callable[..., Any] | None] = {}
"""Compiled callables by segment key; None: the key failed to compile (runs in Python)."""


def clear_cache() -> None:
    """Forget every compiled segment (tests that count compiles start from here)."""
    _CACHE.clear()


@dataclass(frozen=True)
class _Read:
    """One input of a segment: a value made outside it, as the segment's nodes read it."""

    source: fx.Node
    whole: bool
    """From `whole` (input-only or side input), else from the chunk's values."""
    rows: SeqDim | None
    """The sequence dimension of the value as read (narrowed to the chunk), or None."""


@dataclass
class _Segment:
    """A run of token-local nodes of one range class, compiled as one callable."""

    nodes: list[fx.Node]
    from_zero: bool
    reads: list[_Read] = field(default_factory=list)
    outputs: list[fx.Node] = field(default_factory=list)
    fn: Callable[..., Any] | None = None
    """The compiled callable; None runs `nodes` in Python."""
    key: tuple = ()


@dataclass
class _Plan:
    """The steps of one kind of `run` call: a node the runtime evaluates itself, or a
    segment; `drops[i]`: values no step after `i` reads."""

    steps: list[fx.Node | _Segment]
    drops: list[list[fx.Node]]
    whole_nodes: list[fx.Node]
    """The input-only values a call evaluates (what segments read as inputs, what the runtime's
    own steps read, and what those are made from)."""


class CompiledBodies:
    """`ChunkRunner.run` through compiled segments: one plan per kind of call (which nodes it
    evaluates, what it keeps, whether keys' inputs start at zero), made at its first chunk."""

    def __init__(self, runner: ChunkRunner):
        self.runner = runner
        self.plans: dict[tuple, _Plan] = {}
        self.detached: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        """Side inputs (weights) detached once, by id, for segments run without autograd."""

    def run(self, x: torch.Tensor | None, start: int, end: int, whole: dict[fx.Node, Any], *,
            reduce_hook: Callable[[fx.Node, tuple, dict], Any] | None = None,
            preset: dict[fx.Node, tuple[Any, int]] | None = None,
            only: set[fx.Node] | None = None, keep: Sequence[fx.Node] = (),
            x_start: int | None = None, prefix_from_zero: bool = True,
            sinks: dict[fx.Node, torch.Tensor] | None = None) -> dict[fx.Node, Any]:
        """What `ChunkRunner.run` returns, for the same arguments (its docstring)."""
        runner, region = self.runner, self.runner.region
        env: dict[fx.Node, Any] = {}
        starts: dict[fx.Node, int] = {}
        if x is not None:
            env[region.input] = x
            starts[region.input] = (runner.start_of(region.input, start, prefix_from_zero)
                                    if x_start is None else x_start)
        for node, (value, first) in (preset or {}).items():
            env[node], starts[node] = value, first
        key = (None if only is None else frozenset(only), prefix_from_zero,
               reduce_hook is not None, tuple(keep), tuple(preset or ()), x is not None)
        plan = self.plans.get(key)
        # Input-only values: whole, cached across chunks; once planned, only those read
        # outside the segments' own graphs.
        for node in region.nodes if plan is None else plan.whole_nodes:
            if node not in runner.tail and node not in runner.activations and node not in whole:
                whole[node] = evaluate_input_only(node, _resolve(node.args, whole),
                                                  _resolve(node.kwargs, whole))
        if plan is None:
            plan = self.plans[key] = _make_plan(runner, only, keep, prefix_from_zero,
                                                reduce_hook is not None, whole)
        keep_set = set(keep)
        for step, dead in zip(plan.steps, plan.drops):
            if isinstance(step, _Segment):
                first = 0 if step.from_zero else start
                _run_segment(runner, step, env, starts, whole, first, end, self.detached)
            else:
                first = runner.start_of(step, start, prefix_from_zero)
                env[step] = runner.evaluate(step, env, starts, whole, first, end, reduce_hook,
                                            sinks)
                starts[step] = first
            for node in dead:
                if node not in keep_set:
                    env.pop(node, None)
        return {n: env[n] for n in keep if n in env}


def _make_plan(runner: ChunkRunner, only: set[fx.Node] | None, keep: Sequence[fx.Node],
               prefix_from_zero: bool, hooked: bool, whole: dict[fx.Node, Any]) -> _Plan:
    """Cut the nodes a call evaluates into steps (module docstring), then decide each
    segment's inputs and outputs and compile it (or find it compiled)."""
    region = runner.region
    evaluated = [n for n in region.nodes if n not in runner.tail and n in runner.activations
                 and (only is None or n in only)]
    steps: list[fx.Node | _Segment] = []
    open_: dict[bool, _Segment] = {}
    home: dict[fx.Node, _Segment] = {}

    def flush(segment: _Segment) -> None:
        # What the segment reads from the other open segment must be computed first.
        for other in list(open_.values()):
            if other is not segment and any(home.get(a) is other for n in segment.nodes
                                            for a in n.all_input_nodes):
                flush(other)
        if open_.get(segment.from_zero) is segment:
            del open_[segment.from_zero]
            steps.append(segment)

    for node in evaluated:
        from_zero = prefix_from_zero and node in region.prefix
        reads_open = {id(home[a]): home[a] for a in node.all_input_nodes
                      if a in home and home[a] in open_.values()}
        if _own_step(runner, node, hooked, open_.get(from_zero), home):
            for segment in reads_open.values():
                flush(segment)
            steps.append(node)
            continue
        for segment in reads_open.values():  # a value of the other class: computed before
            if segment.from_zero != from_zero:
                flush(segment)
        segment = open_.get(from_zero)
        if segment is None:
            segment = open_[from_zero] = _Segment([], from_zero)
        segment.nodes.append(node)
        home[node] = segment
    for segment in sorted(open_.values(), key=lambda s: not s.from_zero):
        flush(segment)
    drops = _drops(steps)
    for i, step in enumerate(steps):
        if isinstance(step, _Segment):
            _prepare(runner, step, steps[i + 1:], keep, whole)
    return _Plan(steps, drops, _whole_read(runner, steps))


def _whole_read(runner: ChunkRunner, steps: list[fx.Node | _Segment]) -> list[fx.Node]:
    """The input-only nodes the steps read from `whole`, with what they are made from, in
    region order; a segment's graph makes the rest itself (`_weight_views`)."""
    needed: set[fx.Node] = set()
    for step in steps:
        if isinstance(step, _Segment) and step.fn is not None:
            needed.update(r.source for r in step.reads if r.whole)
        else:
            needed.update(a for n in _nodes(step) for a in n.all_input_nodes)
    for node in reversed(runner.region.nodes):
        if node in needed:
            needed.update(node.all_input_nodes)
    return [n for n in runner.region.nodes if n in needed and n not in runner.activations]


def _own_step(runner: ChunkRunner, node: fx.Node, hooked: bool, segment: _Segment | None,
              home: dict[fx.Node, _Segment]) -> bool:
    """Whether the runtime evaluates `node` itself: attention over the sequence, a hooked
    reduction, a `getitem` of a value not made in `segment` (the open one of its class:
    `ChunkRunner._item` narrows what another class made)."""
    if node.target is operator.getitem:
        return segment is None or home.get(node.args[0]) is not segment
    return runner._over_sequence(node) or (hooked and node in runner.region.reductions)


def _nodes(step: fx.Node | _Segment) -> list[fx.Node]:
    return step.nodes if isinstance(step, _Segment) else [step]


def _drops(steps: list[fx.Node | _Segment]) -> list[list[fx.Node]]:
    """For each step, the values (its own, earlier steps', the input's, presets') no later
    step reads; the caller keeps what it was asked to keep."""
    made_at = {node: i for i, step in enumerate(steps) for node in _nodes(step)}
    last = dict(made_at)
    for i, step in enumerate(steps):
        for node in _nodes(step):
            for arg in node.all_input_nodes:
                if made_at.get(arg) != i:
                    last[arg] = max(last.get(arg, i), i)
    drops: list[list[fx.Node]] = [[] for _ in steps]
    for node, i in last.items():
        drops[i].append(node)
    return drops


def _prepare(runner: ChunkRunner, segment: _Segment, later: list, keep: Sequence[fx.Node],
             whole: dict[fx.Node, Any]) -> None:
    """Decide `segment`'s outputs (what later steps read, or the caller keeps) and inputs,
    build its graph and find or compile its callable."""
    read_later = {a for step in later for n in _nodes(step) for a in n.all_input_nodes}
    segment.outputs = [n for n in segment.nodes if n in read_later or n in keep]
    try:
        gm, specs = _segment_graph(runner, segment, whole)
    except _Unsupported as why:
        _fall_back(segment, f"{segment.nodes[0].name}..: {why}")
        return
    segment.key = (gm.code, tuple(specs))
    if segment.key in _CACHE:
        STATS.hits += 1
        segment.fn = _CACHE[segment.key]
        return
    STATS.kinds += 1
    _CACHE[segment.key] = segment.fn = torch.compile(gm, backend=_counted_inductor,
                                                     fullgraph=True)


class _Unsupported(Exception):
    """A segment this module cannot write as a graph (it runs in Python)."""


def _segment_graph(runner: ChunkRunner, segment: _Segment, whole: dict[fx.Node, Any]
                   ) -> tuple[fx.GraphModule, list[tuple]]:
    """The segment as a GraphModule with canonical names (so equal layers give equal code),
    and each input's spec: dtype, device, shape with the chunk dimension as None."""
    info = runner.info
    inline = _weight_views(runner, whole)
    graph = fx.Graph()
    placeholders: dict[_Read, fx.Node] = {}
    mapping: dict[fx.Node, fx.Node] = {}
    length: list[fx.Node] = []  # the chunk length, read off an input once

    def read(reader: fx.Node, arg: fx.Node) -> Any:
        if arg in mapping:
            return mapping[arg]
        if arg in inline:
            mapping[arg] = graph.call_function(
                arg.target, fx.node.map_arg(arg.args, lambda a: read(arg, a)),
                fx.node.map_arg(arg.kwargs, lambda a: read(arg, a)), name=f"w{len(mapping)}")
            return mapping[arg]
        if arg in whole:
            value = whole[arg]
            if not isinstance(value, torch.Tensor):
                if isinstance(value, (int, float, bool, type(None))):
                    return value
                raise _Unsupported(f"input-only {arg.name} is a {type(value).__name__}")
            key = _Read(arg, True, runner.whole_rows(reader, arg, value))
        else:
            seq = info.dim_of(arg)
            key = _Read(arg, False, seq if isinstance(seq, SeqDim) else None)
        if key not in placeholders:
            placeholders[key] = graph.placeholder(f"in{len(placeholders)}")
        return placeholders[key]

    def chunk_length() -> fx.Node:
        if not length:
            inputs = [(r, p) for r, p in placeholders.items() if r.rows is not None]
            if not inputs:
                raise _Unsupported("no input carries the sequence")
            r, p = min(inputs, key=lambda rp: rp[0].rows.outer * rp[0].rows.inner)
            size = graph.call_method("size", (p, r.rows.dim))
            factor = r.rows.outer * r.rows.inner
            length.append(size if factor == 1 else graph.call_function(
                operator.floordiv, (size, factor)))
        return length[0]

    for i, node in enumerate(segment.nodes):
        args = fx.node.map_arg(node.args, lambda a, node=node: read(node, a))
        kwargs = fx.node.map_arg(node.kwargs, lambda a, node=node: read(node, a))
        target = node.target
        seq = info.dim_of(node)
        if target in _SIZE_ARG_OPS and isinstance(seq, SeqDim) and args[1][seq.dim] != -1:
            sizes = list(args[1])
            factor = seq.outer * seq.inner
            sizes[seq.dim] = chunk_length() if factor == 1 else graph.call_function(
                operator.mul, (chunk_length(), factor))
            args = (args[0], sizes, *args[2:])
            target = _RESHAPE.get(target, target)  # a narrowed input may not be viewable
        mapping[node] = graph.call_function(target, tuple(args), dict(kwargs), name=f"v{i}")
    graph.output(tuple(mapping[n] for n in segment.outputs))
    segment.reads = list(placeholders)
    specs = [_spec(r, whole[r.source] if r.whole else r.source.meta.get("val"))
             for r in segment.reads]
    return fx.GraphModule(torch.nn.Module(), graph), specs


def _weight_views(runner: ChunkRunner, whole: dict[fx.Node, Any]) -> set[fx.Node]:
    """Input-only values a segment makes itself from the weights: views and element-wise
    ops of side inputs that require grad (a transposed projection weight). Made once per layer
    call in Python they are cheap, but a backward chunk makes them again (from leaves, for
    their gradients) and backpropagates through them: inside the compiled graph both are free.
    """
    made: set[fx.Node] = set()
    for node in runner.region.nodes:
        if node in runner.activations or node in runner.tail:
            continue
        target = node.target
        cheap = isinstance(target, torch._ops.OpOverload) and (
            target.is_view or torch.Tag.pointwise in target.tags)
        reads = node.all_input_nodes
        if cheap and reads and all(a in made or (a in runner.region.side_inputs
                                                 and _requires_grad(whole.get(a)))
                                   for a in reads) and not any(
                runner.whole_rows(user, node, whole[node]) is not None for user in node.users):
            made.add(node)  # (none read along the sequence: a graph never narrows them)
    return made


def _requires_grad(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.requires_grad


def _spec(read: _Read, value: Any) -> tuple:
    if not isinstance(value, torch.Tensor):
        raise _Unsupported(f"{read.source.name} is not a tensor")
    shape = list(value.shape)
    if read.rows is not None:
        shape[read.rows.dim] = None
    return (read.whole, read.rows, value.dtype, str(value.device), tuple(shape))


def _counted_inductor(gm: fx.GraphModule, example_inputs: list[Any]) -> Any:
    """Inductor, counting the graphs it compiles (`STATS.graphs`)."""
    from torch._inductor.compile_fx import compile_fx

    STATS.graphs += 1
    return compile_fx(gm, example_inputs)


def _run_segment(runner: ChunkRunner, segment: _Segment, env: dict[fx.Node, Any],
                 starts: dict[fx.Node, int], whole: dict[fx.Node, Any], first: int,
                 end: int, detached: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Run one segment on `[first, end)`: its outputs land in `env`."""
    if segment.fn is None:
        _fill_whole(runner, segment, whole)
        return _run_in_python(runner, segment, env, starts, whole, first, end)
    inputs = []
    grad = torch.is_grad_enabled()
    for read in segment.reads:
        if read.whole:
            value = whole[read.source]
            if read.rows is not None:
                value = narrow_seq(value, read.rows, first, end - first)
        else:
            value = env[read.source]
            if read.rows is not None and starts[read.source] != first:
                value = narrow_seq(value, read.rows, first - starts[read.source], end - first)
        if not grad and value.requires_grad:
            # Without autograd, whether an input requires grad (or is a Parameter) changes
            # nothing but would change Dynamo's guards from one layer to the next. A weight
            # is detached once, not once per chunk.
            if read.whole and read.source in runner.region.side_inputs:
                held = detached.get(id(value))
                if held is None or held[0] is not value:
                    if len(detached) > 4 * len(runner.region.side_inputs):
                        detached.clear()  # leaves of past backwards: not met again
                    held = detached[id(value)] = (value, value.detach())
                value = held[1]
            else:
                value = value.detach()
        if read.rows is not None:
            torch._dynamo.maybe_mark_dynamic(value, read.rows.dim)
        inputs.append(value)
    try:
        outputs = segment.fn(*inputs)
    except Exception as error:  # noqa: BLE001 - any compile failure: the nodes run in Python
        if not _compile_failed(error):
            raise
        _CACHE[segment.key] = None
        _fall_back(segment, f"{segment.nodes[0].name}..: {type(error).__name__}: {error}")
        _fill_whole(runner, segment, whole)
        return _run_in_python(runner, segment, env, starts, whole, first, end)
    STATS.calls += 1
    for node, value in zip(segment.outputs, outputs):
        env[node], starts[node] = value, first


def _compile_failed(error: Exception) -> bool:
    """Whether `error` came from Dynamo or Inductor compiling (not from running the code)."""
    from torch._dynamo.exc import BackendCompilerFailed, TorchDynamoException

    return isinstance(error, (BackendCompilerFailed, TorchDynamoException))


def _run_in_python(runner: ChunkRunner, segment: _Segment, env: dict[fx.Node, Any],
                   starts: dict[fx.Node, int], whole: dict[fx.Node, Any], first: int,
                   end: int) -> None:
    """The segment's nodes one by one, as `ChunkRunner.run` would; only its outputs stay."""
    for node in segment.nodes:
        env[node] = runner.evaluate(node, env, starts, whole, first, end)
        starts[node] = first
    kept = set(segment.outputs)
    for node in segment.nodes:
        if node not in kept:
            env.pop(node, None)


def _fill_whole(runner: ChunkRunner, segment: _Segment, whole: dict[fx.Node, Any]) -> None:
    """The input-only values a segment run in Python reads (its graph made some itself)."""
    for node in runner.region.nodes:
        if (node not in runner.activations and node not in runner.tail
                and node not in whole):
            whole[node] = evaluate_input_only(node, _resolve(node.args, whole),
                                              _resolve(node.kwargs, whole))


def _fall_back(segment: _Segment, why: str) -> None:
    segment.fn = None
    STATS.fallbacks += 1
    STATS.failures.append(why)
    log.warning("stream: a chunk body segment runs in Python: %s", why)


def _resolve(value: Any, env: dict[fx.Node, Any]) -> Any:
    return fx.node.map_aggregate(value, lambda a: env[a] if isinstance(a, fx.Node) else a)
