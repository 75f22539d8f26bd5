"""Regions that end in a loss: `StreamHead` (the LM head and loss, chunk by chunk along the
sequence) and `StreamBatch` (a loss coupling a batch, its per-sample part chunk by chunk)."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from memcompile.runtime.stream import ChunkRunner, narrow_seq, write_rows
from memcompile.runtime.stream_fused import RegionUpdates, update_complete
from memcompile.runtime.stream_grads import RegionGrads, chunks
from memcompile.runtime.stream_tail import fill_whole, run_tail

aten = torch.ops.aten


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


def _float_leaves(value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(_float_leaves(v) for v in value)
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().requires_grad_()
    return value


def _flat(value: Any) -> list[Any]:
    return [x for v in value for x in _flat(v)] if isinstance(value, tuple) else [value]


class StreamHead(torch.autograd.Function):
    """The loss head, run chunk by chunk: the full-length logits never exist, or only as the
    value returned to a caller that asked for them (`region.sequence_outputs`), written chunk
    by chunk and kept for no backward.

    When the loss is an affine function of the reductions (cross-entropy's mean, GRPO's
    masked token mean), their gradients are constants: the forward computes the gradients in
    the same pass as the loss, and the backward only scales them by the loss's gradient.
    Otherwise (DPO's sigmoid of per-sequence sums) the forward computes the reductions, and
    the backward takes their gradients from the tail and runs the chunks again. A gradient
    reaching a returned sequence output (rare: a loss built outside the compiled function from
    the logits) is taken back by one more pass over the chunks. `updates`: the weights only
    the head reads, updated at the end of its backward (`stream_fused`).
    """

    @staticmethod
    def forward(ctx: Any, runner: ChunkRunner, updates: RegionUpdates, x: torch.Tensor,
                *side: Any) -> Any:
        region = runner.region
        ctx.set_materialize_grads(False)  # an unused returned logits' gradient stays None
        ctx.runner, ctx.updates = runner, updates
        ctx.others = [None if isinstance(t, torch.Tensor) else t for t in side]
        returned = {n: _empty_like_meta(n, (x,)) for n in region.sequence_outputs}
        # The input is kept only if a returned value may get a gradient to take back.
        ctx.x = x if returned and any(ctx.needs_input_grad[2:]) else None
        one_pass = (region.affine_tail and _scalar_outputs(region) == 1
                    and any(ctx.needs_input_grad[2:]))
        if one_pass:
            grads = RegionGrads(runner, x, list(side))
            with torch.enable_grad():
                fill_whole(runner, grads.whole)
                zeros = {n: _zeros_like_meta(n) for n in region.reductions}
                seeds = _reduction_seeds(runner, zeros, grads.whole, None)
            parts = _head_backward_pass(grads, seeds, {}, returned)
            with torch.no_grad():
                outputs = run_tail(runner, {**parts, **returned}, grads.whole)
            grads.saved_x = None  # the gradients are all the backward needs
            ctx.ready = grads
            ctx.side = list(side)
            return tuple(outputs)
        whole = dict(zip(region.side_inputs, side))
        seq = runner.info.dim_of(region.input)
        shares = _Shares(whole, {})
        with torch.no_grad():
            for start, end in chunks(runner.length, region.chunk_size):
                kept = runner.run(narrow_seq(x, seq, start, end - start), start, end, whole,
                                  reduce_hook=shares, keep=list(returned))
                _write_returned(runner, returned, kept, start)
            fill_whole(runner, whole)
            outputs = run_tail(runner, {**shares.parts, **returned}, whole)
        ctx.ready, ctx.reduced = None, dict(shares.parts)
        ctx.save_for_backward(x, *(t if isinstance(t, torch.Tensor) else None for t in side))
        return tuple(outputs)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Any) -> tuple[Any, ...]:
        runner: ChunkRunner = ctx.runner
        region = runner.region
        returned = {n: g for n, g in zip(region.outputs, grad_outputs)
                    if n in region.sequence_outputs and g is not None}
        if ctx.ready is not None:  # computed in the forward; scale by the loss's gradient
            grads, ctx.ready = ctx.ready, None
            scale = next(g for n, g in zip(region.outputs, grad_outputs)
                         if n not in region.sequence_outputs)
            side = [_scaled(g, scale) for g in grads.side]
            x_grad = _scaled(grads.result(), scale)
            if returned:  # the returned logits got a gradient too: one more pass for it
                more = RegionGrads(runner, ctx.x, ctx.side)
                with torch.enable_grad():
                    fill_whole(runner, more.whole)
                _head_backward_pass(more, {}, returned, {})
                x_grad = more.x if x_grad is None else x_grad.add_(more.x)
                side = [_added(a, b) for a, b in zip(side, more.side)]
            ctx.x = ctx.side = None
            update_complete(ctx.updates, region.side_inputs, side)
            return (None, None, x_grad, *side)
        x, *tensors = ctx.saved_tensors
        side = [t if t is not None else o for t, o in zip(tensors, ctx.others)]
        grads = RegionGrads(runner, x, side)
        with torch.enable_grad():
            fill_whole(runner, grads.whole)
            reduced = {k: _float_leaves(v) for k, v in ctx.reduced.items()}
            seeds = _reduction_seeds(runner, reduced, grads.whole, list(grad_outputs))
        _head_backward_pass(grads, seeds, returned, {})
        update_complete(ctx.updates, region.side_inputs, grads.side)
        return (None, None, grads.result(), *grads.side)


def _scalar_outputs(region: Any) -> int:
    return len([o for o in region.outputs if o not in region.sequence_outputs])


def _scaled(grad: torch.Tensor | None, scale: torch.Tensor | None) -> torch.Tensor | None:
    """A precomputed gradient times the loss's gradient (None: the loss got none)."""
    if grad is None or scale is None:
        return None
    return grad.mul_(scale)


def _added(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a.add_(b)


def _write_returned(runner: ChunkRunner, returned: dict[fx.Node, torch.Tensor],
                    kept: dict[fx.Node, Any], start: int) -> None:
    """Copy a chunk's rows of the values returned to the caller into their buffers."""
    for node, buffer in returned.items():
        write_rows(buffer, runner.info.dim_of(node), start, kept[node].detach(), add=False)


def _zeros_like_meta(node: fx.Node) -> Any:
    val = node.meta["val"]
    if isinstance(val, (tuple, list)):
        return tuple(torch.zeros(v.shape, dtype=v.dtype, device=v.device, requires_grad=True)
                     if v.is_floating_point() else None for v in val)
    return torch.zeros(val.shape, dtype=val.dtype, device=val.device, requires_grad=True)


def _reduction_seeds(runner: ChunkRunner, reduced: dict[fx.Node, Any], whole: dict[fx.Node, Any],
                     grad_outputs: list[Any] | None) -> dict[fx.Node, list[torch.Tensor | None]]:
    """The gradient of the outputs with respect to each reduced value, from the tail alone
    (`grad_outputs` None: the gradient of the single scalar output itself)."""
    outputs = run_tail(runner, reduced, whole)
    if grad_outputs is None:
        grad_outputs = [None if node in runner.region.sequence_outputs else torch.ones_like(o)
                        for node, o in zip(runner.region.outputs, outputs)]
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs)
             if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
    flat = [(node, i, r) for node, v in reduced.items() for i, r in enumerate(_flat(v))
            if isinstance(r, torch.Tensor) and r.requires_grad]
    found = torch.autograd.grad([o for o, _ in pairs], [r for _, _, r in flat],
                                [g for _, g in pairs], allow_unused=True) if pairs else ()
    seeds: dict[fx.Node, list[torch.Tensor | None]] = {n: [None] * len(_flat(v))
                                                       for n, v in reduced.items()}
    for (node, i, _), g in zip(flat, found):
        seeds[node][i] = g
    return seeds


def _head_backward_pass(grads: RegionGrads, seeds: dict[fx.Node, list[Any]],
                        returned_grads: dict[fx.Node, torch.Tensor],
                        returned: dict[fx.Node, torch.Tensor]) -> dict[fx.Node, Any]:
    """Run the head's chunks with autograd, backpropagate the reductions' `seeds` and the rows
    of `returned_grads` (gradients reaching returned values) from each, write each chunk's rows
    of the values returned to the caller into `returned`, and return the reductions' values
    (the sum of the chunks' shares)."""
    runner = grads.runner
    region = runner.region
    seq = runner.info.dim_of(region.input)
    counts: dict[fx.Node, torch.Tensor] = {}
    totals: dict[fx.Node, Any] = {}
    keep = list(dict.fromkeys([*returned, *returned_grads]))
    for start, end in chunks(runner.length, region.chunk_size):
        shares = _Shares(grads.whole, counts)
        with torch.enable_grad():
            x_part = narrow_seq(grads.saved_x, seq, start, end - start).detach()
            x_part.requires_grad_()
            kept = runner.run(x_part, start, end, grads.whole, reduce_hook=shares, keep=keep)
            _write_returned(runner, returned, kept, start)
            roots, grad_roots = [], []
            for node, share in shares.parts.items():
                for part, seed in zip(_flat(share), seeds.get(node, ())):
                    if seed is not None and isinstance(part, torch.Tensor) and part.requires_grad:
                        roots.append(part)
                        grad_roots.append(seed)
            for node, grad in returned_grads.items():
                if kept[node].requires_grad:
                    roots.append(kept[node])
                    grad_roots.append(narrow_seq(grad, runner.info.dim_of(node), start,
                                                 end - start))
            del kept  # a returned chunk is held no longer than the loss's own use of it
            found = (torch.autograd.grad(roots, [x_part, *grads.targets()], grad_roots,
                                         allow_unused=True) if roots else ())
        for node, share in shares.parts.items():
            detached = _detach(share)
            totals[node] = detached if node not in totals else _add_share(totals[node], detached)
        if found:
            if found[0] is not None:
                write_rows(grads.x, seq, start, found[0], add=True)
            grads.add_side(found[1:])
        grads.forget_param_values()
        # The chunk's weight gradients die before the next chunk runs, not when it reassigns.
        del found, x_part, shares
    return totals


def _detach(value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    return value.detach() if isinstance(value, torch.Tensor) else value


class StreamBatch(torch.autograd.Function):
    """A loss coupling the samples of a batch (contrastive), its per-sample part run a chunk of
    samples at a time: first without autograd for the values the loss reads (the embeddings),
    then, in the backward, again with autograd to take their gradients back to the weights.
    `updates`: the weights only this region reads, updated at the end of its backward."""

    @staticmethod
    def forward(ctx: Any, runner: ChunkRunner, updates: RegionUpdates, *inputs: Any) -> Any:
        region = runner.region
        ctx.updates = updates
        whole = dict(zip(region.side_inputs, inputs))
        with torch.no_grad():
            fill_whole(runner, whole)
            boundary = {n: _empty_like_meta(n, inputs) for n in region.boundary}
            for start, end in chunks(runner.length, region.chunk_size):
                rows = runner.run(None, start, end, whole, only=region.chunked,
                                  keep=region.boundary)
                for node, value in rows.items():
                    write_rows(boundary[node], runner.info.dim_of(node), start, value,
                               add=False)
            outputs = run_tail(runner, boundary, whole)
        ctx.runner, ctx.boundary = runner, boundary
        ctx.others = [None if isinstance(t, torch.Tensor) else t for t in inputs]
        ctx.save_for_backward(*(t if isinstance(t, torch.Tensor) else None for t in inputs))
        return tuple(outputs)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Any) -> tuple[Any, ...]:
        runner: ChunkRunner = ctx.runner
        region = runner.region
        side = [t if t is not None else o for t, o in zip(ctx.saved_tensors, ctx.others)]
        grads = RegionGrads(runner, None, side)
        leaves = {n: v.detach().requires_grad_() for n, v in ctx.boundary.items()}
        ctx.boundary = None
        with torch.enable_grad():
            fill_whole(runner, grads.whole)
            outputs = run_tail(runner, leaves, grads.whole)
            pairs = [(o, g) for o, g in zip(outputs, grad_outputs)
                     if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
            found = torch.autograd.grad([o for o, _ in pairs],
                                        [*leaves.values(), *grads.targets()],
                                        [g for _, g in pairs], allow_unused=True)
        seeds = dict(zip(leaves, found[:len(leaves)]))
        grads.add_side(found[len(leaves):])  # weights the loss reads itself (a logit scale)
        grads.forget_param_values()
        for start, end in chunks(runner.length, region.chunk_size):
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
            del part, rows  # before the next chunk runs
        update_complete(ctx.updates, region.side_inputs, grads.side)
        return (None, None, *grads.side)


def _empty_like_meta(node: fx.Node, inputs: tuple[Any, ...]) -> torch.Tensor:
    val = node.meta["val"]
    device = next((t.device for t in inputs if isinstance(t, torch.Tensor)), val.device)
    return torch.empty(val.shape, dtype=val.dtype, device=device)
