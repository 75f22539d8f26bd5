"""StreamBP on a sequence-parallel shard (`stream=True` with `sequence_parallel`), on spawned
gloo ranks.

Each rank streams its shard (`shard_batch`): a layer's chunks attend over the keys of every rank
(gathered once per layer pass, their gradients returned to their owners) and the weights'
gradients are summed over the ranks by the streamed step. The ranks' losses summed
(`global_loss`) and every parameter's gradient on every rank equal single-process eager on the
whole batch to FLOAT64_TOL (docs/design.md's float64 rule) for the built-in model, with the
layers streamed on every rank. Chunks of 3 tokens cut a zigzag shard's pieces of 4 (a chunk
across two pieces far apart in the sequence), chunks of 4 do not.

transformers' Llama is held to the float32 rule instead, as every streamed transformers model
is (tests/test_stream_models.py): its RMSNorm computes in float32 whatever the model's dtype,
and a streamed layer backpropagates its keys' and values' gradients through that norm apart
from its queries' (keys and values computed once), which rounds differently from eager (4.6e-8
on one device, without sequence parallelism). The built-in model's norm computes in its own
dtype: float64 throughout.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from dist_ranks import RankPool
from helpers import float32_tolerance, relative_error
from test_sequence_parallel import _assert_exact, _batch, _reference_loss, _sp_options

from memcompile.config import Options
from memcompile.distributed import (count_bytes, global_loss, shard_batch, shard_loss,
                                    shard_sequence)
from memcompile.distributed.schedule import chunk_count, sent_chunks
from memcompile.errors import OptionsError
from memcompile.models import build_hf_model, build_model
from memcompile.models.llama import resolve_config
from memcompile.optim import lowrank
from memcompile.report import recording


def _tiny(layers: int):
    """The built-in tiny Llama with `layers` layers."""
    return dataclasses.replace(resolve_config("tiny"), num_layers=layers)


def _builtin_reference(batch, layers=2):
    model = build_model(_tiny(layers), dtype=torch.float64)
    loss = model(batch["input_ids"], labels=batch["labels"]).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _hf_eager(batch, dtype):
    """Single-process eager on the whole batch: its loss and gradients. The float32 model the
    ranks build, cast (initialized in float64, its weights would differ)."""
    model = build_hf_model("llama", dtype=torch.float32).to(dtype)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                use_cache=False)
    loss = _reference_loss(out.logits, batch["labels"])
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _worst(loss, grads, ref_loss, ref_grads):
    errors = {"loss": relative_error(loss, ref_loss)}
    errors.update({n: relative_error(g, ref_grads[n]) for n, g in grads.items()})
    worst = max(errors, key=errors.__getitem__)
    return errors[worst], worst


def _stream_notes(records):
    """What each rank's records say about streaming: kinds, chunked decisions, notes."""
    return {"kinds": [r.kind for r in records],
            "chunked": [d.reason for r in records for d in r.decisions if d.kind == "chunked"],
            "notes": [text for r in records for _, text in r.notes]}


def _builtin_stream_job(batch, options, layout, layers=2):
    """One streamed step of the built-in model on this rank's shard."""
    torch._dynamo.reset()
    model = build_model(_tiny(layers), dtype=torch.float64)
    shard = shard_batch(batch["input_ids"], batch["labels"], layout=layout)

    def step(ids, positions, targets, count):
        return shard_loss(model(ids, position_ids=positions).logits, targets, count)

    compiled = torch.compile(step, backend="memcompile", options=_sp_options(options, layout))
    count = torch.tensor(float(shard.num_tokens), dtype=torch.float64)
    with recording() as records, count_bytes() as sent:
        loss = compiled(shard.input_ids, shard.position_ids, shard.shift_labels, count)
        loss.backward()
    return {"loss": global_loss(loss), "grads": {n: p.grad for n, p in model.named_parameters()},
            "sent": (sent.forward, sent.backward), **_stream_notes(records)}


def _hf_stream_job(batch, options, layout):
    """One streamed float32 step of a transformers Llama (4 query heads over 2 key/value heads)
    with its padding mask on this rank's shard (the mask cut as the ids are: `shard_batch`
    takes right padding only, and a hole in the middle tests the keys' mask harder)."""
    torch._dynamo.reset()
    model = build_hf_model("llama", dtype=torch.float32)
    shard = shard_batch(batch["input_ids"], batch["labels"], layout=layout)
    mask = shard_sequence(batch["attention_mask"], 1, layout=layout)
    compiled = torch.compile(model, backend="memcompile", options=_sp_options(options, layout))
    count = torch.tensor(shard.num_tokens)
    with recording() as records:
        out = compiled(input_ids=shard.input_ids, position_ids=shard.position_ids,
                       attention_mask=mask, use_cache=False)
        loss = shard_loss(out.logits, shard.shift_labels, count)
        loss.backward()
    return {"loss": global_loss(loss), "grads": {n: p.grad for n, p in model.named_parameters()},
            **_stream_notes(records)}


def _fused_job(batch):
    """A streamed step whose projected weights step inside the backward: refused."""
    torch._dynamo.reset()
    model = build_model(_tiny(2), dtype=torch.float64)
    lowrank(torch.optim.AdamW(model.parameters()), model=model, rank=8, fused_backward=True)
    shard = shard_batch(batch["input_ids"], batch["labels"])

    def step(ids, positions, targets, count):
        return shard_loss(model(ids, position_ids=positions).logits, targets, count)

    compiled = torch.compile(step, backend="memcompile",
                             options=_sp_options({"runtime": "eager", "stream": True}, "zigzag"))
    try:
        compiled(shard.input_ids, shard.position_ids, shard.shift_labels,
                 torch.tensor(float(shard.num_tokens), dtype=torch.float64))
    except Exception as error:  # Dynamo wraps the backend's error
        return str(error)
    return None


def _assert_streamed(results, layers):
    """Every layer streamed on every rank (the head too when `layers` counts it)."""
    for rank, result in enumerate(results):
        assert result["kinds"] == ["stream"], (rank, result["kinds"], result["notes"])
        layer_decisions = [d for d in result["chunked"] if d.startswith("layer")]
        assert len(layer_decisions) == layers, (rank, result["chunked"])
        assert any("attend across 2 ranks" in note for note in result["notes"]), rank


@pytest.fixture(scope="module")
def ranks():
    pool = RankPool(2)
    yield pool
    pool.close()


@pytest.mark.parametrize("layout,chunk", [("zigzag", 3), ("zigzag", 4), ("contiguous", 3)])
def test_builtin_model_streams_its_shard_exactly(ranks, layout, chunk):
    batch = _batch(256)
    options = {"runtime": "eager", "stream": {"chunk_size": chunk, "logits_chunk_size": 3}}
    results = ranks.run(_builtin_stream_job, batch, options, layout, timeout=120)
    _assert_exact(results, *_builtin_reference(batch))
    _assert_streamed(results, layers=2)
    config = _tiny(2)
    piece = batch["input_ids"].shape[1] // chunk_count(layout, 2)
    # Keys and values (2 key/value heads of 16) of one piece of 2 rows, in float64.
    unit = 2 * 2 * config.num_kv_heads * piece * (config.hidden_size // config.num_heads) * 8
    for rank, result in enumerate(results):
        assert any(d.startswith("head") for d in result["chunked"])
        # Each layer pass sends the pieces the peer's queries see (the forward's, the
        # backward's again); the backward returns the gradients of the pieces received.
        sends, gets = sent_chunks(layout, 2, rank, 1 - rank), sent_chunks(layout, 2, 1 - rank, rank)
        assert result["sent"] == (2 * sends * unit, 2 * (sends + gets) * unit), rank


def test_builtin_model_under_a_memory_budget_recomputes_layers_exactly(ranks):
    """A numeric budget under stream decides how many layer inputs are held: with 4 layers
    and 0.99 of the estimate for holding all (at 32 tokens per rank the weights' gradients
    dominate it), fewer are held and the backward re-runs layer
    forwards, each gathering its keys and values again, on every rank alike."""
    batch = _batch(256, length=64)
    options = {"runtime": "eager", "stream": {"chunk_size": 8}, "memory_budget": 0.99}
    results = ranks.run(_builtin_stream_job, batch, options, "zigzag", 4, timeout=180)
    _assert_exact(results, *_builtin_reference(batch, layers=4))
    _assert_streamed(results, layers=4)
    for result in results:
        (held,) = [n for n in result["notes"] if n.startswith("layer inputs:")]
        assert "held at once; the backward recomputes 0 " not in held, held
        assert "memory_budget 0.99" in held, held


@pytest.mark.parametrize("holes", ["right", "middle"])
def test_hugging_face_llama_with_padding_streams_its_shard(ranks, holes):
    """Right padding (row 0), or keys hidden in the middle of row 1 that later queries, on both
    ranks, must not see; float32 rule against float64 eager (see the module's docstring)."""
    batch = _batch(256)
    if holes == "middle":
        batch["attention_mask"][1, 5:9] = 0
        batch["labels"][1, 5:9] = -100
    results = ranks.run(_hf_stream_job, batch, {"runtime": "eager", "stream": {"chunk_size": 3}},
                        "zigzag", timeout=180)
    ref_loss, ref_grads = _hf_eager(batch, torch.float64)
    eager_err, _ = _worst(*_hf_eager(batch, torch.float32), ref_loss, ref_grads)
    for rank, result in enumerate(results):
        err, where = _worst(result["loss"], result["grads"], ref_loss, ref_grads)
        assert err <= float32_tolerance(eager_err), (
            f"rank {rank}: {err:.3e} at {where}; eager float32's {eager_err:.3e}")
    _assert_streamed(results, layers=2)


def test_unsupported_stream_combinations_are_refused():
    with pytest.raises(OptionsError, match="stream.keys_values.*computed once"):
        Options(sequence_parallel=True, stream={"keys_values": "per_chunk"})
    with pytest.raises(OptionsError, match="stream.dim.*along the sequence"):
        Options(sequence_parallel=True, stream={"dim": "batch"})
    assert Options(sequence_parallel=True, stream=True).stream is True
    assert Options(sequence_parallel=True, stream={"chunk_size": 8}).stream.chunk_size == 8


def test_fused_updates_in_the_streamed_backward_are_refused_on_every_rank(ranks):
    for message in ranks.run(_fused_job, _batch(256), timeout=120):
        assert message is not None and "fused_backward=True" in message, message
        assert "valid: fused_backward=False" in message


@pytest.mark.slow
def test_default_runtime_streams_its_shard_exactly(ranks):
    """The default runtime (Inductor): chunk bodies compiled, the attention over every rank's
    keys run by the stream runtime between them. Minutes of compiling on 2 shared cores."""
    batch = _batch(256)
    results = ranks.run(_builtin_stream_job, batch, {"stream": {"chunk_size": 3}}, "zigzag",
                        timeout=600)
    _assert_exact(results, *_builtin_reference(batch))
    _assert_streamed(results, layers=2)
