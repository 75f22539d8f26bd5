"""`sequence_parallel`: each causal attention of the captured graph attends across the ranks.

Under `options["sequence_parallel"]` every rank runs the same graph on its shard of the
sequence (`memcompile.distributed.shard_batch`). Token-local ops (embeddings, norms, linear
layers, rotary embeddings at the global positions the user passes, the loss over the shard's
targets) need nothing; attention is the one op that mixes tokens. This pass replaces each call
of `scaled_dot_product_attention` by `memcompile::sp_attention` (`distributed.ops`): causal
attention of this rank's queries over the keys/values of every rank, returned as this rank's
shard. The weights' gradients are summed over the ranks by `sequence_parallel_grads`, on the
joint graph.

Why here, on Dynamo's graph before AOTAutograd, and not on the joint graph:

- one rewrite serves every path a graph takes after capture: the joint graph and its
  partition, a graph without a backward (evaluation), the per-size recompiles of a byte
  budget, both runtimes;
- the replacement is a custom operator with its own autograd formula, so AOTAutograd puts its
  forward in the forward graph and `sp_attention_backward` in the backward graph, reading the
  saved output and log-sum-exp: the remat planner sees one op it may not recompute
  (`analysis.joint.recompute_ban`), so attention's forward and its transfers never run again
  in the backward, and the planner keeps its output and log-sum-exp saved;
- the call is found at the level the model wrote it (`F.scaled_dot_product_attention`),
  whichever kernel SDPA would pick, and the blocks run on the device's kernel
  (`runtime.attention_kernels`).

A mask on the call (transformers builds `causal & padding` over the shard) is handed to the op,
which checks at run time, on every rank together, that it is the causal rule and padding over
keys, and applies that padding over the global sequence (`distributed.masks`).

What it refuses, with an error rather than a note: under sequence parallelism an attention left
as it is computes each rank's queries over that rank's keys alone, which is wrong, not slow. So
dropout inside attention, non-causal attention without a mask, an attention op this pass does
not rewrite (an aten kernel already in the graph), and attention written as matmul, softmax,
matmul (transformers' `attn_implementation="eager"`; use "sdpa") raise `NotAvailableError`
naming the node. A graph with no attention (a tail after a graph break) is left unchanged with
a note. Ops that mix tokens other than attention (a mean over the sequence, a convolution along
it) are not detected: decoder language models have none.
"""

from __future__ import annotations

import logging
import numbers
import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx

from memcompile.analysis.attention import ATTENTION_OPS
from memcompile.errors import NotAvailableError
from memcompile.meta import record_note
from memcompile.passes.registry import register_pass

log = logging.getLogger(__name__)

PASS_NAME = "sequence_parallel"
_SDPA = torch._C._nn.scaled_dot_product_attention
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
              "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
                  "enable_gqa": False}
_SOFTMAX = {torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax}
_MATMUL = {torch.matmul, operator.matmul, torch.bmm, torch.baddbmm, torch.einsum,
           torch.Tensor.matmul, torch.Tensor.bmm}
_NEAR = 8
"""How many ops from a softmax a matmul may be for the chain to count as attention."""


@register_pass(PASS_NAME, default=True, graph="capture", option="sequence_parallel")
def sequence_parallel_pass(gm: fx.GraphModule, example_inputs: Sequence[Any], *,
                           options: Any = None) -> fx.GraphModule:
    """Replace each causal `scaled_dot_product_attention` by `memcompile::sp_attention` over
    the ranks of `options.sequence_parallel`'s group (no-op when it is off)."""
    sp = getattr(options, "sequence_parallel", False)
    if not sp:
        return gm
    from memcompile.distributed.ops import SP_ATTENTION, group_name  # registers the ops

    _refuse_eager_attention(gm)
    group = group_name(sp.group)
    world = dist.get_world_size(sp.group)
    replaced = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in ATTENTION_OPS:
            raise NotAvailableError(f"sequence_parallel: {node.name} calls {node.target}, an "
                                    "attention kernel this pass does not rewrite (it rewrites "
                                    "scaled_dot_product_attention calls)")
        if node.target is _SDPA:
            _replace(gm, node, SP_ATTENTION, (group, sp.layout, sp.timeout))
            replaced += 1
    if replaced:
        gm.recompile()
        record_note(gm, PASS_NAME, f"{replaced} attention call(s) attend across {world} ranks "
                    f"({sp.layout} shards, group {group!r}); every other op stays on its shard")
    else:
        record_note(gm, PASS_NAME, "no attention in this graph: its ops run on each rank's "
                    "shard unchanged")
    return gm


def _arguments(node: fx.Node) -> dict[str, Any]:
    """The SDPA call's arguments by name, defaults filled in."""
    named = dict(zip(_SDPA_ARGS, node.args))
    return {**_SDPA_DEFAULTS, **named, **node.kwargs}


def _why_not(node: fx.Node, args: dict[str, Any]) -> str | None:
    """Why the SDPA call `node` cannot become the distributed attention, or None."""
    dropout, causal, mask = args["dropout_p"], args["is_causal"], args["attn_mask"]
    if not isinstance(dropout, numbers.Number) or dropout != 0:
        return f"dropout_p={dropout!r} (dropout inside attention is not built; set the " \
               "model's attention dropout to 0)"
    if not isinstance(causal, bool):
        return f"is_causal={causal!r} is not a constant"
    if not causal and mask is None:
        return "is_causal=False without a mask: every query sees every key (not causal)"
    if causal and mask is not None:
        return "is_causal=True with a mask"
    scale = args["scale"]
    if scale is not None and not isinstance(scale, numbers.Number):
        return f"scale={scale!r} is not a constant"
    return None


def _replace(gm: fx.GraphModule, node: fx.Node, op: Any, where: tuple[str, str, float]) -> None:
    """Put `op(q, k, v, mask, scale, *where)[0]` in place of the SDPA call `node`."""
    args = _arguments(node)
    why = _why_not(node, args)
    if why is not None:
        raise NotAvailableError(f"sequence_parallel: attention {node.name} cannot attend "
                                f"across ranks: {why}; left as it is, each rank would attend "
                                "to its own shard only")
    scale = None if args["scale"] is None else float(args["scale"])
    call_args = (args["query"], args["key"], args["value"], args["attn_mask"], scale, *where)
    with gm.graph.inserting_before(node):
        call = gm.graph.call_function(op, call_args)
        out = gm.graph.call_function(operator.getitem, (call, 0))
    _fake_values(call, out, op, call_args)
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
    log.debug("%s: %s -> %s", PASS_NAME, node.name, call.name)


def _fake_values(call: fx.Node, out: fx.Node, op: Any, call_args: tuple) -> None:
    """Dynamo's `example_value` for the new nodes, from the inputs' (when they have them)."""
    values = fx.node.map_arg(call_args, lambda n: n.meta.get("example_value"))
    query = values[0]
    mode = getattr(query, "fake_mode", None)
    if mode is None or any(isinstance(a, fx.Node) and v is None
                           for a, v in zip(call_args, values)):
        return
    with mode:
        result = op(*values)
    call.meta["example_value"], out.meta["example_value"] = result, result[0]


def _refuse_eager_attention(gm: fx.GraphModule) -> None:
    """Raise when a softmax sits between two matmuls: attention written out in ops, which
    this pass cannot make distributed."""
    for node in gm.graph.nodes:
        if not _is_softmax(node):
            continue
        before = _near(node, lambda n: n.all_input_nodes)
        after = _near(node, lambda n: list(n.users))
        if any(map(_is_matmul, before)) and any(map(_is_matmul, after)):
            raise NotAvailableError(
                f"sequence_parallel: {node.name} is a softmax between matmuls, attention "
                "written out in ops (transformers' attn_implementation='eager'); only "
                "scaled_dot_product_attention is made distributed: load the model with "
                "attn_implementation='sdpa'")


def _near(node: fx.Node, step: Any) -> set[fx.Node]:
    """Nodes at most `_NEAR` steps from `node` along `step`."""
    seen, frontier = set(), [node]
    for _ in range(_NEAR):
        frontier = [n for f in frontier for n in step(f) if n not in seen]
        seen.update(frontier)
    return seen


def _is_softmax(node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in _SOFTMAX)
            or (node.op == "call_method" and node.target == "softmax"))


def _is_matmul(node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in _MATMUL)
            or (node.op == "call_method" and node.target in ("matmul", "bmm", "baddbmm")))
