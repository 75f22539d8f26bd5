"""StreamBP on Hugging Face models as users configure them: default configs, sizes changed only.

A default config keeps `use_cache=True`: in training mode the model builds a fresh KV cache and
concatenates each layer's new keys and values onto its empty tensors. That concatenation joins
nothing, so every layer still streams; gradients are held to the float32 rule, as the other
Hugging Face models in `test_stream.py` (their RMSNorm computes in float32 whatever the dtype).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_float32_rule, clone_inputs, clone_model
from torch.fx.experimental.proxy_tensor import make_fx

import memcompile
from memcompile.analysis.sequence import SeqDim, analyze_sequence
from memcompile.models import build_hf_model
from memcompile.report import recording

aten = torch.ops.aten

VOCAB = 256


def test_concatenating_onto_an_empty_tensor_keeps_the_sequence():
    """ids (1, 8) -> x (1, 8, 4); cat([empty (1, 0, 4), x], 1) is x itself (a fresh cache),
    cat([x, x], 1) joins two sequences (unknown to the analysis)."""
    def f(ids, emb):
        x = F.embedding(ids, emb)
        fresh = torch.cat([torch.zeros(1, 0, 4), x], 1)
        joined = torch.cat([x, x], 1)
        return fresh.sum() + joined.sum()

    gm = make_fx(f, tracing_mode="fake")(torch.zeros(1, 8, dtype=torch.long), torch.randn(10, 4))
    info = analyze_sequence(gm.graph)
    fresh, joined = [n for n in gm.graph.nodes if n.target is aten.cat.default]
    assert info.effects[fresh] == "local" and info.dim_of(fresh) == SeqDim(1)
    assert info.effects[joined] == "unknown"
    assert info.unknown_reason[joined] == "concatenates along the sequence"


def test_stack_and_topk_are_token_local_away_from_the_sequence():
    """ids (1, 8) -> x (1, 8, 4); stack([x, x], -1) -> (1, 8, 4, 2) keeps the sequence in dim 1
    (interleaved rotary embeddings); topk over the hidden size is per token (expert routing);
    topk over the sequence is not."""
    def f(ids, emb):
        x = F.embedding(ids, emb)
        pairs = torch.stack([x, x], -1)
        values, _ = x.topk(2, dim=-1)
        over_tokens, _ = x.topk(2, dim=1)
        return pairs.sum() + values.sum() + over_tokens.sum()

    gm = make_fx(f, tracing_mode="fake")(torch.zeros(1, 8, dtype=torch.long), torch.randn(10, 4))
    info = analyze_sequence(gm.graph)
    stack = next(n for n in gm.graph.nodes if n.target is aten.stack.default)
    per_token, over_tokens = [n for n in gm.graph.nodes if n.target is aten.topk.default]
    assert info.effects[stack] == "local" and info.dim_of(stack) == SeqDim(1)
    assert info.effects[per_token] == "local"
    assert info.effects[over_tokens] == "unknown"


def _batch(padding: str | None, length: int = 14) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (2, length), generator=gen)
    batch = {"input_ids": ids, "labels": ids.clone()}
    if padding == "left":
        mask = torch.ones_like(ids)
        mask[0, :4] = 0
        batch["attention_mask"] = mask
        batch["labels"] = ids.masked_fill(mask == 0, -100)
    return batch


def _loss(model, batch):
    return model(**batch).loss


def _streamed_step(model, batch, stream: dict):
    """One compiled step under `stream` on the eager runtime, backpropagated; no
    MemcompileWarning may fire. Its loss and its graph's record."""
    torch._dynamo.reset()
    step = torch.compile(lambda b: _loss(model, b), backend="memcompile",
                         options={"runtime": "eager", "stream": stream})
    with recording() as records, warnings.catch_warnings():
        warnings.simplefilter("error", memcompile.MemcompileWarning)
        loss = step(clone_inputs(batch))
    loss.backward()
    (record,) = records
    return loss, record


@pytest.mark.parametrize("arch,padding", [("llama", None), ("qwen2", "left")])
def test_a_default_config_with_its_cache_on_streams_every_layer(arch, padding):
    eager32 = build_hf_model(arch, dtype=torch.float32, seed=0, use_cache=True)
    assert eager32.config.use_cache
    ref64 = clone_model(eager32, dtype=torch.float64)
    model = clone_model(eager32)
    batch = _batch(padding)
    loss, record = _streamed_step(model, batch, {"chunk_size": 5, "logits_chunk_size": 4})
    assert record.kind == "stream"
    chunked = [d.reason for d in record.decisions if d.kind == "chunked"]
    assert sum(r.startswith("layer") for r in chunked) == model.config.num_hidden_layers
    assert chunked[-1].startswith("head: computed")

    assert_float32_rule(loss, model, eager32, ref64, batch, arch)


def test_a_model_that_returns_its_cache_is_told_to_turn_it_off():
    """Compiled whole with its default config, the model returns the KV cache it builds: every
    layer's keys and values are outputs, so no layer streams, and the warning says what to set."""
    model = build_hf_model("llama", dtype=torch.float64, seed=0, use_cache=True)
    batch = _batch(None)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="memcompile",
                             options={"runtime": "eager", "stream": True})
    with pytest.warns(memcompile.MemcompileWarning,
                      match=r"the forward returns a KV cache it builds \(4 key/value tensors.*"
                            r"set model\.config\.use_cache = False"):
        out = compiled(**batch)
    assert out.past_key_values is not None
    out.loss.backward()


@pytest.mark.parametrize("how", ["recompile", "dynamic", "mark_dynamic"])
def test_stream_stays_on_through_dynamic_recompiles(how):
    """Variable lengths: Dynamo's automatic dynamic recompile at the second length, `dynamic=True`
    from the first call (which also makes module number attributes, such as the norms' epsilon,
    inputs), or `mark_dynamic` on the batch. The graph is planned once per length it runs at, so
    every length streams, exactly (float64: the built-in model's norm computes in its own
    dtype), at more distinct lengths than Dynamo's recompile limit."""
    from helpers import FLOAT64_TOL, step_error

    from memcompile.models import build_model, make_batch

    model = build_model("tiny", dtype=torch.float64)
    ref = clone_model(model)
    torch._dynamo.reset()
    step = torch.compile(lambda b: model(**b).loss, backend="memcompile",
                         dynamic=True if how == "dynamic" else None,
                         options={"runtime": "eager", "stream": {"chunk_size": 16}})
    limit = torch._dynamo.config.recompile_limit
    lengths = [32, 48, 64, 40, 48] + [19 + 2 * k for k in range(limit)]  # odd: all new
    with recording() as records, warnings.catch_warnings():
        warnings.simplefilter("error", memcompile.MemcompileWarning)
        for length in lengths:
            batch = make_batch("tiny", seq_len=length)
            if how == "mark_dynamic":
                for value in batch.values():
                    torch._dynamo.mark_dynamic(value, 1)
            err, where = step_error(step, model, ref, batch)
            assert err <= FLOAT64_TOL, f"{length} tokens: {err:.3e} at {where}"
    distinct = list(dict.fromkeys(lengths))  # 48 comes back: its plan is reused
    assert [r.kind for r in records] == ["stream"] * len(distinct)
    assert [r.stream_plan.info.length for r in records] == distinct
    assert len(distinct) > limit


def test_a_lora_model_streams_and_frozen_weights_get_no_gradient():
    """PEFT LoRA: the base weights are frozen parameters, the adapters train. Frozen weights
    still make activations (the residual stream after a frozen embedding is one), so every
    layer streams; only the adapters get gradients."""
    peft = pytest.importorskip("peft")

    def lora(model):
        config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                 init_lora_weights=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return peft.get_peft_model(model, config)

    eager32 = lora(build_hf_model("llama", dtype=torch.float32, seed=0))
    ref64 = clone_model(eager32, dtype=torch.float64)
    model = clone_model(eager32)
    batch = _batch(None)
    loss, record = _streamed_step(model, batch, {"chunk_size": 5})
    assert record.kind == "stream"
    assert len(record.stream_plan.layers) == model.config.num_hidden_layers
    assert record.stream_plan.head is not None
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trained

    assert_float32_rule(loss, model, eager32, ref64, batch, "lora")
