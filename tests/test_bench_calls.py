"""`memcompile bench` reports the calls of a step beside peak and time (issue 18, point 4)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from memcompile.bench import worker
from memcompile.bench.results import render_markdown, render_table

MIB = 2**20


def _row(mode: str, seq_len: int, calls: int | None) -> dict:
    row = {"mode": mode, "seq_len": seq_len, "tokens": seq_len, "ok": True, "error": None,
           "peak_bytes": 100 * MIB, "baseline_bytes": MIB, "param_bytes": MIB, "seconds": 1.0,
           "first_step_seconds": 2.0, "method": "allocator", "device": "cpu"}
    return row if calls is None else {**row, "calls": calls}


def test_calls_at_the_longest_length_and_their_ratio_to_checkpointing():
    rows = [_row("checkpoint", 32, 900), _row("checkpoint", 64, 1_000),
            _row("stream", 32, 3_000), _row("stream", 64, 6_300)]
    lines = render_table(rows).splitlines()
    assert lines[0].endswith("| calls @64 | calls / checkpoint |")
    assert lines[2].endswith("| 1,000 | 1.00 |") and lines[3].endswith("| 6,300 | 6.30 |")
    text = render_markdown({"rows": rows, "command": "memcompile bench", "model": "tiny",
                            "dtype": "float32", "batch_size": 1, "date": "today",
                            "repeat": 1, "seq_lens": [32, 64], "modes": ["checkpoint", "stream"]})
    assert "Calls: of one more step" in text


def test_rows_without_calls_keep_the_old_table():
    """Results written before calls were counted render as they did."""
    lines = render_table([_row("checkpoint", 32, None), _row("checkpoint", 64, None)])
    assert "calls" not in lines.splitlines()[0]


def test_the_worker_counts_aten_events_and_inductor_kernels(monkeypatch):
    """The worker's row: eager, aten events alone; a step through Inductor (a small compiled
    function standing in for the model, so the test compiles in seconds) also counts the
    generated kernels, which the worker makes visible (`kernel_profile`) while it compiles."""
    spec = {"model": {"kind": "preset", "name": "tiny"}, "seq_len": 32, "batch_size": 1,
            "dtype": "float32", "device": "cpu", "repeat": 1, "options": {}}
    eager = worker.run_worker({**spec, "mode": "eager"})
    assert eager["kernel_calls"] == 0 and eager["calls"] == eager["aten_calls"] > 0

    weight = torch.nn.Parameter(torch.ones(8))
    torch._dynamo.reset()
    loss = torch.compile(lambda x: ((x * weight).relu() + 1).sum())
    monkeypatch.setattr(worker, "_wrap", lambda model, mode, options: (
        lambda **batch: SimpleNamespace(loss=loss(torch.ones(8)))))
    compiled = worker.run_worker({**spec, "mode": "inductor"})
    assert compiled["kernel_calls"] > 0
    assert compiled["calls"] == compiled["aten_calls"] + compiled["kernel_calls"]
