"""The rematerialization planner: what the backward recomputes so the step's *peak* meets a
memory budget. The `plan_remat` pass (`passes/remat_plan.py`) runs it and tags the graph.

torch's `activation_memory_budget` caps the bytes saved for the backward, not the peak, and its
backward recomputes the whole forward before the first gradient op (research/torch_remat.md,
2.4). This pass plans on the simulated peak of the real schedule instead:

1. A plan is the set of storage groups the backward recomputes (`analysis.schedule.layout`);
   recomputation runs lazily, right before its first use. Each plan is scored by its simulated
   peak (exact for the eager runtime) and its recompute seconds (`analysis.cost`).
2. A greedy chain starts from the plan that recomputes only what the model's checkpoint regions
   ask for, and repeatedly recomputes one more saved value that is live at the current peak,
   the one that frees the most bytes per second of recompute, as long as the peak does not rise.
   On big graphs a value is evicted together with its twins of the same op and shape (the other
   layers' copies), and the last such batch is refined one value at a time when a budget falls
   inside it. Where the twins cannot go all at once, the chain walks them one layer at a time,
   in stretches that double while each lowers the peak by exactly as many steps' bytes
   (`_note_walk`). A value whose eviction left the peak where it was is not tried again until
   the peak moves. On a 32-layer Llama-style graph this takes `auto` from 100 simulated plans
   to 46-47, with the same plan.
3. For a budget of B bytes the pass takes the first plan of the chain whose peak is at most B
   (plans get costlier along the chain, so it is the cheapest such plan the chain knows). A lower
   budget therefore never gives a higher peak. A budget below the chain's least peak raises
   `MemoryBudgetError` with that least peak.

The planner only decides: `tag_plan` writes `"save"` or `"recompute"` on each forward value the
backward reads (`meta.REMAT`) and records decisions; `planning.remat_split` applies the tags
when the graph is split.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch.fx as fx

from memcompile.analysis.cost import CostModel
from memcompile.analysis.joint import JointGraph
from memcompile.analysis.schedule import (Layout, PlanSimulation, ScheduleFacts, layout,
                                          simulate_layout)
from memcompile.errors import MemoryBudgetError
from memcompile.meta import REMAT, Decision, record_decision

log = logging.getLogger(__name__)

PASS_NAME = "plan_remat"
"""The pass whose decisions the planner records."""

_DETOURS = 3  # steps up the chain may take in a row before it gives up
_BATCH_ABOVE = 48  # candidate groups: above this many, evict an op's twins together


@dataclass(frozen=True)
class PlanPoint:
    """One plan of the chain: what it recomputes, its simulated step and its cost."""

    evicted: frozenset[int]
    layout: Layout
    sim: PlanSimulation
    recompute_seconds: float
    move: tuple[int, ...] = ()
    """The groups this plan evicted on top of the previous plan of the chain."""

    @property
    def peak_bytes(self) -> int:
        """Simulated peak above what is live when the step starts."""
        return self.sim.peak_bytes

    @cached_property
    def saved(self) -> frozenset[fx.Node]:
        """The values this plan saves, as a set (the planner asks per candidate group)."""
        return frozenset(self.layout.saved)

    @cached_property
    def recomputed(self) -> frozenset[fx.Node]:
        """The values this plan recomputes, as a set."""
        return frozenset(self.layout.recomputed)


@dataclass
class RematSummary:
    """What the planner saw and chose, for the report and the bench."""

    budget: Any
    budget_bytes: int | None
    save_all_peak: int
    chosen_peak: int
    least_peak: int | None
    recompute_seconds: float
    forward_seconds: float
    plans_simulated: int
    seconds: float
    chain: list[tuple[int, float]] = field(default_factory=list)
    """(peak bytes, recompute seconds) of each plan of the chain, in order."""
    cost: CostModel | None = None
    """The cost model the plan was priced with: `cost.to_dict()` as `Options.cost_model`
    plans the same graph the same way in another run."""
    priced_on: str = "eager"
    """Whose buffers the peaks count: "eager" (every op's output, the tracked peak) or
    "inductor" (what Inductor's fused kernels store; `analysis.fusion`)."""


class RematPlanner:
    """Builds the greedy chain of plans for one joint graph and picks a plan for a budget."""

    def __init__(self, joint: JointGraph, cost: CostModel, *, batch: bool | None = None,
                 fusion: bool = False, stretches: bool = True):
        self.joint = joint
        self.fusion = fusion
        """Price plans on Inductor's buffers (`analysis.fusion`) instead of the eager runtime's."""
        self.stretches = stretches
        """Take a walk over repeated layers a stretch at a time (`_note_walk`); False: one value
        at a time (the reference the tests compare against)."""
        self.facts = ScheduleFacts.of(joint)
        self.node_seconds = {n: cost.node_seconds(n) for n in joint.forward}
        self.forward_seconds = sum(self.node_seconds.values())
        self._evictable = {
            g: joint.group_banned(g) is None and joint.group_bytes(g) > 0
            for g in range(len(joint.group_members))
        }
        needed_groups = {joint.group_of[v] for v in joint.needed if v in joint.group_of}
        self.batch = (sum(self._evictable[g] for g in needed_groups) > _BATCH_ABOVE
                      if batch is None else batch)
        self._signatures: dict[int, tuple] = {}
        self._rejected: set[int] = set()
        self._idle: dict[int, tuple[str, str]] = {}
        """Groups whose eviction left the peak unchanged, and the (phase, op) the peak was at."""
        self._walks: dict[tuple, tuple[int, int]] = {}
        """Per op signature on a walk (`_note_walk`): how many twins to try at once next, and
        the bytes each step of the walk lowered the peak by."""
        self.width = 2 if self.batch else 8
        self.detours_left = _DETOURS
        """How many candidate moves each step of the chain simulates."""
        self._points: dict[frozenset[int], PlanPoint] = {}
        self.chain: list[PlanPoint] = []
        self._chain_done = False

    # -- evaluating plans --------------------------------------------------------------------

    def evaluate(self, evicted: frozenset[int], move: tuple[int, ...] = ()) -> PlanPoint:
        """Simulate the plan that recomputes `evicted` (memoized)."""
        if evicted not in self._points:
            plan = layout(self.joint, evicted)
            seconds = sum(self.node_seconds[n] for n in plan.recomputed)
            # Planned for the usual loop, `model(**batch).loss.backward()`: logits dropped.
            sim = simulate_layout(self.joint, plan, fusion=self.fusion, drop_outputs=True,
                                  facts=self.facts)
            self._points[evicted] = PlanPoint(evicted, plan, sim, seconds, move)
        point = self._points[evicted]
        return point if point.move == move else dataclasses.replace(point, move=move)

    @property
    def least_peak(self) -> int | None:
        """The least peak of the chain, once the chain is complete (None before)."""
        return min(p.peak_bytes for p in self.chain) if self._chain_done else None

    @property
    def plans_simulated(self) -> int:
        """How many distinct plans were simulated so far."""
        return len(self._points)

    def save_all(self) -> PlanPoint:
        """The plan that recomputes nothing: the reference of a fractional budget."""
        return self.evaluate(frozenset())

    def start(self) -> PlanPoint:
        """The least-recompute plan that honours the model: its checkpoint regions recompute."""
        groups = {self.joint.group_of[n] for n in self.joint.model_recompute
                  if n in self.joint.group_of}
        return self.evaluate(frozenset(g for g in groups if self.joint.group_banned(g) is None))

    # -- the chain ------------------------------------------------------------------------------

    def extend_chain(self, stop_at_peak: int | None = None, stop_above_seconds: float | None = None
                     ) -> list[PlanPoint]:
        """Grow the chain until its peak is at most `stop_at_peak`, its cost passes
        `stop_above_seconds`, or no saved value live at the peak can go without raising it."""
        if not self.chain:
            self.chain.append(self.start())
            self._best_peak = self.chain[0].peak_bytes
        while not self._chain_done:
            current = self.chain[-1]
            if stop_at_peak is not None and current.peak_bytes <= stop_at_peak:
                break
            if stop_above_seconds is not None and current.recompute_seconds > stop_above_seconds:
                break
            step = self._next(current)
            if step is None:
                self._chain_done = True
            else:
                self.chain.append(step)
                if step.peak_bytes < self._best_peak:
                    self._best_peak = step.peak_bytes
                    self.detours_left = _DETOURS
        if self._chain_done:
            # Detours that never led below the best peak are not plans worth choosing.
            last_best = max(i for i, p in enumerate(self.chain) if p.peak_bytes == self._best_peak)
            del self.chain[last_best + 1:]
        return self.chain

    def _next(self, current: PlanPoint) -> PlanPoint | None:
        at_peak = {self.joint.group_of[v] for v in current.sim.live_at_peak
                   if v in self.joint.group_of}
        scores = {g: self._seconds_per_byte(g, current) for g in sorted(at_peak)
                  if self._evictable[g] and g not in current.evicted and g not in self._rejected}
        scored = sorted(scores, key=lambda g: (scores[g], self.joint.order[self.joint.group_members[g][0]]))
        # A group whose eviction left the peak where it was is not tried again while the peak
        # stays at the same op, unless nothing else can move it.
        at = (current.sim.peak_phase, current.sim.peak_node)
        fresh = [g for g in scored if self._idle.get(g) != at]
        best, detour = self._try(fresh, scored, current)
        if best is None and len(fresh) < len(scored):
            best, detour = self._try(scored, scored, current)
        if best is not None:
            self._note_walk(current, best)
            return best
        if detour is not None and self.detours_left > 0:
            # A step up that may open a way further down (recomputing one value can make the
            # next one cheap to recompute); the chain is cut back if it does not.
            self.detours_left -= 1
            self._rejected.difference_update(detour.move)
            return detour
        return None

    def _try(self, candidates: list[int], scored: list[int], current: PlanPoint
             ) -> tuple[PlanPoint | None, PlanPoint | None]:
        """Simulate the most promising moves of `candidates` (best first; `scored`: every
        candidate, for their twins). Returns the move that lowers the peak most per second of
        recompute, or, if none lowers it, the cheapest that keeps it (it frees saved bytes that
        a later move may turn into a lower peak); and the least-raising move, if none keeps
        the peak."""
        best: tuple[tuple, PlanPoint] | None = None
        detour: PlanPoint | None = None
        tried = 0
        for group in candidates:
            if tried >= self.width:
                break
            twins = (group,)
            if self.batch:
                twins = (group, *(g for g in scored if g != group
                                  and self._signature(g) == self._signature(group)))
            for move in self._moves(twins):
                point = self.evaluate(
                    current.evicted | self._with_unsaved_inputs(move, current), move)
                tried += 1
                lowered = current.peak_bytes - point.peak_bytes
                walk = self._walks.get(self._signature(group))
                stretch = 1 < len(move) < len(twins) and walk is not None
                if stretch and lowered != len(move) * walk[1]:
                    # Not the walk it stood for (each value lowering the peak as the last one
                    # did): one value now, half the stretch next time.
                    self._walks[self._signature(group)] = (len(move) // 2, walk[1])
                    continue
                if lowered < 0:
                    if detour is None or point.peak_bytes < detour.peak_bytes:
                        detour = point
                    continue
                extra = point.recompute_seconds - current.recompute_seconds
                if not lowered and len(move) == 1:
                    self._idle[group] = (current.sim.peak_phase, current.sim.peak_node)
                key = ((0, -lowered / max(extra, 1e-12)) if lowered else (1, extra))
                if best is None or key < best[0]:
                    best = (key, point)
                break
            else:
                # Raised the peak now; in a model of repeated layers its twins would too.
                self._rejected.update(twins)
        return (best[1] if best else None), detour

    def _moves(self, twins: tuple[int, ...]) -> list[tuple[int, ...]]:
        """The moves to try for a group and its twins (the group first): all of them at once,
        then, on a walk (`_note_walk`), the next stretch of it at once, then the group alone."""
        if len(twins) == 1:
            return [twins]
        moves = [twins]
        walk = self._walks.get(self._signature(twins[0]))
        if walk is not None and walk[0] > 1 and len(twins) > 2:
            moves.append(twins[:min(walk[0], len(twins) - 1)])
        moves.append(twins[:1])
        return moves

    def _note_walk(self, current: PlanPoint, chosen: PlanPoint) -> None:
        """Follow walks: on a model of repeated layers the chain often evicts one layer's copy
        of a value after another (each recomputed from the copy before it), every step
        lowering the peak by the same bytes. After two such steps the planner tries the next
        two copies at once, then four, doubling while each stretch lowers the peak by exactly
        as many steps' bytes; a stretch that does not is dropped (`_try`): that step takes one
        copy and the next tries half the stretch (two at the least, while the steps stay
        equal). So a walk over 32 layers takes a handful of simulations."""
        if not (self.batch and self.stretches and chosen.move):
            return
        signature = self._signature(chosen.move[0])
        lowered = current.peak_bytes - chosen.peak_bytes
        walk = self._walks.get(signature)
        if lowered <= 0:
            self._walks.pop(signature, None)
        elif len(chosen.move) == 1:
            self._walks[signature] = ((max(2, walk[0]) if walk and walk[1] == lowered else 1),
                                      lowered)
        elif walk is not None and lowered == len(chosen.move) * walk[1]:
            self._walks[signature] = (2 * len(chosen.move), walk[1])
        else:
            self._walks.pop(signature, None)

    def _with_unsaved_inputs(self, move: tuple[int, ...], current: PlanPoint) -> frozenset[int]:
        """The groups of `move` and of every input chain reaching them that the current plan
        does not save: evicting a value means recomputing it from what is saved already."""
        joint, saved = self.joint, current.saved
        groups = set(move)
        stack = [i for g in move for m in joint.group_members[g] for i in joint.inputs[m]]
        seen: set[fx.Node] = set()
        while stack:
            node = stack.pop()
            if node in seen or node not in joint.group_of or node in saved:
                continue
            seen.add(node)
            group = joint.group_of[node]
            if not self._evictable[group] or not joint.is_tensor(node):
                continue
            groups.add(group)
            stack.extend(joint.inputs[node])
        return frozenset(groups)

    def _seconds_per_byte(self, group: int, current: PlanPoint) -> float:
        """Estimated recompute seconds per byte freed by recomputing `group` from what the
        current plan saves."""
        recomputed = current.recomputed
        groups = self._with_unsaved_inputs((group,), current)
        seconds = sum(self.node_seconds[m] for g in groups for m in self.joint.group_members[g]
                      if m not in recomputed)
        return seconds / self.joint.group_bytes(group)

    def _signature(self, group: int) -> tuple:
        if group not in self._signatures:
            self._signatures[group] = tuple(
                (str(n.target), tuple(map(str, getattr(n.meta.get("val"), "shape", ()))),
                 str(getattr(n.meta.get("val"), "dtype", "")))
                for n in self.joint.group_members[group])
        return self._signatures[group]

    # -- choosing ------------------------------------------------------------------------------

    def for_budget(self, budget_bytes: int) -> PlanPoint:
        """The first plan of the chain with a peak of at most `budget_bytes`.

        Raises `MemoryBudgetError` (with the least peak the chain reaches) if there is none.
        """
        chain = self.extend_chain(stop_at_peak=budget_bytes)
        index = next((i for i, p in enumerate(chain) if p.peak_bytes <= budget_bytes), None)
        if index is None:
            least = min(p.peak_bytes for p in chain)
            raise MemoryBudgetError(
                budget_bytes, least,
                "the least peak of memcompile's plans for this graph, recomputing every value "
                "the backward reads that can be recomputed without raising the peak")
        point = chain[index]
        if index and len(point.move) > 1:
            # The batch that crossed the budget, one value at a time: the first prefix whose peak
            # fits (and is not below the batch's own, so lower budgets keep lower peaks).
            before = chain[index - 1].evicted
            for j in range(1, len(point.move)):
                prefix = self.evaluate(before | frozenset(point.move[:j]), point.move[:j])
                if point.peak_bytes <= prefix.peak_bytes <= budget_bytes:
                    return prefix
        return point

    def auto(self) -> PlanPoint:
        """The least peak among plans that recompute at most one forward's worth of time.

        When the chain's first plan past that time took several values at once (twins, or a
        stretch of a walk), the longest prefix of that move within the time is a candidate too:
        its recompute seconds come from the layout alone, so only that prefix is simulated."""
        chain = self.extend_chain(stop_above_seconds=self.forward_seconds)
        affordable = [p for p in chain if p.recompute_seconds <= self.forward_seconds]
        over = next((i for i, p in enumerate(chain)
                     if p.recompute_seconds > self.forward_seconds), len(chain))
        if 0 < over < len(chain) and len(chain[over].move) > 1:
            move = chain[over].move
            for j in range(len(move) - 1, 0, -1):
                evicted = self._prefix(chain, over, j)
                plan = layout(self.joint, evicted)
                if sum(self.node_seconds[n] for n in plan.recomputed) <= self.forward_seconds:
                    affordable.append(self.evaluate(evicted, move[:j]))
                    break
        return min(affordable or chain[:1], key=lambda p: p.peak_bytes)

    def _prefix(self, chain: list[PlanPoint], index: int, j: int) -> frozenset[int]:
        """What the plan before `chain[index]` evicts plus the first `j` groups of its move,
        with the inputs they need that the plan before does not save (as the move itself)."""
        before = chain[index - 1]
        return before.evicted | self._with_unsaved_inputs(chain[index].move[:j], before)


def resolve_budget(budget: Any, planner: RematPlanner) -> int | None:
    """Bytes of a numeric budget (a fraction of the save-everything peak, or bytes)."""
    if isinstance(budget, float):
        return int(budget * planner.save_all().peak_bytes)
    if isinstance(budget, int):
        return budget
    return None


def plan(joint: JointGraph, budget: Any, cost: CostModel, *, fusion: bool = False
         ) -> tuple[PlanPoint, RematSummary, RematPlanner]:
    """The plan for `budget` ("auto", None, a fraction or bytes), what the planner saw, and the
    planner (its chain, its per-node seconds). `fusion`: price on Inductor's buffers."""
    # Simulating a plan makes many short-lived containers and no cycles: the collector's
    # passes over the graph's objects would cost a quarter of the planner's time.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _plan(joint, budget, cost, fusion)
    finally:
        if collecting:
            gc.enable()


def _plan(joint: JointGraph, budget: Any, cost: CostModel, fusion: bool
          ) -> tuple[PlanPoint, RematSummary, RematPlanner]:
    start = time.perf_counter()
    planner = RematPlanner(joint, cost, fusion=fusion)
    budget_bytes = resolve_budget(budget, planner)
    if budget_bytes is not None:
        point = _for_budget(planner, budget, budget_bytes)
    elif budget == "auto":
        point = planner.auto()
    else:  # None: no budget, the least recompute
        point = planner.start()
    summary = RematSummary(
        budget=budget, budget_bytes=budget_bytes, save_all_peak=planner.save_all().peak_bytes,
        chosen_peak=point.peak_bytes,
        least_peak=planner.least_peak,
        recompute_seconds=point.recompute_seconds, forward_seconds=planner.forward_seconds,
        plans_simulated=planner.plans_simulated, seconds=time.perf_counter() - start,
        chain=[(p.peak_bytes, p.recompute_seconds) for p in planner.chain],
        priced_on="inductor" if fusion else "eager", cost=cost,
    )
    return point, summary, planner


def _for_budget(planner: RematPlanner, budget: Any, budget_bytes: int) -> PlanPoint:
    """`planner.for_budget`, its error naming a fractional budget as the fraction asked, the
    least reachable fraction and what to pass instead."""
    try:
        return planner.for_budget(budget_bytes)
    except MemoryBudgetError as e:
        if not isinstance(budget, float):
            raise
        raise MemoryBudgetError(
            e.budget_bytes, e.least_peak_bytes, budget=budget,
            reference_bytes=planner.save_all().peak_bytes) from None


def tag_plan(joint: JointGraph, point: PlanPoint, node_seconds: dict[fx.Node, float]) -> None:
    """Write the plan onto the joint graph: "save" or "recompute" on each forward value it
    concerns, and a decision per value, with its bytes and the reason."""
    gm = joint.gm
    for node in gm.graph.nodes:
        node.meta.pop(REMAT, None)
    counted: set[int] = set()
    for node in point.layout.saved:
        if node.op == "placeholder" or not joint.is_tensor(node):
            continue
        node.meta[REMAT] = "save"
        if not joint.bytes_of(node):
            continue  # a view of an input (a weight's transpose): saving it costs nothing
        fresh = [(k, b) for k, b in joint.storages[node] if k not in joint.external
                 and k not in counted]
        counted.update(k for k, _ in fresh)
        if node in joint.banned:
            reason = f"cannot be recomputed: {joint.banned[node]}"
        elif node in point.sim.live_at_peak:
            reason = "kept: live at the plan's peak, but recomputing it would raise the peak or "\
                     "cost more than the budget needs"
        else:
            reason = "kept: not live at the plan's peak, so recomputing it would not lower it"
        record_decision(gm, Decision(PASS_NAME, "saved", node.name, sum(b for _, b in fresh),
                                     reason))
    for node in point.layout.recomputed:
        node.meta[REMAT] = "recompute"
        seconds = node_seconds.get(node, 0.0)
        policy = node.meta.get("recompute")
        reason = (f"inside a torch.utils.checkpoint region ({policy.name})"
                  if node in joint.model_recompute
                  else "recomputed in the backward right before its first use")
        record_decision(gm, Decision(PASS_NAME, "recomputed", node.name, joint.bytes_of(node),
                                     f"{reason} (~{seconds * 1e6:.0f} us)"))
