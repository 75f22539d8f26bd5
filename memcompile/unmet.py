"""What the user asked for that did not apply: said loudly, as a `MemcompileWarning`.

An explicit request (`stream=True` or a dict, a numeric `memory_budget`, fused optimizer updates)
that leaves a graph unchanged warns once per graph, naming the graph (memcompile's name, the
function Dynamo captured, its compile id) and the reason; the report keeps the same text among
its notes. An "auto" option that chooses not to act is only a note.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
import torch.fx as fx

from memcompile.errors import MemcompileWarning
from memcompile.meta import FEATURES
from memcompile.report import GraphRecord


def origin(gm: fx.GraphModule) -> str:
    """Where a Dynamo graph comes from: the captured function, its file and line, and Dynamo's
    compile id ("frame/recompile"), as far as torch tells."""
    compile_id = gm.meta.get("dynamo_compile_id")
    context = torch._guards.TracingContext.try_get()
    codes = getattr(context, "traced_code", None) or []
    where = (f"{codes[0].co_name} at {codes[0].co_filename}:{codes[0].co_firstlineno}"
             if codes else "")
    parts = [p for p in (where, f"compile {compile_id}" if compile_id is not None else "") if p]
    return ", ".join(parts)


def warn_unmet(record: GraphRecord, items: Iterable[tuple[str, str]]) -> None:
    """Warn, once per item, that a feature asked for did not apply to `record`'s graph."""
    for pass_name, reason in items:
        if (pass_name, reason) in record.unmet:
            continue
        record.unmet.append((pass_name, reason))
        label = f"{record.name} ({record.origin})" if record.origin else record.name
        feature = FEATURES.get(pass_name, pass_name)
        warnings.warn(f"memcompile {label}: {feature} not applied: {reason}",
                      MemcompileWarning, stacklevel=2)
