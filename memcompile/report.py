"""What memcompile did to each captured graph, and the `Report` that `memcompile.explain` returns.

The backend fills one `GraphRecord` per compiled subgraph (Dynamo makes several at graph breaks).
`explain` collects them through `recording()`, adds measured peaks, and returns a `Report`: it
prints as text and plots a memory timeline.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from memcompile.analysis.memory import MemorySimulation, simulate_step
from memcompile.meta import DECISIONS, NOTES, Decision

_graph_ids = itertools.count()
_active_recorders: list[list[GraphRecord]] = []


@dataclass
class GraphRecord:
    """One captured graph: the passes run on it, the split, the decisions, the simulation."""

    name: str
    kind: str = "inference"
    """ "training" (a joint graph split in two) or "inference" (no backward)."""
    joint_before: str = ""
    joint_after: str = ""
    forward_code: str = ""
    backward_code: str = ""
    passes: list[Any] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)
    num_user_outputs: int = 0
    forward: fx.GraphModule | None = None
    backward: fx.GraphModule | None = None

    def set_split(self, joint: fx.GraphModule, fw: fx.GraphModule, bw: fx.GraphModule) -> None:
        """Record the joint graph after the passes and the forward/backward it was split into."""
        self.joint_after = joint.code
        self.forward, self.backward = fw, bw
        self.forward_code, self.backward_code = fw.code, bw.code
        self.notes = list(joint.meta.get(NOTES, []))
        self.decisions = [*joint.meta.get(DECISIONS, []), *fw.meta.get(DECISIONS, []),
                          *bw.meta.get(DECISIONS, [])]

    def decisions_of(self, kind: str) -> list[Decision]:
        """The decisions of one kind ("saved", "recomputed", ...)."""
        return [d for d in self.decisions if d.kind == kind]

    def simulate(self, sizes: Any = None) -> MemorySimulation | None:
        """The simulated step of this graph (None for an inference graph)."""
        if self.forward is None or self.backward is None:
            return None
        return simulate_step(self.forward, self.backward,
                             num_user_outputs=self.num_user_outputs, sizes=sizes)


def new_record(kind: str = "training") -> GraphRecord:
    """A record for the next compiled graph, handed to every active `recording()`."""
    record = GraphRecord(name=f"graph_{next(_graph_ids)}", kind=kind)
    for sink in _active_recorders:
        sink.append(record)
    return record


@contextlib.contextmanager
def recording() -> Iterator[list[GraphRecord]]:
    """Collect the records of every graph memcompile compiles inside the block."""
    sink: list[GraphRecord] = []
    _active_recorders.append(sink)
    try:
        yield sink
    finally:
        _active_recorders.remove(sink)
