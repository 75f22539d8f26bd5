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
UNMET = "memcompile.unmet"
"""gm.meta key: list of (pass_name, reason): what the user asked for explicitly that a pass could
not do on this graph. The backend turns each into a `MemcompileWarning`."""

REMAT = "memcompile.remat"
"""node.meta key: "save", "recompute" or "offload" (saved through host memory,
`planning.offload`), a rematerialization plan's tag on a forward value."""
JOINT = "memcompile.joint"
"""gm.meta key on a joint graph: {"num_fwd_outputs": int, "static_lifetime_input_indices": list},
what the partition knows about the joint graph and passes need to tell forward from backward."""

REMAT_PLAN = "memcompile.remat_plan"
"""gm.meta key on a joint graph: the `RematSummary` of the plan chosen for it."""

FEATURES = {
    "stream_plan": "stream (StreamBP)",
    "plan_remat": "memory_budget",
    "fuse_optimizer_updates": "fused optimizer updates",
}
"""The feature each pass serves, as the user asks for it: how a warning names what did not
apply."""

STREAM_PLAN = "memcompile.stream_plan"
"""gm.meta key on a forward graph: the `StreamPlan` the `stream_plan` pass decided for it."""

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


def record_unmet(gm: fx.GraphModule, pass_name: str, reason: str) -> None:
    """Record that something the user asked for explicitly did not apply, and why: a note, and
    a `MemcompileWarning` once the graph is compiled (`memcompile.unmet`)."""
    record_note(gm, pass_name, f"not applied: {reason}")
    gm.meta.setdefault(UNMET, []).append((pass_name, reason))
