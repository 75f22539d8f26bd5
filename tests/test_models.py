"""Tests of the benchmark models: the pure-PyTorch Llama and the small Hugging Face builders."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import memcompile.models.llama as llama
from memcompile.models import (
    HF_ARCHS,
    PRESETS,
    LlamaConfig,
    LlamaForCausalLM,
    build_hf_model,
    build_model,
    make_batch,
)


def expected_param_count(config: LlamaConfig) -> int:
    """Parameter count of a Llama model, from the architecture's formula."""
    h, kv = config.hidden_size, config.num_kv_heads * config.head_dim
    attention = 2 * h * h + 2 * h * kv
    mlp = 3 * h * config.intermediate_size
    per_layer = attention + mlp + 2 * h
    embeddings = config.vocab_size * h * (1 if config.tie_embeddings else 2)
    return embeddings + config.num_layers * per_layer + h


@pytest.mark.parametrize(
    ("name", "layers", "hidden", "intermediate", "heads", "kv_heads", "vocab"),
    [
        ("tiny", 2, 64, 176, 4, 2, 256),
        ("small", 4, 512, 1408, 8, 8, 32000),
        ("wide", 8, 1024, 2816, 16, 4, 4096),
    ],
)
def test_preset_sizes(name, layers, hidden, intermediate, heads, kv_heads, vocab):
    config = PRESETS[name]
    assert (config.num_layers, config.hidden_size, config.intermediate_size) == (
        layers, hidden, intermediate
    )
    assert (config.num_heads, config.num_kv_heads, config.vocab_size) == (heads, kv_heads, vocab)
    # Counted on the meta device so the larger presets cost no memory or init time.
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == expected_param_count(config)


def test_tiny_param_count_literal():
    # 256*64*2 + 2*(2*64*64 + 2*64*32 + 3*64*176 + 2*64) + 64
    assert expected_param_count(PRESETS["tiny"]) == 32768 + 2 * (8192 + 4096 + 33792 + 128) + 64
    assert sum(p.numel() for p in build_model("tiny").parameters()) == 125248


def test_tied_embeddings_share_weight():
    config = dataclasses.replace(PRESETS["tiny"], tie_embeddings=True)
    model = build_model(config)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == expected_param_count(config)


def reference_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> float:
    """Next-token cross-entropy written out position by position."""
    logits = logits.detach()
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target == ignore_index:
                continue
            row = logits[b, t].double()
            total += float(torch.logsumexp(row, 0) - row[target])
            count += 1
    return total / count


def test_loss_matches_reference():
    model = build_model("tiny", dtype=torch.float64)
    batch = make_batch("tiny", batch_size=2, seq_len=12)
    out = model(batch["input_ids"])
    assert out.loss is None and out.logits.shape == (2, 12, 256)
    with_labels = model(**batch)
    assert with_labels.logits is None
    expected = reference_loss(out.logits, batch["labels"])
    assert with_labels.loss.item() == pytest.approx(expected, rel=1e-12)
    # Random weights with std 0.02 give near-uniform predictions.
    assert with_labels.loss.item() == pytest.approx(math.log(256), rel=0.05)


def test_ignore_index_positions_are_excluded():
    model = build_model("tiny", dtype=torch.float64)
    batch = make_batch("tiny", batch_size=2, seq_len=10, seed=3)
    logits = model(batch["input_ids"]).logits.detach()
    labels = batch["labels"].clone()
    labels[0, 3:7] = -100
    labels[1, 1] = -100
    loss = model(batch["input_ids"], labels=labels).loss
    assert loss.item() == pytest.approx(reference_loss(logits, labels), rel=1e-12)
    assert loss.item() != model(**batch).loss.item()
    # Only one target left: the loss is that single term, not divided by the sequence length.
    single = torch.full_like(labels, -100)
    single[1, 5] = labels[1, 5]
    expected = float(torch.logsumexp(logits[1, 4], 0) - logits[1, 4, labels[1, 5]])
    assert model(batch["input_ids"], labels=single).loss.item() == pytest.approx(expected)


def test_custom_ignore_index():
    config = dataclasses.replace(PRESETS["tiny"], ignore_index=0)
    model = build_model(config, dtype=torch.float64)
    batch = make_batch(config, batch_size=1, seq_len=8, seed=5)
    labels = batch["labels"].clone()
    labels[0, 2:5] = 0
    logits = model(batch["input_ids"]).logits
    loss = model(batch["input_ids"], labels=labels).loss
    assert loss.item() == pytest.approx(reference_loss(logits, labels, ignore_index=0), rel=1e-12)


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gradient_checkpointing_is_exact():
    model = build_model("tiny", dtype=torch.float64)
    batch = make_batch("tiny", batch_size=2, seq_len=16)
    assert model.training and not model.gradient_checkpointing
    loss, grads = loss_and_grads(model, batch)
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    ckpt_loss, ckpt_grads = loss_and_grads(model, batch)
    torch.testing.assert_close(ckpt_loss, loss, rtol=0, atol=1e-12)
    assert grads.keys() == ckpt_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=0, atol=1e-12, msg=name)


def test_gradient_checkpointing_uses_checkpoint(monkeypatch):
    calls = []

    def spy(fn, *args, **kwargs):
        calls.append(kwargs)
        return fn(*args)

    monkeypatch.setattr(llama, "checkpoint", spy)
    model = build_model("tiny")
    model.enable_gradient_checkpointing()
    batch = make_batch("tiny", seq_len=4)
    model(**batch)
    assert calls == [{"use_reentrant": False}] * 2
    model.eval()
    model(**batch)
    assert len(calls) == 2  # no checkpointing outside training


def test_gqa_equals_repeated_kv_heads():
    gqa = build_model("tiny", dtype=torch.float64)
    config = gqa.config
    groups = config.num_heads // config.num_kv_heads
    mha = build_model(dataclasses.replace(config, num_kv_heads=config.num_heads),
                      dtype=torch.float64)
    state = gqa.state_dict()
    for key, value in state.items():
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            heads = value.view(config.num_kv_heads, config.head_dim, config.hidden_size)
            state[key] = heads.repeat_interleave(groups, dim=0).flatten(0, 1)
    mha.load_state_dict(state)
    input_ids = make_batch(config, batch_size=2, seq_len=9)["input_ids"]
    torch.testing.assert_close(mha(input_ids).logits, gqa(input_ids).logits,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seq_len", [1, 7, 32])
def test_different_sequence_lengths(seq_len):
    model = build_model("tiny")
    batch = make_batch("tiny", batch_size=3, seq_len=seq_len)
    assert model(batch["input_ids"]).logits.shape == (3, seq_len, 256)
    if seq_len > 1:
        loss = model(**batch).loss
        loss.backward()
        assert torch.isfinite(loss)


def test_causal_prefix_is_independent_of_suffix():
    model = build_model("tiny", dtype=torch.float64)
    long_ids = make_batch("tiny", seq_len=12)["input_ids"]
    torch.testing.assert_close(model(long_ids[:, :5]).logits, model(long_ids).logits[:, :5])


def test_build_model_is_deterministic_and_keeps_global_rng():
    before = torch.get_rng_state()
    a, b = build_model("tiny", seed=1), build_model("tiny", seed=1)
    assert torch.equal(torch.get_rng_state(), before)
    c = build_model("tiny", seed=2, dtype=torch.float64)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        assert pc.dtype == torch.float64
        if "norm" in name:
            assert torch.equal(pa, torch.ones_like(pa))
        else:
            assert not torch.equal(pa.double(), pc), name
    assert a.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_make_batch_deterministic_by_seed():
    a = make_batch("tiny", batch_size=2, seq_len=16, seed=7)
    b = make_batch(PRESETS["tiny"], batch_size=2, seq_len=16, seed=7)
    c = make_batch("tiny", batch_size=2, seq_len=16, seed=8)
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert not torch.equal(a["input_ids"], c["input_ids"])
    assert torch.equal(a["labels"], a["input_ids"]) and a["labels"] is not a["input_ids"]
    assert a["input_ids"].dtype == torch.long and a["input_ids"].shape == (2, 16)
    assert 0 <= a["input_ids"].min() and a["input_ids"].max() < 256


@pytest.mark.parametrize(
    ("overrides", "field", "valid"),
    [
        ({"num_layers": 0}, "num_layers", "positive int"),
        ({"vocab_size": 1.5}, "vocab_size", "positive int"),
        ({"num_heads": 5}, "num_heads", "[1, 2, 4, 8, 16, 32]"),
        ({"num_heads": 64}, "num_heads", "[1, 2, 4, 8, 16, 32]"),
        ({"num_kv_heads": 3}, "num_kv_heads", "[1, 2, 4]"),
        ({"rms_norm_eps": 0.0}, "rms_norm_eps", "positive number"),
    ],
)
def test_bad_config_raises_clear_error(overrides, field, valid):
    with pytest.raises(ValueError, match=field) as info:
        dataclasses.replace(PRESETS["tiny"], **overrides)
    assert valid in str(info.value)


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError, match=r"'huge'.*\['small', 'tiny', 'wide'\]"):
        build_model("huge")


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_build_hf_model_trains(arch):
    pytest.importorskip("transformers")
    model = build_hf_model(arch, seed=0)
    assert model.training
    assert model.config._attn_implementation == "sdpa"
    assert model.config.use_cache is False
    input_ids = make_batch("tiny", batch_size=2, seq_len=8)["input_ids"]
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    # Same seed, same weights, same loss: dropout is off and init is seeded.
    again = build_hf_model(arch, seed=0)
    assert again(input_ids=input_ids, labels=input_ids).loss.item() == loss.item()


def test_build_hf_model_overrides_and_dtype():
    pytest.importorskip("transformers")
    model = build_hf_model("llama", dtype=torch.float64, num_hidden_layers=3)
    assert model.config.num_hidden_layers == 3
    assert model.config.num_key_value_heads == 2
    assert all(p.dtype == torch.float64 for p in model.parameters())


def test_build_hf_model_unknown_arch_lists_valid_ones():
    with pytest.raises(ValueError, match="bert") as info:
        build_hf_model("bert")
    for arch in ("llama", "qwen2", "gpt2"):
        assert arch in str(info.value)
