"""`key_mask`: split a padding mask into the causal rule and a mask over keys alone.

A mask built from the inputs (`causal & padding`, see `analysis.masks`) cannot be evaluated at
compile time, and it is quadratic in the length. Where it splits into the causal rule and terms
over keys alone, this pass sets the kernel's `is_causal` and hands it the `(batch, 1, 1, T)`
additive mask over keys instead, so a streamed chunk of queries reads the keys' mask and never a
`(T, T)` one. A mask that does not split (a sliding window, a document mask), or a kernel the
stream runtime takes no key mask on, is kept whole, with a note saying why.

It runs in the stream pipeline, after `causal_mask`, on the forward graph StreamBP plans.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from memcompile.analysis import attention
from memcompile.analysis.masks import (DocumentMask, KeyMaskSplit, find_document_mask,
                                       input_built_masks, split_key_mask)
from memcompile.meta import record_note
from memcompile.passes.registry import register_pass

aten = torch.ops.aten

PASS_NAME = "key_mask"
_CPU_ATTENTION = aten._scaled_dot_product_flash_attention_for_cpu.default
"""The kernel whose chunked form (`runtime.chunk_attention`) takes a mask over keys."""


@register_pass(PASS_NAME, default=True, rank=20, graph="stream")
def key_mask_pass(gm: fx.GraphModule, example_inputs: Sequence[Any], *,
                  options: Any = None) -> fx.GraphModule:
    """Replace each input-built mask that is `causal & keys` by the causal kernel with a mask
    over keys alone."""
    replaced = 0
    for node, mask in input_built_masks(gm):
        replaced += _use_key_mask(gm, node, mask)
    if replaced:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return gm


def _use_key_mask(gm: fx.GraphModule, node: fx.Node, mask: fx.Node) -> bool:
    found = split_key_mask(mask)
    if node.target is not _CPU_ATTENTION:
        found = f"{node.target} (the stream runtime takes a key mask on the CPU kernel only)"
    key_mask = _build_key_mask(gm, node, found) if isinstance(found, KeyMaskSplit) else None
    if key_mask is None and isinstance(find_document_mask(mask), DocumentMask):
        record_note(gm, PASS_NAME, f"{mask.name} is the causal rule within documents (packed "
                    "sequences): left to the document_mask pass")
        return False
    if key_mask is None:
        reason = found if isinstance(found, str) else "its key terms do not form a 4-d mask"
        record_note(gm, PASS_NAME, f"{mask.name} depends on the inputs (a padding "
                    f"mask) and stays whole: {reason}")
        return False
    args, kwargs = attention.with_causal(node.args, node.kwargs, node.target, True)
    node.args, node.kwargs = args, {**kwargs, "attn_mask": key_mask}
    record_note(gm, PASS_NAME, f"{node.name}: its mask {mask.name} "
                f"{tuple(mask.meta['val'].shape)} is the causal rule and a mask over keys; "
                f"replaced by the causal kernel with the key mask "
                f"{tuple(key_mask.meta['val'].shape)}")
    return True


def _build_key_mask(gm: fx.GraphModule, node: fx.Node, found: KeyMaskSplit) -> fx.Node | None:
    """The additive `(B, H|1, 1, T)` mask `where(and of the key terms, 0, -inf)`, inserted
    before `node` with its fake value, or None when the terms do not broadcast to 4-d."""
    vals = [t.meta["val"] for t in found.keys]
    shape = torch.broadcast_shapes(*(v.shape for v in vals))
    if len(shape) != 4 or shape[-2] != 1:
        return None
    fake_mode = vals[0].fake_mode
    graph = gm.graph
    with graph.inserting_before(node):
        keys, val = found.keys[0], vals[0]
        for term, term_val in zip(found.keys[1:], vals[1:]):
            keys = graph.call_function(aten.bitwise_and.Tensor, (keys, term))
            with fake_mode:
                val = keys.meta["val"] = aten.bitwise_and.Tensor(val, term_val)
        additive = graph.call_function(aten.where.self, (keys, found.zero, found.hidden))
        zero, hidden = (a.meta["val"] if isinstance(a, fx.Node) else a
                        for a in (found.zero, found.hidden))
        with fake_mode:
            additive.meta["val"] = aten.where.self(val, zero, hidden)
    return additive
