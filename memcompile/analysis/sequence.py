"""Which dimension of every tensor is the sequence, and what each op does along it.

StreamBP re-runs parts of the graph on a range of the sequence, so it must know, for every value,
which dimension holds the tokens and how the op that made it treats them. Both are read off an
aten graph with static shapes (what Dynamo captures on a first call):

- The sequence starts at the integer token inputs (ids, labels, attention mask: rank 2, the same
  length `T` in their last dimension) and is carried forward op by op. A `SeqDim` says which
  dimension holds it and how it is merged with neighbours: a `(B, T, D)` tensor viewed as
  `(B*T, D)` keeps the sequence in dimension 0 with `outer=B`. Sizes are never matched by value,
  so a hidden size equal to the length does not confuse the analysis.
- Each op is *token-local* (output rows depend only on the same input rows), *mixes* tokens
  (attention), *reduces* over the sequence (a loss), or is *unknown* (any op the rules below do
  not cover; a region holding one is left unchunked, and the report says which op).

Values that no token input reaches (`arange(T)` for rotary tables, a mask built from positions)
carry no `SeqDim`; a chunked op narrows them where they meet a sequence dimension by broadcasting.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx as fx

from memcompile.analysis import attention
from memcompile.analysis.attention import SEQUENCE_ATTENTION_OPS

aten = torch.ops.aten

Effect = Literal["local", "mixes", "reduces", "unknown"]


_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
_SAME_SHAPE = (aten.clone.default, aten.alias.default, aten._to_copy.default,
               aten.detach.default, aten.contiguous.default, aten.lift_fresh_copy.default,
               aten.empty_like.default, aten.zeros_like.default, aten.ones_like.default,
               aten.full_like.default)
_REDUCTIONS = (aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default)
_ALONG_DIM = (aten._log_softmax.default, aten._softmax.default, aten.cumsum.default)
"""Ops computing along one dimension, token-local unless that dimension is the sequence."""
_SELECT_ALONG = {aten.topk.default: 2, aten.sort.default: 1}
"""Ops choosing along one dimension (argument position of the dimension), with two outputs of
the input's shape there: token-local unless that dimension is the sequence."""


@dataclass(frozen=True)
class SeqDim:
    """Where a tensor holds the sequence: dimension `dim` has size `outer * length * inner`."""

    dim: int
    outer: int = 1
    inner: int = 1

    def moved(self, dim: int) -> SeqDim:
        """The same factors in another dimension (after a transpose, unsqueeze, ...)."""
        return SeqDim(dim, self.outer, self.inner)


@dataclass
class SequenceInfo:
    """The analysis of one graph: the length, each node's `SeqDim` and each op's effect."""

    length: int
    dims: dict[fx.Node, SeqDim]
    effects: dict[fx.Node, Effect]
    unknown_reason: dict[fx.Node, str]

    def dim_of(self, node: fx.Node) -> SeqDim | None:
        """The node's sequence dimension, or None if no token input reaches it."""
        return self.dims.get(node)


def is_token_tensor(val: Any) -> bool:
    """Whether `val` can be a `(batch, T)` token input: integer, rank 2, longer than 1."""
    return (isinstance(val, torch.Tensor) and val.dim() == 2 and not val.is_floating_point()
            and val.dtype != torch.bool and val.shape[1] > 1)


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    val = node.meta.get("val")
    return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else None


def token_inputs(graph: fx.Graph) -> tuple[list[fx.Node], int | None]:
    """The integer rank-2 placeholders (ids, labels, mask) sharing the longest length.

    Returns them and that length `T`; a graph without any has no sequence (`[]`, None).
    """
    candidates = []
    for node in graph.find_nodes(op="placeholder"):
        if is_token_tensor(node.meta.get("val")):
            candidates.append(node)
    if not candidates:
        return [], None
    length = max(int(n.meta["val"].shape[1]) for n in candidates)
    return [n for n in candidates if int(n.meta["val"].shape[1]) == length], length


def view_seq_dim(in_shape: tuple[int, ...], seq: SeqDim, out_shape: tuple[int, ...],
                 length: int) -> SeqDim | None:
    """Where a view keeps the sequence, or None if it splits the sequence across dimensions.

    The sequence's factor occupies a run of elements with stride `stride` (everything right of
    it) and extent `stride * length`; it survives in output dimension `j` if `j` holds that
    whole run.
    """
    stride = seq.inner * math.prod(in_shape[seq.dim + 1:])
    span = stride * length
    for j in range(len(out_shape)):
        right = math.prod(out_shape[j + 1:])
        whole = right * out_shape[j]
        if stride % right == 0 and whole % span == 0 and right <= stride:
            inner = stride // right
            return SeqDim(j, out_shape[j] // (length * inner), inner)
    return None


def _aligned(node: fx.Node, arg: fx.Node, seq: SeqDim) -> SeqDim:
    """`arg`'s sequence dimension carried to a broadcasting op's output (aligned at the right)."""
    out_rank = len(_shape(node) or ())
    in_rank = len(_shape(arg) or ())
    return seq.moved(seq.dim + out_rank - in_rank)


def _norm_dims(dims: object, rank: int) -> list[int]:
    if dims is None:
        return list(range(rank))
    dims = [dims] if isinstance(dims, int) else list(dims)  # type: ignore[arg-type]
    return [d % rank if rank else 0 for d in dims]


class _Rules:
    """The per-op rules; `apply(node)` returns (effect, SeqDim of the output or None, reason)."""

    def __init__(self, info: SequenceInfo):
        self.info = info

    def inputs_with_seq(self, node: fx.Node) -> list[tuple[int, fx.Node, SeqDim]]:
        found = []
        for i, arg in enumerate(node.all_input_nodes):
            if (seq := self.info.dims.get(arg)) is not None:
                found.append((i, arg, seq))
        return found

    def apply(self, node: fx.Node) -> tuple[Effect, SeqDim | None, str]:
        carried = self.inputs_with_seq(node)
        if not carried:
            return "local", None, ""
        target = node.target
        first = node.args[0] if node.args else None
        seq0 = self.info.dims.get(first) if isinstance(first, fx.Node) else None
        if target is operator.getitem:
            seq = self.info.dims.get(node.args[0])
            if isinstance(seq, tuple):  # multi-output op: one SeqDim per output
                return "local", seq[node.args[1]], ""
            return "local", seq, ""
        if target in SEQUENCE_ATTENTION_OPS:
            return self._attention(node)
        if isinstance(target, torch._ops.OpOverload) and (
                torch.Tag.nondeterministic_seeded in target.tags):
            return "unknown", None, f"{target} draws random numbers (a re-run would differ)"
        if target is aten.native_layer_norm.default:
            normalized = len(node.args[1])
            if seq0.dim >= len(_shape(first)) - normalized:
                return "mixes", None, "normalizes over the sequence"
            return "local", (seq0, seq0, seq0), ""
        if target in _VIEWS:
            assert seq0 is not None
            out = view_seq_dim(_shape(first), seq0, _shape(node), self.info.length)
            if out is None:
                return "unknown", None, "a view splits the sequence across dimensions"
            return "local", out, ""
        if target in _SAME_SHAPE or target is aten.expand.default:
            return "local", seq0, ""
        if target in (aten.transpose.int, aten.permute.default, aten.t.default):
            return "local", self._permuted(node, seq0), ""
        if target is aten.unsqueeze.default:
            d = node.args[1] % (len(_shape(node)))
            return "local", seq0.moved(seq0.dim + (1 if d <= seq0.dim else 0)), ""
        if target in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
            return self._squeezed(node, seq0)
        if target in (aten.mm.default, aten.addmm.default, aten.bmm.default):
            return self._matmul(node)
        if target is aten.convolution.default:
            if seq0 is not None and seq0.dim == 0 and len(carried) == 1:
                return "local", seq0, ""  # per sample: the batch
            return "mixes", None, "a convolution over the chunked dimension"
        if target is aten.embedding.default:
            return "local", self.info.dims.get(node.args[1]), ""
        if target in (aten.sum.default, aten.mean.default):
            return "reduces", None, ""
        if target is aten.linalg_vector_norm.default:
            dims = _norm_dims(node.args[2] if len(node.args) > 2 else None, len(_shape(first)))
            if seq0.dim in dims:
                return "unknown", None, "a norm over the chunked dimension"
            keep = len(node.args) > 3 and node.args[3]
            return "local", seq0.moved(seq0.dim - (0 if keep else sum(d < seq0.dim for d in dims))), ""
        if target in _REDUCTIONS:
            dims = _norm_dims(node.args[1] if len(node.args) > 1 else None, len(_shape(first)))
            if seq0.dim in dims:
                return "reduces", None, ""
            keep = len(node.args) > 2 and node.args[2]
            return "local", seq0.moved(seq0.dim - (0 if keep else sum(d < seq0.dim for d in dims))), ""
        if target is aten.nll_loss_forward.default:
            if node.args[3] == 0:
                return "local", (seq0, None), ""
            return "reduces", None, ""
        if target in _ALONG_DIM:
            if node.args[1] % len(_shape(first)) == seq0.dim:
                return "mixes", None, "computes along the sequence"
            return "local", seq0, ""
        if target in (aten.split.Tensor, aten.split_with_sizes.default):
            dim = (node.args[2] if len(node.args) > 2 else 0) % len(_shape(first))
            if dim == seq0.dim:
                return "unknown", None, "splits along the sequence"
            return "local", tuple(seq0 for _ in node.meta["val"]), ""
        if target is aten.unbind.int:
            dim = (node.args[1] if len(node.args) > 1 else 0) % len(_shape(first))
            if dim == seq0.dim:
                return "unknown", None, "unbinds along the chunked dimension"
            moved = seq0.moved(seq0.dim - (1 if dim < seq0.dim else 0))
            return "local", tuple(moved for _ in node.meta["val"]), ""
        if target in (aten.slice.Tensor, aten.select.int, aten.narrow.default):
            return self._slice(node, seq0)
        if target is aten.cat.default:
            return self._cat(node)
        if target is aten.stack.default:
            return self._stack(node)
        if target in _SELECT_ALONG:
            position = _SELECT_ALONG[target]
            dim = (node.args[position] if len(node.args) > position else -1) % len(_shape(first))
            if dim == seq0.dim:
                return "unknown", None, f"{target} chooses along the sequence"
            return "local", (seq0, seq0), ""
        if target is aten.gather.default:
            if node.args[1] % len(_shape(first)) == seq0.dim:
                return "unknown", None, "gathers along the sequence"
            return "local", seq0, ""
        if isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags:
            arg, seq = next((a, s) for _, a, s in carried)
            return "local", _aligned(node, arg, seq), ""
        return "unknown", None, f"no sequence rule for {target}"

    def _attention(self, node: fx.Node) -> tuple[Effect, SeqDim | None, str]:
        q = self.info.dims.get(node.args[0])
        outs = node.meta["val"]
        single = isinstance(outs, torch.Tensor)  # memcompile::eager_attention: the output alone
        if q is not None and q.dim == 0 and all(
                self.info.dims.get(a) in (None, q) for a in node.args[1:3]):
            # Chunking the batch: attention stays within each sample.
            if single:
                return "local", q, ""
            return "local", tuple(q if isinstance(v, torch.Tensor) and v.dim() >= 1 else None
                                  for v in outs), ""
        if q is None or q.dim != 2:
            return "unknown", None, "attention whose queries do not hold the sequence in dim 2"
        if attention.dropout(node):
            return "unknown", None, "attention with dropout (a re-run would draw a new mask)"
        if single:
            return "mixes", q, ""
        # The log-sum-exp holds a row per query, except the memory-efficient kernel's, padded
        # to a multiple of 32 rows: that one has no sequence dimension to cut.
        rows = outs[0].shape[2]
        dims = tuple(q if i == 0 else (SeqDim(2) if isinstance(v, torch.Tensor) and v.dim() == 3
                                       and v.shape[2] == rows else None)
                     for i, v in enumerate(outs))
        return "mixes", dims, ""

    def _squeezed(self, node: fx.Node, seq: SeqDim) -> tuple[Effect, SeqDim | None, str]:
        shape = _shape(node.args[0])
        if node.target is aten.squeeze.default:
            dims = [d for d, size in enumerate(shape) if size == 1]
        else:
            dims = _norm_dims(node.args[1], len(shape))
        dims = [d for d in dims if shape[d] == 1]
        if seq.dim in dims:
            return "unknown", None, "squeezes the sequence away (a length of 1)"
        return "local", seq.moved(seq.dim - sum(d < seq.dim for d in dims)), ""

    def _permuted(self, node: fx.Node, seq: SeqDim) -> SeqDim:
        rank = len(_shape(node))
        if node.target is aten.t.default:
            order = [1, 0] if rank == 2 else [0]
        elif node.target is aten.transpose.int:
            a, b = node.args[1] % rank, node.args[2] % rank
            order = list(range(rank))
            order[a], order[b] = order[b], order[a]
        else:
            order = [d % rank for d in node.args[1]]
        return seq.moved(order.index(seq.dim))

    def _matmul(self, node: fx.Node) -> tuple[Effect, SeqDim | None, str]:
        offset = 1 if node.target is aten.addmm.default else 0
        a, b = node.args[offset], node.args[offset + 1]
        seq_a, seq_b = self.info.dims.get(a), self.info.dims.get(b)
        rank = len(_shape(node))
        if seq_b is not None and not (rank == 3 and seq_b.dim == 0 and seq_a is not None):
            return "mixes", None, "a matmul contracts or spans the sequence of its second operand"
        if seq_a is None or seq_a.dim == rank - 1:
            return "mixes", None, "a matmul contracts the sequence"
        return "local", seq_a, ""

    def _slice(self, node: fx.Node, seq: SeqDim) -> tuple[Effect, SeqDim | None, str]:
        rank = len(_shape(node.args[0]))
        dim = (node.args[1] if len(node.args) > 1 else 0) % rank
        if dim == seq.dim:
            return "unknown", None, "slices along the sequence"
        if node.target is aten.select.int:
            return "local", seq.moved(seq.dim - (1 if dim < seq.dim else 0)), ""
        return "local", seq, ""

    def _stack(self, node: fx.Node) -> tuple[Effect, SeqDim | None, str]:
        """Stacking tensors of one sequence dimension (interleaved rotary embeddings) inserts a
        dimension: token-local, the sequence moved past it."""
        tensors = node.args[0]
        seqs = {self.info.dims.get(t) for t in tensors}
        if len(seqs) != 1 or None in seqs:
            return "unknown", None, "stacks tensors with different sequence dimensions"
        seq = seqs.pop()
        dim = (node.args[1] if len(node.args) > 1 else 0) % len(_shape(node))
        return "local", seq.moved(seq.dim + (1 if dim <= seq.dim else 0)), ""

    def _cat(self, node: fx.Node) -> tuple[Effect, SeqDim | None, str]:
        tensors = node.args[0]
        rank = len(_shape(node))
        dim = (node.args[1] if len(node.args) > 1 else 0) % rank
        seqs = {self.info.dims.get(t) for t in tensors} - {None}
        if len(seqs) != 1:
            return "unknown", None, "concatenates tensors with different sequence dimensions"
        seq = seqs.pop()
        if seq.dim == dim:
            if _onto_empty(tensors, self.info.dims):
                # A fresh KV cache: transformers concatenates the new keys onto an empty
                # tensor. Nothing is joined: the result is the one input with a sequence.
                return "local", seq, ""
            return "unknown", None, "concatenates along the sequence"
        return "local", seq, ""


def fresh_cache_update(node: fx.Node, info: SequenceInfo) -> bool:
    """Whether `node` concatenates one sequence onto empty tensors: how a KV cache created in
    the forward (transformers' `use_cache=True`) takes a layer's keys or values."""
    return (node.op == "call_function" and node.target is aten.cat.default
            and info.dim_of(node) is not None and _onto_empty(node.args[0], info.dims))


def _onto_empty(tensors: list[fx.Node], dims: dict) -> bool:
    """Whether one of `tensors` has a sequence dimension and every other one is empty."""
    with_seq = [t for t in tensors if dims.get(t) is not None]
    others = [t for t in tensors if dims.get(t) is None]
    return len(with_seq) == 1 and all(
        isinstance(v := t.meta.get("val"), torch.Tensor) and v.numel() == 0 for t in others)


def batch_inputs(graph: fx.Graph, parameters: set[fx.Node]) -> tuple[list[fx.Node], int | None]:
    """The non-parameter placeholders of rank 2 or more sharing the first one's leading size
    (images and token ids of one batch), and that size; ([], None) if there are none."""
    inputs = [n for n in graph.find_nodes(op="placeholder") if n not in parameters
              and isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dim() >= 2]
    if not inputs or int(inputs[0].meta["val"].shape[0]) < 2:
        return [], None
    size = int(inputs[0].meta["val"].shape[0])
    return [n for n in inputs if int(n.meta["val"].shape[0]) == size], size


def analyze_sequence(graph: fx.Graph, *, dim: str = "sequence",
                     parameters: set[fx.Node] | None = None) -> SequenceInfo | None:
    """Find the chunked dimension of every value and the effect of every op.

    `dim="sequence"` follows the length of the integer `(batch, T)` inputs; `dim="batch"`
    follows the leading (batch) dimension of the non-parameter inputs instead (`parameters`
    names the placeholders to leave out), for losses that couple the samples of a batch.
    Returns None when the graph has no such input (nothing to chunk).
    """
    if dim == "batch":
        inputs, length = batch_inputs(graph, parameters or set())
        start = SeqDim(0)
    else:
        inputs, length = token_inputs(graph)
        start = SeqDim(1)
    if length is None:
        return None
    info = SequenceInfo(length, {n: start for n in inputs}, {}, {})
    rules = _Rules(info)
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        try:
            effect, seq, reason = rules.apply(node)
        except (TypeError, IndexError, AttributeError, StopIteration) as e:
            effect, seq, reason = "unknown", None, f"{node.target}: {type(e).__name__}: {e}"
        info.effects[node] = effect
        if seq is not None:
            info.dims[node] = seq  # type: ignore[assignment]
        if effect == "unknown":
            info.unknown_reason[node] = reason
    return info
