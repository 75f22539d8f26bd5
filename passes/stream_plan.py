"""Decide StreamBP's regions on a forward aten graph: layers re-run in sequence chunks, and a
loss head computed chunk by chunk.

The graph is read, never the model's classes (`analysis.sequence` supplies the facts):

- An *activation* is a value that depends on a parameter and on a token input. A *cut* is an
  activation that, once computed, is the only activation still needed: the residual stream
  between layers, for instance. Nothing else flows from one side of a cut to the other except
  parameters and values built from the inputs alone (rotary tables, masks).
- A *layer* runs from one cut to the next cut of the same shape that lies past exactly one
  token-mixing op (attention). Its backward re-runs it one chunk of queries at a time, with keys
  and values for the prefix, from its saved input only.
- The *head* runs from the last layer's output to the graph's outputs: token-local ops, then
  reductions over the sequence (the loss), then a tail on the reduced values. It runs chunk by
  chunk, so the `(T, vocabulary)` logits never exist, or, when the model returns them beside
  its loss (the form trainers call), exist only as the value returned to the caller: written
  chunk by chunk, with no gradient, log-softmax or other whole-length value kept for the
  backward.

With `stream={"dim": "batch"}` the plan is along the batch instead (`plan_batch`): the
per-sample part of a graph whose loss couples the samples (a contrastive loss) runs a chunk of
samples at a time.

A layer holding an op the analysis does not know, or attention that is not over the sequence,
is not chunked; the report says which op and why.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from memcompile.analysis.attention import SEQUENCE_ATTENTION_OPS, is_causal
from memcompile.analysis.attention import dropout as attention_dropout
from memcompile.analysis.attention import mask as attention_mask
from memcompile.analysis.eager_attention import EAGER_ATTENTION
from memcompile.analysis.masks import DOCUMENT_MASK
from memcompile.analysis.sequence import (SeqDim, SequenceInfo, analyze_sequence,
                                          fresh_cache_update)
from memcompile.config import Options, StreamOptions
from memcompile.distributed.ops import SP_ATTENTION
from memcompile.meta import STREAM_PLAN, Decision, record_decision, record_note, record_unmet
from memcompile.passes.registry import register_pass
from memcompile.planning.stream_chunks import MIN_AUTO_CHUNK, choose_chunks
from memcompile.planning.stream_memory import checkpoints_for, estimate
from memcompile.planning.stream_schedule import (Reversal, groups_reversal, least_checkpoints,
                                               reversal)

log = logging.getLogger(__name__)

STREAM_PASS = "stream_plan"
_ADDITIVE = (torch.ops.aten.nll_loss_forward.default, torch.ops.aten.sum.dim_IntList,
             torch.ops.aten.mean.dim, torch.ops.aten.sum.default, torch.ops.aten.mean.default)
"""Reductions over the sequence whose value is a sum of per-chunk shares."""
_NLL = torch.ops.aten.nll_loss_forward.default
HEAD_MAX_CHUNK = 1024
"""The most tokens per head chunk when `logits_chunk_size` is "auto"."""
DEFAULT_BATCH_CHUNK = 32
"""Samples per chunk when chunking the batch and `chunk_size` is "auto"."""
HEAD_CHUNK_BYTES = 32 * 2**20
"""With `logits_chunk_size` "auto", head chunks hold about this many bytes of their largest
value (the logits): 256 tokens of a 32000-word vocabulary in float32, 1024 of 4096.
Smaller chunks reread the head's weight more often: 64 tokens made `small`'s step 1.5x slower."""


@dataclass
class Region:
    """A part of the graph run as one unit: a layer, or the head."""

    kind: str
    """ "layer" or "head". """
    input: fx.Node
    """The cut it starts from (its only activation input)."""
    outputs: list[fx.Node]
    nodes: list[fx.Node]
    """Its nodes in graph order, the input cut excluded."""
    side_inputs: list[fx.Node] = field(default_factory=list)
    """Values from outside it, other than the input: parameters, masks, rotary tables."""
    chunk_size: int = 0
    keys_values: str = "once"
    """Layer only: "once" (keys and values computed once per backward, their gradients summed
    over chunks) or "per_chunk" (each chunk recomputes them over its prefix)."""
    prefix: set[fx.Node] = field(default_factory=set)
    """Nodes a chunk needs from the sequence's start (keys and values of attention)."""
    keep_attention: bool = False
    """Layer only: its attention outputs are kept from the forward pass for its backward
    (`StreamOptions.keep_attention`, `runtime.kept_attention`)."""
    reductions: list[fx.Node] = field(default_factory=list)
    """Head only: the nodes that reduce over the sequence."""
    tail: set[fx.Node] = field(default_factory=set)
    """Head: what is computed from the reduced values (run once, after the chunks). Batch:
    what is computed from the boundary values (the loss coupling the samples)."""
    chunked: set[fx.Node] = field(default_factory=set)
    """Batch only: the per-sample part, run chunk by chunk."""
    boundary: list[fx.Node] = field(default_factory=list)
    """Batch only: the per-sample values the tail reads (the embeddings)."""
    affine_tail: bool = False
    """Head only: whether the outputs are affine in the reduced values (their gradients are
    then constants, known before the chunks run)."""
    sequence_outputs: list[fx.Node] = field(default_factory=list)
    """Head only: outputs computed token by token before the reductions (the logits a model
    returns beside its loss), written chunk by chunk into whole-length buffers for the caller;
    nothing of them is kept for the backward."""


@dataclass
class StreamPlan:
    """The regions of one graph, in order, and the analysis they were decided on."""

    info: SequenceInfo
    activations: set[fx.Node]
    regions: list[Region]
    notes: list[str] = field(default_factory=list)
    layers_per_checkpoint: int = 1
    """Consecutive layers sharing one saved input (`StreamOptions.layers_per_checkpoint`)."""
    checkpoints: int | None = None
    """The most layer inputs a run of layers holds at once (from `memory_budget`); None: every
    layer's input is kept."""

    @property
    def runs(self) -> list[list[Region]]:
        """The layers in runs, each layer's input the previous one's output."""
        runs: list[list[Region]] = []
        for region in self.layers:
            if runs and region.input is runs[-1][-1].outputs[0]:
                runs[-1].append(region)
            else:
                runs.append([region])
        return runs

    def reversal(self, n: int) -> Reversal:
        """How the backward of a run of `n` consecutive layers gets their inputs back."""
        if self.layers_per_checkpoint > 1:
            return groups_reversal(n, self.layers_per_checkpoint)
        return reversal(n, max(self.checkpoints or n, least_checkpoints(n)))

    @property
    def layers(self) -> list[Region]:
        """The layer regions, in order."""
        return [r for r in self.regions if r.kind == "layer"]

    @property
    def head(self) -> Region | None:
        """The head region, if the loss is chunked."""
        return next((r for r in self.regions if r.kind == "head"), None)


def _chunk(value: int | str, default: int) -> int:
    return default if value == "auto" else int(value)


def stream_options(options: Options) -> StreamOptions:
    """The stream options in full, with defaults for `True` and "auto"."""
    return options.stream if isinstance(options.stream, StreamOptions) else StreamOptions()


def _weights(placeholders: list[fx.Node], example_inputs: list[Any]) -> set[fx.Node]:
    """The inputs that are weights: those that require grad, and frozen parameters (a LoRA
    model's base weights), which make activations as much as trained ones do."""
    return {p for p, x in zip(placeholders, example_inputs) if isinstance(x, torch.Tensor)
            and (x.requires_grad or isinstance(x, torch.nn.Parameter))}


def _activations(graph: fx.Graph, info: SequenceInfo, weights: set[fx.Node]) -> set[fx.Node]:
    """Values computed from a weight and a token input: what a layer's chunks recompute (values
    from the inputs alone, such as masks and rotary tables, are computed whole)."""
    from_params: set[fx.Node] = set(weights)
    from_tokens: set[fx.Node] = {n for n in info.dims if n.op == "placeholder"}
    for node in graph.nodes:
        if node.op == "call_function":
            if any(a in from_params for a in node.all_input_nodes):
                from_params.add(node)
            if any(a in from_tokens for a in node.all_input_nodes):
                from_tokens.add(node)
    return {n for n in from_params & from_tokens if n.op == "call_function"}


def _cuts(nodes: list[fx.Node], activations: set[fx.Node], info: SequenceInfo) -> list[fx.Node]:
    """Activations that are the only activation live right after they are computed."""
    index = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((index[u] for u in n.users), default=index[n]) for n in activations}
    dying: dict[int, int] = {}
    for n in activations:
        if last_use[n] > index[n]:
            dying[last_use[n]] = dying.get(last_use[n], 0) + 1
    live, cuts = 0, []
    for i, node in enumerate(nodes):
        live -= dying.get(i, 0)
        if node in activations and last_use[node] > i:
            live += 1
            if live == 1 and _is_sequence_tensor(node, info):
                cuts.append(node)
    return cuts


def _is_sequence_tensor(node: fx.Node, info: SequenceInfo) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor) and isinstance(info.dim_of(node),
                                                                         SeqDim)


def _owned(nodes: list[fx.Node], members: set[fx.Node], activations: set[fx.Node]) -> set[fx.Node]:
    """`members` and the non-activation values used only by them (built once per region)."""
    owned = set(members)
    for node in reversed(nodes):
        if (node.op == "call_function" and node not in activations and node not in owned
                and node.users and all(u in owned for u in node.users)):
            owned.add(node)
    return owned


def _region(kind: str, nodes: list[fx.Node], start: int, stop: int, activations: set[fx.Node],
            outputs: list[fx.Node]) -> Region:
    members = {n for n in nodes[start + 1:stop + 1] if n in activations}
    owned = _owned(nodes[:stop + 1], members, activations)
    body = [n for n in nodes if n in owned]
    side: list[fx.Node] = []
    for node in body:
        for arg in node.all_input_nodes:
            if arg not in owned and arg is not nodes[start] and arg not in side:
                side.append(arg)
    return Region(kind, nodes[start], outputs, body, side)


def _prefix_nodes(region: Region, activations: set[fx.Node]) -> set[fx.Node]:
    """Region nodes a chunk needs from the start of the sequence: what keys and values read."""
    prefix: set[fx.Node] = set()
    stack = [a for n in region.nodes if n.target in SEQUENCE_ATTENTION_OPS for a in n.args[1:3]]
    inside = set(region.nodes)
    while stack:
        node = stack.pop()
        if node in prefix or node not in inside or node not in activations:
            continue
        prefix.add(node)
        stack.extend(node.all_input_nodes)
    return prefix


def _layer_problem(region: Region, plan_info: SequenceInfo, activations: set[fx.Node]) -> str | None:
    """Why a layer region cannot be re-run in chunks, or None if it can."""
    for node in region.nodes:
        if node not in activations:
            continue
        effect = plan_info.effects.get(node, "local")
        if effect == "unknown":
            return f"{node.name}: {plan_info.unknown_reason.get(node, 'unknown op')}"
        if effect == "reduces":
            return f"{node.name} ({node.target}) reduces over the sequence"
        if effect == "mixes" and node.target not in SEQUENCE_ATTENTION_OPS:
            return f"{node.name} ({node.target}) mixes tokens and is not attention"
        if node.target in SEQUENCE_ATTENTION_OPS and not _causal_or_masked(node):
            return f"{node.name}: attention that is neither causal nor masked (bidirectional)"
    return None


def _causal_or_masked(node: fx.Node) -> bool:
    return is_causal(node) or attention_mask(node) is not None


def _head_problem(region: Region, info: SequenceInfo, activations: set[fx.Node]) -> str | None:
    """Why the head cannot run chunk by chunk, or None if it can. A head with no reduction
    over the sequence chunks when its outputs are per-token values (log-probabilities taken
    from the logits, say): each chunk writes its rows."""
    per_token = [o for o in region.outputs if isinstance(info.dim_of(o), SeqDim)]
    if not region.reductions and (not per_token or len(per_token) < len(region.outputs)):
        return ("no op reduces over the sequence after the last layer, and its outputs are not "
                "all per-token values (no loss in the graph)")
    after = _descendants(region.reductions, set(region.nodes))
    for out in region.outputs:
        val = out.meta.get("val")
        if out in after or not isinstance(val, torch.Tensor) or info.dim_of(out) is None:
            continue
        if not isinstance(info.dim_of(out), SeqDim) or out not in activations:
            return (f"{out.name} {tuple(val.shape)} is an output of the graph that holds the "
                    "sequence in a form the head cannot write chunk by chunk")
    for node in region.nodes:
        if node not in activations or node in after or node in region.reductions:
            continue
        effect = info.effects.get(node, "local")
        if effect != "local" or not isinstance(info.dim_of(node), (SeqDim, tuple)):
            return f"{node.name} ({node.target}): {info.unknown_reason.get(node, effect)}"
    for node in region.reductions:
        if node.target not in _ADDITIVE:
            return f"{node.name} ({node.target}) is not a sum over the sequence"
        if node.target is torch.ops.aten.nll_loss_forward.default and node.args[2] is not None:
            return f"{node.name}: a class-weighted loss (only an unweighted one is chunked)"
    return None


_LINEAR = {torch.ops.aten.add.Tensor, torch.ops.aten.sub.Tensor, torch.ops.aten.neg.default,
           torch.ops.aten.sum.default, torch.ops.aten.sum.dim_IntList,
           torch.ops.aten.mean.default, torch.ops.aten.mean.dim, torch.ops.aten.view.default,
           torch.ops.aten.reshape.default, torch.ops.aten.squeeze.dim,
           torch.ops.aten.unsqueeze.default, torch.ops.aten.clone.default,
           torch.ops.aten.alias.default, torch.ops.aten.expand.default}
"""Ops whose output is linear in each tensor input."""
_SCALING = {torch.ops.aten.mul.Tensor, torch.ops.aten.div.Tensor}
"""Ops linear in an input only if the other does not depend on the reductions (and, for div,
is not the one depending on them)."""


def _affine_in(reductions: list[fx.Node], tail: set[fx.Node]) -> bool:
    """Whether every tail value is affine in the reductions, read off the tail's ops."""
    dependent = set(reductions)
    order = [n for n in next(iter(reductions)).graph.nodes if n in tail] if reductions else []
    for node in order:
        inputs = [a for a in node.all_input_nodes if a in dependent]
        dependent.add(node)
        if node.target is operator.getitem:
            continue
        if node.target in _LINEAR:
            continue
        if node.target in _SCALING:
            if len(inputs) == 1 and (node.target is torch.ops.aten.mul.Tensor
                                     or node.args[0] is inputs[0]):
                continue
        return False
    return True


def _descendants(roots: list[fx.Node], inside: set[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [u for r in roots for u in r.users]
    while stack:
        node = stack.pop()
        if node in seen or node not in inside:
            continue
        seen.add(node)
        stack.extend(node.users)
    return seen


def _shape_of(node: fx.Node) -> tuple[int, ...]:
    return tuple(node.meta["val"].shape)


def _find_layers(nodes: list[fx.Node], cuts: list[fx.Node], attentions: list[fx.Node],
                 end: int, plan: StreamPlan) -> list[tuple[int, int]]:
    """(input index, output index) of each layer: one attention between two same-shaped cuts."""
    index = {n: i for i, n in enumerate(nodes)}
    spans: list[tuple[int, int]] = []
    previous = -1
    for k, attention in enumerate(attentions):
        a = index[attention]
        before = [index[c] for c in cuts if previous <= index[c] < a]
        if not before:
            plan.notes.append(f"{attention.name}: no single activation flows into it from the "
                              "previous layer; not chunked")
            continue
        start = previous if previous in before else before[-1]
        stop = index[attentions[k + 1]] if k + 1 < len(attentions) else end
        shape = _shape_of(nodes[start])
        after = [index[c] for c in cuts if a < index[c] < stop and _shape_of(c) == shape]
        if not after:
            plan.notes.append(f"{attention.name}: no value of its input's shape {shape} carries "
                              "the whole layer to the next one; not chunked")
            continue
        spans.append((start, after[-1]))
        previous = after[-1]
    return spans


def plan_batch(gm: fx.GraphModule, example_inputs: list[Any], options: Options
               ) -> StreamPlan | None:
    """Decide the per-sample part of a graph whose loss couples the batch (contrastive).

    The per-sample part is every activation that keeps the batch dimension and is computed
    from the inputs and other per-sample values only; its values the rest reads (the
    embeddings) are the boundary; the rest (the loss) is the tail. The per-sample part runs
    chunk by chunk of samples, twice: without autograd for the boundary, then with it to take
    the boundary's gradients back. None, with a note, when nothing can be chunked.
    """
    gm.graph.eliminate_dead_code()
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    params = _weights(placeholders, example_inputs)
    info = analyze_sequence(gm.graph, dim="batch", parameters=params)
    if info is None:
        record_note(gm, STREAM_PASS, "no batched input of rank 2 or more: no batch to chunk")
        return None
    if any(isinstance(x, torch.Tensor) and x.requires_grad and p in info.dims
           for p, x in zip(placeholders, example_inputs)):
        record_note(gm, STREAM_PASS, "a batched input requires grad: batch chunking gives "
                    "gradients to parameters only; not chunked")
        return None
    activations = _activations(gm.graph, info, params)
    nodes = list(gm.graph.nodes)
    chunked: set[fx.Node] = set()
    for node in nodes:
        if (node in activations and info.effects.get(node) == "local"
                and isinstance(info.dim_of(node), (SeqDim, tuple))
                and all(a in chunked or a not in activations for a in node.all_input_nodes)):
            chunked.add(node)
    boundary = [n for n in nodes if n in chunked
                and any(u not in chunked for u in n.users)]
    plan = StreamPlan(info, activations, [])
    problem = _batch_problem(boundary, info, activations, chunked)
    if problem:
        record_note(gm, STREAM_PASS, f"batch: not chunked: {problem}")
        return None
    output = next(iter(gm.graph.find_nodes(op="output")))
    body = [n for n in nodes if n.op == "call_function"]
    region = Region("batch", None, _flatten(output.args[0]), body,
                    [n for n in placeholders if n.users])  # type: ignore[arg-type]
    region.chunked, region.boundary = chunked, boundary
    region.tail = {n for n in body if n in activations and n not in chunked}
    stream = stream_options(options)
    region.chunk_size = _chunk(stream.chunk_size, DEFAULT_BATCH_CHUNK)
    plan.regions.append(region)
    biggest = max(chunked, key=_bytes)
    record_decision(gm, Decision(
        STREAM_PASS, "chunked", biggest.name, _bytes(biggest),
        f"batch: the per-sample part runs {region.chunk_size} samples at a time, so "
        f"{biggest.name} {tuple(biggest.meta['val'].shape)} never exists whole; the loss reads "
        + ", ".join(f"{b.name} {tuple(b.meta['val'].shape)}" for b in boundary)))
    return plan


def _batch_problem(boundary: list[fx.Node], info: SequenceInfo, activations: set[fx.Node],
                   chunked: set[fx.Node]) -> str | None:
    if not boundary:
        return "no per-sample value feeds a loss that couples the batch"
    for node in boundary:
        if not isinstance(node.meta.get("val"), torch.Tensor) or not isinstance(
                info.dim_of(node), SeqDim):
            return f"{node.name} is read by the loss but is not a per-sample tensor"
    for node in activations - chunked:
        if info.effects.get(node) == "unknown" and any(a in chunked for a in
                                                         node.all_input_nodes):
            return f"{node.name}: {info.unknown_reason.get(node)}"
    return None


@register_pass(STREAM_PASS, default=True, rank=100, graph="stream")
def stream_plan_pass(gm: fx.GraphModule, example_inputs: Sequence[Any], *,
                     options: Options | None = None) -> fx.GraphModule:
    """Decide StreamBP's regions and keep the plan in `gm.meta[STREAM_PLAN]`; the graph itself
    is not rewritten (the stream runtime runs the plan). No plan, with a note, when nothing can
    be chunked."""
    gm.meta.pop(STREAM_PLAN, None)
    plan = plan_stream(gm, list(example_inputs), options or Options())
    if plan is not None:
        gm.meta[STREAM_PLAN] = plan
    return gm


def plan_stream(gm: fx.GraphModule, example_inputs: list[Any], options: Options) -> StreamPlan | None:
    """Decide the layers and the head of a forward aten graph; None if nothing can be chunked.

    Writes a "chunked" decision per layer and for the head, and a note for each part left
    whole, into `gm.meta`. With `stream={"dim": "batch"}`, decides the batch chunking instead
    (`plan_batch`).
    """
    if stream_options(options).dim == "batch":
        return plan_batch(gm, example_inputs, options)
    gm.graph.eliminate_dead_code()
    info = analyze_sequence(gm.graph)
    if info is None:
        record_note(gm, STREAM_PASS, "no integer (batch, length) input: no sequence to chunk")
        return None
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    activations = _activations(gm.graph, info, _weights(placeholders, example_inputs))
    nodes = list(gm.graph.nodes)
    cuts = _cuts(nodes, activations, info)
    attentions = [n for n in nodes if n in activations and n.target in SEQUENCE_ATTENTION_OPS]
    reducing = [i for i, n in enumerate(nodes)
                if n in activations and info.effects.get(n) == "reduces"]
    end = reducing[0] if reducing else len(nodes) - 1
    stream = stream_options(options)
    plan = StreamPlan(info, activations, [], layers_per_checkpoint=stream.layers_per_checkpoint)
    _note_returned_cache(gm, info, plan)
    chunk = _chunk(stream.chunk_size, MIN_AUTO_CHUNK)  # "auto": sized in `_hold`
    not_kept: list[str] = []
    for start, stop in _find_layers(nodes, cuts, attentions, end, plan):
        region = _region("layer", nodes, start, stop, activations, [nodes[stop]])
        problem = _layer_problem(region, info, activations)
        if problem:
            plan.notes.append(f"layer at {region.input.name}: not chunked: {problem}")
            continue
        region.chunk_size = chunk
        region.keys_values = stream.keys_values
        region.prefix = _prefix_nodes(region, activations)
        if stream.keep_attention:
            unkept = _why_attention_not_kept(region)
            region.keep_attention = unkept is None
            if unkept and unkept not in not_kept:
                not_kept.append(unkept)
        plan.regions.append(region)
    last = max((nodes.index(r.outputs[0]) for r in plan.layers), default=None)
    if last is not None:
        _plan_head(gm, nodes, last, activations, plan, stream.logits_chunk_size)
    if not plan.regions:
        record_note(gm, STREAM_PASS, "nothing to chunk: " + "; ".join(plan.notes or [
            "no attention over the sequence was found"]))
        return None
    for reason in not_kept:
        record_unmet(gm, STREAM_PASS, f"keep_attention: {reason}")
    _hold(gm, plan, example_inputs, options)
    _record(gm, plan)
    return plan


def _why_attention_not_kept(region: Region) -> str | None:
    """Why `region`'s attention outputs cannot be kept for its backward (None: they can). The
    backward replays them on `chunk_attention`'s prefix path: keys and values computed once,
    causal attention on a fused kernel with no mask over queries and no dropout."""
    if region.keys_values != "once":
        return ("keys_values 'per_chunk' recomputes each chunk's keys over its prefix; only "
                "keys_values 'once' keeps attention outputs")
    for node in region.nodes:
        if node.target not in SEQUENCE_ATTENTION_OPS:
            continue
        if node.target is SP_ATTENTION:
            return ("attention across ranks (sequence_parallel) merges every rank's keys; its "
                    "outputs are recomputed")
        if node.target is EAGER_ATTENTION:
            return (f"{node.name} is transformers' eager attention, which has no fused "
                    "backward to replay; use attn_implementation='sdpa'")
        if not is_causal(node) or attention_dropout(node):
            return f"{node.name} is not causal attention without dropout"
        mask = attention_mask(node)
        if isinstance(mask, fx.Node) and mask.target is DOCUMENT_MASK:
            return f"{node.name} has a document mask, whose chunks are recomputed"
    return None


def _note_returned_cache(gm: fx.GraphModule, info: SequenceInfo, plan: StreamPlan) -> None:
    """Say what to change when the graph returns a KV cache built in the forward.

    A returned cache makes every layer's keys and values outputs of the step: they must exist
    whole, so the layers that made them cannot be re-run chunk by chunk."""
    output = next(iter(gm.graph.find_nodes(op="output")))
    cache = [o for o in dict.fromkeys(_flatten(output.args[0])) if fresh_cache_update(o, info)]
    if cache:
        plan.notes.append(
            f"the forward returns a KV cache it builds ({len(cache)} key/value tensors: "
            f"{', '.join(o.name for o in cache[:4])}{', ...' if len(cache) > 4 else ''}), so "
            "every layer's keys and values must exist whole; a model that trains needs no "
            "cache: set model.config.use_cache = False (or pass use_cache=False)")


def _hold(gm: fx.GraphModule, plan: StreamPlan, example_inputs: list[Any],
          options: Options) -> None:
    """Decide how long layer chunks are (`chunk_size`, or sized by `choose_chunks`) and how many
    layer inputs a run holds at once (`stream.checkpoints`, else from a numeric
    `memory_budget`); record both, with the estimated peak."""
    if not plan.layers:
        return
    parameters = [x for x in example_inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    stream = stream_options(options)
    given = stream.checkpoints if isinstance(stream.checkpoints, int) else None
    if stream.chunk_size == "auto":
        choice = choose_chunks(plan, parameters, options.memory_budget, given)
        memory, plan.checkpoints = choice.memory, choice.checkpoints
        record_note(gm, STREAM_PASS, choice.why)
    else:
        memory = estimate(plan, parameters)
        plan.checkpoints = given if given else checkpoints_for(options.memory_budget, memory)
    kept = set()
    for run in plan.runs:
        walk = plan.reversal(len(run))
        kept.update(run[k].input for k in walk.kept_in_forward())
    walk = plan.reversal(memory.layers)
    budget = options.memory_budget
    for k, region in enumerate(plan.layers):
        kind = "saved" if region.input in kept else "recomputed"
        record_decision(gm, Decision(
            STREAM_PASS, kind, region.input.name, _bytes(region.input),
            f"layer {k}'s input: " + ("kept by the forward" if kind == "saved" else
                                      "rebuilt in the backward from an earlier kept input")))
    record_note(gm, STREAM_PASS, (
        f"layer inputs: at most {walk.held()} of {memory.layers} held at once; the backward "
        f"recomputes {walk.recomputed()} layer forwards to get the others back; estimated peak "
        f"{memory.peak(walk.held()):,} bytes above the step's start"
        + (f" (memory_budget {budget!r})" if budget not in (None, "auto") else "")))


def _plan_head(gm: fx.GraphModule, nodes: list[fx.Node], last: int, activations: set[fx.Node],
               plan: StreamPlan, chunk: int | str) -> None:
    output = next(iter(gm.graph.find_nodes(op="output")))
    members = {n for n in nodes[last + 1:] if n in activations}
    outputs = list(dict.fromkeys(o for o in _flatten(output.args[0]) if o in members))
    region = _region("head", nodes, last, len(nodes) - 2, activations, outputs)
    region.reductions = [n for n in region.nodes
                         if n in activations and plan.info.effects.get(n) == "reduces"]
    region.tail = _descendants(region.reductions, set(region.nodes))
    problem = _head_problem(region, plan.info, activations)
    if problem:
        plan.notes.append(f"head after {region.input.name}: not chunked: {problem}")
        return
    region.chunk_size = chunk if isinstance(chunk, int) else _head_chunk(region, plan)
    region.affine_tail = _affine_in(region.reductions, region.tail)
    region.sequence_outputs = [o for o in outputs if o not in region.tail
                               and isinstance(plan.info.dim_of(o), SeqDim)]
    plan.regions.append(region)


def _head_chunk(region: Region, plan: StreamPlan) -> int:
    """Tokens per head chunk so that its largest value holds about `HEAD_CHUNK_BYTES`."""
    per_token = max(_bytes(n) for n in region.nodes if n in plan.activations) / plan.info.length
    tokens = int(HEAD_CHUNK_BYTES // max(per_token, 1))
    return max(16, min(HEAD_MAX_CHUNK, 1 << max(tokens, 1).bit_length() - 1))


def _flatten(value: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_aggregate(value, lambda a: out.append(a) if isinstance(a, fx.Node) else None)
    return out


def _bytes(node: fx.Node) -> int:
    val = node.meta.get("val")
    return val.numel() * val.element_size() if isinstance(val, torch.Tensor) else 0


def _record(gm: fx.GraphModule, plan: StreamPlan) -> None:
    for k, region in enumerate(plan.layers):
        record_decision(gm, Decision(
            STREAM_PASS, "chunked", region.outputs[0].name, _bytes(region.input),
            f"layer {k}: nothing inside it is saved; the backward re-runs it from its input "
            f"{region.input.name}, {region.chunk_size} queries at a time, "
            + ("keys and values computed once over the whole length"
               if region.keys_values == "once" else "keys and values over each chunk's prefix")))
    head = plan.head
    if head is not None:
        biggest = max((n for n in head.nodes if n in plan.activations), key=_bytes)
        returned = ", ".join(f"{o.name} {tuple(o.meta['val'].shape)}"
                             for o in head.sequence_outputs)
        record_decision(gm, Decision(
            STREAM_PASS, "chunked", biggest.name, _bytes(biggest),
            f"head: computed {head.chunk_size} tokens at a time, so {biggest.name} "
            f"{tuple(biggest.meta['val'].shape)} "
            + ("never exists whole" if biggest not in head.sequence_outputs else
               "exists only as the value returned")
            + "; reduced by " + ", ".join(str(r.target).split('.')[-2] for r in head.reductions)
            + (f"; returned to the caller, written chunk by chunk and kept for no backward: "
               f"{returned}" if returned else "")))
    for text in plan.notes:
        record_note(gm, STREAM_PASS, text)
    log.info("stream: %d layers chunked, head %s", len(plan.layers),
             "chunked" if head else "whole")
