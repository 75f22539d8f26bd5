"""`document_mask`: build a packed batch's attention mask from per-token ids, chunk by chunk.

SFT packs several documents in one row, with `position_ids` restarting at each. transformers
then builds attention's mask as `(batch, 1, T, T)`: the causal rule within each document. It
depends on an input, is quadratic in the length, and splits into no mask over keys alone (the
`key_mask` pass's case), so a streamed layer would slice a whole `(T, T)` mask in every chunk.
But each of its factors compares a value per query with a value per key
(`analysis.masks.find_document_mask`). This pass replaces it, for each attention call, by the
op `memcompile::document_mask` on those per-token values (linear in the length). The graph
means the same; the stream runtime never runs that op whole: each chunk of queries builds its
own rows, over the keys of its documents only (`runtime.document_mask`).

A mask of another structure (a sliding window), or a kernel the stream runtime takes no such
mask on, is kept whole, with a note saying why.

It runs in the stream pipeline, after `key_mask`, on the forward graph StreamBP plans.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from memcompile.analysis import attention
from memcompile.analysis.masks import (DOCUMENT_MASK, DocumentMask, ancestors,
                                       find_document_mask, input_built_masks)
from memcompile.meta import record_note
from memcompile.passes.registry import register_pass

aten = torch.ops.aten

PASS_NAME = "document_mask"
_CPU_ATTENTION = aten._scaled_dot_product_flash_attention_for_cpu.default
"""The kernel whose chunked form (`runtime.chunk_attention`) takes a mask over a chunk's
queries and keys."""


@register_pass(PASS_NAME, default=True, rank=30, graph="stream")
def document_mask_pass(gm: fx.GraphModule, example_inputs: Sequence[Any], *,
                       options: Any = None) -> fx.GraphModule:
    """Replace each input-built mask that is the causal rule within documents by a
    `memcompile::document_mask` op on the per-token ids it compares."""
    replaced = 0
    for node, mask in input_built_masks(gm):
        if mask.target is DOCUMENT_MASK or attention.is_causal(node):
            continue  # one already rewritten, or a key mask (`key_mask`'s)
        replaced += _use_document_mask(gm, node, mask)
    if replaced:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return gm


def _use_document_mask(gm: fx.GraphModule, node: fx.Node, mask: fx.Node) -> bool:
    found = find_document_mask(mask)
    if node.target is not _CPU_ATTENTION:
        found = f"{node.target} (the stream runtime takes a document mask on the CPU kernel only)"
    elif isinstance(found, DocumentMask) and _from_float_input(mask):
        # Ids computed from activations would have to be rebuilt per chunk; masks never are.
        found = "it is computed from a floating-point input, not from token inputs"
    if not isinstance(found, DocumentMask):
        record_note(gm, PASS_NAME, f"{mask.name} is not a document mask and stays whole: {found}")
        return False
    built = _build(gm, node, found)
    args, kwargs = list(node.args), dict(node.kwargs)
    where = attention.LAYOUTS[node.target].mask
    if isinstance(where, str):
        kwargs[where] = built
    else:
        args[where] = built
    node.args, node.kwargs = tuple(args), kwargs
    causal = "pos[k] <= pos[q]" if found.positions else "k <= q"
    record_note(gm, PASS_NAME, f"{node.name}: its mask {mask.name} "
                f"{tuple(mask.meta['val'].shape)} is the causal rule ({causal}) within documents "
                f"({found.documents[0].name} == {found.documents[1].name}); replaced by "
                f"{built.name}, whose rows each chunk builds from the per-token ids")
    return True


def _from_float_input(mask: fx.Node) -> bool:
    return any(n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)
               and n.meta["val"].is_floating_point() for n in ancestors(mask))


def _build(gm: fx.GraphModule, node: fx.Node, found: DocumentMask) -> fx.Node:
    """The `memcompile::document_mask` call for `found`, inserted before `node` with its fake
    value."""
    args = found.args()
    with gm.graph.inserting_before(node):
        built = gm.graph.call_function(DOCUMENT_MASK, args)
    fake = fx.node.map_arg(args, lambda n: n.meta["val"])
    with found.documents[0].meta["val"].fake_mode:
        built.meta["val"] = DOCUMENT_MASK(*fake)
    return built
