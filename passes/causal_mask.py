"""Replace an attention mask that is a constant causal mask with the causal kernel.

transformers builds its causal mask as a `(batch, 1, T, T)` tensor under `torch.compile`, even
when no padding mask is given. Such a mask is quadratic in the length and, once it exists,
every chunk of a streamed layer must slice it. When the mask depends on no graph input (it is
built from `arange`s and constants alone), it is the same at every call: this pass computes it
once, at compile time, and where it equals the lower-triangular mask it drops it and sets the
kernel's `is_causal` (square, so top-left and lower-right alignment agree). A mask that depends
on an input (a padding mask) or is too large to check is left as it is, with a note.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx

from memcompile.analysis import attention
from memcompile.analysis.attention import ATTENTION_OPS
from memcompile.meta import record_note

log = logging.getLogger(__name__)

CAUSAL_MASK_PASS = "causal_mask"
CHECK_LIMIT = 2**28
"""Largest mask (elements) this pass evaluates to check it: 256 MiB of booleans."""


def _ancestors(node: fx.Node) -> list[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        stack.extend(current.all_input_nodes)
    return [n for n in node.graph.nodes if n in seen]


def _evaluate(nodes: list[fx.Node]) -> torch.Tensor:
    env: dict[fx.Node, object] = {}
    for node in nodes:
        args = fx.node.map_arg(node.args, env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        env[node] = node.target(*args, **kwargs)
    return env[nodes[-1]]  # type: ignore[return-value]


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


def replace_causal_masks(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop constant causal masks feeding attention and set `is_causal` instead."""
    replaced = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in ATTENTION_OPS:
            continue
        mask = attention.mask(node)
        if not isinstance(mask, fx.Node):
            continue
        nodes = _ancestors(mask)
        if any(n.op != "call_function" for n in nodes):
            record_note(gm, CAUSAL_MASK_PASS, f"{mask.name} depends on the inputs (a padding "
                        "mask): kept")
            continue
        val = mask.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.numel() > CHECK_LIMIT:
            record_note(gm, CAUSAL_MASK_PASS, f"{mask.name} is too large to check at compile "
                        f"time ({CHECK_LIMIT:,} elements at most): kept")
            continue
        with torch.no_grad():
            if not is_causal_mask(_evaluate(nodes)):
                record_note(gm, CAUSAL_MASK_PASS, f"{mask.name} is not a causal mask: kept")
                continue
        node.args, node.kwargs = attention.with_causal(node.args, node.kwargs, node.target, True)
        replaced += 1
        record_note(gm, CAUSAL_MASK_PASS, f"{node.name}: its mask {mask.name} "
                    f"{tuple(val.shape)} equals the causal mask; replaced by the causal kernel")
    if replaced:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return gm
