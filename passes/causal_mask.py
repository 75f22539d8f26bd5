"""`causal_mask`: replace an attention mask that is a constant causal mask with the causal kernel.

transformers builds its causal mask as a `(batch, 1, T, T)` tensor under `torch.compile`, even
when no padding mask is given. Such a mask is quadratic in the length and, once it exists,
every chunk of a streamed layer must slice it. When the mask depends on no graph input (it is
built from `arange`s and constants alone), it is the same at every call: this pass computes it
once, at compile time, and where it equals the lower-triangular mask it drops it and sets the
kernel's `is_causal` (square, so top-left and lower-right alignment agree). A mask that depends
on an input (a padding mask) is the `key_mask` pass's. One that is not causal or is too large to
check is left as it is, with a note. On `memcompile::eager_attention` (the `eager_attention`
pass's), a mask hiding keys with the dtype's lowest value, as transformers' eager path builds
it, counts as causal too.

It runs in the stream pipeline, on the forward graph StreamBP plans.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from memcompile.analysis import attention
from memcompile.analysis.attention import ATTENTION_OPS
from memcompile.analysis.eager_attention import EAGER_ATTENTION
from memcompile.analysis.masks import ancestors, evaluate, is_causal_mask
from memcompile.meta import record_note
from memcompile.passes.registry import register_pass

PASS_NAME = "causal_mask"
CHECK_LIMIT = 2**28
"""Largest mask (elements) this pass evaluates to check it: 256 MiB of booleans."""


@register_pass(PASS_NAME, default=True, rank=10, graph="stream")
def causal_mask_pass(gm: fx.GraphModule, example_inputs: Sequence[Any], *,
                     options: Any = None) -> fx.GraphModule:
    """Drop constant causal masks feeding attention and set `is_causal` instead."""
    replaced = 0
    for node in list(gm.graph.nodes):
        mask = _constant_mask(node)
        if mask is None:
            continue
        val = mask.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.numel() > CHECK_LIMIT:
            record_note(gm, PASS_NAME, f"{mask.name} is too large to check at compile "
                        f"time ({CHECK_LIMIT:,} elements at most): kept")
            continue
        with torch.no_grad():
            # The eager path's mask hides keys with the dtype's lowest value (see
            # `is_causal_mask`); memcompile::eager_attention's causal rule hides them with -inf.
            min_hides = node.target is EAGER_ATTENTION
            if not is_causal_mask(evaluate(ancestors(mask)), min_hides=min_hides):
                record_note(gm, PASS_NAME, f"{mask.name} is not a causal mask: kept")
                continue
        node.args, node.kwargs = attention.with_causal(node.args, node.kwargs, node.target, True)
        replaced += 1
        record_note(gm, PASS_NAME, f"{node.name}: its mask {mask.name} "
                    f"{tuple(val.shape)} equals the causal mask; replaced by the causal kernel")
    if replaced:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return gm


def _constant_mask(node: fx.Node) -> fx.Node | None:
    """The mask of an attention call when it is computed from no graph input."""
    if node.op != "call_function" or node.target not in ATTENTION_OPS:
        return None
    mask = attention.mask(node)
    if not isinstance(mask, fx.Node) or any(n.op != "call_function" for n in ancestors(mask)):
        return None
    return mask
