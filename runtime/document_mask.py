"""A packed batch's attention mask, built a chunk of queries at a time from per-token ids.

The `document_mask` pass hands attention a `memcompile::document_mask` op on per-token document
ids (and positions) instead of a `(B, 1, T, T)` mask. The stream runtime never runs that op
whole: `DocumentIds` holds its arguments (linear in the length) and each chunk of
queries `[first, end)` gets

- the keys it may see: those from the earliest start of a document its queries are in, found
  from the ids (`first_key`), so a chunk reads no key of an earlier document;
- no mask at all where its queries and those keys lie in one document (per row): the causal
  kernel alone, as for an unpacked row;
- otherwise its rows of the mask over those keys, `(B|1, 1, end - first, end - start)`.

Chunks may drop the keys after their end only when the mask hides every later key. With the
causal rule on indices (`k <= q`) it does; with transformers' rule on positions
(`pos[k] <= pos[q]`) it does when positions increase within each document, which `causal`
checks on the ids (transformers' document ids, which start a document wherever a position is
not its predecessor's plus one, always pass). A mask that fails runs whole, as any mask that
lets a query see a later key does.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import torch
import torch.fx as fx

from memcompile.analysis.masks import DOCUMENT_MASK, document_mask_part
from memcompile.runtime.chunk_attention import prefix_causal_attention, prefix_masked_attention


class DocumentIds:
    """The arguments of a `memcompile::document_mask` call (`analysis.masks.document_mask`),
    kept in place of the mask it would build."""

    def __init__(self, documents_q: torch.Tensor, documents_k: torch.Tensor,
                 positions_q: torch.Tensor | None, positions_k: torch.Tensor | None,
                 keys: list[torch.Tensor], zero: float, hidden: float, dtype: torch.dtype):
        self.args = (documents_q, documents_k, positions_q, positions_k, list(keys), zero,
                     hidden, dtype)
        self.queries, self.keys = _per_token(documents_q, documents_k)

    def rows(self, first: int, end: int, start: int = 0) -> torch.Tensor:
        """The additive mask of queries `[first, end)` over keys `[start, end)`."""
        return document_mask_part(*self.args, rows=(first, end), columns=(start, end))

    def key_mask(self, start: int, end: int) -> torch.Tensor | None:
        """The additive mask of the key terms alone over keys `[start, end)`, `(B|1, 1, 1, n)`,
        or None without key terms."""
        keys = self.args[4]
        if not keys:
            return None
        visible = keys[0][..., start:end] if keys[0].shape[-1] > 1 else keys[0]
        for term in keys[1:]:
            visible = visible & (term[..., start:end] if term.shape[-1] > 1 else term)
        zero, hidden, dtype = self.args[5:]
        options = {"dtype": dtype, "device": visible.device}
        return torch.where(visible.expand(*visible.shape[:-1], end - start),
                           torch.tensor(zero, **options), torch.tensor(hidden, **options))

    @cached_property
    def causal(self) -> bool:
        """Whether no query sees a later key, checked on the per-token values."""
        if self.args[2] is None:
            return True  # the causal rule on indices is one of the mask's factors
        if not torch.equal(self.queries, self.keys):
            return False
        positions_q, positions_k = _per_token(self.args[2], self.args[3])
        if not torch.equal(positions_q, positions_k):
            return False
        # Within each document (equal ids, in index order after a stable sort by id), positions
        # must strictly increase: then pos[k] <= pos[q] with the same id implies k <= q.
        order = torch.sort(self.queries, dim=-1, stable=True).indices
        ids, positions = self.queries.gather(-1, order), positions_q.gather(-1, order)
        same = ids[:, 1:] == ids[:, :-1]
        return bool(((positions[:, 1:] > positions[:, :-1]) | ~same).all())

    def first_key(self, first: int, end: int) -> int:
        """The first key any query of `[first, end)` may see, in any row: keys before it hold
        ids none of these queries has. At most `first` (the chunk's own keys stay)."""
        start = first
        for queries, keys in zip(self.queries, self.keys):
            shared = torch.isin(keys[:first], queries[first:end]).nonzero()
            if shared.numel():
                start = min(start, int(shared[0, 0]))
        return start

    def one_document(self, start: int, first: int, end: int) -> bool:
        """Whether, in every row, queries `[first, end)` and keys `[start, end)` share one id:
        the mask over them is then the causal rule and the key terms alone."""
        queries, keys = self.queries[:, first:end], self.keys[:, start:end]
        return bool((queries == queries[:, :1]).all() and (keys == queries[:, :1]).all())


def _per_token(queries: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token values at the queries `(B|1, 1, T, 1)` and at the keys `(B|1, 1, 1, T)` as
    two `(B, T)` tensors."""
    q, k = queries.reshape(queries.shape[0], -1), keys.reshape(keys.shape[0], -1)
    batch = max(q.shape[0], k.shape[0])
    return q.expand(batch, -1), k.expand(batch, -1)


def evaluate_input_only(node: fx.Node, args: Any, kwargs: dict[str, Any]) -> Any:
    """An input-only value of a region, computed whole; a document mask stays its ids."""
    if node.target is DOCUMENT_MASK:
        return DocumentIds(*args, **kwargs)
    return node.target(*args, **kwargs)


def document_attention(op: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       scale: float | None, ids: DocumentIds, first: int, end: int,
                       sinks: tuple[torch.Tensor, torch.Tensor] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """`(out, logsumexp)` of queries `[first, end)` (`q`) over keys `[0, end)` (`k`, `v`) under
    the document mask `ids`, which hides every later key (`ids.causal`); with `sinks`, the keys'
    and values' gradients are added into them."""
    start = ids.first_key(first, end)
    k, v = k[:, :, start:], v[:, :, start:]
    if sinks is not None:
        sinks = (sinks[0][:, :, start:], sinks[1][:, :, start:])
    if ids.one_document(start, first, end):
        return prefix_causal_attention(q, k, v, scale, sinks, op, ids.key_mask(start, end))
    return prefix_masked_attention(q, k, v, ids.rows(first, end, start), scale, sinks, op)
