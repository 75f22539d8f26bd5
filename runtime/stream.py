"""The stream runtime's core: `ChunkRunner`, which evaluates a region of a forward aten graph
on a range of the chunked dimension, and the helpers that cut and write ranges.

Regions are run as autograd nodes elsewhere: `stream_layers` (layers re-run in sequence chunks
in the backward), `stream_loss` (the loss head along the sequence; a batch-coupled loss along
the batch), `stream_program` (the whole graph). Values a chunk computes cover only the range it
needs: `[start, end)` for most, `[0, end)` for what attention's keys and values are made from;
values built from the inputs alone are computed whole and narrowed where they meet the chunked
dimension. The plan is read by duck typing (`regions`, `info`, `activations`), so the runtime
does not import the passes.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx

from memcompile.analysis import attention
from memcompile.analysis.attention import SEQUENCE_ATTENTION_OPS
from memcompile.analysis.eager_attention import EAGER_ATTENTION
from memcompile.analysis.sequence import SeqDim
from memcompile.distributed.ops import SP_ATTENTION
from memcompile.runtime.chunk_attention import prefix_causal_attention, prefix_eager_attention
from memcompile.runtime.document_mask import (DocumentIds, document_attention,
                                              evaluate_input_only)
from memcompile.runtime.stream_shard import shard_attention

log = logging.getLogger(__name__)

aten = torch.ops.aten
_SIZE_ARG_OPS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default,
                 aten.expand.default)
_RESHAPE = {aten.view.default: aten.reshape.default,
            aten._unsafe_view.default: aten.reshape.default}
_TARGET_OPS = (aten.nll_loss_forward.default, aten.nll_loss2d_forward.default)


def narrow_seq(t: torch.Tensor, seq: SeqDim, offset: int, length: int) -> torch.Tensor:
    """Rows `[offset, offset + length)` of the sequence held (possibly merged) in `seq.dim`."""
    if seq.outer == 1 and seq.inner == 1:
        return t.narrow(seq.dim, offset, length)
    size = t.shape[seq.dim]
    current = size // (seq.outer * seq.inner)
    split = (*t.shape[:seq.dim], seq.outer, current, seq.inner, *t.shape[seq.dim + 1:])
    part = t.reshape(split).narrow(seq.dim + 1, offset, length)
    return part.reshape(*t.shape[:seq.dim], seq.outer * length * seq.inner,
                        *t.shape[seq.dim + 1:])


def write_rows(dst: torch.Tensor, seq: SeqDim, offset: int, value: torch.Tensor, *,
               add: bool) -> None:
    """Add (or copy) `value` into rows `[offset, offset + its length)` of `dst`, in place.

    `dst` must be contiguous: a sequence merged with other dimensions is reached through a view
    of `dst` split into them (narrowing the merged form and reshaping back would copy, and the
    write would be lost).
    """
    if seq.outer == 1 and seq.inner == 1:
        part = dst.narrow(seq.dim, offset, value.shape[seq.dim])
    else:
        factor = seq.outer * seq.inner
        length = value.shape[seq.dim] // factor

        def split(t: torch.Tensor, rows: int) -> tuple[int, ...]:
            return (*t.shape[:seq.dim], seq.outer, rows, seq.inner, *t.shape[seq.dim + 1:])

        part = dst.view(split(dst, dst.shape[seq.dim] // factor)).narrow(seq.dim + 1, offset,
                                                                         length)
        value = value.reshape(split(value, length))
    if add:
        part.add_(value)
    else:
        part.copy_(value)


class ChunkRunner:
    """Evaluates a region's nodes on the sequence range `[start, end)`.

    Activations are computed on their range only: `[start, end)`, or `[0, end)` for the values
    keys and values are made from. Values built from the inputs alone are computed whole, once
    per call, and narrowed where they meet the sequence.
    """

    def __init__(self, region: Any, plan: Any):
        self.region = region
        self.info = plan.info
        self.activations = plan.activations
        self.length = plan.info.length
        self.input_from_zero = region.input is not None and any(
            region.input in n.all_input_nodes for n in region.prefix)
        self.tail = getattr(region, "tail", set())
        self.once, self.boundary, self.per_chunk = _computed_once(region, plan.info)
        self.dies_after = _last_readers(region)
        self.causal_mask_checked: dict[int, bool] = {}
        self.bodies: Any = None
        """Compiled chunk bodies (`stream_compiled.CompiledBodies`) that `run` hands its work
        to; None runs the nodes one by one in Python (the eager runtime, the reference)."""
        self.kept: Any = None
        """While a layer pass keeps (or reads back) its attention outputs
        (`kept_attention.KeptAttention`, set by `stream_layers`): where causal attention goes."""

    def start_of(self, node: fx.Node, start: int, prefix_from_zero: bool = True) -> int:
        """Where the range of `node` begins for a chunk beginning at `start` (with
        `prefix_from_zero` False, every node's range is the chunk's own)."""
        if not prefix_from_zero:
            return start
        if node is self.region.input:
            return 0 if self.input_from_zero else start
        return 0 if node in self.region.prefix else start

    def run(self, x: torch.Tensor | None, start: int, end: int, whole: dict[fx.Node, Any], *,
            reduce_hook: Callable[[fx.Node, tuple, dict], Any] | None = None,
            preset: dict[fx.Node, tuple[Any, int]] | None = None,
            only: set[fx.Node] | None = None, keep: Sequence[fx.Node] = (),
            x_start: int | None = None, prefix_from_zero: bool = True,
            sinks: dict[fx.Node, torch.Tensor] | None = None) -> dict[fx.Node, Any]:
        """Evaluate the region's nodes for queries `[start, end)`; return those in `keep`.

        `x` is the region's input over `[x_start, end)` (by default `[self.start_of(input,
        start), end)`). `whole` holds the
        side inputs and caches input-only values across chunks. `preset` gives values already
        computed, each with where its range starts; `only` limits the nodes evaluated.
        `prefix_from_zero=False` computes the nodes keys and values are made from on the chunk
        only (for the token-local part of a layer, `only=self.once`).
        `sinks` maps preset keys and values to buffers of their shape that attention adds their
        gradients into, instead of returning them through autograd (where the kernel allows).
        `reduce_hook(node, args, kwargs)` evaluates a reduction over the sequence (the head's);
        the tail after the reductions (`region.tail`) is left to the caller. Each value is
        dropped after its last reader, so a whole-length run without autograd holds no more
        than eager would.
        """
        if self.bodies is not None:
            return self.bodies.run(x, start, end, whole, reduce_hook=reduce_hook, preset=preset,
                                   only=only, keep=keep, x_start=x_start,
                                   prefix_from_zero=prefix_from_zero, sinks=sinks)
        env: dict[fx.Node, Any] = {}
        starts: dict[fx.Node, int] = {}
        if x is not None:
            env[self.region.input] = x
            starts[self.region.input] = (
                self.start_of(self.region.input, start, prefix_from_zero)
                if x_start is None else x_start)
        for node, (value, first) in (preset or {}).items():
            env[node], starts[node] = value, first
        keep_set = set(keep)
        for i, node in enumerate(self.region.nodes):
            if node in self.tail:
                continue
            if node not in self.activations:  # input-only: whole, whatever `only` says
                if node not in whole:
                    whole[node] = evaluate_input_only(node, _load(node.args, env, whole),
                                                      _load(node.kwargs, env, whole))
                continue
            if only is not None and node not in only:
                continue
            first = self.start_of(node, start, prefix_from_zero)
            env[node] = self.evaluate(node, env, starts, whole, first, end, reduce_hook, sinks)
            starts[node] = first
            for dead in self.dies_after.get(i, ()):
                if dead not in keep_set:
                    env.pop(dead, None)
        return {n: env[n] for n in keep if n in env}

    def evaluate(self, node: fx.Node, env: dict[fx.Node, Any], starts: dict[fx.Node, int],
                 whole: dict[fx.Node, Any], first: int, end: int,
                 reduce_hook: Callable[[fx.Node, tuple, dict], Any] | None = None,
                 sinks: dict[fx.Node, torch.Tensor] | None = None) -> Any:
        """One activation node's value over `[first, end)`, from the values in `env` (each
        over `[starts[n], end)`) and `whole`."""
        if node.target is operator.getitem and node.args[0] in env:
            return self._item(node, env[node.args[0]], starts[node.args[0]], first, end)
        args, kwargs = self._inputs(node, env, starts, whole, first, end)
        if reduce_hook is not None and node in self.region.reductions:
            return reduce_hook(node, args, kwargs)
        if self._over_sequence(node):
            return self._attention(node, args, kwargs, first, end, sinks)
        target = node.target
        if target in _SIZE_ARG_OPS:
            args = (args[0], self._resized(node, args[1], first, end), *args[2:])
            # A narrowed input may not be viewable; reshape copies only then.
            target = _RESHAPE.get(target, target)
        return target(*args, **kwargs)

    def _over_sequence(self, node: fx.Node) -> bool:
        """Attention across the chunked dimension (not within each sample of a chunked batch)."""
        return node.target in SEQUENCE_ATTENTION_OPS and self.info.effects.get(node) == "mixes"

    def _item(self, node: fx.Node, values: Any, have: int, first: int, end: int) -> Any:
        """One output of a multi-output op, narrowed to the range its readers need."""
        value = values[node.args[1]]
        seq = self.info.dim_of(node)
        if isinstance(seq, SeqDim) and isinstance(value, torch.Tensor) and have != first:
            value = narrow_seq(value, seq, first - have, end - first)
        return value

    def _inputs(self, node: fx.Node, env: dict, starts: dict, whole: dict, first: int,
                end: int) -> tuple[tuple, dict]:
        over_sequence = self._over_sequence(node)
        mask_position = attention.LAYOUTS[node.target].mask if over_sequence else None

        def load(arg: Any, position: int | str) -> Any:
            if not isinstance(arg, fx.Node):
                return arg
            need = 0 if over_sequence and position in (1, 2) else first
            if arg in env:
                value, seq = env[arg], self.info.dim_of(arg)
                if (isinstance(seq, SeqDim) and isinstance(value, torch.Tensor)
                        and starts[arg] != need):
                    value = narrow_seq(value, seq, need - starts[arg], end - need)
                return value
            value = whole[arg] if arg in whole else _missing(arg)
            if over_sequence and position == mask_position:
                return _narrow_mask(value, first, end, self.length)
            return self._narrow_whole(node, arg, value, need, end)

        args = tuple(_map_positions(node.args, load))
        kwargs = {k: fx.node.map_aggregate(v, lambda a, k=k: load(a, k))
                  for k, v in node.kwargs.items()}
        return args, kwargs

    def _narrow_whole(self, node: fx.Node, arg: fx.Node, value: Any, first: int, end: int) -> Any:
        """An input-only value narrowed where it meets the sequence of `node`'s output."""
        seq = self.whole_rows(node, arg, value)
        return value if seq is None else narrow_seq(value, seq, first, end - first)

    def whole_rows(self, node: fx.Node, arg: fx.Node, value: Any) -> SeqDim | None:
        """Where the input-only `value` of `arg` meets the sequence of `node`'s output: the
        dimension a chunk narrows it along, or None when `node` reads it whole."""
        if not isinstance(value, torch.Tensor):
            return None
        seq = self.info.dim_of(arg)
        if isinstance(seq, SeqDim):
            return seq
        if node.target in _TARGET_OPS and arg is node.args[1]:
            # Class targets line up with the input's rows (a shifted copy of the labels
            # carries no sequence dimension of its own: the shift hides it from the analysis).
            rows = self.info.dim_of(node.args[0])
            if isinstance(rows, SeqDim) and rows.dim == 0 and value.dim() >= 1:
                return rows
        if not _broadcasts(node):
            return None  # a weight of a matmul, say: never cut along the sequence by its size
        out_seq = self.info.dim_of(node)
        out_seq = out_seq[0] if isinstance(out_seq, tuple) else out_seq
        out_val = node.meta.get("val")
        out_val = out_val[0] if isinstance(out_val, (tuple, list)) else out_val
        if not isinstance(out_seq, SeqDim) or not isinstance(out_val, torch.Tensor):
            return None
        dim = out_seq.dim - (out_val.dim() - value.dim())
        if 0 <= dim < value.dim() and value.shape[dim] == out_val.shape[out_seq.dim] > 1:
            return out_seq.moved(dim)
        return None

    def _resized(self, node: fx.Node, sizes: Sequence[int], first: int, end: int) -> list[int]:
        seq = self.info.dim_of(node)
        sizes = list(sizes)
        if isinstance(seq, SeqDim) and sizes[seq.dim] != -1:
            sizes[seq.dim] = seq.outer * (end - first) * seq.inner
        return sizes

    def _attention(self, node: fx.Node, args: tuple, kwargs: dict, first: int, end: int,
                   sinks: dict[fx.Node, torch.Tensor] | None = None) -> Any:
        """Attention for queries `[first, end)` over keys `[0, end)`, causal at the lower right.

        A kernel's `is_causal` aligns at the top left when there are fewer queries than keys,
        so such a chunk runs as blocks of keys without a causal mask (`chunk_attention`), on
        the captured kernel, with a mask over keys alone if the call has one (`key_mask`). The result has the captured kernel's outputs: output and
        log-sum-exp, the rest (sequence offsets, random state: unused without dropout) None.
        A document mask (`document_mask`) is built for the chunk's rows from its ids.
        """
        if node.target is EAGER_ATTENTION:
            return self._eager_attention(args, kwargs, first, end)
        if node.target is SP_ATTENTION:  # over every rank's keys (`stream_shard`)
            return shard_attention(self, node, args, kwargs, first, end)
        mask = attention.call_mask(node.target, args, kwargs)
        if isinstance(mask, DocumentIds):
            return self._document_attention(node, args, kwargs, mask, first, end, sinks)
        if not attention.is_causal(node) or (first == 0 and self.kept is None):
            return node.target(*args, **kwargs)
        q, k, v = args[:3]
        k_node, v_node = node.args[1:3]
        pair = (sinks[k_node], sinks[v_node]) if (
            sinks and k_node in sinks and v_node in sinks) else None
        # Any mask left here is over keys alone (`passes.key_mask`).
        if self.kept is not None:
            out, lse = self.kept.attend(node, q, k, v, first, end, kwargs.get("scale"), pair,
                                        node.target, mask)
        else:
            out, lse = prefix_causal_attention(q, k, v, kwargs.get("scale"), pair,
                                               node.target, mask)
        return (out, lse) + (None,) * (attention.LAYOUTS[node.target].outputs - 2)

    def _eager_attention(self, args: tuple, kwargs: dict, first: int, end: int) -> Any:
        """The eager path's attention (`memcompile::eager_attention`) for queries
        `[first, end)` over keys `[0, end)`: its mask's rows came narrowed with the arguments;
        a bias (ALiBi) is narrowed here the same way."""
        q, k, v, mask, dropout_p, causal = args[:6]
        if dropout_p:
            raise RuntimeError("stream runtime: eager attention with dropout cannot be chunked")
        bias = kwargs.get("bias")
        return prefix_eager_attention(
            q, k, v, mask, causal, kwargs.get("scale", 1.0), kwargs.get("softcap"),
            kwargs.get("softmax_dtype"), _narrow_mask(bias, first, end, self.length))

    def _document_attention(self, node: fx.Node, args: tuple, kwargs: dict, ids: DocumentIds,
                            first: int, end: int,
                            sinks: dict[fx.Node, torch.Tensor] | None) -> Any:
        """Attention for queries `[first, end)` under a document mask, from its ids."""
        if not ids.causal:
            # Queries may see later keys: the layer runs whole (`stream_layers`), and so does
            # its mask, as the graph would build it.
            where = attention.LAYOUTS[node.target].mask
            dense = ids.rows(first, end)
            if isinstance(where, str):
                kwargs = {**kwargs, where: dense}
            else:
                args = (*args[:where], dense, *args[where + 1:])
            return node.target(*args, **kwargs)
        q, k, v = args[:3]
        k_node, v_node = node.args[1:3]
        pair = (sinks[k_node], sinks[v_node]) if (
            sinks and k_node in sinks and v_node in sinks) else None
        out, lse = document_attention(node.target, q, k, v, kwargs.get("scale"), ids, first,
                                      end, pair)
        return (out, lse) + (None,) * (attention.LAYOUTS[node.target].outputs - 2)


def _computed_once(region: Any, info: Any) -> tuple[set[fx.Node], dict[fx.Node, bool],
                                                     set[fx.Node]]:
    """How a layer is split when keys and values are computed once per pass.

    Returns the nodes keys and values are made from (`once`), the boundary (attention's keys
    and values, each read from the sequence's start), and the nodes a chunk evaluates given the
    boundary (`per_chunk`: everything the output needs except through the boundary; a shared
    norm is recomputed on the chunk's rows rather than kept at whole length). All empty when a
    key or value has no sequence dimension to narrow.
    """
    inside = set(region.nodes)
    boundary: dict[fx.Node, bool] = {}
    for node in region.nodes:
        if node.target in SEQUENCE_ATTENTION_OPS:
            for arg in node.args[1:3]:
                if isinstance(arg, fx.Node) and arg in inside:
                    if not isinstance(info.dim_of(arg), SeqDim):
                        return set(), {}, set()
                    boundary[arg] = True
    per_chunk: set[fx.Node] = set()
    stack = list(region.outputs)
    while stack:
        node = stack.pop()
        if node in per_chunk or node in boundary or node not in inside:
            continue
        per_chunk.add(node)
        stack.extend(node.all_input_nodes)
    return set(region.prefix), boundary, per_chunk


def _broadcasts(node: fx.Node) -> bool:
    """Whether the op lines its inputs up with its output by broadcasting (elementwise ops, and
    gather's index)."""
    target = node.target
    return target is aten.gather.default or (
        isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags)


def _last_readers(region: Any) -> dict[int, list[fx.Node]]:
    """Position in `region.nodes` after which each value (the input included) is not read."""
    index = {n: i for i, n in enumerate(region.nodes)}
    dies: dict[int, list[fx.Node]] = {}
    for node in [region.input, *region.nodes] if region.input is not None else region.nodes:
        readers = [index[u] for u in node.users if u in index]
        if readers:
            dies.setdefault(max(readers), []).append(node)
    return dies


def _narrow_mask(mask: Any, first: int, end: int, length: int) -> Any:
    """A `(..., T, T)` attention mask's rows `[first, end)` and columns `[0, end)`."""
    if not isinstance(mask, torch.Tensor):
        return mask
    if mask.shape[-2] == length:
        mask = mask.narrow(-2, first, end - first)
    if mask.shape[-1] == length:
        mask = mask.narrow(-1, 0, end)
    return mask


def mask_is_causal(mask: torch.Tensor, rows_per_block: int = 1024, *,
                   min_hides: bool = False) -> bool:
    """Whether no query may see a later key (so keys past a chunk can be dropped), checked in
    blocks of rows to keep the check's memory small.

    `min_hides` (an additive mask of transformers' eager path): the dtype's lowest value hides a
    key as -inf does, but only in a row that sees some key (one that sees none gets equal
    weights over every key, later ones included); every row must then see one."""
    length = mask.shape[-1]
    for r0 in range(0, mask.shape[-2], rows_per_block):
        block = mask[..., r0:r0 + rows_per_block, :]
        if block.dtype == torch.bool:
            allowed = block
        elif min_hides:
            allowed = block > torch.finfo(block.dtype).min
            if not allowed.any(-1).all():
                return False
        else:
            allowed = block > float("-inf")
        later = torch.ones(block.shape[-2], length, dtype=torch.bool,
                           device=mask.device).triu(r0 + 1)
        if (allowed & later).any():
            return False
    return True


def _map_positions(args: tuple, load: Callable[[Any, int], Any]) -> list[Any]:
    out = []
    for i, a in enumerate(args):
        if isinstance(a, (list, tuple)):
            out.append(type(a)(load(x, i) for x in a))
        else:
            out.append(load(a, i))
    return out


def _load(value: Any, env: dict, whole: dict) -> Any:
    return fx.node.map_aggregate(
        value, lambda a: (env[a] if a in env else whole[a]) if isinstance(a, fx.Node) else a)


def _missing(node: fx.Node) -> Any:
    raise RuntimeError(f"stream runtime: value {node.name} was freed or never computed")
