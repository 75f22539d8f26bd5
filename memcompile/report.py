"""What memcompile did to each captured graph, and the `Report` that `memcompile.explain` returns.

The backend fills one `GraphRecord` per compiled subgraph (Dynamo makes several at graph breaks).
`explain` collects them through `recording()`, adds measured peaks, and returns a `Report`: it
prints as text and plots a memory timeline.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from memcompile.analysis.memory import MemorySimulation, MissingMetadataError, simulate_step
from memcompile.meta import DECISION_KINDS, DECISIONS, FEATURES, NOTES, REMAT_PLAN, Decision

_graph_ids = itertools.count()
_active_recorders: list[list[GraphRecord]] = []


@dataclass
class GraphRecord:
    """One captured graph: the passes run on it, the split, the decisions, the simulation."""

    name: str
    kind: str = "pending"
    """ "training" (a joint graph split in two), "stream" (run by StreamBP's runtime),
    "inference" (no backward), "cached" (loaded from AOTAutograd's cache, so nothing was
    recorded), or "pending" while it compiles."""
    joint_before: str = ""
    joint_after: str = ""
    forward_code: str = ""
    backward_code: str = ""
    passes: list[Any] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)
    unmet: list[tuple[str, str]] = field(default_factory=list)
    """(pass name, reason): what the user asked for that did not apply to this graph; each was
    also raised as a `MemcompileWarning` (`memcompile.unmet`)."""
    origin: str = ""
    """Where Dynamo captured the graph: function, file and line, compile id."""
    num_user_outputs: int = 0
    forward: fx.GraphModule | None = None
    backward: fx.GraphModule | None = None
    plan: Any = None
    """The rematerialization planner's summary (`planning.remat.RematSummary`), if it ran."""
    stream_plan: Any = None
    """StreamBP's regions (`passes.stream_plan.StreamPlan`) for a graph of kind "stream"."""
    _simulation: MemorySimulation | None = field(default=None, repr=False)

    def set_split(self, joint: fx.GraphModule, fw: fx.GraphModule, bw: fx.GraphModule) -> None:
        """Record the joint graph after the passes and the forward/backward it was split into."""
        self.joint_after = joint.code
        self.forward, self.backward = fw, bw
        self.forward_code, self.backward_code = fw.code, bw.code
        self.notes = [*self.notes, *joint.meta.get(NOTES, []), *bw.meta.get(NOTES, [])]
        self.plan = joint.meta.get(REMAT_PLAN)
        self.decisions = [*joint.meta.get(DECISIONS, []), *fw.meta.get(DECISIONS, []),
                          *bw.meta.get(DECISIONS, [])]

    def dump(self, dump_dir: str) -> None:
        """Write the forward, the backward and the decisions next to the pass dumps."""
        folder = os.path.join(dump_dir, self.name)
        os.makedirs(folder, exist_ok=True)
        for filename, text in (("forward.py", self.forward_code),
                               ("backward.py", self.backward_code)):
            if not text:
                continue  # a streamed graph has no backward graph: its runtime runs the plan
            with open(os.path.join(folder, filename), "w") as f:
                f.write(text)
        with open(os.path.join(folder, "decisions.tsv"), "w") as f:
            f.write("pass\tkind\tnode\tbytes\treason\n")
            for d in self.decisions:
                f.write(f"{d.pass_name}\t{d.kind}\t{d.node}\t{d.bytes}\t{d.reason}\n")

    def decisions_of(self, kind: str) -> list[Decision]:
        """The decisions of one kind ("saved", "recomputed", ...)."""
        return [d for d in self.decisions if d.kind == kind]

    def simulate(self, sizes: Any = None) -> MemorySimulation | None:
        """The simulated step of this graph (None for an inference graph).

        `sizes` binds the graphs' size symbols to other values; by default, the example sizes.
        """
        if self.forward is None or self.backward is None:
            return None
        if sizes is None and self._simulation is not None:
            return self._simulation
        sim = simulate_step(self.forward, self.backward,
                            num_user_outputs=self.num_user_outputs, sizes=sizes)
        if sizes is None:
            self._simulation = sim
        return sim


def new_record(origin: str = "") -> GraphRecord:
    """A record for the next compiled graph, handed to every active `recording()`; `origin`
    says where Dynamo captured it."""
    record = GraphRecord(name=f"graph_{next(_graph_ids)}", origin=origin)
    for sink in _active_recorders:
        sink.append(record)
    return record


def discard_record(record: GraphRecord) -> None:
    """Forget a record whose compilation did not finish (Dynamo restarts some compilations)."""
    for sink in _active_recorders:
        if record in sink:
            sink.remove(record)


@contextlib.contextmanager
def recording() -> Iterator[list[GraphRecord]]:
    """Collect the records of every graph memcompile compiles inside the block."""
    sink: list[GraphRecord] = []
    _active_recorders.append(sink)
    try:
        yield sink
    finally:
        _active_recorders.remove(sink)


TEXT_DECISIONS = 12
"""How many decisions per graph the text shows, largest first."""


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


@dataclass
class Report:
    """What `memcompile.explain` found: the graphs, their decisions, simulated and measured peaks.

    `str(report)` is the text a user reads; `report.plot(path)` writes the memory timeline.
    """

    records: list[GraphRecord]
    options: Any
    measured: dict[str, int] = field(default_factory=dict)
    """Measured peaks by measure name ("allocator", "tracked"), bytes above the step's start."""

    @property
    def decisions(self) -> list[Decision]:
        """Every decision of every graph, in order."""
        return [d for r in self.records for d in r.decisions]

    @property
    def graphs(self) -> dict[str, dict[str, str]]:
        """Code of each graph by stage: the joint graph before and after each pass, the split."""
        out: dict[str, dict[str, str]] = {}
        for r in self.records:
            stages = {"joint": r.joint_before}
            stages.update({f"after {p.name}": p.code_after for p in r.passes})
            stages.update(forward=r.forward_code, backward=r.backward_code)
            out[r.name] = stages
        return out

    @property
    def simulated_peak_bytes(self) -> int | None:
        """The largest simulated step peak over the training graphs (None if none simulates)."""
        sims = [s for s in (_simulation_or_none(r) for r in self.records) if s is not None]
        return max((s.peak_bytes for s in sims), default=None)

    def __str__(self) -> str:
        lines = [f"memcompile report: {len(self.records)} graph(s), runtime={self.options.runtime}"]
        for r in self.records:
            lines += _graph_lines(r)
        peak = self.simulated_peak_bytes
        measured = ", ".join(f"{k} {v:,} B" for k, v in self.measured.items()) or "not measured"
        lines.append(f"peak above the step's start: simulated "
                     f"{'n/a' if peak is None else f'{peak:,} B'}; measured {measured}")
        if len(self.records) > 1:
            lines.append("(graphs are simulated one at a time; eager code between them is not)")
        return "\n".join(lines)

    def plot(self, path: str) -> str:
        """Write a PNG of the simulated live bytes over each training graph's step; return path."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        sims = [(r.name, s) for r in self.records if (s := _simulation_or_none(r)) is not None]
        fig, axes = plt.subplots(len(sims) or 1, 1, figsize=(10, 3.2 * max(len(sims), 1)),
                                 squeeze=False)
        for ax, (name, sim) in zip(axes[:, 0], sims):
            _plot_timeline(ax, name, sim, self.measured)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _graph_lines(r: GraphRecord) -> list[str]:
    lines = [f"\n{r.name} ({r.kind})"]
    if r.forward is not None and r.backward is not None:
        lines.append(f"  forward {len(r.forward.graph.nodes)} nodes, "
                     f"backward {len(r.backward.graph.nodes)} nodes")
    for p in r.passes:
        diff = ", ".join(f"{op} {n:+d}" for op, n in p.op_diff.items()) or "no change"
        lines.append(f"  pass {p.name}: {p.seconds * 1e3:.1f} ms, {diff}")
    for pass_name, reason in r.unmet:
        lines.append(f"  WARNING {FEATURES.get(pass_name, pass_name)} not applied: {reason}")
    for pass_name, text in r.notes:
        lines.append(f"  note ({pass_name}): {text}")
    for kind in DECISION_KINDS:
        ds = r.decisions_of(kind)
        if ds:
            lines.append(f"  {kind}: {len(ds)} tensor(s), {_mib(sum(d.bytes for d in ds))}")
    if r.decisions:
        # The largest decisions are the ones worth reading; all of them are in report.decisions.
        largest = sorted(r.decisions, key=lambda d: -d.bytes)[:TEXT_DECISIONS]
        lines.append(f"  {'decision':<11}{'bytes':>14}  {'node':<28}reason")
        for d in largest:
            lines.append(f"  {d.kind:<11}{d.bytes:>14,}  {d.node:<28}{d.reason}")
        if len(r.decisions) > len(largest):
            lines.append(f"  ... {len(r.decisions) - len(largest)} smaller decisions "
                         "(report.decisions lists all)")
    try:
        sim = r.simulate()
    except MissingMetadataError as e:
        lines.append(f"  simulated peak unavailable: {e}")
        return lines
    if sim is not None and sim.peak_event is not None:
        e = sim.peak_event
        lines.append(f"  simulated peak {sim.peak_bytes:,} B ({_mib(sim.peak_bytes)}) at "
                     f"{e.phase} {e.node}; {sim.saved_bytes:,} B live between forward and backward")
    return lines


def _simulation_or_none(r: GraphRecord) -> MemorySimulation | None:
    try:
        return r.simulate()
    except MissingMetadataError:
        return None


def _plot_timeline(ax: Any, name: str, sim: MemorySimulation, measured: dict[str, int]) -> None:
    xs = list(range(len(sim.events)))
    ys = [e.live_bytes / 2**20 for e in sim.events]
    ax.plot(xs, ys, color="tab:blue", lw=1.2, label="simulated live bytes")
    first_bw = next((i for i, e in enumerate(sim.events) if e.phase != "forward"), len(xs))
    ax.axvspan(0, first_bw, color="tab:green", alpha=0.08, label="forward")
    ax.axvspan(first_bw, len(xs), color="tab:orange", alpha=0.08, label="backward")
    peak = sim.peak_event
    if peak is not None:
        i = sim.events.index(peak)
        ax.annotate(f"peak {peak.live_bytes / 2**20:.2f} MiB\n{peak.node}", (i, ys[i]),
                    textcoords="offset points", xytext=(8, -24), fontsize=8)
    for k, v in measured.items():
        ax.axhline(v / 2**20, ls="--", lw=0.8, color="gray")
        ax.text(len(xs) / 2, v / 2**20, f"measured ({k})", fontsize=7, va="bottom",
                color="gray")
    ax.set_title(f"{name}: live bytes above the step's start")
    ax.set_xlabel("op in the forward-then-backward schedule")
    ax.set_ylabel("MiB")
    ax.legend(loc="lower right", fontsize=7)
