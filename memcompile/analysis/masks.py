"""Facts about attention masks read off a graph: whether a constant mask is the causal one,
and whether a mask built from the inputs splits into the causal rule and a mask over keys alone.

With an `attention_mask` (padding), transformers builds attention's mask under `torch.compile`
as `causal(q, k) & padding(b, k)`, expanded to `(batch, 1, T, T)` and turned additive with
`where(mask, 0, -inf)`. It depends on an input, so it cannot be evaluated at compile time, and
it is quadratic in the length. But only one factor needs the query: the causal rule, which the
kernel applies itself (`is_causal`). The rest is a `(batch, 1, 1, T)` mask over keys.

`split_key_mask(mask)` reads that structure off the graph: an additive `where(c, 0, -inf)` of a
boolean `c`, optionally expanded, that is an `and` of terms each of which is either

- the causal comparison `k <= q` (or `q >= k`), where `k` and `q` are position indices: values
  computed from no input that equal `arange(T)` along the last and the second-to-last
  dimension (checked by evaluating them: they are `T` elements each), or
- a term that does not vary along the query dimension (size 1 there): padding, for one.

Anything else (a sliding window, a document mask) is not split, and the reason says so. The
passes `causal_mask` and `key_mask` act on these facts.

Packed sequences (several documents in one row, `position_ids` restarting at each) get a mask
that no split over keys describes: transformers builds `(pos[k] <= pos[q]) & (doc[q] == doc[k])`
from per-token document ids and positions gathered at the query and at the key.
`find_document_mask(mask)` reads that structure off the graph: an additive `where(c, 0, -inf)`
whose condition is an `and` of

- one equality of per-token ids at the queries `(B|1, 1, T, 1)` and at the keys
  `(B|1, 1, 1, T)` (the document term),
- a causal rule: the comparison of positions `k <= q` above, or the same comparison of
  per-token values at the key and at the query (`pos[k] <= pos[q]`, transformers' rule
  remapped to each document's positions),
- terms over keys alone, and terms that are always true (computed from no input).

Every factor is a comparison of a value per query with a value per key, so any rows and columns
of the mask can be built from the per-token vectors (`document_mask_part`), never the whole
`(T, T)`. The pass `document_mask` acts on these facts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

aten = torch.ops.aten

_ANDS = (aten.bitwise_and.Tensor, aten.logical_and.default)
_EXPANDS = (aten.expand.default,)


@dataclass(frozen=True)
class KeyMaskSplit:
    """A mask found to be `causal & keys`: the terms over keys alone, and the additive mask's
    zero and minus-infinity arguments to rebuild it from them."""

    keys: list[fx.Node]
    zero: object
    hidden: object


def is_causal_mask(mask: torch.Tensor, *, min_hides: bool = False) -> bool:
    """Whether `(..., T, T)` `mask` lets each query see exactly the keys up to its own position
    (boolean: True = visible; additive: 0 visible, -inf hidden), the same for every batch and
    head.

    `min_hides`: the dtype's lowest finite value hides a key too. transformers' eager path
    adds that value, not -inf (its softmax would give NaN on a row of -inf). Where every query
    sees its own key, as here, the two weigh a hidden key the same: exactly zero."""
    if mask.dim() < 2 or mask.shape[-1] != mask.shape[-2]:
        return False
    length = mask.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    if mask.dtype == torch.bool:
        return bool((mask == causal).all())
    hidden = mask[..., ~causal]
    hides = hidden == float("-inf")
    if min_hides:
        hides = hides | (hidden == torch.finfo(mask.dtype).min)
    return bool(((mask == 0) == causal).all() and hides.all())


def split_key_mask(mask: fx.Node) -> KeyMaskSplit | str:
    """The key terms of `mask` if it is the causal rule and terms over keys alone, else why not."""
    additive = _additive(mask)
    if additive is None:
        return "not an additive mask made by where(mask, 0, -inf)"
    condition, zero, hidden = additive
    terms = _and_terms(condition)
    causal = [t for t in terms if _is_causal_comparison(t)]
    keys = [t for t in terms if t not in causal]
    if not causal:
        return "no causal comparison of positions among its terms"
    for term in keys:
        val = term.meta.get("val") if isinstance(term, fx.Node) else None
        if not isinstance(val, torch.Tensor):
            return f"{getattr(term, 'name', term)} has no recorded value"
        if val.dim() >= 2 and val.shape[-2] != 1:
            return f"{term.name} varies along the queries (a window or document mask?)"
    return KeyMaskSplit(keys, zero, hidden)


@dataclass(frozen=True)
class DocumentMask:
    """A mask found to be `same document & causal & keys` (`find_document_mask`): the nodes
    `document_mask` takes, in its argument order."""

    documents: tuple[fx.Node, fx.Node]
    """Per-token ids at the queries `(B|1, 1, T, 1)` and at the keys `(B|1, 1, 1, T)`."""
    positions: tuple[fx.Node, fx.Node] | None
    """Per-token positions at the queries and at the keys, when the causal rule compares them
    (`pos[k] <= pos[q]`); None when it compares the indices themselves."""
    keys: list[fx.Node]
    zero: float
    hidden: float
    dtype: torch.dtype

    def args(self) -> tuple:
        """The arguments of a `document_mask` call building this mask."""
        positions = self.positions or (None, None)
        return (*self.documents, *positions, list(self.keys), self.zero, self.hidden,
                self.dtype)


def find_document_mask(mask: fx.Node) -> DocumentMask | str:
    """The per-token terms of `mask` if it is the causal rule within documents (and terms over
    keys alone), else why not."""
    additive = _additive(mask)
    if additive is None:
        return "not an additive mask made by where(mask, 0, -inf)"
    condition, zero, hidden = additive
    val = mask.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() != 4 or val.shape[-1] != val.shape[-2]:
        return "not a square 4-d mask"
    length = int(val.shape[-1])
    causal, documents, positions, keys = False, [], [], []
    for term in _and_terms(condition):
        if _is_causal_comparison(term):
            causal = True
        elif _always_true(term):
            continue  # transformers starts its `and` from a constant True
        elif (pair := _per_token_pair(term, length)) is not None:
            kind, queries, keys_side = pair
            (documents if kind == "same" else positions).append((queries, keys_side))
        elif _over_keys(term):
            keys.append(term)
        else:
            return (f"{getattr(term, 'name', term)} is neither the causal rule, a comparison of "
                    "per-token values at the query and the key, nor a term over keys")
    if len(documents) != 1:
        return (f"{len(documents)} equalities of per-token ids at the query and the key "
                "(a document mask has one)")
    if len(positions) > 1 or (not causal and not positions):
        return "no single causal rule among its terms (k <= q, or pos[k] <= pos[q])"
    return DocumentMask(documents[0], None if causal else positions[0], keys, _constant(zero),
                        _constant(hidden), val.dtype)


def document_mask_part(documents_q: torch.Tensor, documents_k: torch.Tensor,
                       positions_q: torch.Tensor | None, positions_k: torch.Tensor | None,
                       keys: list[torch.Tensor], zero: float, hidden: float,
                       dtype: torch.dtype, rows: tuple[int, int] | None = None,
                       columns: tuple[int, int] | None = None) -> torch.Tensor:
    """The additive mask a `DocumentMask` describes, in `dtype`: `zero` where query `q` sees
    key `k`, `hidden` elsewhere. `q` sees `k` when their ids are equal, the causal rule holds
    (`positions_k <= positions_q`, or `k <= q` without positions) and every key term is true.

    Queries `(B|1, 1, T, 1)`, keys `(B|1, 1, 1, T)`; key terms `(B|1, 1, 1, T|1)`. Whole, it is
    `(B|1, 1, T, T)`; with `rows` and `columns`, only those ranges of it are built, from the
    per-token values alone."""
    q0, q1 = rows or (0, documents_q.shape[-2])
    k0, k1 = columns or (0, documents_k.shape[-1])
    visible = documents_q[..., q0:q1, :] == documents_k[..., k0:k1]
    if positions_q is None or positions_k is None:
        device = documents_q.device
        visible = visible & (torch.arange(k0, k1, device=device)
                             <= torch.arange(q0, q1, device=device)[:, None])
    else:
        visible = visible & (positions_k[..., k0:k1] <= positions_q[..., q0:q1, :])
    for term in keys:
        visible = visible & (term[..., k0:k1] if term.shape[-1] > 1 else term)
    options = {"dtype": dtype, "device": documents_q.device}
    return torch.where(visible, torch.tensor(zero, **options), torch.tensor(hidden, **options))


@torch.library.custom_op("memcompile::document_mask", mutates_args=())
def document_mask(documents_q: torch.Tensor, documents_k: torch.Tensor,
                  positions_q: torch.Tensor | None, positions_k: torch.Tensor | None,
                  keys: list[torch.Tensor], zero: float, hidden: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """The whole `(B|1, 1, T, T)` mask of `document_mask_part`: the op the `document_mask` pass
    puts in the graph. The stream runtime never runs it whole; it builds a chunk's rows from its
    arguments (`runtime.document_mask`)."""
    return document_mask_part(documents_q, documents_k, positions_q, positions_k, keys, zero,
                              hidden, dtype)


@document_mask.register_fake
def _(documents_q: torch.Tensor, documents_k: torch.Tensor, positions_q: torch.Tensor | None,
      positions_k: torch.Tensor | None, keys: list[torch.Tensor], zero: float, hidden: float,
      dtype: torch.dtype) -> torch.Tensor:
    positions = [t.shape for t in (positions_q, positions_k) if t is not None]
    shape = torch.broadcast_shapes(documents_q.shape, documents_k.shape, *positions,
                                   *(t.shape for t in keys))
    return documents_q.new_empty(shape, dtype=dtype)


DOCUMENT_MASK = torch.ops.memcompile.document_mask.default
"""The op the `document_mask` pass puts in the graph (a node's target)."""


def _per_token_pair(term: object, length: int) -> tuple[str, fx.Node, fx.Node] | None:
    """`("same", queries, keys)` for `eq(queries, keys)` of per-token values at the query and
    at the key (either order), `("before", queries, keys)` for `le(keys, queries)` or
    `ge(queries, keys)`; None for anything else."""
    if not isinstance(term, fx.Node) or len(term.args) != 2:
        return None
    a, b = term.args
    sides = (_side(a, length), _side(b, length))
    if term.target is aten.eq.Tensor and set(sides) == {"query", "key"}:
        return ("same", a, b) if sides[0] == "query" else ("same", b, a)
    if term.target is aten.le.Tensor and sides == ("key", "query"):
        return "before", b, a
    if term.target is aten.ge.Tensor and sides == ("query", "key"):
        return "before", a, b
    return None


def _side(node: object, length: int) -> str | None:
    """"query" for a `(B|1, 1, T, 1)` value (one per query), "key" for `(B|1, 1, 1, T)`."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() != 4 or val.shape[1] != 1 or length < 2:
        return None
    if tuple(val.shape[-2:]) == (length, 1):
        return "query"
    if tuple(val.shape[-2:]) == (1, length):
        return "key"
    return None


def _over_keys(term: object) -> bool:
    """A boolean `(B|1, 1, 1, T|1)` term: the same for every query."""
    val = term.meta.get("val") if isinstance(term, fx.Node) else None
    return (isinstance(val, torch.Tensor) and val.dtype == torch.bool and val.dim() == 4
            and val.shape[1] == 1 and val.shape[-2] == 1)


ALWAYS_TRUE_LIMIT = 2**16
"""Largest term (elements) checked for being a constant True by evaluating it."""


def _always_true(term: object) -> bool:
    """A term computed from no input whose every element is True."""
    if not isinstance(term, fx.Node):
        return term is True
    val = term.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dtype != torch.bool or (
            val.numel() > ALWAYS_TRUE_LIMIT):
        return False
    nodes = ancestors(term)
    if any(n.op != "call_function" for n in nodes):
        return False
    with torch.no_grad():
        return bool(evaluate(nodes).all())


def _additive(mask: fx.Node) -> tuple[object, object, object] | None:
    """`(condition, zero, hidden)` of an additive `where(condition, 0, -inf)`, the condition's
    expands stripped; None for anything else."""
    if mask.target is not aten.where.self:
        return None
    condition, zero, hidden = mask.args
    if not (_constant(zero) == 0.0 and _constant(hidden) == -math.inf):
        return None
    while isinstance(condition, fx.Node) and condition.target in _EXPANDS:
        condition = condition.args[0]
    return condition, zero, hidden


def _constant(value: object) -> float | None:
    """A Python number, or a scalar_tensor node's value."""
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, fx.Node) and value.target is aten.scalar_tensor.default:
        return float(value.args[0])
    return None


def _and_terms(node: object) -> list[object]:
    if isinstance(node, fx.Node) and node.target in _ANDS:
        return [t for arg in node.args[:2] for t in _and_terms(arg)]
    return [node]


def _is_causal_comparison(term: object) -> bool:
    """`keys <= queries` or `queries >= keys` over position indices."""
    if not isinstance(term, fx.Node):
        return False
    if term.target is aten.le.Tensor:
        keys, queries = term.args
    elif term.target is aten.ge.Tensor:
        queries, keys = term.args
    else:
        return False
    return _positions(keys, dim=-1) and _positions(queries, dim=-2)


def _positions(node: object, dim: int) -> bool:
    """Whether `node` is computed from no input and equals `arange(T)` along `dim` (size 1
    elsewhere)."""
    if not isinstance(node, fx.Node):
        return False
    nodes = ancestors(node)
    if any(n.op != "call_function" for n in nodes):
        return False
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() < 2 or val.numel() != val.shape[dim]:
        return False
    with torch.no_grad():
        value = evaluate(nodes)
    return bool((value.flatten() == torch.arange(value.numel(), device=value.device)).all())


def ancestors(node: fx.Node) -> list[fx.Node]:
    """`node` and every node it is computed from, in graph order."""
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(current.all_input_nodes)
    return [n for n in node.graph.nodes if n in seen]


def evaluate(nodes: list[fx.Node]) -> torch.Tensor:
    """The last of `nodes` (a graph-ordered closure of calls on constants), computed now."""
    env: dict[fx.Node, object] = {}
    for node in nodes:
        args = fx.node.map_arg(node.args, env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        env[node] = node.target(*args, **kwargs)
    return env[nodes[-1]]  # type: ignore[return-value]


def input_built_masks(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node]]:
    """(attention call, its mask) for each attention whose mask is built from a graph input,
    the masks `key_mask` and `document_mask` look at (constant ones are `causal_mask`'s)."""
    from memcompile.analysis import attention

    found = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in attention.ATTENTION_OPS:
            continue
        mask = attention.mask(node)
        if isinstance(mask, fx.Node) and not all(n.op == "call_function"
                                                 for n in ancestors(mask)):
            found.append((node, mask))
    return found
