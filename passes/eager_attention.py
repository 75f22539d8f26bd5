"""`eager_attention`: recognize attention written as matmul, softmax, matmul, and make it one op.

transformers' eager attention (Gemma2 uses it for its logit softcapping, any model loaded with
`attn_implementation="eager"` does, Bloom writes its own with ALiBi) reaches the aten graph as

    bmm(q, kᵀ)            keys repeated for grouped heads (expand, clone, view), transposed
    * scale               (Bloom: baddbmm(alibi, q, kᵀ, alpha=scale) instead)
    tanh(· / c) * c       optional softcapping
    + mask                optional additive mask (transformers' eager mask: 0 or finfo.min)
    softmax(-1)           often cast to float32 before and back after
    bmm(p, v)             values repeated as keys are

with views between them (4-d `(B, H, T, ·)` for the elementwise ops, 3-d `(B*H, T, ·)` for the
matmuls). The sequence analysis sees two matmuls mixing tokens, not attention, so no layer is
found. This pass replaces each such chain by `memcompile::eager_attention`
(`analysis.eager_attention`), which computes the same values with the same ops and dtypes and is
one of `ATTENTION_OPS`: the `causal_mask` pass then drops a constant causal mask, and the stream
runtime runs it a chunk of queries at a time.

A chain that differs (dropout with p > 0 between the softmax and the matmul, an op the list
above does not name, a mask computed from the weights, intermediate values read elsewhere) is
left as it is, with a note naming what differs. A softmax with no matmul before and after it is
not attention and is passed over silently.

It runs first in the stream pipeline (rank 5), on the forward graph StreamBP plans.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from memcompile.analysis.eager_attention import EAGER_ATTENTION
from memcompile.analysis.masks import ancestors
from memcompile.meta import record_note
from memcompile.passes.registry import register_pass

aten = torch.ops.aten

PASS_NAME = "eager_attention"
_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
_COPIES = (aten.clone.default, aten.contiguous.default, aten.alias.default)
_MATMULS = (aten.bmm.default, aten.baddbmm.default)
_NEAR = 12
"""How many ops away from a softmax a matmul may be for the softmax to count as attention's."""


class _Mismatch(Exception):
    """The chain around a softmax differs from the eager pattern; the message says how."""


@dataclass
class _Found:
    """An eager attention chain, read off the graph: what the op needs, and the node whose
    uses it takes over (`output`, `(B, H, Tq, Dv)`, or the second matmul's `(B*H, Tq, Dv)`)."""

    output: fx.Node
    batch: int
    heads: int
    query: fx.Node
    key: fx.Node
    value: fx.Node
    mask: fx.Node | None
    bias: fx.Node | None
    scale: float
    softcap: float | None
    softmax_dtype: torch.dtype


@register_pass(PASS_NAME, default=True, rank=5, graph="stream")
def eager_attention_pass(gm: fx.GraphModule, example_inputs: Sequence[Any], *,
                         options: Any = None) -> fx.GraphModule:
    """Replace each matmul, softmax, matmul chain of transformers' eager attention by one
    `memcompile::eager_attention` call."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    weights = {p for p, x in zip(placeholders, example_inputs) if isinstance(x, torch.Tensor)
               and (x.requires_grad or isinstance(x, torch.nn.Parameter))}
    replaced = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten._softmax.default:
            continue
        if not _between_matmuls(node):
            continue  # a softmax that is not attention's (a router's, say)
        try:
            found = _match(node, weights)
            built = _replace(gm, found)
        except _Mismatch as why:
            record_note(gm, PASS_NAME, f"{node.name}: matmul, softmax, matmul left as it is: "
                        f"{why}")
            continue
        except (TypeError, ValueError, AttributeError, IndexError, RuntimeError) as error:
            # A chain this reader does not foresee: never a failed compile.
            record_note(gm, PASS_NAME, f"{node.name}: matmul, softmax, matmul left as it is: "
                        f"it could not be read ({type(error).__name__}: {error})")
            continue
        replaced += 1
        record_note(gm, PASS_NAME, f"{found.output.name}: matmul, softmax, matmul "
                    f"({_describe(found)}) replaced by {built.name} "
                    "(memcompile::eager_attention)")
    if replaced:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return gm


def _describe(found: _Found) -> str:
    key = _shape(found.key)
    kv_heads = key[1] if len(key) == 4 else found.heads  # 3-d: viewed as `heads` heads
    parts = [f"{found.heads} query heads over {kv_heads} key heads", f"scale {found.scale:g}"]
    if found.softcap is not None:
        parts.append(f"softcap {found.softcap:g}")
    if found.bias is not None:
        parts.append(f"bias {found.bias.name}")
    if found.mask is not None:
        parts.append(f"mask {found.mask.name}")
    parts.append(f"softmax in {str(found.softmax_dtype).removeprefix('torch.')}")
    return ", ".join(parts)


def _between_matmuls(softmax: fx.Node) -> bool:
    """Whether a batched matmul lies a few ops before the softmax and another a few after."""
    return (_reaches(softmax, lambda n: n.all_input_nodes)
            and _reaches(softmax, lambda n: list(n.users)))


def _reaches(start: fx.Node, step: Any) -> bool:
    frontier, seen = [start], {start}
    for _ in range(_NEAR):
        frontier = [m for n in frontier for m in step(n) if m not in seen]
        seen.update(frontier)
        if any(m.target in _MATMULS for m in frontier):
            return True
    return False


# --- reading the chain ---------------------------------------------------------------------

def _val(node: Any) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(int(s) for s in _val(node).shape)


def _live_users(node: fx.Node) -> list[fx.Node]:
    """Users that matter: not a functional op whose result nobody reads (the trace's
    `detach` of a saved value)."""
    return [u for u in node.users if u.users or u.op != "call_function" or not isinstance(
        u.target, torch._ops.OpOverload) or u.target._schema.is_mutable]


def _only_user(node: fx.Node) -> fx.Node:
    users = _live_users(node)
    if len(users) != 1:
        names = ", ".join(u.name for u in users) or "nothing"
        raise _Mismatch(f"{node.name} is read by {names}, not by the next op of the chain alone "
                        "(attention weights returned?)")
    return users[0]


def _is_cast(node: fx.Node) -> bool:
    """`_to_copy` changing the dtype alone."""
    if node.target is not aten._to_copy.default or "dtype" not in node.kwargs:
        return False
    source = _val(node.args[0])
    extra = {k: v for k, v in node.kwargs.items() if k != "dtype"}
    return (extra.get("layout", torch.strided) == torch.strided
            and extra.get("device", source.device) == source.device
            and extra.get("memory_format", torch.preserve_format) == torch.preserve_format
            and set(extra) <= {"layout", "device", "memory_format"})


def _same_values(node: fx.Node) -> bool:
    """An op whose output holds its input's values in the same shape: a copy, or an expand to
    the input's own shape."""
    if node.target in _COPIES:
        return not any(k != "memory_format" for k in node.kwargs)
    return node.target is aten.expand.default and _shape(node) == _shape(node.args[0])


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) \
        else None


def _scalar_step(node: fx.Node, target: Any) -> tuple[fx.Node, float] | None:
    """`(x, c)` for `target(x, c)` (or `target(c, x)` for mul) with a Python number `c`."""
    if node.target is not target or node.kwargs:
        return None
    a, b = node.args
    if isinstance(a, fx.Node) and _number(b) is not None:
        return a, _number(b)
    if target is aten.mul.Tensor and isinstance(b, fx.Node) and _number(a) is not None:
        return b, _number(a)
    return None


def _match(softmax: fx.Node, weights: set[fx.Node]) -> _Found:
    rank = len(_shape(softmax))
    if softmax.args[1] % rank != rank - 1 or softmax.args[2]:
        raise _Mismatch("the softmax is not over the last dimension")
    if rank != 4:
        raise _Mismatch(f"the softmax is over a {rank}-d value, not (batch, heads, queries, "
                        "keys)")
    batch, heads, queries, keys = _shape(softmax)
    softmax_dtype = _val(softmax.args[0]).dtype

    # Backward from the softmax: cast, mask, softcap, scale, views, the first matmul. Each
    # value on the way (`chain`) must be read by the next op alone.
    chain: list[fx.Node] = []
    x = softmax.args[0]
    if _is_cast(x):
        chain.append(x)
        x = x.args[0]
    mask = None
    if x.target is aten.add.Tensor:
        chain.append(x)
        x, mask = _split_mask(x, weights)
    softcap = None
    step = _scalar_step(x, aten.mul.Tensor)
    if step is not None and step[0].target is aten.tanh.default:
        tanh = step[0]
        inner = _scalar_step(tanh.args[0], aten.div.Tensor)
        if inner is None or inner[1] != step[1]:
            raise _Mismatch(f"{tanh.name} is a tanh but not of the scores divided by "
                            f"{step[1]:g} (softcapping)")
        chain += [x, tanh, tanh.args[0]]
        x, softcap = inner[0], step[1]
        step = _scalar_step(x, aten.mul.Tensor)
    scale = None
    if step is not None:
        chain.append(x)
        x, scale = step
    x = _through_layout(x, (batch * heads, queries, keys), chain)
    if x.target not in _MATMULS:
        raise _Mismatch(f"{x.name} ({x.target}) lies between the first matmul and the softmax")
    chain.append(x)
    _single(chain)
    bias = None
    if x.target is aten.baddbmm.default:
        bias3, q3, k3 = x.args[:3]
        beta, alpha = x.kwargs.get("beta", 1), x.kwargs.get("alpha", 1)
        if set(x.kwargs) - {"beta", "alpha"} or beta != 1:
            raise _Mismatch(f"{x.name}: baddbmm with beta {beta} (only 1: the bias added as is)")
        if scale is not None:
            raise _Mismatch(f"{x.name}: a multiplication after baddbmm scales its bias too")
        scale = float(alpha)
        bias = _bias(bias3, batch, heads, queries, keys, weights, x)
    elif x.kwargs:
        raise _Mismatch(f"{x.name}: a matmul with keyword arguments {x.kwargs}")
    else:
        q3, k3 = x.args

    # Forward from the softmax: cast, views, the second matmul.
    y = softmax
    user = _next(y)
    if _is_cast(user):
        y, user = user, _next(user)
    while user.target in _VIEWS or _same_values(user):
        y, user = user, _next(user)
    if user.target is not aten.bmm.default or user.args[0] is not y:
        raise _Mismatch(f"{user.name} ({user.target}) lies between the softmax and the second "
                        "matmul")
    second = user
    if _shape(y) != (batch * heads, queries, keys):
        raise _Mismatch(f"{y.name} {_shape(y)} is not the probabilities as (batch * heads, "
                        "queries, keys)")
    output = second
    after = _live_users(second)
    dv = _shape(second)[-1]
    if (len(after) == 1 and after[0].target in _VIEWS
            and _shape(after[0]) == (batch, heads, queries, dv)):
        output = after[0]

    query = _heads(q3, batch, heads, "queries")
    key = _heads(_untransposed(k3, batch, heads), batch, heads, "keys")
    value = _heads(second.args[1], batch, heads, "values")
    key, value = _unrepeated(key, batch, heads), _unrepeated(value, batch, heads)
    _check_shapes(query, key, value, batch, heads, queries, keys)
    return _Found(output, batch, heads, query, key, value, mask, bias,
                  1.0 if scale is None else scale, softcap, softmax_dtype)


def _single(nodes: list[fx.Node]) -> None:
    for node in nodes:
        _only_user(node)


def _through_layout(node: fx.Node, shape3: tuple[int, ...], chain: list[fx.Node]) -> fx.Node:
    """Back through copies and the view from `shape3` (the matmul's 3-d form), each added to
    `chain`."""
    while _same_values(node) or (node.target in _VIEWS and _shape(node.args[0]) == shape3):
        chain.append(node)
        node = node.args[0]
    return node


def _split_mask(add: fx.Node, weights: set[fx.Node]) -> tuple[fx.Node, fx.Node]:
    """(scores, mask) of `scores + mask`: the scores are the operand a matmul reaches."""
    operands = [a for a in add.args if isinstance(a, fx.Node)]
    if len(operands) != 2:
        raise _Mismatch(f"{add.name} adds a constant to the scores, not a mask")
    sides = [any(n.target in _MATMULS for n in ancestors(a)) for a in operands]
    if sides.count(True) != 1:
        raise _Mismatch(f"{add.name} adds two values computed by matmuls (not a mask)")
    scores, mask = operands if sides[0] else operands[::-1]
    val = _val(mask)
    if val is None or not val.is_floating_point():
        raise _Mismatch(f"{mask.name} is not an additive floating-point mask")
    if val.dim() > 4 or torch.broadcast_shapes(val.shape, _val(add).shape) != _val(add).shape:
        raise _Mismatch(f"{mask.name} {tuple(val.shape)} does not broadcast to the scores")
    if any(n in weights for n in ancestors(mask)):
        raise _Mismatch(f"{mask.name} is computed from the model's weights (a learned bias, "
                        "not a mask)")
    return scores, mask


def _bias(bias3: Any, batch: int, heads: int, queries: int, keys: int, weights: set[fx.Node],
          matmul: fx.Node) -> fx.Node:
    """baddbmm's added term `(B*H, 1|Tq, Tk)` (ALiBi), which must come from no weight."""
    val = _val(bias3)
    if val is None or val.dim() != 3 or val.shape[0] != batch * heads or (
            val.shape[1] not in (1, queries)) or val.shape[2] != keys:
        raise _Mismatch(f"{matmul.name}: baddbmm's added term is not (batch * heads, 1 or "
                        "queries, keys)")
    if any(n in weights for n in ancestors(bias3)):
        raise _Mismatch(f"{matmul.name}: baddbmm's added term is computed from the weights")
    return bias3


def _next(node: fx.Node) -> fx.Node:
    """The one op reading a value after the softmax, which must not be dropout."""
    for user in _live_users(node):
        _not_dropout(user, node)
    return _only_user(node)


def _not_dropout(node: fx.Node, probabilities: fx.Node) -> None:
    """Raise if `node`, the op after the probabilities, is dropout: random itself, or reading
    a random value made a few ops before it (`mul(p, bernoulli(...) / (1 - p))`)."""
    frontier, seen = [node], {node, probabilities}
    for _ in range(4):
        for n in frontier:
            if isinstance(n.target, torch._ops.OpOverload) and (
                    torch.Tag.nondeterministic_seeded in n.target.tags):
                raise _Mismatch(f"dropout with p > 0 ({node.name} applies {n.name}, "
                                f"{n.target}): a re-run would draw another mask")
        frontier = [m for n in frontier for m in n.all_input_nodes if m not in seen]
        seen.update(frontier)


def _untransposed(node: fx.Node, batch: int, heads: int) -> fx.Node:
    """The keys `(B, H, Tk, D)` (or `(B*H, Tk, D)`) whose transpose the first matmul reads."""
    node = _through_heads_view(node, batch, heads)
    rank = len(_shape(node))
    if node.target is aten.transpose.int and {d % rank for d in node.args[1:3]} == {
            rank - 2, rank - 1}:
        return node.args[0]
    if node.target is aten.permute.default and [d % rank for d in node.args[1]] == [
            *range(rank - 2), rank - 1, rank - 2]:
        return node.args[0]
    raise _Mismatch(f"{node.name} ({node.target}) is not the keys transposed")


def _through_heads_view(node: fx.Node, batch: int, heads: int) -> fx.Node:
    """Back from a matmul operand `(B*H, X, Y)` through copies and the view from
    `(B, H, X, Y)`, to the 4-d value if there is one. (The operands' ops may have other
    readers: the values they hold are what counts.)"""
    while _same_values(node):
        node = node.args[0]
    shape = _shape(node)
    if node.target in _VIEWS and len(shape) == 3 and _shape(node.args[0]) == (
            batch, heads, *shape[1:]):
        node = node.args[0]
        while _same_values(node):
            node = node.args[0]
    return node


def _heads(node: fx.Node, batch: int, heads: int, what: str) -> fx.Node:
    """`node` as `(B, H, T, D)`: itself, or the 4-d value a view to the matmul's form read, or
    `node` if 3-d `(B*H, T, D)` (the pass views it as 4-d)."""
    node = _through_heads_view(node, batch, heads)
    shape = _shape(node)
    if len(shape) == 4 and shape[:2] == (batch, heads) or (
            len(shape) == 3 and shape[0] == batch * heads):
        return node
    raise _Mismatch(f"the {what} {node.name} {shape} are not (batch, heads, length, dim)")


def _unrepeated(node: fx.Node, batch: int, heads: int) -> fx.Node:
    """The keys or values before `repeat_kv` (`(B, Hkv, T, D)` expanded to `H / Hkv` copies
    of each head), or `node` if they were not repeated."""
    if node.target not in _VIEWS or len(_shape(node)) != 4:
        return node
    source = node.args[0]
    while _same_values(source):
        source = source.args[0]
    if source.target is not aten.expand.default or len(_shape(source)) != 5:
        return node
    unsqueezed = source.args[0]
    if unsqueezed.target is not aten.unsqueeze.default or unsqueezed.args[1] % 5 != 2:
        return node
    kv = unsqueezed.args[0]
    b, kv_heads, length, dim = _shape(kv)
    if _shape(source) != (b, kv_heads, heads // kv_heads, length, dim) or (
            _shape(node) != (batch, heads, length, dim)):
        return node
    return kv


def _check_shapes(query: fx.Node, key: fx.Node, value: fx.Node, batch: int, heads: int,
                  queries: int, keys: int) -> None:
    # A 3-d value is viewed as (B, H, T, D) by the pass.
    q, k, v = (_shape(n) if len(_shape(n)) == 4 else (batch, heads, *_shape(n)[1:])
               for n in (query, key, value))
    if q[:2] != (batch, heads) or k[0] != batch or v[0] != batch:
        raise _Mismatch(f"queries {q}, keys {k} and values {v} are not of {batch} samples and "
                        f"{heads} heads")
    if k[1] != v[1] or heads % k[1]:
        raise _Mismatch(f"{heads} query heads over {k[1]} key and {v[1]} value heads")
    if q[2] != queries or k[2] != keys or v[2] != keys:
        raise _Mismatch(f"queries {q}, keys {k} and values {v} do not match the scores")
    if queries != keys:
        raise _Mismatch(f"{queries} queries over {keys} keys (a cache before them?)")


# --- rewriting ------------------------------------------------------------------------------

def _replace(gm: fx.GraphModule, found: _Found) -> fx.Node:
    """Insert the `memcompile::eager_attention` call before `found.output` and hand it the
    output's uses."""
    graph = gm.graph
    mode = _val(found.query).fake_mode
    batch, heads = found.batch, found.heads
    inserted: list[fx.Node] = []

    def call(target: Any, args: tuple, kwargs: dict | None = None) -> fx.Node:
        node = graph.call_function(target, args, kwargs or {})
        inserted.append(node)
        fakes = fx.node.map_arg((args, kwargs or {}), lambda n: n.meta["val"])
        with mode:
            node.meta["val"] = target(*fakes[0], **fakes[1])
        return node

    def four_d(node: fx.Node | None) -> fx.Node | None:
        if node is None or len(_shape(node)) == 4:
            return node
        rows = _shape(node)
        return call(aten.reshape.default, (node, [batch, heads, *rows[1:]]))

    try:
        with graph.inserting_before(found.output):
            query, key, value, bias = (four_d(n) for n in (found.query, found.key, found.value,
                                                           found.bias))
            kwargs: dict[str, Any] = {"scale": found.scale, "softcap": found.softcap,
                                      "softmax_dtype": found.softmax_dtype}
            if bias is not None:
                kwargs["bias"] = bias
            built = call(EAGER_ATTENTION, (query, key, value, found.mask, 0.0, False), kwargs)
            result = built
            if len(_shape(found.output)) == 3:
                result = call(aten.reshape.default, (built, list(_shape(found.output))))
        if (_val(result).dtype != _val(found.output).dtype
                or _shape(result) != _shape(found.output)):
            raise _Mismatch(f"the op would give {_shape(result)} {_val(result).dtype} for "
                            f"{found.output.name} {_shape(found.output)} "
                            f"{_val(found.output).dtype}")
    except Exception:
        for node in reversed(inserted):  # nothing reads them yet
            graph.erase_node(node)
        raise
    found.output.replace_all_uses_with(result)
    return built
