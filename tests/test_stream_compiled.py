"""Compiled chunk bodies (`runtime.stream_compiled`): under the default runtime, a stream
region's token-local ops run as Inductor-compiled segments shared across chunks, layers and
lengths; exact in float64 against eager; the eager runtime keeps the Python loop; a segment that
fails to compile runs in Python; the allocator's peak stays that of the loop.
"""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import FLOAT64_TOL, clone_inputs, clone_model, worst_error

import memcompile
from memcompile.models import LlamaConfig, LlamaForCausalLM
from memcompile.runtime import stream_compiled
from memcompile.runtime.stream_compiled import STATS

TINY = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_layers=2,
                   num_heads=4, num_kv_heads=2)


def _model(layers: int = 2, dtype: torch.dtype = torch.float64,
           config: LlamaConfig = TINY) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(**{**config.__dict__, "num_layers": layers})
    return LlamaForCausalLM(config).to(dtype)


def _batch(batch_size: int, length: int, vocab: int = TINY.vocab_size) -> dict:
    ids = torch.randint(0, vocab, (batch_size, length),
                        generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :5] = -100  # chunks start on ignored labels
    return {"input_ids": ids, "labels": labels}


def _compiled_step(model, options: dict):
    """A step function streamed under `options`; its loss is returned, gradients in `.grad`."""
    loss = torch.compile(lambda b: model(**b).loss, backend="memcompile", options=options)

    def step(batch):
        value = loss(batch)
        value.backward()
        return value.detach()

    return step


@pytest.mark.parametrize("batch_size,length,chunk,logits_chunk,keys_values", [
    (2, 17, 5, 6, "once"),       # a shorter last chunk, batch merged with the sequence
    (1, 16, 4, 4, "per_chunk"),  # keys and values from the sequence's start, per chunk
])
def test_compiled_bodies_are_exact_in_float64(batch_size, length, chunk, logits_chunk,
                                              keys_values):
    torch._dynamo.reset()
    STATS.reset()
    model = _model()
    ref = clone_model(model)
    batch = _batch(batch_size, length)
    options = {"stream": {"chunk_size": chunk, "logits_chunk_size": logits_chunk,
                          "keys_values": keys_values}}
    loss = _compiled_step(model, options)(clone_inputs(batch))
    ref_loss = ref(**clone_inputs(batch)).loss
    ref_loss.backward()
    err, where = worst_error(loss, ref_loss.detach(), model, ref)
    assert err <= FLOAT64_TOL, f"worst relative error {err:.3e} at {where}"
    assert STATS.calls > 0 and STATS.fallbacks == 0, STATS


def test_the_eager_runtime_keeps_the_python_loop():
    torch._dynamo.reset()
    STATS.reset()
    model = _model()
    _compiled_step(model, {"runtime": "eager", "stream": {"chunk_size": 5}})(_batch(1, 17))
    assert STATS.calls == 0 and STATS.graphs == 0


def test_segments_compile_once_across_chunks_layers_and_lengths():
    """A 2-layer model compiles each kind of segment once per autograd mode (the forward's
    chunks run without autograd, the backward's with it); a 4-layer model of the same shapes
    and a second length with the same chunk size compile nothing more: the layers, chunks and
    lengths share the compiled segments."""
    torch._dynamo.reset()
    stream_compiled.clear_cache()
    STATS.reset()
    options = {"stream": {"chunk_size": 4, "logits_chunk_size": 4}}
    _compiled_step(_model(layers=2), options)(_batch(2, 16))
    kinds, graphs, calls = STATS.kinds, STATS.graphs, STATS.calls
    assert STATS.fallbacks == 0, STATS.failures
    # Layers: the keys' and values' pass, the queries' part before attention, the part after
    # it (the last layer's holds the final norm: one more kind); the head before its loss.
    assert kinds == 5, STATS
    assert kinds <= graphs <= 2 * kinds, STATS
    assert calls > 4 * graphs  # every chunk of every layer ran a compiled segment
    _compiled_step(_model(layers=4), options)(_batch(2, 16))
    assert (STATS.kinds, STATS.graphs) == (kinds, graphs), STATS
    assert STATS.hits > 0
    _compiled_step(_model(layers=4), options)(_batch(2, 24))
    assert (STATS.kinds, STATS.graphs) == (kinds, graphs), STATS


def test_a_segment_that_fails_to_compile_runs_in_python(monkeypatch, caplog):
    """Inductor failing (here: made to) leaves the step exact: the segment runs its nodes in
    Python, after one warning naming the cause."""
    def broken(gm, example_inputs):
        raise RuntimeError("no compiler today")

    monkeypatch.setattr(stream_compiled, "_counted_inductor", broken)
    torch._dynamo.reset()
    stream_compiled.clear_cache()
    STATS.reset()
    model = _model()
    ref = clone_model(model)
    batch = _batch(2, 17)
    with caplog.at_level(logging.WARNING, logger=stream_compiled.__name__):
        loss = _compiled_step(model, {"stream": {"chunk_size": 5}})(clone_inputs(batch))
    stream_compiled.clear_cache()  # the callables hold the broken backend
    ref_loss = ref(**clone_inputs(batch)).loss
    ref_loss.backward()
    err, where = worst_error(loss, ref_loss.detach(), model, ref)
    assert err <= FLOAT64_TOL, f"worst relative error {err:.3e} at {where}"
    assert STATS.calls == 0 and STATS.fallbacks == STATS.kinds > 0
    assert "no compiler today" in caplog.text


def test_compiled_bodies_do_not_raise_the_allocator_peak():
    """The allocator's peak of a float32 streamed step with compiled bodies against the Python
    loop's, same chunks: Inductor frees a segment's intermediates itself, and a segment's
    outputs are only what later steps read."""
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=704, num_layers=2,
                         num_heads=4, num_kv_heads=2)
    batch = _batch(1, 1024, vocab=512)
    peaks = {}
    for runtime in ("eager", "inductor"):
        torch._dynamo.reset()
        model = _model(dtype=torch.float32, config=config)
        step = _compiled_step(model, {"runtime": runtime,
                                      "stream": {"chunk_size": 256, "logits_chunk_size": 256}})

        def once(step=step, model=model):
            step(batch)
            model.zero_grad(set_to_none=True)

        once()  # compiles
        peaks[runtime] = memcompile.measure(once, warmup=0, repeat=1,
                                            method="allocator").peak_bytes
    assert peaks["inductor"] <= 1.05 * peaks["eager"], peaks
