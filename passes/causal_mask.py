"""Replace an attention mask that is a constant causal mask with the causal kernel.

transformers builds its causal mask as a `(batch, 1, T, T)` tensor under `torch.compile`, even
when no padding mask is given. Such a mask is quadratic in the length and, once it exists,
every chunk of a streamed layer must slice it. When the mask depends on no graph input (it is
built from `arange`s and constants alone), it is the same at every call: this pass computes it
once, at compile time, and where it equals the lower-triangular mask it drops it and sets the
kernel's `is_causal` (square, so top-left and lower-right alignment agree). A mask that depends
on an input (a padding mask) is split, where it can be, into the causal rule and a mask over keys
alone (`key_mask`): the kernel applies the first, and the second is `(batch, 1, 1, T)`. One that
cannot be split or is too large to check is left as it is, with a note.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx

from memcompile.analysis import attention
from memcompile.analysis.attention import ATTENTION_OPS
from memcompile.passes.key_mask import KeyMaskSplit, ancestors, evaluate, split_key_mask
from memcompile.meta import record_note

log = logging.getLogger(__name__)
aten = torch.ops.aten

CAUSAL_MASK_PASS = "causal_mask"
CHECK_LIMIT = 2**28
"""Largest mask (elements) this pass evaluates to check it: 256 MiB of booleans."""


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
        nodes = ancestors(mask)
        if any(n.op != "call_function" for n in nodes):
            replaced += _use_key_mask(gm, node, mask)
            continue
        val = mask.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.numel() > CHECK_LIMIT:
            record_note(gm, CAUSAL_MASK_PASS, f"{mask.name} is too large to check at compile "
                        f"time ({CHECK_LIMIT:,} elements at most): kept")
            continue
        with torch.no_grad():
            if not is_causal_mask(evaluate(nodes)):
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


def _use_key_mask(gm: fx.GraphModule, node: fx.Node, mask: fx.Node) -> bool:
    """Replace a mask built from the inputs by the causal kernel and a mask over keys alone,
    where it splits so (`key_mask`); else keep it, with a note saying why."""
    found = split_key_mask(mask)
    if node.target is not _CPU_ATTENTION:
        found = f"{node.target} (the stream runtime takes a key mask on the CPU kernel only)"
    key_mask = _build_key_mask(gm, node, found) if isinstance(found, KeyMaskSplit) else None
    if key_mask is None:
        reason = found if isinstance(found, str) else "its key terms do not form a 4-d mask"
        record_note(gm, CAUSAL_MASK_PASS, f"{mask.name} depends on the inputs (a padding "
                    f"mask) and stays whole: {reason}")
        return False
    args, kwargs = attention.with_causal(node.args, node.kwargs, node.target, True)
    node.args, node.kwargs = args, {**kwargs, "attn_mask": key_mask}
    record_note(gm, CAUSAL_MASK_PASS, f"{node.name}: its mask {mask.name} "
                f"{tuple(mask.meta['val'].shape)} is the causal rule and a mask over keys; "
                f"replaced by the causal kernel with the key mask "
                f"{tuple(key_mask.meta['val'].shape)}")
    return True


_CPU_ATTENTION = aten._scaled_dot_product_flash_attention_for_cpu.default


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

