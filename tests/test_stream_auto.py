"""`stream="auto"`, the default: a graph streams when its plan's estimated peak is at most
`AUTO_PEAK_RATIO` of the same estimate with every chunk the whole length
(`planning.stream_auto`), and takes the remat plan otherwise; the report states the decision and
its numbers, and no warning is given either way (the user asked for nothing).

The built-in Llama (float64, hidden 64, vocabulary 1,024): with the default chunk sizes (1,024
tokens per layer chunk) nothing chunks at 1,024 tokens, and at 4,096 the streamed estimate is
a third of the whole-length one.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from helpers import FLOAT64_TOL, clone_model, compile_memcompile, grad_errors, relative_error
from memcompile import MemcompileWarning
from memcompile.models import LlamaConfig, LlamaForCausalLM
from memcompile.planning.stream_auto import AUTO_PEAK_RATIO
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


def test_a_long_sequence_streams_by_default_exactly():
    record, (decision,) = _run(4096)
    assert record.kind == "stream"
    assert len(record.stream_plan.layers) == 2 and record.stream_plan.head is not None
    assert decision.startswith("stream 'auto': on: estimated peak ")
    streamed, whole = (int(x.replace(",", "")) for x in
                       decision.split("estimated peak ")[1].split(" bytes streamed, ")[0:1]
                       + [decision.split(" bytes streamed, ")[1].split(" with")[0]])
    assert streamed <= AUTO_PEAK_RATIO * whole


def test_where_no_chunk_is_shorter_than_the_length_the_remat_plan_runs():
    record, (decision,) = _run(1024)
    assert record.kind == "training"
    assert decision.startswith("stream 'auto': off:") and "(1.00x > 0.5x)" in decision


@pytest.mark.parametrize("budget", [None, 0.8])
def test_an_explicit_memory_budget_keeps_the_remat_plan_and_says_so(budget):
    record, (decision,) = _run(4096, memory_budget=budget)
    assert record.kind == "training"
    assert f"memory_budget={budget!r} asks for the remat plan" in decision
