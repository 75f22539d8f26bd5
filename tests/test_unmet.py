"""A feature asked for that does not apply says so with a `MemcompileWarning` naming the graph and
the reason; "auto" choosing not to act is a note, never a warning. The stream steps are passes of
the stream pipeline, run by the runner: `passes`, `disable_passes`, `dump_dir`, timing and
`PassError` hold under stream as they do on the joint graph."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import memcompile
from memcompile.models import build_model, make_batch
from memcompile.passes.registry import PASSES, default_pipeline, graph_of
from memcompile.report import recording


def _compile_step(options: dict, *, model: str = "tiny", seq_len: int = 64):
    """Compile and run one training step of a built-in model; the records and the warnings."""
    net = build_model(model, dtype=torch.float64)
    batch = make_batch(model, seq_len=seq_len)
    torch._dynamo.reset()
    with recording() as records, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = torch.compile(lambda b: net(**b).loss, backend="memcompile", options=options)
        step(batch).backward()
    ours = [w for w in caught if issubclass(w.category, memcompile.MemcompileWarning)]
    return records, ours


def test_the_stream_steps_are_passes_of_the_stream_pipeline():
    stream = ["eager_attention", "causal_mask", "key_mask", "document_mask", "stream_plan"]
    assert default_pipeline("eager", graph="stream") == stream
    assert all(graph_of(n) == "stream" for n in stream)
    assert "stream_plan" not in default_pipeline("eager")  # the joint graph's pipeline


def test_a_streamed_step_runs_its_passes_through_the_runner_with_dumps(tmp_path):
    records, caught = _compile_step({"runtime": "eager", "stream": True,
                                     "dump_dir": str(tmp_path)})
    (record,) = records
    assert record.kind == "stream" and not caught
    assert [p.name for p in record.passes] == ["eager_attention", "causal_mask", "key_mask",
                                               "document_mask", "stream_plan"]
    assert all(p.seconds > 0 for p in record.passes)
    files = set(os.listdir(tmp_path / record.name))
    assert {"04_stream_plan_before.py", "04_stream_plan_after.py", "forward.py",
            "decisions.tsv"} <= files
    assert "backward.py" not in files  # the stream runtime runs the plan, not a backward graph
    rows = (tmp_path / record.name / "decisions.tsv").read_text().splitlines()[1:]
    assert len(rows) == len(record.decisions) and any("\tchunked\t" in r for r in rows)


def test_disabling_the_stream_plan_warns_and_runs_the_joint_pipeline():
    records, caught = _compile_step({"runtime": "eager", "stream": True,
                                     "disable_passes": ["stream_plan"]})
    (record,) = records
    assert record.kind == "training"
    assert [p.name for p in record.passes] == ["eager_attention", "causal_mask", "key_mask",
                                               "document_mask", "remove_noops", "plan_remat"]
    (warning,) = caught
    text = str(warning.message)
    assert record.name in text and "stream (StreamBP) not applied" in text
    assert "the stream_plan pass is not in the pipeline" in text
    assert "<lambda>" in text and "compile 0/0" in text  # where Dynamo captured it
    assert record.unmet == [("stream_plan", "the stream_plan pass is not in the pipeline "
                             "(options 'passes'/'disable_passes')")]


def test_a_named_pipeline_holds_under_stream():
    """`passes` lists passes of both graphs; each pipeline runs its own, in the order given."""
    records, caught = _compile_step({"runtime": "eager", "stream": True,
                                     "passes": ["stream_plan", "remove_noops"]})
    (record,) = records
    assert record.kind == "stream" and not caught
    assert [p.name for p in record.passes] == ["stream_plan"]


def test_a_stream_pass_that_raises_is_named_with_the_passes_before_it(monkeypatch, tmp_path):
    def broken(gm, example_inputs, *, options=None):
        raise RuntimeError("boom")

    monkeypatch.setitem(PASSES, "stream_plan", broken)
    with pytest.raises(Exception) as raised:
        _compile_step({"runtime": "eager", "stream": True, "dump_dir": str(tmp_path)})
    text = str(raised.value)
    assert "pass 'stream_plan' failed with RuntimeError: boom" in text
    assert ("passes run before it: eager_attention, causal_mask, key_mask, document_mask"
            in text)
    assert any(name.endswith("stream_plan_failed_on.py")
               for _, _, names in os.walk(tmp_path) for name in names)


def test_stream_on_a_graph_with_nothing_to_chunk_warns_with_the_reason():
    """An MLP over a batch of vectors has no sequence: stream=True cannot apply."""
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    torch._dynamo.reset()
    step = torch.compile(lambda x: net(x).sum(), backend="memcompile",
                         options={"runtime": "eager", "stream": True})
    with pytest.warns(memcompile.MemcompileWarning,
                      match="stream \\(StreamBP\\) not applied: no integer \\(batch, length\\) "
                            "input: no sequence to chunk"):
        step(torch.randn(4, 8)).backward()


def test_a_numeric_budget_with_its_planner_disabled_warns():
    records, caught = _compile_step({"runtime": "eager", "memory_budget": 0.5,
                                     "disable_passes": ["plan_remat"]})
    (warning,) = caught
    assert "memory_budget not applied: memory_budget=0.5: the plan_remat pass is not in the " \
           "pipeline" in str(warning.message)


def test_auto_leaves_notes_not_warnings():
    records, caught = _compile_step({"runtime": "eager"})  # stream "auto", budget "auto"
    assert not caught
    (record,) = records
    assert any(name == "stream_plan" and text.startswith("stream 'auto': off: ")
               for name, text in record.notes), record.notes


def test_explain_shows_what_did_not_apply():
    net = build_model("tiny", dtype=torch.float64)
    batch = make_batch("tiny", seq_len=64)
    torch._dynamo.reset()
    with pytest.warns(memcompile.MemcompileWarning):
        report = memcompile.explain(lambda b: net(**b).loss, batch, measure=False,
                                    options={"runtime": "eager", "stream": True,
                                             "disable_passes": ["stream_plan"]})
    assert "WARNING stream (StreamBP) not applied: the stream_plan pass is not in the " \
           "pipeline" in str(report)
