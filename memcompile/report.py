"""What memcompile did to each captured graph, and the `Report` that `memcompile.explain` returns.

The backend fills one `GraphRecord` per compiled subgraph (Dynamo makes several at graph breaks).
`explain` collects them through `recording()`, adds measured peaks, and returns a `Report`: it
prints as text and plots a memory timeline.

A graph's simulated step uses the buffer model its plan was priced on, so the report's peak, its
plot and the plan's "planned peak" are one number: Inductor's buffers (`analysis.fusion`) when
`plan_remat` planned for the Inductor runtime, else the eager runtime's buffers (every op's
output: the tracked peak, `analysis.memory`). The text and the plot name the model.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from memcompile.analysis.joint import JointGraph
from memcompile.analysis.memory import (MemoryEvent, MemorySimulation, MissingMetadataError,
                                        simulate_step)
from memcompile.analysis.schedule import simulate_layout
from memcompile.meta import DECISION_KINDS, DECISIONS, FEATURES, NOTES, REMAT_PLAN, Decision
from memcompile.planning.remat_split import tagged_layout

_graph_ids = itertools.count()
_active_recorders: list[list[GraphRecord]] = []

SIMULATION_MODELS = {
    "eager": "the eager runtime's buffers (every op's output, as the tracked peak counts them)",
    "inductor": "Inductor's buffers (what its fused kernels store, analysis.fusion)",
}
"""The buffer models a graph's step is simulated on, by the name `RematSummary.priced_on` uses."""


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
    joint: fx.GraphModule | None = None
    """The joint graph after the passes, as it was split (the plan's tags on it)."""
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
        self.joint, self.forward, self.backward = joint, fw, bw
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

    @property
    def simulated_on(self) -> str:
        """The buffer model this graph's step is simulated on (a key of `SIMULATION_MODELS`):
        the one `plan_remat` priced its plan on, or "eager" when there is no plan on
        Inductor's."""
        priced_on = getattr(self.plan, "priced_on", "eager")
        return "inductor" if priced_on == "inductor" and self.joint is not None else "eager"

    def simulate(self, sizes: Any = None, *, on: str | None = None) -> MemorySimulation | None:
        """The simulated step of this graph (None for an inference graph).

        `on`: the buffer model, a key of `SIMULATION_MODELS`; by default `self.simulated_on`,
        the plan's. "inductor" simulates the plan's layout as the planner did, so its peak is
        the plan's planned peak.
        `sizes` binds the graphs' size symbols to other values (the eager model only); by
        default, the example sizes.
        """
        model = on or self.simulated_on
        if model not in SIMULATION_MODELS:
            raise ValueError(f"unknown buffer model {model!r}; valid: "
                             f"{', '.join(SIMULATION_MODELS)}")
        if self.forward is None or self.backward is None:
            return None
        if model == "inductor" and sizes is not None:
            raise ValueError("the Inductor buffer model simulates the example sizes only; "
                             "pass on='eager' to bind sizes")
        cached = sizes is None and model == self.simulated_on
        if cached and self._simulation is not None:
            return self._simulation
        if model == "inductor":
            sim = self._simulate_as_planned()
        else:
            sim = simulate_step(self.forward, self.backward,
                                num_user_outputs=self.num_user_outputs, sizes=sizes)
        if cached:
            self._simulation = sim
        return sim

    def _simulate_as_planned(self) -> MemorySimulation:
        """The step of the tagged plan on Inductor's buffers, as `plan_remat` simulated it
        (Inductor's kernel order, the caller dropping non-scalar outputs before the backward)."""
        if self.joint is None:
            raise ValueError(f"{self.name}: no joint graph recorded to simulate the plan on")
        joint = JointGraph.read(self.joint, self.num_user_outputs)
        timeline: list[tuple[str, str, int]] = []
        planned = simulate_layout(joint, tagged_layout(joint), fusion=True, drop_outputs=True,
                                  timeline=timeline)
        return MemorySimulation([MemoryEvent(*e) for e in timeline], planned.saved_bytes)


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

_SHORT_MODELS = {"eager": "the eager runtime's buffers", "inductor": "Inductor's buffers"}


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


@dataclass
class Report:
    """What `memcompile.explain` found: the graphs, their decisions, simulated and measured peaks.

    `str(report)` is the text a user reads; `report.plot(path)` writes the memory timeline.
    Each graph is simulated on the buffer model its plan was priced on (`GraphRecord.simulated_on`).
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
        """The largest simulated step peak over the training graphs (None if none simulates),
        each on its own buffer model (`simulated_on`)."""
        sims = [s for s in (_simulation_or_none(r) for r in self.records) if s is not None]
        return max((s.peak_bytes for s in sims), default=None)

    @property
    def simulated_on(self) -> list[str]:
        """The buffer models the simulated graphs use (keys of `SIMULATION_MODELS`), each once."""
        return sorted({r.simulated_on for r in self.records if _simulation_or_none(r) is not None})

    @property
    def planned_peak_bytes(self) -> int | None:
        """The largest peak `plan_remat` planned over the graphs (None if it planned none)."""
        return max((r.plan.chosen_peak for r in self.records if r.plan is not None),
                   default=None)

    def __str__(self) -> str:
        runtime = self.options.runtime
        lines = [f"memcompile report: {len(self.records)} graph(s), runtime={runtime}"]
        for r in self.records:
            lines += _graph_lines(r, runtime)
        lines += self._summary_lines()
        return "\n".join(lines)

    def _summary_lines(self) -> list[str]:
        peak, planned = self.simulated_peak_bytes, self.planned_peak_bytes
        simulated = "n/a" if peak is None else f"{peak:,} B on " + " and ".join(
            _SHORT_MODELS[m] for m in self.simulated_on)
        measured = ("measured " + ", ".join(f"{k} {v:,} B" for k, v in self.measured.items())
                    if self.measured else "not measured")
        lines = [f"peak above the step's start: simulated {simulated}"
                 + ("" if planned is None else f"; planned {planned:,} B") + f"; {measured}"]
        if len(self.records) > 1:
            lines.append("(graphs are simulated one at a time; eager code between them is not)")
        return lines

    def figure(self) -> Any:
        """A matplotlib Figure of the simulated live bytes over each training graph's step, one
        axes per graph, on the model each graph was planned on (named in its title)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        sims = [(r, s) for r in self.records if (s := _simulation_or_none(r)) is not None]
        fig, axes = plt.subplots(len(sims) or 1, 1, figsize=(10, 3.2 * max(len(sims), 1)),
                                 squeeze=False)
        for ax, (record, sim) in zip(axes[:, 0], sims):
            _plot_timeline(ax, record, sim, self.measured)
        fig.tight_layout()
        return fig

    def plot(self, path: str) -> str:
        """Write `figure()` as a PNG; return path."""
        import matplotlib.pyplot as plt

        fig = self.figure()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _graph_lines(r: GraphRecord, runtime: str) -> list[str]:
    """The text of one graph: what ran on it, its notes, its decisions, its simulated step."""
    lines = [f"\n{r.name} ({r.kind})"]
    if r.forward is not None and r.backward is not None:
        lines.append(f"  forward {len(r.forward.graph.nodes)} nodes, "
                     f"backward {len(r.backward.graph.nodes)} nodes")
    for p in r.passes:
        diff = ", ".join(f"{op} {n:+d}" for op, n in p.op_diff.items()) or "no change"
        lines.append(f"  pass {p.name}: {p.seconds * 1e3:.1f} ms, {diff}")
    return lines + _note_lines(r) + _decision_lines(r) + _simulation_lines(r, runtime)


def _note_lines(r: GraphRecord) -> list[str]:
    """What was asked for and did not apply (each also a `MemcompileWarning`), then the passes'
    notes (why one left the graph unchanged, what the plan is)."""
    lines = [f"  WARNING {FEATURES.get(pass_name, pass_name)} not applied: {reason}"
             for pass_name, reason in r.unmet]
    return lines + [f"  note ({pass_name}): {text}" for pass_name, text in r.notes]


def _decision_lines(r: GraphRecord) -> list[str]:
    """Totals per kind of decision, then the largest decisions."""
    lines = []
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
    return lines


def _simulation_lines(r: GraphRecord, runtime: str) -> list[str]:
    """The model the step is simulated on, and its simulated peak."""
    try:
        sim = r.simulate()
    except MissingMetadataError as e:
        return [f"  simulated peak unavailable: {e}"]
    if sim is None or sim.peak_event is None:
        return []
    model = f"  simulated on {SIMULATION_MODELS[r.simulated_on]}"
    if r.simulated_on == "inductor":
        model += ", the model plan_remat priced its plan on"
    elif runtime == "inductor":
        # Without a plan priced on Inductor's buffers there is no layout to run its model on.
        model += ("; plan_remat made no plan for this graph, so Inductor's fused kernels are "
                  "not modelled and the allocator's peak may be lower")
    e = sim.peak_event
    return [model, f"  simulated peak {sim.peak_bytes:,} B ({_mib(sim.peak_bytes)}) at "
                   f"{e.phase} {e.node}; {sim.saved_bytes:,} B live between forward and backward"]


def _simulation_or_none(r: GraphRecord) -> MemorySimulation | None:
    try:
        return r.simulate()
    except MissingMetadataError:
        return None


def _plot_timeline(ax: Any, r: GraphRecord, sim: MemorySimulation,
                   measured: dict[str, int]) -> None:
    xs = list(range(len(sim.events)))
    ys = [e.live_bytes / 2**20 for e in sim.events]
    ax.plot(xs, ys, color="tab:blue", lw=1.2,
            label=f"simulated live bytes, {_SHORT_MODELS[r.simulated_on]}")
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
    ax.set_title(f"{r.name}: live bytes above the step's start, simulated on "
                 f"{_SHORT_MODELS[r.simulated_on]}")
    order = "Inductor's kernel order" if r.simulated_on == "inductor" else "graph order"
    ax.set_xlabel(f"op in the forward-then-backward schedule ({order})")
    ax.set_ylabel("MiB")
    ax.legend(loc="lower right", fontsize=7)
