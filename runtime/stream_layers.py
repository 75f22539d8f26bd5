"""`StreamLayers`: a run of consecutive layers that keeps some of their inputs (a `Reversal`);
its backward re-runs each layer in sequence chunks. Keys and values are computed once per pass
(or per chunk over its prefix)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx

from memcompile.analysis import attention
from memcompile.analysis.attention import ATTENTION_OPS
from memcompile.analysis.eager_attention import EAGER_ATTENTION
from memcompile.planning.stream_schedule import Reversal
from memcompile.runtime.attention_kernels import accumulation_dtype
from memcompile.runtime.document_mask import DocumentIds
from memcompile.runtime.kept_attention import KeptAttention
from memcompile.runtime.stream import ChunkRunner, mask_is_causal, narrow_seq, write_rows
from memcompile.runtime.stream_accumulate import deliver_complete
from memcompile.runtime.stream_fused import RegionUpdates, update_complete
from memcompile.runtime.stream_grads import RegionGrads, add_into, chunks
from memcompile.runtime.stream_rebuild import Rebuild, held
from memcompile.runtime.stream_shard import (chunkable, gather_keys_values, release,
                                             return_gradients)
from memcompile.runtime.stream_shard_grads import reduce_complete
from memcompile.runtime.stream_tail import fill_whole

log = logging.getLogger(__name__)


class StreamLayers(torch.autograd.Function):
    """A run of consecutive layers that keeps some of their inputs: those `reversal` keeps in
    the forward (every one by default).

    The forward runs each layer chunk by chunk without autograd. The backward walks
    `reversal`: it re-runs the forward of layers whose input was not kept (holding no more
    inputs at once than the reversal allows), and re-runs each layer, last first, chunk by chunk
    with autograd, summing the chunks' gradients. A layer whose input the forward keeps also
    keeps its attention outputs when its region asks (`region.keep_attention`,
    `kept_attention`): its backward chunks then skip the attention forward. `side` holds every
    layer's side inputs, in `group_side(runners)`'s order. `updates[i]`: the weights only layer
    `i` reads, updated by their optimizer as soon as that layer's backward is done
    (`stream_fused`); the run returns no gradient for them. `own[i]`: the weights only layer
    `i` reads, whose gradients reach `.grad` as soon as that layer's backward is done
    (`stream_accumulate`). `rebuild`: makes the run's input again, which is then not held
    (`stream_rebuild`); None holds it.
    """

    @staticmethod
    def forward(ctx: Any, runners: list[ChunkRunner], reversal: Reversal,
                updates: list[RegionUpdates], own: list[set[fx.Node]], rebuild: Rebuild | None,
                x: torch.Tensor, *side: Any) -> torch.Tensor:
        values = dict(zip(group_side(runners), side))
        kept = set(reversal.kept_in_forward())
        # Kept inputs live on ctx, not in save_for_backward: the backward drops each as soon as
        # its part of the reversal is done, instead of at the end of the whole run.
        ctx.states, ctx.chunks, ctx.kept = {}, [], {}
        h = x
        for i, runner in enumerate(runners):
            attention = None
            if i in kept:
                ctx.states[i] = rebuild if i == reversal.start and rebuild is not None else h
                if getattr(runner.region, "keep_attention", False):
                    attention = ctx.kept[i] = KeptAttention()
            h, chunk = layer_forward(runner, h, values, attention)
            ctx.chunks.append(chunk)
        ctx.runners, ctx.reversal, ctx.updates, ctx.own = runners, reversal, updates, own
        ctx.others = [None if isinstance(t, torch.Tensor) else t for t in side]
        ctx.save_for_backward(*(t if isinstance(t, torch.Tensor) else None for t in side))
        return h

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        side = [t if t is not None else o for t, o in zip(ctx.saved_tensors, ctx.others)]
        order = group_side(ctx.runners)
        walk = _Walk(ctx.runners, ctx.chunks, dict(zip(order, side)), ctx.states, ctx.updates,
                     ctx.own, ctx.kept)
        ctx.states = ctx.kept = None
        reversal: Reversal = ctx.reversal
        grad = walk.reverse(reversal, walk.states.pop(reversal.start), grad_out)
        return (None, None, None, None, None, grad, *(walk.totals.get(n) for n in order))


class _Walk:
    """One backward through a run of layers: the inputs still held, the side inputs' gradient
    sums."""

    def __init__(self, runners: list[ChunkRunner], chunk_sizes: list[int],
                 values: dict[fx.Node, Any], states: dict[int, torch.Tensor],
                 updates: list[RegionUpdates], own: list[set[fx.Node]],
                 kept: dict[int, KeptAttention]):
        self.runners, self.chunk_sizes, self.values, self.states = (
            runners, chunk_sizes, values, states)
        self.kept = kept
        """Attention outputs the forward kept, by layer; each dropped after its backward."""
        self.updates, self.own = updates, own
        self.totals: dict[fx.Node, torch.Tensor | None] = {}

    def reverse(self, part: Reversal, x: torch.Tensor | Rebuild, grad: torch.Tensor
                ) -> torch.Tensor:
        """The gradient at `part`'s input, given the one at its output; `x` is its input (or
        makes it: then it exists only while a layer reads it)."""
        if not part.split:
            runner = self.runners[part.start]
            layer_side = [self.values[n] for n in runner.region.side_inputs]
            grads = _layer_backward(runner, held(x), layer_side, grad,
                                    self.chunk_sizes[part.start],
                                    self.kept.pop(part.start, None))
            # Under sequence parallelism: summed over the ranks before anything reads them.
            reduce_complete(runner, grads.side)
            # Its own weights' gradients are complete: update them (fused) or accumulate them
            # into .grad now, and drop them.
            update_complete(self.updates[part.start], runner.region.side_inputs, grads.side)
            deliver_complete(self.own[part.start], runner.region.side_inputs, layer_side,
                             grads.side)
            for node, found in zip(runner.region.side_inputs, grads.side):
                self.totals[node] = add_into(self.totals.get(node), found)
            return grads.result()
        middle = self.states.pop(part.middle, None)
        if middle is None:  # not kept by the forward: re-run the layers before it
            middle = held(x)
            for runner in self.runners[part.start:part.middle]:
                middle = layer_forward(runner, middle, self.values)[0]
        grad = self.reverse(part.right, middle, grad)
        del middle  # held only while the layers after it were reversed
        return self.reverse(part.left, x, grad)


def group_side(runners: list[ChunkRunner]) -> list[fx.Node]:
    """The side inputs of consecutive layers, each once; the layers' own inputs excluded."""
    inner = {r.region.input for r in runners[1:]}
    order: list[fx.Node] = []
    for runner in runners:
        for node in runner.region.side_inputs:
            if node not in inner and node not in order:
                order.append(node)
    return order


def layer_forward(runner: ChunkRunner, x: torch.Tensor, values: dict[fx.Node, Any],
                  attention: KeptAttention | None = None) -> tuple[torch.Tensor, int]:
    """A layer's output without autograd, and the chunk size its backward may use (the whole
    length when a mask lets queries see later keys). `attention` keeps the attention outputs
    of a layer run in chunks for its backward."""
    region = runner.region
    whole = {n: values[n] for n in region.side_inputs}
    with torch.no_grad():
        fill_whole(runner, whole)
        chunk = (region.chunk_size if _masks_causal(runner, whole) and chunkable(runner)
                 else runner.length)
        if _keys_values_once(runner, chunk):
            with _keeping(runner, attention):
                out = _forward_in_chunks(runner, x, whole, chunk)
        else:
            out = runner.run(x, 0, runner.length, whole, keep=region.outputs)[region.outputs[0]]
    return out, chunk


def _layer_backward(runner: ChunkRunner, x: torch.Tensor, side: list[Any],
                    grad_out: torch.Tensor, chunk: int,
                    attention: KeptAttention | None) -> RegionGrads:
    if _keys_values_once(runner, chunk):
        # Each chunk reads its rows of the output gradient before writing the same rows of
        # the input gradient: one buffer can hold both.
        grads = RegionGrads(runner, x, side, reusable=grad_out)
        if attention is not None:
            attention.recording = False
        with _keeping(runner, attention):
            _backward_keys_values_once(grads, grad_out, chunk)
    else:
        grads = RegionGrads(runner, x, side)
        _backward_prefix_per_chunk(grads, grad_out, chunk)
    return grads


def _backward_prefix_per_chunk(grads: RegionGrads, grad_out: torch.Tensor, chunk: int) -> None:
    """Each chunk re-runs the layer from its input over the prefix `[0, end)`."""
    runner = grads.runner
    region = runner.region
    x_seq = runner.info.dim_of(region.input)
    out_seq = runner.info.dim_of(region.outputs[0])
    for start, end in chunks(runner.length, chunk):
        first = runner.start_of(region.input, start)
        with torch.enable_grad():
            x_part = narrow_seq(grads.saved_x, x_seq, first, end - first).detach()
            x_part.requires_grad_()
            out = runner.run(x_part, start, end, grads.whole, keep=region.outputs)
            found = torch.autograd.grad(out[region.outputs[0]], [x_part, *grads.targets()],
                                        narrow_seq(grad_out, out_seq, start, end - start),
                                        allow_unused=True)
        if found[0] is not None:
            write_rows(grads.x, x_seq, first, found[0], add=True)
        grads.add_side(found[1:])
        grads.forget_param_values()
        # The chunk's weight gradients (a layer's worth) and output die here, not when the
        # next chunk's recompute reassigns them: else two chunks' are live at its peak.
        del found, out, x_part


@contextlib.contextmanager
def _keeping(runner: ChunkRunner, attention: KeptAttention | None) -> Iterator[None]:
    """Route the runner's causal attention through `attention` (None: as usual) meanwhile."""
    runner.kept = attention
    try:
        yield
    finally:
        runner.kept = None


def _keys_values_once(runner: ChunkRunner, chunk: int) -> bool:
    return runner.region.keys_values == "once" and bool(runner.boundary) and chunk < runner.length


def _boundary_whole(runner: ChunkRunner, x: torch.Tensor, whole: dict[fx.Node, Any],
                    chunk: int) -> dict[fx.Node, torch.Tensor]:
    """Attention's keys and values over the whole length, without autograd, computed a chunk
    at a time (what makes them, a norm and projections, is token-local): the whole-length
    buffers are the keys and values alone."""
    info = runner.info
    keys_values = {n: torch.empty(n.meta["val"].shape, dtype=n.meta["val"].dtype,
                                  device=x.device) for n in runner.boundary}
    x_seq = info.dim_of(runner.region.input)
    with torch.no_grad():
        for start, end in chunks(runner.length, chunk):
            part = runner.run(narrow_seq(x, x_seq, start, end - start), start, end, whole,
                              only=runner.once, keep=list(runner.boundary),
                              prefix_from_zero=False)
            for node, value in part.items():
                write_rows(keys_values[node], info.dim_of(node), start, value, add=False)
    return keys_values


def _chunk_inputs(runner: ChunkRunner, boundary: dict[fx.Node, torch.Tensor], start: int,
                  end: int, grad: bool) -> dict[fx.Node, tuple[torch.Tensor, int]]:
    """The keys and values a chunk reads: from the sequence's start to the chunk's end."""
    preset = {}
    for node, from_zero in runner.boundary.items():
        first = 0 if from_zero else start
        part = narrow_seq(boundary[node], runner.info.dim_of(node), first, end - first)
        preset[node] = (part.detach().requires_grad_() if grad else part, first)
    return preset


def _forward_in_chunks(runner: ChunkRunner, x: torch.Tensor, whole: dict[fx.Node, Any],
                       chunk: int) -> torch.Tensor:
    """The layer's output computed chunk by chunk (keys and values once), so no whole-length
    intermediate of its token-local part (the MLP's) exists at once."""
    region = runner.region
    output = region.outputs[0]
    val = output.meta["val"]
    out = torch.empty(val.shape, dtype=val.dtype, device=x.device)
    x_seq, out_seq = runner.info.dim_of(region.input), runner.info.dim_of(output)
    boundary = _boundary_whole(runner, x, whole, chunk)
    gather_keys_values(runner, boundary, whole, "forward")  # sequence parallelism: all ranks'
    for start, end in chunks(runner.length, chunk):
        part = runner.run(narrow_seq(x, x_seq, start, end - start), start, end, whole,
                          preset=_chunk_inputs(runner, boundary, start, end, grad=False),
                          only=runner.per_chunk, keep=region.outputs,
                          prefix_from_zero=False)[output]
        write_rows(out, out_seq, start, part, add=False)
    release(runner)
    return out


def _backward_keys_values_once(grads: RegionGrads, grad_out: torch.Tensor, chunk: int) -> None:
    """Keys and values are computed once over the whole length, without autograd. Each chunk
    re-runs the rest of the layer for its rows (norms included), reads them, and adds into
    their gradients' sums; then each chunk of the token-local part that made them is re-run
    and backpropagates its rows of those sums. No whole-length autograd graph exists; the
    whole-length buffers are the keys, values and their gradients."""
    runner = grads.runner
    region = runner.region
    info = runner.info
    x_seq = info.dim_of(region.input)
    out_seq = info.dim_of(region.outputs[0])
    # A copy of the side values: what this computes without autograd from the parameters
    # (transposed weights) must not stand in for the leaves' versions in the chunks below.
    whole = dict(grads.whole)
    boundary = _boundary_whole(runner, grads.saved_x, whole, chunk)
    gather_keys_values(runner, boundary, whole, "backward")  # sequence parallelism: all ranks'
    # Float32 sums for half-precision keys and values: each adds one share per chunk and key
    # block, hundreds at long lengths, which half precision would round away.
    sums = {n: torch.zeros_like(v, dtype=accumulation_dtype(v.dtype)) for n, v in boundary.items()}
    for start, end in chunks(runner.length, chunk):
        with torch.enable_grad():
            x_part = narrow_seq(grads.saved_x, x_seq, start, end - start).detach()
            x_part.requires_grad_()
            preset = _chunk_inputs(runner, boundary, start, end, grad=True)
            sinks = {n: narrow_seq(sums[n], info.dim_of(n), first, end - first)
                     for n, (_, first) in preset.items()}
            out = runner.run(x_part, start, end, grads.whole, preset=preset,
                             only=runner.per_chunk, keep=region.outputs, prefix_from_zero=False,
                             sinks=sinks)
            leaves = [leaf for leaf, _ in preset.values()]
            found = torch.autograd.grad(out[region.outputs[0]],
                                        [x_part, *leaves, *grads.targets()],
                                        narrow_seq(grad_out, out_seq, start, end - start),
                                        allow_unused=True)
        # Each row is written once, over the output gradient's when the buffer is shared.
        write_rows(grads.x, x_seq, start, found[0] if found[0] is not None else
                   torch.zeros_like(narrow_seq(grads.x, x_seq, start, end - start)), add=False)
        for (node, (_, first)), part in zip(preset.items(), found[1:1 + len(preset)]):
            if part is not None:
                write_rows(sums[node], info.dim_of(node), first, part, add=True)
        grads.add_side(found[1 + len(preset):])
        grads.forget_param_values()
        del found, out, x_part, preset, sinks, leaves  # before the next chunk (see above)
    del boundary
    return_gradients(runner, sums)  # sequence parallelism: other ranks' shares to their owners
    for start, end in chunks(runner.length, chunk):
        with torch.enable_grad():
            x_part = narrow_seq(grads.saved_x, x_seq, start, end - start).detach()
            x_part.requires_grad_()
            made = runner.run(x_part, start, end, grads.whole, only=runner.once,
                              keep=list(runner.boundary), prefix_from_zero=False)
            roots = [n for n in runner.boundary if made[n].requires_grad]
            found = torch.autograd.grad(
                [made[n] for n in roots], [x_part, *grads.targets()],
                [narrow_seq(sums[n], info.dim_of(n), start, end - start).to(made[n].dtype)
                 for n in roots],
                allow_unused=True)
        if found[0] is not None:
            write_rows(grads.x, x_seq, start, found[0], add=True)
        grads.add_side(found[1:])
        grads.forget_param_values()
        del found, made, x_part  # before the next chunk (see above)


def _masks_causal(runner: ChunkRunner, whole: dict[fx.Node, Any]) -> bool:
    """Whether every attention mask of the layer hides later keys (else chunks need all keys).
    A causal kernel's mask is over keys alone (`passes.key_mask`): the kernel hides them. A
    document mask is checked on its ids."""
    for node in runner.region.nodes:
        if node.target not in ATTENTION_OPS or attention.is_causal(node):
            continue
        mask = attention.mask(node)
        value = whole.get(mask) if isinstance(mask, fx.Node) else None
        if isinstance(value, (torch.Tensor, DocumentIds)):
            min_hides = node.target is EAGER_ATTENTION  # finfo.min hides (analysis.masks)
            if not (value.causal if isinstance(value, DocumentIds)
                    else mask_is_causal(value, min_hides=min_hides)):
                log.warning("stream: %s's mask lets queries see later keys; the layer's "
                            "backward re-runs it whole", node.name)
                return False
    return True
