"""Where each fused attention kernel keeps its arguments.

The captured graph holds whichever kernel SDPA chose for the device and dtype: the CPU flash
kernel, CUDA's flash kernel, its memory-efficient kernel or cuDNN's. Their signatures differ:
dropout and `is_causal` sit at different positions, and a mask is a keyword on one and a
positional bias on others. Every pass reads them through this module, whose table is built from
the kernels' own schemas, so none assumes the CPU kernel's layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from memcompile.analysis.eager_attention import EAGER_ATTENTION
from memcompile.distributed.ops import SP_ATTENTION

aten = torch.ops.aten


@dataclass(frozen=True)
class AttentionLayout:
    """Positions of an attention kernel's arguments (query, key, value are always 0, 1, 2).

    `mask` is a position or a keyword-only name (None: the kernel takes no mask); `outputs` is
    how many values the kernel returns (output first, log-sum-exp second). `dropout` and
    `causal` are None for an op that takes neither: it never drops and is always causal (the
    sequence-parallel attention).
    """

    dropout: int | None
    causal: int | None
    mask: int | str | None
    outputs: int

    @classmethod
    def of(cls, op: torch._ops.OpOverload) -> AttentionLayout:
        """The layout read off `op`'s schema."""
        arguments = op._schema.arguments
        index = {a.name: i for i, a in enumerate(arguments)}
        mask = next((a for a in arguments if a.name in ("attn_mask", "attn_bias")), None)
        if mask is None:
            where = None
        else:
            where = mask.name if mask.kwarg_only else index[mask.name]
        return cls(index["dropout_p"], index["is_causal"], where, len(op._schema.returns))


ATTENTION_OPS = (
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
    EAGER_ATTENTION,
)
"""Attention kernels: queries, keys and values are `(B, H, T, D)`; the output's rows are queries.
The last is memcompile's own (`analysis.eager_attention`): the matmul, softmax, matmul chain of
transformers' eager path, put in the graph by the `eager_attention` pass; it returns the output
alone (`AttentionLayout.outputs` 1), no log-sum-exp."""

SEQUENCE_ATTENTION_OPS = (*ATTENTION_OPS, SP_ATTENTION)
"""Attention over the sequence as StreamBP's plan and runtime see it: the kernels, and the
sequence-parallel attention (`memcompile::sp_attention`, always causal, no dropout), whose chunks
the stream runtime runs over the keys of every rank (`runtime.stream_shard`). It stays out of
`ATTENTION_OPS`: the mask passes and the cost model must not take it for a kernel (its mask is
the model's over the shard, which the op reads itself)."""

LAYOUTS: dict[Any, AttentionLayout] = {op: AttentionLayout.of(op) for op in ATTENTION_OPS}
LAYOUTS[SP_ATTENTION] = AttentionLayout(dropout=None, causal=None, mask=3, outputs=3)


def _argument(target: Any, args: Sequence[Any], kwargs: dict[str, Any], position: int | str,
              default: Any = None) -> Any:
    if isinstance(position, str):
        return kwargs.get(position, default)
    if len(args) > position:
        return args[position]
    return kwargs.get(target._schema.arguments[position].name, default)


def is_causal(node: fx.Node) -> bool:
    """Whether the attention call `node` applies the causal rule itself."""
    if LAYOUTS[node.target].causal is None:
        return True
    return bool(_argument(node.target, node.args, node.kwargs, LAYOUTS[node.target].causal,
                          False))


def dropout(node: fx.Node) -> float:
    """The attention call's dropout probability (0.0 when none)."""
    if LAYOUTS[node.target].dropout is None:
        return 0.0
    return _argument(node.target, node.args, node.kwargs, LAYOUTS[node.target].dropout,
                     0.0) or 0.0


def mask(node: fx.Node) -> Any:
    """The attention call's mask or bias argument (a node), or None."""
    return call_mask(node.target, node.args, node.kwargs)


def call_mask(target: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """The mask or bias among the arguments of a call of the attention kernel `target`, or
    None (for a call about to run, with its arguments already loaded)."""
    position = LAYOUTS[target].mask
    return None if position is None else _argument(target, args, kwargs, position)


def with_causal(args: tuple, kwargs: dict, target: Any, causal: bool) -> tuple[tuple, dict]:
    """`args`, `kwargs` of a call of `target` with `is_causal` set to `causal` and no mask."""
    layout = LAYOUTS[target]
    schema = target._schema.arguments
    args, kwargs = list(args), dict(kwargs)
    # is_causal is positional: the arguments before it become positional too, taken from the
    # keywords when the call named them, else their defaults.
    while len(args) <= layout.causal:
        argument = schema[len(args)]
        args.append(kwargs.pop(argument.name, argument.default_value))
    args[layout.causal] = causal
    if isinstance(layout.mask, int):
        args[layout.mask] = None
    kwargs.pop(schema[layout.causal].name, None)
    if isinstance(layout.mask, str):
        kwargs.pop(layout.mask, None)
    return tuple(args), kwargs


def gathered_copies(node: fx.Node) -> int:
    """How many shards' keys and values a streamed chunk of the attention call `node` reads:
    the group's size for the sequence-parallel attention (each layer pass gathers every rank's
    keys and values, `runtime.stream_shard`), else 1."""
    if node.target is not SP_ATTENTION:
        return 1
    from memcompile.distributed.ops import group_size

    return group_size(node.args[5])
