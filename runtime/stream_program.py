"""`StreamProgram`: a forward aten graph run with autograd, its stream regions as single
autograd nodes (`StreamLayer`, `StreamHead`), each value freed after its last use."""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch
import torch.fx as fx

from memcompile.runtime.stream import ChunkRunner, mask_is_causal, narrow_seq

log = logging.getLogger(__name__)

aten = torch.ops.aten


def _chunks(length: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, length)) for s in range(0, length, size)]


def _leaf(t: Any) -> Any:
    return t.detach().requires_grad_() if isinstance(t, torch.Tensor) and t.requires_grad else t


def _add(total: torch.Tensor | None, part: torch.Tensor | None) -> torch.Tensor | None:
    if part is None:
        return total
    return part if total is None else total.add_(part)


class StreamLayers(torch.autograd.Function):
    """Consecutive layers that save only the first one's input.

    The forward runs each layer chunk by chunk without autograd. The backward re-runs the
    forward of all but the last to get their inputs back (none when the group is one layer),
    then, last layer first, re-runs each chunk by chunk with autograd and sums the chunks'
    gradients. `side` holds every layer's side inputs, in `_group_side(runners)`'s order.
    """

    @staticmethod
    def forward(ctx: Any, runners: list[ChunkRunner], x: torch.Tensor, *side: Any
                ) -> torch.Tensor:
        values = dict(zip(_group_side(runners), side))
        ctx.chunks = []
        h = x
        for runner in runners:
            h, chunk = _layer_forward(runner, h, values)
            ctx.chunks.append(chunk)
        ctx.runners = runners
        ctx.others = [None if isinstance(t, torch.Tensor) else t for t in side]
        ctx.save_for_backward(x, *(t if isinstance(t, torch.Tensor) else None for t in side))
        return h

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        runners: list[ChunkRunner] = ctx.runners
        x, *tensors = ctx.saved_tensors
        side = [t if t is not None else o for t, o in zip(tensors, ctx.others)]
        order = _group_side(runners)
        values = dict(zip(order, side))
        inputs = [x]
        for runner in runners[:-1]:  # the inputs not saved, rebuilt from the first
            inputs.append(_layer_forward(runner, inputs[-1], values)[0])
        totals: dict[fx.Node, torch.Tensor | None] = {}
        grad = grad_out
        for runner, chunk in reversed(list(zip(runners, ctx.chunks))):
            layer_side = [values[n] for n in runner.region.side_inputs]
            grads = _layer_backward(runner, inputs.pop(), layer_side, grad, chunk)
            grad = grads.result()
            for node, part in zip(runner.region.side_inputs, grads.side):
                totals[node] = _add(totals.get(node), part)
        return (None, grad, *(totals.get(n) for n in order))


def _group_side(runners: list[ChunkRunner]) -> list[fx.Node]:
    """The side inputs of consecutive layers, each once; the layers' own inputs excluded."""
    inner = {r.region.input for r in runners[1:]}
    order: list[fx.Node] = []
    for runner in runners:
        for node in runner.region.side_inputs:
            if node not in inner and node not in order:
                order.append(node)
    return order


def _layer_forward(runner: ChunkRunner, x: torch.Tensor, values: dict[fx.Node, Any]
                   ) -> tuple[torch.Tensor, int]:
    """A layer's output without autograd, and the chunk size its backward may use (the whole
    length when a mask lets queries see later keys)."""
    region = runner.region
    whole = {n: values[n] for n in region.side_inputs}
    with torch.no_grad():
        _fill_whole(runner, whole)
        chunk = region.chunk_size if _masks_causal(runner, whole) else runner.length
        if _keys_values_once(runner, chunk):
            out = _forward_in_chunks(runner, x, whole, chunk)
        else:
            out = runner.run(x, 0, runner.length, whole, keep=region.outputs)[region.outputs[0]]
    return out, chunk


def _layer_backward(runner: ChunkRunner, x: torch.Tensor, side: list[Any],
                    grad_out: torch.Tensor, chunk: int) -> _LayerGrads:
    if _keys_values_once(runner, chunk):
        # Each chunk reads its rows of the output gradient before writing the same rows of
        # the input gradient: one buffer can hold both.
        grads = _LayerGrads(runner, x, side, reusable=grad_out)
        _backward_keys_values_once(grads, grad_out, chunk)
    else:
        grads = _LayerGrads(runner, x, side)
        _backward_prefix_per_chunk(grads, grad_out, chunk)
    return grads


_OWN_GRADS: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
"""Input gradients this runtime returned to autograd. One handed back to us unchanged as the
next region's output gradient is referenced by nobody else, so its buffer can become that
region's input gradient (rows are overwritten only after they were read)."""


class _LayerGrads:
    """A layer's backward state: leaves for its side inputs and the gradient sums."""

    def __init__(self, runner: ChunkRunner, x: torch.Tensor | None, side: list[Any],
                 reusable: torch.Tensor | None = None):
        self.runner, self.saved_x = runner, x
        self.leaves = [_leaf(t) for t in side]
        self.wanted = [i for i, t in enumerate(self.leaves)
                       if isinstance(t, torch.Tensor) and t.requires_grad]
        self.whole = dict(zip(runner.region.side_inputs, self.leaves))
        self.x = (None if x is None else
                  reusable if _reusable(reusable, x) else torch.zeros_like(x))
        self.side: list[torch.Tensor | None] = [None] * len(side)

    def result(self) -> torch.Tensor:
        """The input gradient, marked as this runtime's own."""
        _OWN_GRADS[id(self.x)] = self.x
        return self.x

    def targets(self) -> list[torch.Tensor]:
        """The side inputs gradients are taken for."""
        return [self.leaves[i] for i in self.wanted]

    def add_side(self, found: tuple[torch.Tensor | None, ...]) -> None:
        """Add gradients found for `targets()`, in that order."""
        for i, part in zip(self.wanted, found):
            self.side[i] = _add(self.side[i], part)

    def forget_param_values(self) -> None:
        """Drop input-only values built from parameters (a transposed weight): each chunk's graph
        rebuilds them from the leaves; masks and tables are reused."""
        region = self.runner.region
        self.whole = {k: v for k, v in self.whole.items() if k in region.side_inputs or not (
            isinstance(v, torch.Tensor) and v.requires_grad)}


def _reusable(grad: torch.Tensor | None, x: torch.Tensor) -> bool:
    return (grad is not None and _OWN_GRADS.get(id(grad)) is grad and grad.shape == x.shape
            and grad.dtype == x.dtype and grad.is_contiguous())


def _backward_prefix_per_chunk(grads: _LayerGrads, grad_out: torch.Tensor, chunk: int) -> None:
    """Each chunk re-runs the layer from its input over the prefix `[0, end)`."""
    runner = grads.runner
    region = runner.region
    x_seq = runner.info.dim_of(region.input)
    out_seq = runner.info.dim_of(region.outputs[0])
    for start, end in _chunks(runner.length, chunk):
        first = runner.start_of(region.input, start)
        with torch.enable_grad():
            x_part = narrow_seq(grads.saved_x, x_seq, first, end - first).detach()
            x_part.requires_grad_()
            out = runner.run(x_part, start, end, grads.whole, keep=region.outputs)
            found = torch.autograd.grad(out[region.outputs[0]], [x_part, *grads.targets()],
                                        narrow_seq(grad_out, out_seq, start, end - start),
                                        allow_unused=True)
        if found[0] is not None:
            narrow_seq(grads.x, x_seq, first, end - first).add_(found[0])
        grads.add_side(found[1:])
        grads.forget_param_values()


def _keys_values_once(runner: ChunkRunner, chunk: int) -> bool:
    return runner.region.keys_values == "once" and bool(runner.boundary) and chunk < runner.length


def _boundary_whole(runner: ChunkRunner, x: torch.Tensor, whole: dict[fx.Node, Any]
                    ) -> dict[fx.Node, torch.Tensor]:
    """Attention's keys and values over the whole length, without autograd."""
    with torch.no_grad():
        return runner.run(x, 0, runner.length, whole, only=runner.once,
                          keep=list(runner.boundary), x_start=0)


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
    boundary = _boundary_whole(runner, x, whole)
    for start, end in _chunks(runner.length, chunk):
        part = runner.run(narrow_seq(x, x_seq, start, end - start), start, end, whole,
                          preset=_chunk_inputs(runner, boundary, start, end, grad=False),
                          only=runner.per_chunk, keep=region.outputs,
                          prefix_from_zero=False)[output]
        narrow_seq(out, out_seq, start, end - start).copy_(part)
    return out


def _backward_keys_values_once(grads: _LayerGrads, grad_out: torch.Tensor, chunk: int) -> None:
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
    boundary = _boundary_whole(runner, grads.saved_x, dict(grads.whole))
    sums = {n: torch.zeros_like(v) for n, v in boundary.items()}
    for start, end in _chunks(runner.length, chunk):
        with torch.enable_grad():
            x_part = narrow_seq(grads.saved_x, x_seq, start, end - start).detach()
            x_part.requires_grad_()
            preset = _chunk_inputs(runner, boundary, start, end, grad=True)
            out = runner.run(x_part, start, end, grads.whole, preset=preset,
                             only=runner.per_chunk, keep=region.outputs, prefix_from_zero=False)
            leaves = [leaf for leaf, _ in preset.values()]
            found = torch.autograd.grad(out[region.outputs[0]],
                                        [x_part, *leaves, *grads.targets()],
                                        narrow_seq(grad_out, out_seq, start, end - start),
                                        allow_unused=True)
        rows = narrow_seq(grads.x, x_seq, start, end - start)
        if found[0] is not None:
            rows.copy_(found[0])  # written once per row; over the output gradient if shared
        else:
            rows.zero_()
        for (node, (_, first)), part in zip(preset.items(), found[1:1 + len(preset)]):
            if part is not None:
                narrow_seq(sums[node], info.dim_of(node), first, end - first).add_(part)
        grads.add_side(found[1 + len(preset):])
        grads.forget_param_values()
    del boundary
    for start, end in _chunks(runner.length, chunk):
        with torch.enable_grad():
            x_part = narrow_seq(grads.saved_x, x_seq, start, end - start).detach()
            x_part.requires_grad_()
            made = runner.run(x_part, start, end, grads.whole, only=runner.once,
                              keep=list(runner.boundary), prefix_from_zero=False)
            roots = [n for n in runner.boundary if made[n].requires_grad]
            found = torch.autograd.grad(
                [made[n] for n in roots], [x_part, *grads.targets()],
                [narrow_seq(sums[n], info.dim_of(n), start, end - start) for n in roots],
                allow_unused=True)
        if found[0] is not None:
            narrow_seq(grads.x, x_seq, start, end - start).add_(found[0])
        grads.add_side(found[1:])
        grads.forget_param_values()


def _masks_causal(runner: ChunkRunner, whole: dict[fx.Node, Any]) -> bool:
    """Whether every attention mask of the layer hides later keys (else chunks need all keys)."""
    for node in runner.region.nodes:
        mask = node.kwargs.get("attn_mask") if node.op == "call_function" else None
        if isinstance(mask, fx.Node) and isinstance(whole.get(mask), torch.Tensor):
            if not mask_is_causal(whole[mask]):
                log.warning("stream: %s's mask lets queries see later keys; the layer's "
                            "backward re-runs it whole", node.name)
                return False
    return True


class _Shares:
    """The head's reductions over the sequence, evaluated as each chunk's additive share."""

    def __init__(self, whole: dict[fx.Node, Any], counts: dict[fx.Node, torch.Tensor]):
        self.whole = whole
        self.counts = counts
        """Label counts (normalizers of mean losses), kept across chunks."""
        self.parts: dict[fx.Node, Any] = {}

    def __call__(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        target = node.target
        if target is aten.nll_loss_forward.default:
            value, weight_sum = target(args[0], args[1], args[2], 2, args[4])
            if node.args[3] == 1:  # mean: the normalizer is the whole batch's label count
                value = value / self._count(node)
            share: Any = (value, weight_sum)
        elif target is aten.mean.dim:
            source = node.args[0].meta["val"]
            dims = [d % source.dim() for d in node.args[1]]
            total = 1
            for d in dims:
                total *= source.shape[d]
            keep = args[2] if len(args) > 2 else False
            share = aten.sum.dim_IntList(args[0], args[1], keep, **kwargs) / total
        elif target is aten.mean.default:
            share = aten.sum.default(args[0], **kwargs) / node.args[0].meta["val"].numel()
        else:
            share = target(*args, **kwargs)
        self.parts[node] = share if node not in self.parts else _add_share(self.parts[node], share)
        return share

    def _count(self, node: fx.Node) -> torch.Tensor:
        if node not in self.counts:
            labels = self.whole[node.args[1]]
            self.counts[node] = (labels != node.args[4]).sum().to(node.meta["val"][0].dtype)
        return self.counts[node]


def _add_share(total: Any, share: Any) -> Any:
    if isinstance(total, tuple):
        return tuple(_add_share(a, b) for a, b in zip(total, share))
    return total + share


def _fill_whole(runner: ChunkRunner, whole: dict[fx.Node, Any]) -> None:
    """Compute the region's input-only values (they never depend on activations)."""
    for node in runner.region.nodes:
        if node not in runner.activations and node not in whole:
            whole[node] = node.target(*_resolve(node.args, whole), **_resolve(node.kwargs, whole))


def _resolve(value: Any, env: dict[fx.Node, Any]) -> Any:
    return fx.node.map_aggregate(value, lambda a: env[a] if isinstance(a, fx.Node) else a)


def _run_tail(runner: ChunkRunner, reduced: dict[fx.Node, Any], whole: dict[fx.Node, Any]
              ) -> list[Any]:
    env = {**whole, **reduced}
    for node in runner.region.nodes:
        if node in runner.region.tail:
            env[node] = node.target(*_resolve(node.args, env), **_resolve(node.kwargs, env))
    return [env[o] for o in runner.region.outputs]


def _float_leaves(value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(_float_leaves(v) for v in value)
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().requires_grad_()
    return value


def _flat(value: Any) -> list[Any]:
    return [x for v in value for x in _flat(v)] if isinstance(value, tuple) else [value]


class StreamHead(torch.autograd.Function):
    """The loss head, run chunk by chunk: the full-length logits never exist.

    When the loss is an affine function of the reductions (cross-entropy's mean, GRPO's
    masked token mean), their gradients are constants: the forward computes the gradients in
    the same pass as the loss, and the backward only scales them by the loss's gradient.
    Otherwise (DPO's sigmoid of per-sequence sums) the forward computes the reductions, and
    the backward takes their gradients from the tail and runs the chunks again.
    """

    @staticmethod
    def forward(ctx: Any, runner: ChunkRunner, x: torch.Tensor, *side: Any) -> Any:
        region = runner.region
        ctx.runner = runner
        ctx.others = [None if isinstance(t, torch.Tensor) else t for t in side]
        one_pass = (region.affine_tail and len(region.outputs) == 1
                    and any(ctx.needs_input_grad[1:]))
        if one_pass:
            grads = _HeadGrads(runner, x, list(side))
            with torch.enable_grad():
                _fill_whole(runner, grads.whole)
                zeros = {n: _zeros_like_meta(n) for n in region.reductions}
                seeds = _reduction_seeds(runner, zeros, grads.whole, [None])
            parts = _head_backward_pass(grads, seeds)
            with torch.no_grad():
                outputs = _run_tail(runner, parts, grads.whole)
            grads.saved_x = None  # the gradients are all the backward needs
            ctx.ready = grads
            return tuple(outputs)
        whole = dict(zip(region.side_inputs, side))
        seq = runner.info.dim_of(region.input)
        shares = _Shares(whole, {})
        with torch.no_grad():
            for start, end in _chunks(runner.length, region.chunk_size):
                runner.run(narrow_seq(x, seq, start, end - start), start, end, whole,
                           reduce_hook=shares)
            _fill_whole(runner, whole)
            outputs = _run_tail(runner, shares.parts, whole)
        ctx.ready, ctx.reduced = None, dict(shares.parts)
        ctx.save_for_backward(x, *(t if isinstance(t, torch.Tensor) else None for t in side))
        return tuple(outputs)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Any) -> tuple[Any, ...]:
        if ctx.ready is not None:  # computed in the forward; scale by the loss's gradient
            grads, scale = ctx.ready, grad_outputs[0]
            ctx.ready = None
            grads.x.mul_(scale)
            return (None, grads.result(), *(g.mul_(scale) if g is not None else None
                                            for g in grads.side))
        runner: ChunkRunner = ctx.runner
        x, *tensors = ctx.saved_tensors
        side = [t if t is not None else o for t, o in zip(tensors, ctx.others)]
        grads = _HeadGrads(runner, x, side)
        with torch.enable_grad():
            _fill_whole(runner, grads.whole)
            reduced = {k: _float_leaves(v) for k, v in ctx.reduced.items()}
            seeds = _reduction_seeds(runner, reduced, grads.whole, list(grad_outputs))
        _head_backward_pass(grads, seeds)
        return (None, grads.result(), *grads.side)


class _HeadGrads(_LayerGrads):
    """The head's backward state (the same as a layer's)."""


def _zeros_like_meta(node: fx.Node) -> Any:
    val = node.meta["val"]
    if isinstance(val, (tuple, list)):
        return tuple(torch.zeros(v.shape, dtype=v.dtype, device=v.device, requires_grad=True)
                     if v.is_floating_point() else None for v in val)
    return torch.zeros(val.shape, dtype=val.dtype, device=val.device, requires_grad=True)


def _reduction_seeds(runner: ChunkRunner, reduced: dict[fx.Node, Any], whole: dict[fx.Node, Any],
                     grad_outputs: list[Any]) -> dict[fx.Node, list[torch.Tensor | None]]:
    """The gradient of the outputs with respect to each reduced value, from the tail alone
    (`grad_outputs` None: the gradient of the single output itself)."""
    outputs = _run_tail(runner, reduced, whole)
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs)
             if isinstance(o, torch.Tensor) and o.requires_grad]
    flat = [(node, i, r) for node, v in reduced.items() for i, r in enumerate(_flat(v))
            if isinstance(r, torch.Tensor) and r.requires_grad]
    found = torch.autograd.grad([o for o, _ in pairs], [r for _, _, r in flat],
                                [g for _, g in pairs], allow_unused=True) if pairs else ()
    seeds: dict[fx.Node, list[torch.Tensor | None]] = {n: [None] * len(_flat(v))
                                                       for n, v in reduced.items()}
    for (node, i, _), g in zip(flat, found):
        seeds[node][i] = g
    return seeds


def _head_backward_pass(grads: _LayerGrads, seeds: dict[fx.Node, list[Any]]) -> dict[fx.Node, Any]:
    """Run the head's chunks with autograd, backpropagate the reductions' `seeds` from each,
    and return the reductions' values (the sum of the chunks' shares)."""
    runner = grads.runner
    region = runner.region
    seq = runner.info.dim_of(region.input)
    counts: dict[fx.Node, torch.Tensor] = {}
    totals: dict[fx.Node, Any] = {}
    for start, end in _chunks(runner.length, region.chunk_size):
        shares = _Shares(grads.whole, counts)
        with torch.enable_grad():
            x_part = narrow_seq(grads.saved_x, seq, start, end - start).detach()
            x_part.requires_grad_()
            runner.run(x_part, start, end, grads.whole, reduce_hook=shares)
            roots, grad_roots = [], []
            for node, share in shares.parts.items():
                for part, seed in zip(_flat(share), seeds[node]):
                    if seed is not None and isinstance(part, torch.Tensor) and part.requires_grad:
                        roots.append(part)
                        grad_roots.append(seed)
            found = (torch.autograd.grad(roots, [x_part, *grads.targets()], grad_roots,
                                         allow_unused=True) if roots else ())
        for node, share in shares.parts.items():
            detached = _detach(share)
            totals[node] = detached if node not in totals else _add_share(totals[node], detached)
        if found:
            if found[0] is not None:
                narrow_seq(grads.x, seq, start, end - start).add_(found[0])
            grads.add_side(found[1:])
        grads.forget_param_values()
    return totals


def _detach(value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    return value.detach() if isinstance(value, torch.Tensor) else value


class StreamBatch(torch.autograd.Function):
    """A loss coupling the samples of a batch (contrastive), its per-sample part run a chunk of
    samples at a time: first without autograd for the values the loss reads (the embeddings),
    then, in the backward, again with autograd to take their gradients back to the weights."""

    @staticmethod
    def forward(ctx: Any, runner: ChunkRunner, *inputs: Any) -> Any:
        region = runner.region
        whole = dict(zip(region.side_inputs, inputs))
        with torch.no_grad():
            _fill_whole(runner, whole)
            boundary = {n: _empty_like_meta(n, inputs) for n in region.boundary}
            for start, end in _chunks(runner.length, region.chunk_size):
                rows = runner.run(None, start, end, whole, only=region.chunked,
                                  keep=region.boundary)
                for node, value in rows.items():
                    narrow_seq(boundary[node], runner.info.dim_of(node), start,
                               end - start).copy_(value)
            outputs = _run_tail(runner, boundary, whole)
        ctx.runner, ctx.boundary = runner, boundary
        ctx.others = [None if isinstance(t, torch.Tensor) else t for t in inputs]
        ctx.save_for_backward(*(t if isinstance(t, torch.Tensor) else None for t in inputs))
        return tuple(outputs)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Any) -> tuple[Any, ...]:
        runner: ChunkRunner = ctx.runner
        region = runner.region
        side = [t if t is not None else o for t, o in zip(ctx.saved_tensors, ctx.others)]
        grads = _LayerGrads(runner, None, side)
        leaves = {n: v.detach().requires_grad_() for n, v in ctx.boundary.items()}
        ctx.boundary = None
        with torch.enable_grad():
            _fill_whole(runner, grads.whole)
            outputs = _run_tail(runner, leaves, grads.whole)
            pairs = [(o, g) for o, g in zip(outputs, grad_outputs)
                     if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
            found = torch.autograd.grad([o for o, _ in pairs],
                                        [*leaves.values(), *grads.targets()],
                                        [g for _, g in pairs], allow_unused=True)
        seeds = dict(zip(leaves, found[:len(leaves)]))
        grads.add_side(found[len(leaves):])  # weights the loss reads itself (a logit scale)
        grads.forget_param_values()
        for start, end in _chunks(runner.length, region.chunk_size):
            with torch.enable_grad():
                rows = runner.run(None, start, end, grads.whole, only=region.chunked,
                                  keep=region.boundary)
                roots = [n for n in rows if seeds[n] is not None and rows[n].requires_grad]
                if not roots:
                    continue
                part = torch.autograd.grad(
                    [rows[n] for n in roots], grads.targets(),
                    [narrow_seq(seeds[n], runner.info.dim_of(n), start, end - start)
                     for n in roots], allow_unused=True)
            grads.add_side(part)
            grads.forget_param_values()
        return (None, *grads.side)


def _empty_like_meta(node: fx.Node, inputs: tuple[Any, ...]) -> torch.Tensor:
    val = node.meta["val"]
    device = next((t.device for t in inputs if isinstance(t, torch.Tensor)), val.device)
    return torch.empty(val.shape, dtype=val.dtype, device=device)


def _groups(runners: list[ChunkRunner], size: int) -> list[list[ChunkRunner]]:
    """Runs of up to `size` layers, each following the previous one directly; the head alone."""
    groups: list[list[ChunkRunner]] = []
    for runner in runners:
        last = groups[-1] if groups else None
        if (runner.region.kind == "layer" and last and last[-1].region.kind == "layer"
                and len(last) < size and runner.region.input is last[-1].region.outputs[0]):
            last.append(runner)
        else:
            groups.append([runner])
    return groups


class StreamProgram:
    """Runs a forward aten graph with autograd; stream regions run as one autograd node each."""

    def __init__(self, gm: fx.GraphModule, plan: Any):
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.runners = [ChunkRunner(r, plan) for r in plan.regions]
        self.owner: dict[fx.Node, ChunkRunner] = {}
        for runner in self.runners:
            for node in runner.region.nodes:
                self.owner[node] = runner
        self.trigger: dict[fx.Node, list[ChunkRunner]] = {}
        for group in _groups(self.runners, plan.layers_per_checkpoint):
            self.trigger[group[-1].region.nodes[-1]] = group
        self.trigger_of = {r: node for node, group in self.trigger.items() for r in group}
        self.dies_after = self._lifetimes()

    def _lifetimes(self) -> dict[int, list[fx.Node]]:
        index = {n: i for i, n in enumerate(self.nodes)}
        last: dict[fx.Node, int] = {}
        outputs = {o for r in self.runners for o in r.region.outputs}
        for node in self.nodes:
            if node in self.owner and node not in outputs:
                continue
            uses = []
            for user in node.users:
                runner = self.owner.get(user)
                uses.append(index[self.trigger_of[runner]] if runner else index[user])
            last[node] = max(uses, default=index[node])
        dies: dict[int, list[fx.Node]] = {}
        for node, i in last.items():
            if self.nodes[i].op != "output":
                dies.setdefault(i, []).append(node)
        return dies

    def __call__(self, *args: Any) -> Any:
        env: dict[fx.Node, Any] = {}
        inputs = iter(args)
        for i, node in enumerate(self.nodes):
            if node.op == "placeholder":
                env[node] = next(inputs)
            elif node.op == "output":
                return _resolve(node.args[0], env)
            elif node in self.trigger:
                self._run_region(self.trigger[node], env)
            elif node not in self.owner:
                env[node] = node.target(*_resolve(node.args, env), **_resolve(node.kwargs, env))
            for dead in self.dies_after.get(i, ()):
                env.pop(dead, None)
        raise RuntimeError("stream program: the graph has no output node")

    @staticmethod
    def _run_region(group: list[ChunkRunner], env: dict[fx.Node, Any]) -> None:
        region = group[0].region
        if region.kind == "layer":
            side = [env[n] for n in _group_side(group)]
            env[group[-1].region.outputs[0]] = StreamLayers.apply(group, env[region.input], *side)
        elif region.kind == "batch":
            outs = StreamBatch.apply(group[0], *(env[n] for n in region.side_inputs))
            for node, value in zip(region.outputs, outs):
                env[node] = value
        else:
            runner = group[0]
            side = [env[n] for n in region.side_inputs]
            outs = StreamHead.apply(runner, env[region.input], *side)
            for node, value in zip(region.outputs, outs):
                env[node] = value
