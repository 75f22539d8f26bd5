"""Namespaced `node.meta` keys memcompile writes, and the `Decision` record read by the report.

Passes communicate only through these tags: a deciding pass writes them, an applying pass and
the report read them. Keeping the keys here means one place says what each tag means.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

DECISIONS = "memcompile.decisions"
"""gm.meta key: list of `Decision` made by passes on this graph."""
NOTES = "memcompile.notes"
"""gm.meta key: list of (pass_name, text): why a pass left the graph unchanged, and the like."""

REMAT = "memcompile.remat"
"""node.meta key: "save" or "recompute", a rematerialization plan's tag on a forward value."""
JOINT = "memcompile.joint"
"""gm.meta key on a joint graph: {"num_fwd_outputs": int, "static_lifetime_input_indices": list},
what the partition knows about the joint graph and passes need to tell forward from backward."""

REMAT_PLAN = "memcompile.remat_plan"
"""gm.meta key on a joint graph: the `RematSummary` of the plan chosen for it."""

DECISION_KINDS = ("saved", "recomputed", "chunked", "offloaded", "sharded", "fused update")


@dataclass(frozen=True)
class Decision:
    """One memory decision: what a pass did to one value, why, and how many bytes it concerns."""

    pass_name: str
    kind: str
    node: str
    bytes: int
    reason: str

    def __post_init__(self) -> None:
        if self.kind not in DECISION_KINDS:
            raise ValueError(f"unknown decision kind {self.kind!r}; valid: {DECISION_KINDS}")


def record_decision(gm: fx.GraphModule, decision: Decision) -> None:
    """Append a decision to the graph's record (kept in `gm.meta`, read by the report)."""
    gm.meta.setdefault(DECISIONS, []).append(decision)


def record_note(gm: fx.GraphModule, pass_name: str, text: str) -> None:
    """Record why a pass did what it did (or nothing), for the log and the report."""
    gm.meta.setdefault(NOTES, []).append((pass_name, text))
