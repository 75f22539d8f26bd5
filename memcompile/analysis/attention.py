"""Where each fused attention kernel keeps its arguments.

The captured graph holds whichever kernel SDPA chose for the device and dtype: the CPU flash
kernel, CUDA's flash kernel (half precision), its memory-efficient kernel (float32, equal head
counts) or cuDNN's. Their signatures differ: dropout and `is_causal` sit at different
positions, and a mask is a keyword on one and a positional bias on others. Reading them through
one table keeps every pass from assuming the CPU kernel's layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

aten = torch.ops.aten


@dataclass(frozen=True)
class AttentionLayout:
    """Positions of an attention kernel's arguments (query, key, value are always 0, 1, 2).

    `mask` is a position or a keyword name (None: the kernel takes no mask); `outputs` is how
    many values the kernel returns (output first, log-sum-exp second).
    """

    dropout: int
    causal: int
    mask: int | str | None
    outputs: int


LAYOUTS: dict[Any, AttentionLayout] = {
    aten._scaled_dot_product_flash_attention_for_cpu.default: AttentionLayout(3, 4, "attn_mask", 2),
    aten._scaled_dot_product_flash_attention.default: AttentionLayout(3, 4, None, 9),
    aten._scaled_dot_product_efficient_attention.default: AttentionLayout(5, 6, 3, 4),
    aten._scaled_dot_product_cudnn_attention.default: AttentionLayout(5, 6, 3, 9),
}

ATTENTION_OPS = tuple(LAYOUTS)
"""Attention kernels: queries, keys and values are `(B, H, T, D)`; the output's rows are queries."""


def _argument(node: fx.Node, position: int | str, default: Any = None) -> Any:
    if isinstance(position, str):
        return node.kwargs.get(position, default)
    if len(node.args) > position:
        return node.args[position]
    name = node.target._schema.arguments[position].name  # type: ignore[union-attr]
    return node.kwargs.get(name, default)


def is_causal(node: fx.Node) -> bool:
    """Whether the attention call `node` applies the causal rule itself."""
    return bool(_argument(node, LAYOUTS[node.target].causal, False))


def dropout(node: fx.Node) -> float:
    """The attention call's dropout probability (0.0 when none)."""
    return _argument(node, LAYOUTS[node.target].dropout, 0.0) or 0.0


def mask(node: fx.Node) -> Any:
    """The attention call's mask or bias argument (a node), or None."""
    position = LAYOUTS[node.target].mask
    return None if position is None else _argument(node, position)


def with_causal(args: tuple, kwargs: dict, target: Any, causal: bool) -> tuple[tuple, dict]:
    """`args`, `kwargs` of a call of `target` with `is_causal` set to `causal` and no mask."""
    layout = LAYOUTS[target]
    schema = target._schema.arguments
    args = list(args)
    while len(args) <= layout.causal:  # fill the defaults up to is_causal
        args.append(schema[len(args)].default_value)
    args[layout.causal] = causal
    if isinstance(layout.mask, int):
        args[layout.mask] = None
    kwargs = {k: v for k, v in kwargs.items() if k != layout.mask}
    return tuple(args), kwargs
