"""StreamBP (`options={"stream": ...}`): the sequence analysis, the plan, and exact gradients.

Structure on small traced functions; exactness in float64 against eager on the built-in model
(its norms compute in the input dtype), GPT-2 and a CLIP-style dual encoder, and under the
float32 rule on Hugging Face models whose RMSNorm computes in float32 whatever the model's
dtype; memory by the allocator where the logits or a batch's activations dominate.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    FLOAT64_TOL,
    clone_inputs,
    clone_model,
    float32_tolerance,
    worst_error,
)
from torch.fx.experimental.proxy_tensor import make_fx

import memcompile
from memcompile.analysis.sequence import SeqDim, analyze_sequence, view_seq_dim
from memcompile.losses import dpo_loss, grpo_loss, shift_labels
from memcompile.models import (LlamaConfig, LlamaForCausalLM, build_hf_model, build_model,
                               make_batch)
from memcompile.report import recording
from memcompile.runtime.stream import mask_is_causal

aten = torch.ops.aten


def lower_right_causal(queries: int, keys: int, device: torch.device,
                       dtype: torch.dtype) -> torch.Tensor:
    """Additive mask letting the last `queries` positions of `keys` see their own prefix."""
    hidden = torch.ones(queries, keys, dtype=torch.bool, device=device).triu(keys - queries + 1)
    return torch.zeros(queries, keys, dtype=dtype, device=device).masked_fill_(hidden,
                                                                             float("-inf"))


# ---- analysis ---------------------------------------------------------------------------------

def test_view_keeps_the_sequence_where_its_elements_go():
    # (B, T, D) -> (B*T, D): merged with the batch in dim 0.
    assert view_seq_dim((2, 16, 64), SeqDim(1), (32, 64), 16) == SeqDim(0, outer=2, inner=1)
    # (B, T, H*D) -> (B, T, H, D): still dim 1.
    assert view_seq_dim((2, 16, 64), SeqDim(1), (2, 16, 4, 16), 16) == SeqDim(1)
    # (T, H) -> (T*H,): merged with what follows it.
    assert view_seq_dim((16, 4), SeqDim(0), (64,), 16) == SeqDim(0, outer=1, inner=4)
    # Split across two dimensions: no single dimension holds it.
    assert view_seq_dim((1, 16, 4), SeqDim(1), (1, 4, 4, 4), 16) is None


def test_hidden_size_equal_to_the_length_does_not_confuse_the_analysis():
    """ids (1, 8) -> embedding (1, 8, 8) -> matmul (8, 8) weight: hidden size = length = 8.
    The sequence is followed through the ops, never matched by size."""
    def f(ids, emb, w):
        h = F.embedding(ids, emb)
        return (h @ w).transpose(1, 2).sum()

    gm = make_fx(f, tracing_mode="fake")(torch.zeros(1, 8, dtype=torch.long),
                                         torch.randn(10, 8), torch.randn(8, 8))
    info = analyze_sequence(gm.graph)
    by_target = {n.target: n for n in gm.graph.nodes}
    assert info.length == 8
    assert info.dim_of(by_target[aten.embedding.default]) == SeqDim(1)
    assert info.dim_of(by_target[aten.transpose.int]) == SeqDim(2)
    assert info.effects[by_target[aten.sum.default]] == "reduces"


def test_ops_that_mix_tokens_are_named():
    def f(ids, emb):
        return F.embedding(ids, emb).cumsum(1)

    gm = make_fx(f, tracing_mode="fake")(torch.zeros(1, 8, dtype=torch.long), torch.randn(10, 4))
    info = analyze_sequence(gm.graph)
    cumsum = next(n for n in gm.graph.nodes if n.target is aten.cumsum.default)
    assert info.effects[cumsum] == "mixes"


def test_rows_of_a_merged_sequence_are_read_and_written_in_place():
    from memcompile.runtime.stream import narrow_seq, write_rows

    full = torch.arange(2 * 6 * 3, dtype=torch.float64).reshape(2 * 6, 3)  # (B*T, D), B=2, T=6
    seq = SeqDim(0, outer=2, inner=1)
    rows = narrow_seq(full, seq, 2, 3)
    torch.testing.assert_close(rows, full.view(2, 6, 3)[:, 2:5].reshape(6, 3))
    write_rows(full, seq, 2, torch.ones(6, 3, dtype=torch.float64), add=True)
    expected = torch.arange(36, dtype=torch.float64).reshape(2, 6, 3)
    expected[:, 2:5] += 1
    torch.testing.assert_close(full, expected.reshape(12, 3))


def test_lower_right_mask_gives_the_rows_of_full_causal_attention():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 10, 4, dtype=torch.float64) for _ in range(3))
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    first, end = 3, 7
    mask = lower_right_causal(end - first, end, q.device, q.dtype)
    rows = F.scaled_dot_product_attention(q[:, :, first:end], k[:, :, :end], v[:, :, :end],
                                          attn_mask=mask)
    torch.testing.assert_close(rows, full[:, :, first:end], rtol=0, atol=1e-14)
    # SDPA's own is_causal aligns top-left with fewer queries than keys: not these rows.
    top_left = F.scaled_dot_product_attention(q[:, :, first:end], k[:, :, :end], v[:, :, :end],
                                              is_causal=True)
    assert not torch.allclose(top_left, full[:, :, first:end])


def test_mask_is_causal_checks_every_row_block():
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    assert mask_is_causal(causal, rows_per_block=4)
    leaky = causal.clone()
    leaky[5, 5] = True
    leaky[4, 5] = True  # a query sees a later key, in the second block
    assert not mask_is_causal(leaky, rows_per_block=4)
    additive = torch.zeros(6, 6).masked_fill(~causal, float("-inf"))
    assert mask_is_causal(additive)


# ---- the built-in model, float64 --------------------------------------------------------------

TINY = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_layers=2,
                   num_heads=4, num_kv_heads=2)


def _tiny(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(TINY).double()


def _labels(ids: torch.Tensor) -> torch.Tensor:
    """The ids as labels with a masked prompt, so chunks start on ignored labels."""
    labels = ids.clone()
    labels[:, :5] = -100
    labels[0, 9:12] = -100
    return labels


def _stream_step(model, batch, options, loss_of=lambda m, b: m(**b).loss):
    torch._dynamo.reset()
    step = torch.compile(lambda b: loss_of(model, b), backend="memcompile", options=options)
    with recording() as records:
        loss = step(batch)
    loss.backward()
    return loss.detach(), records


def _eager_step(model, batch, loss_of=lambda m, b: m(**b).loss):
    loss = loss_of(model, batch)
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("batch_size,length,chunk,logits_chunk,keys_values", [
    (1, 16, 5, 3, "once"),
    (2, 17, 4, 6, "once"),
    (3, 13, 13, 13, "once"),       # one chunk each
    (2, 17, 4, 6, "per_chunk"),
    (1, 9, 1, 1, "per_chunk"),     # one token per chunk
    (2, 16, 8, 8, "once"),         # batch x length = hidden size: weights are not cut
    (1, 32, 8, 8, "per_chunk"),    # length = hidden size
])
def test_stream_is_exact_in_float64(batch_size, length, chunk, logits_chunk, keys_values):
    model = _tiny()
    ref = clone_model(model)
    ids = torch.randint(0, TINY.vocab_size, (batch_size, length),
                        generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": _labels(ids)}
    options = {"runtime": "eager", "stream": {"chunk_size": chunk, "logits_chunk_size":
                                              logits_chunk, "keys_values": keys_values}}
    loss, records = _stream_step(model, clone_inputs(batch), options)
    ref_loss = _eager_step(ref, clone_inputs(batch))
    err, where = worst_error(loss, ref_loss, model, ref)
    assert err <= FLOAT64_TOL, f"worst relative error {err:.3e} at {where}"
    (record,) = records
    assert record.kind == "stream"
    chunked = [d for d in record.decisions if d.kind == "chunked"]
    assert len(chunked) == TINY.num_layers + 1  # every layer and the head
    assert "head: computed" in chunked[-1].reason


def test_stream_under_the_default_runtime_is_exact_in_float64():
    """`options={"stream": True}` and nothing else, as a user writes it: the default runtime
    (Inductor) streams every layer and the head, and every gradient is within 1e-10 of eager."""
    model = _tiny()
    ref = clone_model(model)
    ids = torch.randint(0, TINY.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": _labels(ids)}
    loss, records = _stream_step(model, clone_inputs(batch), {"stream": True})
    err, where = worst_error(loss, _eager_step(ref, clone_inputs(batch)), model, ref)
    assert err <= FLOAT64_TOL, f"worst relative error {err:.3e} at {where}"
    (record,) = records
    assert record.kind == "stream"
    chunked = [d for d in record.decisions if d.kind == "chunked"]
    assert len(chunked) == TINY.num_layers + 1 and "head: computed" in chunked[-1].reason


def _policy_batch(batch_size=4, length=19):
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, TINY.vocab_size, (batch_size, length), generator=gen)
    labels = shift_labels(ids, prompt_lengths=torch.tensor([3, 5, 0, 7][:batch_size]))
    return ids, labels, gen


def _assert_policy_loss_exact(loss_of, ids, labels, chunk, logits_chunk):
    """One streamed step of `loss_of(model, batch)` against eager, in float64, and the head
    chunked."""
    model = _tiny()
    ref = clone_model(model)
    batch = {"input_ids": ids, "labels": labels}
    options = {"runtime": "eager",
               "stream": {"chunk_size": chunk, "logits_chunk_size": logits_chunk}}
    loss, records = _stream_step(model, batch, options, loss_of)
    err, where = worst_error(loss, _eager_step(ref, batch, loss_of), model, ref)
    assert err <= FLOAT64_TOL, f"worst relative error {err:.3e} at {where}"
    (record,) = records
    assert any("head: computed" in d.reason for d in record.decisions)


def test_dpo_is_exact_in_float64_and_takes_two_passes():
    ids, labels, gen = _policy_batch()
    ref_c, ref_r = torch.randn(2, 2, dtype=torch.float64, generator=gen)

    def loss_of(model, batch):
        return dpo_loss(model(batch["input_ids"]).logits, batch["labels"], ref_c, ref_r,
                        beta=0.5)

    _assert_policy_loss_exact(loss_of, ids, labels, chunk=4, logits_chunk=5)


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_is_exact_in_float64(beta):
    ids, labels, gen = _policy_batch()
    advantages = torch.randn(4, dtype=torch.float64, generator=gen)
    old = -3 * torch.rand(4, 19, dtype=torch.float64, generator=gen)
    ref_logps = -3 * torch.rand(4, 19, dtype=torch.float64, generator=gen)

    def loss_of(model, batch):
        return grpo_loss(model(batch["input_ids"]).logits, batch["labels"], advantages, old,
                         ref_logps, beta=beta)

    _assert_policy_loss_exact(loss_of, ids, labels, chunk=6, logits_chunk=4)


def test_affine_losses_take_one_pass_and_dpo_two():
    """Cross-entropy and GRPO are affine in their sums over the sequence (one pass, gradients
    computed in the forward); DPO's sigmoid of per-sequence sums is not (two passes)."""
    ids, labels, _ = _policy_batch()
    adv, old = torch.randn(4, dtype=torch.float64), torch.zeros(4, 19, dtype=torch.float64)
    ref_c = torch.zeros(2, dtype=torch.float64)
    losses = {
        "sft": lambda m, b: m(**b).loss,
        "grpo": lambda m, b: grpo_loss(m(b["input_ids"]).logits, b["labels"], adv, old, old),
        "dpo": lambda m, b: dpo_loss(m(b["input_ids"]).logits, b["labels"], ref_c, ref_c),
    }
    affine = {}
    for name, loss_of in losses.items():
        _, records = _stream_step(_tiny(), {"input_ids": ids, "labels": labels},
                                  {"runtime": "eager", "stream": True}, loss_of)
        affine[name] = records[0].stream_plan.head.affine_tail
    assert affine == {"sft": True, "grpo": True, "dpo": False}


# ---- Hugging Face models ----------------------------------------------------------------------

HF_VOCAB = 256


def _hf_batch(padding: str | None, batch_size=2, length=14):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, HF_VOCAB, (batch_size, length), generator=gen)
    mask = torch.ones_like(ids)
    if padding == "right":
        mask[0, -4:] = 0
    elif padding == "left":
        mask[0, :4] = 0
    labels = ids.masked_fill(mask == 0, -100)
    batch = {"input_ids": ids, "labels": labels}
    if padding:
        batch["attention_mask"] = mask
    return batch


def test_gpt2_layers_stream_exactly_in_float64():
    """GPT-2's LayerNorm computes in the model's dtype, so float64 is exact. Its loss runs in a
    second graph (transformers breaks the graph before it), so that graph has no layers."""
    model = build_hf_model("gpt2", dtype=torch.float64, seed=0)
    ref = clone_model(model)
    batch = _hf_batch(None)
    options = {"runtime": "eager", "stream": {"chunk_size": 5, "logits_chunk_size": 4}}
    loss, records = _stream_step(model, clone_inputs(batch), options)
    err, where = worst_error(loss, _eager_step(ref, clone_inputs(batch)), model, ref)
    assert err <= FLOAT64_TOL, f"worst relative error {err:.3e} at {where}"
    layers = [d for r in records for d in r.decisions
              if d.kind == "chunked" and d.reason.startswith("layer")]
    assert len(layers) == model.config.n_layer


def _check_hf_record(records, model):
    (record,) = records
    assert record.kind == "stream"
    chunked = [d.reason for d in record.decisions if d.kind == "chunked"]
    assert sum(r.startswith("layer") for r in chunked) == model.config.num_hidden_layers
    assert chunked[-1].startswith("head: computed")


@pytest.mark.parametrize("arch,padding", [
    ("llama", None), ("llama", "left"), ("llama", "right"), ("qwen2", "right"),
    ("qwen3", None), ("mistral", "left"), ("gemma", None), ("gemma", "left"),
])
def test_hf_models_stream_within_the_float32_rule(arch, padding):
    """These models' RMSNorm computes in float32 whatever the model's dtype. A streamed layer
    backpropagates the norm twice (for the queries' rows in each chunk, and once more for the
    keys' and values' gradient sums), so its float32 rounding differs from eager's single pass
    (4e-8 relative in a float64 model): they are held to the float32 rule."""
    eager32 = build_hf_model(arch, dtype=torch.float32, seed=0)
    ref64 = clone_model(eager32, dtype=torch.float64)
    model = clone_model(eager32)
    batch = _hf_batch(padding)
    options = {"runtime": "eager", "stream": {"chunk_size": 5, "logits_chunk_size": 4}}
    loss, records = _stream_step(model, clone_inputs(batch), options)
    loss64 = _eager_step(ref64, clone_inputs(batch))
    loss32 = _eager_step(eager32, clone_inputs(batch))
    err, where = worst_error(loss, loss64, model, ref64)
    eager_err, _ = worst_error(loss32, loss64, eager32, ref64)
    assert err <= float32_tolerance(eager_err), (
        f"{arch}: worst relative error {err:.3e} at {where}; eager float32's {eager_err:.3e}")
    _check_hf_record(records, model)


def test_a_constant_causal_mask_is_replaced_by_the_causal_kernel():
    """transformers builds a (batch, 1, T, T) mask even without padding; it is dropped."""
    model = build_hf_model("llama", dtype=torch.float64, seed=0)
    _, records = _stream_step(model, _hf_batch(None),
                              {"runtime": "eager", "stream": {"chunk_size": 5}})
    (record,) = records
    replaced = [t for name, t in record.notes if name == "causal_mask"]
    assert len(replaced) == model.config.num_hidden_layers
    assert all("equals the causal mask; replaced by the causal kernel" in t for t in replaced)
    assert "attn_mask" not in record.forward_code


@pytest.mark.parametrize("padding,pad", [("left", 9), ("right", 9)])
def test_a_padding_mask_becomes_the_causal_kernel_and_a_mask_over_keys(padding, pad):
    """transformers' (batch, 1, T, T) padding mask splits into the causal rule and a
    (batch, 1, 1, T) mask over keys: nothing quadratic in the length remains. Nine padded
    tokens and chunks of 4: whole chunks of queries see no key at all (left padding), and
    their prefix blocks are all padding. Held to the float32 rule, as the other Hugging Face
    models (their RMSNorm computes in float32)."""
    eager32 = build_hf_model("llama", dtype=torch.float32, seed=0)
    ref64 = clone_model(eager32, dtype=torch.float64)
    model = clone_model(eager32)
    length = 20
    batch = _hf_batch(None, length=length)
    mask = torch.ones_like(batch["input_ids"])
    mask[0, :pad] = 0 if padding == "left" else 1
    mask[0, length - pad:] = 0 if padding == "right" else 1
    batch["attention_mask"] = mask
    batch["labels"] = batch["labels"].masked_fill(mask == 0, -100)
    options = {"runtime": "eager", "stream": {"chunk_size": 4, "logits_chunk_size": 4}}
    loss, records = _stream_step(model, clone_inputs(batch), options)
    loss64 = _eager_step(ref64, clone_inputs(batch))
    err, where = worst_error(loss, loss64, model, ref64)
    eager_err, _ = worst_error(_eager_step(eager32, clone_inputs(batch)), loss64, eager32, ref64)
    assert err <= float32_tolerance(eager_err), (
        f"worst relative error {err:.3e} at {where}; eager float32's {eager_err:.3e}")
    (record,) = records
    split = [t for name, t in record.notes if name == "key_mask"]
    assert len(split) == model.config.num_hidden_layers
    assert all("is the causal rule and a mask over keys" in t and "(2, 1, 1, 20)" in t
               for t in split)
    nodes = {n for region in record.stream_plan.regions for n in region.nodes}
    nodes |= {a for n in nodes for a in n.all_input_nodes}
    quadratic = [n.name for n in nodes if isinstance(n.meta.get("val"), torch.Tensor)
                 and list(n.meta["val"].shape[-2:]) == [length, length]]
    assert not quadratic, quadratic


def test_a_graph_without_tokens_is_compiled_as_usual_with_a_note():
    torch._dynamo.reset()
    layer = torch.nn.Linear(4, 4).double()
    compiled = torch.compile(layer, backend="memcompile", options={"stream": True,
                                                                   "runtime": "eager"})
    with recording() as records:
        compiled(torch.randn(3, 4, dtype=torch.float64)).sum().backward()
    (record,) = records
    assert record.kind == "training"
    assert any("no integer (batch, length) input" in text for _, text in record.notes)


# ---- memory -----------------------------------------------------------------------------------

def test_the_logits_never_exist_whole():
    """Vocabulary 8192, 256 tokens, float64: the logits are 16 MiB, and eager holds them (and
    their log-softmax) at once. Streamed, the head's chunks of 32 tokens hold 2 MiB each."""
    config = LlamaConfig(vocab_size=8192, hidden_size=32, intermediate_size=48, num_layers=1,
                         num_heads=4, num_kv_heads=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).double()
    ids = torch.randint(0, 8192, (1, 256))
    batch = {"input_ids": ids, "labels": ids}
    logits_bytes = 256 * 8192 * 8
    torch._dynamo.reset()
    step = torch.compile(lambda b: model(**b).loss, backend="memcompile",
                         options={"runtime": "eager",
                                  "stream": {"chunk_size": 64, "logits_chunk_size": 32}})

    def streamed():
        step(batch).backward()
        model.zero_grad(set_to_none=True)

    def eager():
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    grads = sum(p.numel() * 8 for p in model.parameters())
    stream_peak = memcompile.measure(streamed, repeat=1, method="allocator").peak_bytes
    eager_peak = memcompile.measure(eager, repeat=1, method="allocator").peak_bytes
    assert eager_peak >= grads + 2 * logits_bytes
    assert stream_peak < grads + logits_bytes // 2, (stream_peak - grads) / 2**20


def test_is_causal_mask_reads_boolean_and_additive_masks():
    from memcompile.analysis.masks import is_causal_mask

    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    assert is_causal_mask(causal.expand(2, 1, 5, 5))
    assert not is_causal_mask(torch.ones(5, 5, dtype=torch.bool))  # bidirectional
    additive = torch.zeros(5, 5).masked_fill(~causal, float("-inf"))
    assert is_causal_mask(additive)
    additive[3, 0] = float("-inf")  # a hidden key inside the triangle: not plain causal
    assert not is_causal_mask(additive)


def _five_layers_counting_forwards(stream, monkeypatch):
    """Five float64 layers streamed with `stream` options: the worst relative gradient error
    against eager, the layer forwards run (forward and backward), and the records."""
    import memcompile.runtime.stream_layers as layers

    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_layers=5,
                         num_heads=4, num_kv_heads=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).double()
    ref = clone_model(model)
    ids = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(4))
    batch = {"input_ids": ids, "labels": _labels(ids)}
    counted = []
    layer_forward = layers.layer_forward
    monkeypatch.setattr(layers, "layer_forward",
                        lambda *a: counted.append(1) or layer_forward(*a))
    loss, records = _stream_step(model, clone_inputs(batch),
                                 {"runtime": "eager", "stream": {"chunk_size": 4, **stream}})
    err, where = worst_error(loss, _eager_step(ref, clone_inputs(batch)), model, ref)
    assert err <= FLOAT64_TOL, f"worst relative error {err:.3e} at {where}"
    return len(counted), records


@pytest.mark.parametrize("layers_per_checkpoint,keys_values", [(2, "once"), (3, "once"),
                                                               (5, "per_chunk")])
def test_layers_sharing_a_saved_input_are_exact_and_rerun_once(layers_per_checkpoint,
                                                                  keys_values, monkeypatch):
    """Five layers; groups of g save one input, and the backward re-runs the forward of the
    others in each group once: 5 + (layers not first in their group) layer forwards."""
    forwards, _ = _five_layers_counting_forwards(
        {"keys_values": keys_values, "layers_per_checkpoint": layers_per_checkpoint},
        monkeypatch)
    groups = -(-5 // layers_per_checkpoint)
    assert forwards == 5 + (5 - groups)


# ---- along the batch: a contrastive loss ------------------------------------------------------

def _clip_step(model, images, ids):
    from memcompile.losses import contrastive_loss

    image, text = model(images, ids)
    return contrastive_loss(image, text, model.logit_scale)


@pytest.mark.parametrize("batch_size,chunk", [(13, 4), (8, 8), (6, 1)])
def test_contrastive_loss_chunked_along_the_batch_is_exact(batch_size, chunk):
    """CLIP's loss couples every pair of the batch; the towers are per sample. They run
    `chunk` samples at a time, twice (embeddings, then their gradients back to the weights)."""
    from memcompile.models.clip import DualEncoder

    torch.manual_seed(0)
    model = DualEncoder().double()
    ref = clone_model(model)
    gen = torch.Generator().manual_seed(5)
    images = torch.randn(batch_size, 3, 16, 16, dtype=torch.float64, generator=gen)
    ids = torch.randint(0, 128, (batch_size, 8), generator=gen)
    torch._dynamo.reset()
    step = torch.compile(lambda i, t: _clip_step(model, i, t), backend="memcompile",
                         options={"runtime": "eager",
                                  "stream": {"dim": "batch", "chunk_size": chunk}})
    with recording() as records:
        loss = step(images, ids)
    loss.backward()
    ref_loss = _clip_step(ref, images, ids)
    ref_loss.backward()
    err, where = worst_error(loss.detach(), ref_loss.detach(), model, ref)
    assert err <= FLOAT64_TOL, f"worst relative error {err:.3e} at {where}"
    (record,) = records
    assert record.kind == "stream"
    (decision,) = [d for d in record.decisions if d.kind == "chunked"]
    assert f"runs {chunk} samples at a time" in decision.reason


def test_batch_norm_couples_the_batch_and_is_not_chunked():
    torch._dynamo.reset()
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)).double()
    step = torch.compile(lambda x: net(x).pow(2).sum(), backend="memcompile",
                         options={"runtime": "eager", "stream": {"dim": "batch"}})
    with recording() as records:
        step(torch.randn(6, 4, dtype=torch.float64)).backward()
    (record,) = records
    assert record.kind == "training"
    assert any("not applied" in t for _, t in record.notes)


def test_chunking_the_batch_holds_one_chunk_of_activations():
    """64 pairs, 8 at a time: the towers' activations for the whole batch (what eager keeps
    for the backward) never exist; the streamed step peaks below a third of eager's."""
    from memcompile.models.clip import DualEncoder, DualEncoderConfig

    torch.manual_seed(0)
    model = DualEncoder(DualEncoderConfig(image_size=32, hidden=64, layers=2)).double()
    gen = torch.Generator().manual_seed(6)
    images = torch.randn(64, 3, 32, 32, dtype=torch.float64, generator=gen)
    ids = torch.randint(0, 128, (64, 8), generator=gen)
    torch._dynamo.reset()
    step = torch.compile(lambda i, t: _clip_step(model, i, t), backend="memcompile",
                         options={"runtime": "eager", "stream": {"dim": "batch", "chunk_size": 8}})

    def streamed():
        step(images, ids).backward()
        model.zero_grad(set_to_none=True)

    def eager():
        _clip_step(model, images, ids).backward()
        model.zero_grad(set_to_none=True)

    stream_peak = memcompile.measure(streamed, repeat=1, method="allocator").peak_bytes
    eager_peak = memcompile.measure(eager, repeat=1, method="allocator").peak_bytes
    assert stream_peak < eager_peak / 3, (stream_peak / 2**20, eager_peak / 2**20)


@pytest.mark.parametrize("checkpoints,keys_values,forwards", [
    (2, "once", 5 + 6), (3, "once", 5 + 2), (3, "per_chunk", 5 + 2), (4, "once", 5 + 1)])
def test_holding_fewer_layer_inputs_is_exact_and_recomputes_the_schedule(
        checkpoints, keys_values, forwards, monkeypatch):
    """Five layers holding at most `checkpoints` inputs at once. Two: the forward keeps layers
    0 and 4's inputs, the backward rebuilds 3, 2 and 1's from layer 0's (3 + 2 + 1 forwards);
    three: it keeps 0, 3 and 4's and rebuilds 1 and 2 (2 forwards); four: 0, 2, 3 and 4's, and
    rebuilds 1 (1 forward)."""
    forwards_run, records = _five_layers_counting_forwards(
        {"keys_values": keys_values, "checkpoints": checkpoints}, monkeypatch)
    assert forwards_run == forwards
    kinds = [d.kind for d in records[0].decisions if d.kind in ("saved", "recomputed")]
    assert kinds.count("saved") == {2: 2, 3: 3, 4: 4}[checkpoints]
    assert len(kinds) == 5


def _hidden_dominated_model():
    """Six layers of hidden 128 with a vocabulary of 64: at 2048 tokens a layer input is
    1 MiB, the gradients of all weights 2.3 MiB."""
    config = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=128, num_layers=6,
                         num_heads=2, num_kv_heads=1)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def test_memory_budget_picks_the_layer_inputs_held_and_the_estimate_bounds_the_peak():
    """A numeric budget under stream decides how many layer inputs are held at once. Fewer
    held gives a lower measured peak, and the estimate each plan reports is above it."""
    model = _hidden_dominated_model()
    ids = torch.randint(0, 64, (1, 2048), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    hidden = 2048 * 128 * 4
    peaks, estimates, held = {}, {}, {}
    for budget in ("auto", 0.9, 0.82):
        torch._dynamo.reset()
        step = torch.compile(lambda b: model(**b).loss, backend="memcompile", options={
            "runtime": "eager", "stream": {"chunk_size": 256}, "memory_budget": budget})
        with recording() as records:
            step(batch).backward()  # compiles
        model.zero_grad(set_to_none=True)
        (note,) = [t for p, t in records[0].notes if t.startswith("layer inputs:")]
        held[budget] = int(note.split("at most ")[1].split(" ")[0])
        estimates[budget] = int(note.split("estimated peak ")[1].split(" ")[0].replace(",", ""))

        def run():
            step(batch).backward()
            model.zero_grad(set_to_none=True)
        peaks[budget] = memcompile.measure(run, repeat=1, method="tracked").peak_bytes
    assert held["auto"] == 6 and held[0.9] < 6 and held[0.82] < held[0.9]
    for budget in peaks:
        assert peaks[budget] <= estimates[budget], (budget, peaks[budget], estimates[budget])
    assert peaks["auto"] > peaks[0.9] > peaks[0.82]
    # Six held against two: the peak falls by more than two whole hidden states (at the
    # least peak one of the four is the rebuilt input of the layer being reversed).
    assert peaks["auto"] - peaks[0.82] >= 2 * hidden


def test_a_budget_below_the_least_stream_estimate_is_refused():
    model = _hidden_dominated_model()
    ids = torch.randint(0, 64, (1, 512))
    torch._dynamo.reset()
    step = torch.compile(lambda b: model(**b).loss, backend="memcompile", options={
        "runtime": "eager", "stream": True, "memory_budget": "1MiB"})
    with pytest.raises(Exception, match="MemoryBudgetError.*holding 2 of 6 layer inputs"):
        step({"input_ids": ids, "labels": ids})


@pytest.mark.parametrize("kernel", ["cpu", "math"])
def test_keys_values_gradients_go_into_sinks_block_by_block(monkeypatch, kernel):
    """With sinks, the keys' and values' gradients are added into them a key block at a time
    (blocks of 3 here) and none is returned; they equal autograd's through full attention. On
    the CPU kernel, and on the plain-ops kernel other devices fall back to."""
    import memcompile.runtime.attention_kernels as attention_kernels
    import memcompile.runtime.chunk_attention as chunk_attention

    monkeypatch.setattr(chunk_attention, "key_block", lambda *a, **kw: 3)
    monkeypatch.setattr(attention_kernels, "kernel_kind", lambda q, k, op=None: kernel)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, 12, 8, dtype=torch.float64, generator=gen).requires_grad_()
               for h in (4, 2, 2))
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    grad = torch.randn(full.shape, dtype=torch.float64, generator=gen)
    expected = torch.autograd.grad(full[:, :, 10:12], (q, k, v), grad[:, :, 10:12])
    sinks = (torch.ones_like(k), torch.ones_like(v))  # sums already holding something
    out, _ = chunk_attention.prefix_causal_attention(q[:, :, 10:12], k, v, None, sinks)
    grad_q, grad_k, grad_v = torch.autograd.grad(out, (q, k, v), grad[:, :, 10:12],
                                                 allow_unused=True)
    assert grad_k is None and grad_v is None
    torch.testing.assert_close(grad_q, expected[0], rtol=0, atol=1e-14)
    torch.testing.assert_close(sinks[0] - 1, expected[1], rtol=0, atol=1e-14)
    torch.testing.assert_close(sinks[1] - 1, expected[2], rtol=0, atol=1e-14)


@pytest.mark.parametrize("kernel", ["cpu", "math"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_prefix_causal_attention_equals_rows_of_full_causal_attention(monkeypatch, dtype, kernel):
    """Two mask-free kernel calls (the prefix, then a square causal block) merged by their
    log-sum-exps, and their backward, against full causal attention with grouped heads."""
    import memcompile.runtime.attention_kernels as attention_kernels
    from memcompile.runtime.chunk_attention import prefix_causal_attention

    monkeypatch.setattr(attention_kernels, "kernel_kind", lambda q, k, op=None: kernel)

    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, h, 10, 8, dtype=dtype, generator=gen).requires_grad_()
               for h in (4, 2, 2))
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    grad = torch.randn(full.shape, dtype=dtype, generator=gen)
    expected = torch.autograd.grad(full[:, :, 3:7], (q, k, v), grad[:, :, 3:7])
    out, _ = prefix_causal_attention(q[:, :, 3:7], k[:, :, :7], v[:, :, :7])
    got = torch.autograd.grad(out, (q, k, v), grad[:, :, 3:7])
    tol = 1e-14 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(out, full[:, :, 3:7], rtol=0, atol=tol)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=tol)


@pytest.mark.parametrize("dtype,widening", [(torch.bfloat16, 2), (torch.float32, 1)])
def test_estimate_counts_half_precision_gradient_sums_in_float32(dtype, widening):
    """The runtime sums half-precision keys' and values' gradients in float32; the estimate's
    term for those sums is twice the keys' and values' bytes then, equal to them otherwise."""
    from memcompile.capture import trace_static
    from memcompile.config import Options
    from memcompile.planning.stream_memory import estimate
    from memcompile.passes.stream_plan import plan_stream

    model = build_model("tiny", dtype=dtype)
    batch = make_batch("tiny", seq_len=256)
    found = {}

    def backend(gm, example_inputs):
        plan = plan_stream(trace_static(gm, example_inputs), list(example_inputs),
                           Options(stream=True))
        found["memory"] = estimate(plan, [x for x in example_inputs
                                          if isinstance(x, torch.Tensor) and x.requires_grad])
        return gm.forward

    torch._dynamo.reset()
    torch.compile(lambda b: model(**b).loss, backend=backend)(batch)
    memory = found["memory"]
    assert memory.keys_values > 0
    assert memory.gradient_sums == widening * memory.keys_values


def test_bfloat16_streams_within_the_reduced_precision_rule():
    """Half precision: key/value gradient sums are kept in float32, and each chunk's are cast
    back for the projections; the result is held to the reduced-precision rule of
    docs/design.md, "Exactness, defined" (1.5x eager's own error against float64)."""
    eager16 = build_model("tiny", dtype=torch.bfloat16)
    ref64 = clone_model(eager16, dtype=torch.float64)
    model = clone_model(eager16)
    batch = make_batch("tiny", seq_len=96)
    options = {"runtime": "eager", "stream": {"chunk_size": 16, "checkpoints": 2}}
    loss, records = _stream_step(model, clone_inputs(batch), options)
    assert records[0].stream_plan is not None and records[0].stream_plan.runs
    loss64 = _eager_step(ref64, clone_inputs(batch))
    loss16 = _eager_step(eager16, clone_inputs(batch))
    err, where = worst_error(loss, loss64, model, ref64)
    eager_err, _ = worst_error(loss16, loss64, eager16, ref64)
    assert err <= 1.5 * eager_err, (
        f"worst relative error {err:.3e} at {where}; eager's {eager_err:.3e}")



@pytest.mark.parametrize("kernel", ["cpu", "math"])
def test_chunk_attention_under_a_key_mask_equals_the_whole_kernel(monkeypatch, kernel):
    """A key mask hiding keys 0-8 of 16: queries 4-8 see no key at all, and the chunk of
    queries 8-12 has a prefix block that is all padding. Output, log-sum-exp and gradients
    (keys' and values' into sinks, blocks of 3 keys) equal the kernel run over the whole
    length, in float64."""
    import memcompile.runtime.attention_kernels as attention_kernels
    import memcompile.runtime.chunk_attention as chunk_attention

    monkeypatch.setattr(chunk_attention, "key_block", lambda *a, **kw: 3)
    monkeypatch.setattr(attention_kernels, "kernel_kind", lambda q, k, op=None: kernel)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, h, 16, 8, dtype=torch.float64, generator=gen).requires_grad_()
               for h in (4, 2, 2))
    mask = torch.zeros(2, 1, 1, 16, dtype=torch.float64)
    mask[0, ..., :9] = float("-inf")
    full, full_lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True,
                                                                      attn_mask=mask)
    grad = torch.randn(full.shape, dtype=torch.float64, generator=gen)
    for first, end in ((4, 8), (8, 12), (12, 16)):
        expected = torch.autograd.grad(full[:, :, first:end], (q, k, v), grad[:, :, first:end],
                                       retain_graph=True)
        sinks = (torch.zeros_like(k), torch.zeros_like(v))
        out, lse = chunk_attention.prefix_causal_attention(
            q[:, :, first:end], k[:, :, :end], v[:, :, :end], None, sinks,
            mask=mask[..., :end])
        torch.testing.assert_close(out, full[:, :, first:end], rtol=0, atol=1e-14)
        torch.testing.assert_close(lse, full_lse[:, :, first:end], rtol=0, atol=1e-13)
        (grad_q,) = torch.autograd.grad(out, q, grad[:, :, first:end])
        torch.testing.assert_close(grad_q, expected[0], rtol=0, atol=1e-13)
        torch.testing.assert_close(sinks[0], expected[1], rtol=0, atol=1e-13)
        torch.testing.assert_close(sinks[1], expected[2], rtol=0, atol=1e-13)


def test_a_mask_over_queries_is_refused_by_chunk_attention():
    from memcompile.runtime.chunk_attention import prefix_causal_attention

    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match=r"must be over keys alone, \(B\|1, H\|1, 1, keys\)"):
        prefix_causal_attention(q, torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 8),
                                mask=torch.zeros(1, 1, 4, 8))
