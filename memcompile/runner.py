"""The pass runner: runs named passes in order and owns everything that cuts across them.

Passes only transform graphs. The runner times each one, logs its op-count diff, writes the graph
before and after it to `dump_dir`, checks that it returned a GraphModule, and, when one raises,
names it and the passes that ran before it and leaves the failing graph on disk.
"""

from __future__ import annotations

import collections
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from memcompile.config import Options
from memcompile.errors import MemoryBudgetError, PassError
from memcompile.meta import NOTES
from memcompile.passes.registry import active_options, get_pass, resolve_pipeline

log = logging.getLogger(__name__)


@dataclass
class PassRecord:
    """What one pass did to one graph: its time, its op-count diff, and the code around it."""

    name: str
    seconds: float
    op_diff: dict[str, int]
    code_before: str
    code_after: str
    notes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        """Whether the pass changed the graph's code."""
        return self.code_before != self.code_after


def op_counts(gm: fx.GraphModule) -> collections.Counter[str]:
    """How many nodes call each op (placeholders and outputs left out)."""
    return collections.Counter(
        str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_module")
    )


def op_diff(before: collections.Counter[str], after: collections.Counter[str]) -> dict[str, int]:
    """Per-op change in count, only the ops whose count changed."""
    return {op: after[op] - before[op] for op in sorted(set(before) | set(after))
            if after[op] != before[op]}


def run_passes(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    options: Options,
    graph_name: str,
    graph: str = "joint",
) -> tuple[fx.GraphModule, list[PassRecord]]:
    """Run the pipeline the options name for `graph` ("capture", "joint" or "stream", see
    `passes.registry`) on `gm`; return the result and one record per pass."""
    names = resolve_pipeline(options.passes, options.disable_passes, options.runtime, graph,
                             active_options(options))
    log.info("%s: running passes %s", graph_name, names or "(none)")
    records: list[PassRecord] = []
    for index, name in enumerate(names):
        before_code, before_ops = gm.code, op_counts(gm)
        notes_before = len(gm.meta.get(NOTES, []))
        start = time.perf_counter()
        try:
            result = get_pass(name)(gm, example_inputs, options=options)
            if not isinstance(result, fx.GraphModule):
                raise TypeError(f"returned {type(result).__name__}, not a GraphModule")
        except MemoryBudgetError:
            raise  # the user's budget, not a broken pass: the error says what is reachable
        except Exception as e:
            path = _dump_failure(gm, options.dump_dir, graph_name, index, name)
            raise PassError(name, names[:index], path, e) from e
        seconds = time.perf_counter() - start
        gm = result
        diff = op_diff(before_ops, op_counts(gm))
        notes = [text for pass_name, text in gm.meta.get(NOTES, [])[notes_before:]]
        records.append(PassRecord(name, seconds, diff, before_code, gm.code, notes))
        log.info("%s: pass %s took %.3f s, op diff %s", graph_name, name, seconds, diff or "{}")
        for text in notes:
            log.info("%s: pass %s: %s", graph_name, name, text)
        if options.dump_dir:
            _dump(options.dump_dir, graph_name, f"{index:02d}_{name}_before.py", before_code)
            _dump(options.dump_dir, graph_name, f"{index:02d}_{name}_after.py", gm.code)
    return gm, records


def _dump(dump_dir: str, graph_name: str, filename: str, text: str) -> str:
    folder = os.path.join(dump_dir, graph_name)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, filename)
    with open(path, "w") as f:
        f.write(text)
    return path


def _dump_failure(
    gm: fx.GraphModule, dump_dir: str | None, graph_name: str, index: int, name: str
) -> str | None:
    # The failing graph is the user's best clue; write it even without a dump_dir, and never
    # let a failure to write it hide the pass's own error.
    try:
        folder = dump_dir or tempfile.mkdtemp(prefix="memcompile_failure_")
        return _dump(folder, graph_name, f"{index:02d}_{name}_failed_on.py", gm.code)
    except OSError:
        log.warning("could not write the graph pass %s failed on", name, exc_info=True)
        return None
