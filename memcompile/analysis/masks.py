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


def is_causal_mask(mask: torch.Tensor) -> bool:
    """Whether `(..., T, T)` `mask` lets each query see exactly the keys up to its own position
    (boolean: True = visible; additive: 0 visible, -inf hidden), the same for every batch and
    head."""
    if mask.dim() < 2 or mask.shape[-1] != mask.shape[-2]:
        return False
    length = mask.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    if mask.dtype == torch.bool:
        return bool((mask == causal).all())
    return bool(((mask == 0) == causal).all() and (mask[..., ~causal] == float("-inf")).all())


def split_key_mask(mask: fx.Node) -> KeyMaskSplit | str:
    """The key terms of `mask` if it is the causal rule and terms over keys alone, else why not."""
    if mask.target is not aten.where.self:
        return "not an additive mask made by where(mask, 0, -inf)"
    condition, zero, hidden = mask.args
    if not (_constant(zero) == 0.0 and _constant(hidden) == -math.inf):
        return "not an additive mask made by where(mask, 0, -inf)"
    while isinstance(condition, fx.Node) and condition.target in _EXPANDS:
        condition = condition.args[0]
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
