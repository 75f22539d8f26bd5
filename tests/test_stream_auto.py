"""`stream="auto"`, the default: a graph streams when a region chunks and its plan's estimated
peak is at most `AUTO_PEAK_RATIO` of the peak the remat plan plans for it (`planning.stream_auto`),
and takes the remat plan otherwise; the report states the decision and its numbers, and no
warning is given either way (the user asked for nothing). The estimate counts the gradients the
streamed step holds: not those of a layer's own weights when `.grad` exists.

The built-in Llama (float64, hidden 64, vocabulary 1,024): with the default chunk sizes (1,024
tokens per layer chunk) nothing chunks at 1,024 tokens; at 4,096 the streamed estimate is well
under the remat plan's peak.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from helpers import FLOAT64_TOL, clone_model, compile_memcompile, grad_errors, relative_error
from memcompile import MemcompileWarning
from memcompile.backend import memcompile as memcompile_backend
from memcompile.models import LlamaConfig, LlamaForCausalLM
from memcompile.planning.stream_auto import AUTO_PEAK_RATIO, decide, streamed_gradient_bytes
from memcompile.report import recording

CONFIG = LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=176, num_layers=2,
                     num_heads=4, num_kv_heads=2)


def _run(length: int, **options):
    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG).double()
    reference = clone_model(model)
    step = compile_memcompile(lambda ids: model(input_ids=ids, labels=ids).loss,
                              runtime="eager", **options)
    ids = torch.randint(0, 1024, (1, length), generator=torch.Generator().manual_seed(0))
    with recording() as records, warnings.catch_warnings():
        warnings.simplefilter("error", MemcompileWarning)  # none under "auto"
        loss = step(ids)
    loss.backward()
    expected = reference(input_ids=ids, labels=ids).loss
    expected.backward()
    assert relative_error(loss, expected) < FLOAT64_TOL
    assert max(grad_errors(model, reference).values()) < FLOAT64_TOL
    (record,) = records
    decision = [text for _, text in record.notes if text.startswith("stream 'auto'")]
    return record, decision


def _numbers(decision: str) -> tuple[int, int]:
    """(streamed, remat) bytes from a decision note."""
    streamed = decision.split("estimated peak ")[1].split(" bytes streamed, ")[0]
    remat = decision.split(" bytes streamed, ")[1].split(" by ")[0]
    return int(streamed.replace(",", "")), int(remat.replace(",", ""))


def test_a_long_sequence_streams_by_default_exactly():
    record, (decision,) = _run(4096)
    assert record.kind == "stream"
    assert len(record.stream_plan.layers) == 2 and record.stream_plan.head is not None
    assert decision.startswith("stream 'auto': on: estimated peak ")
    assert "by the remat plan's planned peak" in decision
    streamed, remat = _numbers(decision)
    assert streamed <= AUTO_PEAK_RATIO * remat


def test_where_no_chunk_is_shorter_than_the_length_the_remat_plan_runs():
    record, (decision,) = _run(1024)
    assert record.kind == "training"
    assert decision.startswith("stream 'auto': off: every region fits in one chunk")


def test_the_decision_follows_the_remat_plans_peak():
    """The same plan against remat peaks just above and just below the streamed estimate over
    the ratio; the remat plan is not planned when nothing chunks."""
    record, _ = _run(4096)
    plan = record.stream_plan
    at_ratio = decide(plan, [], 0, lambda: 2**60).streamed / AUTO_PEAK_RATIO
    assert decide(plan, [], 0, lambda: int(at_ratio) + 1).on
    assert not decide(plan, [], 0, lambda: int(at_ratio) - 1).on

    def never() -> int:
        raise AssertionError("planned the remat plan with nothing to chunk")

    whole = dataclasses.replace(plan, regions=[dataclasses.replace(r, chunk_size=0)
                                               for r in plan.regions])
    assert not decide(whole, [], 0, never).chunked


def test_with_no_remat_plan_the_whole_length_estimate_stands_in():
    record, (decision,) = _run(4096, disable_passes=["plan_remat"])
    assert "recomputing each layer whole (no remat plan to weigh)" in decision


def test_only_gradients_the_streamed_step_holds_are_counted():
    """With no `.grad`, every weight's gradient (they accumulate into new `.grad`s); with `.grad`
    existing, only the largest of the weights outside a single layer (here the embedding and
    the head, 1,024 x 64 float64 each): a layer's own weights' are added in place."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG).double()
    seen = {}

    def backend(gm, inputs):
        seen["inputs"] = list(inputs)
        return memcompile_backend(gm, inputs, {"runtime": "eager"})

    ids = torch.randint(0, 1024, (1, 4096), generator=torch.Generator().manual_seed(0))
    with recording() as records:
        torch.compile(lambda ids: model(input_ids=ids, labels=ids).loss, backend=backend)(ids)
    (record,) = records
    plan, graph_inputs = record.stream_plan, seen["inputs"]
    placeholders = list(record.forward.graph.find_nodes(op="placeholder"))
    every = sum(p.numel() * 8 for p in model.parameters())
    assert streamed_gradient_bytes(plan, placeholders, graph_inputs) == every
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    assert streamed_gradient_bytes(plan, placeholders, graph_inputs) == 1024 * 64 * 8


@pytest.mark.parametrize("budget", [None, 0.8])
def test_an_explicit_memory_budget_keeps_the_remat_plan_and_says_so(budget):
    record, (decision,) = _run(4096, memory_budget=budget)
    assert record.kind == "training"
    assert f"memory_budget={budget!r} asks for the remat plan" in decision
