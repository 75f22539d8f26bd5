"""StreamBP on attention written as matmul, softmax, matmul (transformers' eager attention).

The `eager_attention` pass replaces the chain by `memcompile::eager_attention`, one of the
attention ops the stream machinery chunks. Structure on small traced functions (recognized with
and without softcapping, and left as it is with a note where the chain differs); the chunk
kernel against the whole op; exactness in float64 against eager on Gemma2 (softcapping, sliding
window), Llama with `attn_implementation="eager"` (padded batches too) and Bloom (ALiBi), with
their float32 norms, softmax and loss computed in float64; the float32 rule on Gemma2 and eager
Llama as shipped, in the two forms `test_zoo` uses.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import (FLOAT64_TOL, assert_float32_rule, clone_inputs, clone_model,
                     relative_error, worst_error)
from torch.fx.experimental.proxy_tensor import make_fx

import memcompile
from memcompile.analysis.eager_attention import EAGER_ATTENTION
from memcompile.analysis.masks import is_causal_mask
from memcompile.meta import NOTES
from memcompile.passes.eager_attention import eager_attention_pass
from memcompile.report import recording
from memcompile.runtime.chunk_attention import prefix_eager_attention
from memcompile.runtime.stream import mask_is_causal

aten = torch.ops.aten

BATCH, HEADS, KV_HEADS, LENGTH, DIM = 2, 4, 2, 6, 8


def _attention(q, k, v, mask, *, softcap=None, softmax_dtype=None, dropout=0.0,
               scale=DIM ** -0.5, hook=None, returns_weights=False):
    """Grouped-head attention in plain ops, as transformers' eager path spells it: each key and
    value head repeated for its group of query heads, scores scaled (and capped), the additive
    mask, a softmax (in `softmax_dtype`, cast back), dropout, the values. `hook` changes the
    scores before the softmax (a step the pattern does not have); `returns_weights` returns
    the probabilities too."""
    groups = q.shape[1] // k.shape[1]

    def repeat(x):
        b, heads, length, dim = x.shape
        return x.unsqueeze(2).expand(b, heads, groups, length, dim).reshape(
            b, heads * groups, length, dim)

    scores = torch.matmul(q, repeat(k).transpose(2, 3)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = hook(scores) if hook is not None else scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=softmax_dtype).to(q.dtype)
    probs = F.dropout(probs, p=dropout, training=True)
    out = torch.matmul(probs, repeat(v))
    return (out, probs) if returns_weights else out


def _inputs(dtype=torch.float64, requires_grad=False):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(BATCH, HEADS, LENGTH, DIM, generator=gen, dtype=dtype)
    k = torch.randn(BATCH, KV_HEADS, LENGTH, DIM, generator=gen, dtype=dtype)
    v = torch.randn(BATCH, KV_HEADS, LENGTH, DIM, generator=gen, dtype=dtype)
    hidden = torch.ones(LENGTH, LENGTH, dtype=torch.bool).triu(1)
    mask = torch.zeros(BATCH, 1, LENGTH, LENGTH, dtype=dtype).masked_fill(
        hidden, torch.finfo(dtype).min)  # transformers' eager mask: the lowest value hides
    return [x.requires_grad_(requires_grad) if x.is_floating_point() and x is not mask else x
            for x in (q, k, v, mask)]


def _run_pass(fn):
    gm = make_fx(fn, tracing_mode="fake")(*_inputs())
    before = gm.code
    eager_attention_pass(gm, _inputs(requires_grad=True))
    notes = [t for name, t in gm.meta.get(NOTES, []) if name == "eager_attention"]
    return gm, before, notes


# ---- structure --------------------------------------------------------------------------------

@pytest.mark.parametrize("softcap, softmax_dtype", [(None, None), (30.0, torch.float32)])
def test_matmul_softmax_matmul_becomes_one_attention_call(softcap, softmax_dtype):
    """Traced to aten (expand, view, bmm, mul, [div, tanh, mul], add, [cast], softmax, [cast],
    bmm, view), the chain becomes one `memcompile::eager_attention` on the unrepeated keys and
    values, with the scale, the softcap, the mask and the softmax's dtype; values and
    gradients stay those of the plain ops."""
    def fn(q, k, v, mask):
        return _attention(q, k, v, mask, softcap=softcap, softmax_dtype=softmax_dtype)

    gm, _, notes = _run_pass(fn)
    calls = list(gm.graph.find_nodes(op="call_function", target=EAGER_ATTENTION))
    assert len(calls) == 1 and len(notes) == 1, notes
    assert not list(gm.graph.find_nodes(op="call_function", target=aten.bmm.default))
    (call,) = calls
    q, k, v, mask = gm.graph.find_nodes(op="placeholder")
    assert call.args == (q, k, v, mask, 0.0, False)
    assert call.kwargs == {"scale": DIM ** -0.5, "softcap": softcap,
                           "softmax_dtype": softmax_dtype or torch.float64}
    assert "4 query heads over 2 key heads" in notes[0]
    assert ("softcap 30" in notes[0]) == (softcap is not None)

    inputs, reference = _inputs(requires_grad=True), _inputs(requires_grad=True)
    out, ref = gm(*inputs), fn(*reference)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1),
                          dtype=out.dtype)
    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    # A float32 softmax rounds the scores: equal to its roundoff, not to float64's.
    tol = 1e-6 if softmax_dtype is torch.float32 else 1e-13
    assert relative_error(out, ref) <= tol
    for x, x_ref in zip(inputs[:3], reference[:3]):
        assert relative_error(x.grad, x_ref.grad) <= tol


def test_three_dimensional_matmuls_with_an_added_bias_are_recognized():
    """Bloom's form: baddbmm(ALiBi, q, kᵀ, alpha=scale) on (B*H, T, D) values, the mask added
    in 4-d, bmm of the probabilities: queries, keys, values and bias are viewed as 4-d, and the
    second matmul's (B*H, T, D) output is the op's output viewed back."""
    def bloom_like(q, k, v, bias, mask):
        scores = torch.baddbmm(bias, q, k.transpose(1, 2), beta=1.0, alpha=0.25)
        scores = scores.view(BATCH, HEADS, LENGTH, LENGTH) + mask
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.bmm(probs.view(BATCH * HEADS, LENGTH, LENGTH), v)

    gen = torch.Generator().manual_seed(3)
    shape = (BATCH * HEADS, LENGTH, DIM)
    q, k, v = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3))
    bias = torch.arange(LENGTH, dtype=torch.float64).expand(BATCH * HEADS, 1, LENGTH) * -0.1
    mask = _inputs()[3]
    gm = make_fx(bloom_like, tracing_mode="fake")(q, k, v, bias, mask)
    eager_attention_pass(gm, [q, k, v, bias, mask])
    (call,) = gm.graph.find_nodes(op="call_function", target=EAGER_ATTENTION)
    assert [tuple(a.meta["val"].shape) for a in call.args[:4]] == [
        (BATCH, HEADS, LENGTH, DIM)] * 3 + [(BATCH, 1, LENGTH, LENGTH)]
    assert call.kwargs["scale"] == 0.25 and call.kwargs["softmax_dtype"] == torch.float32
    assert tuple(call.kwargs["bias"].meta["val"].shape) == (BATCH, HEADS, 1, LENGTH)
    assert relative_error(gm(q, k, v, bias, mask), bloom_like(q, k, v, bias, mask)) <= 1e-6


def _masked_fill(scores):
    hidden = torch.ones(LENGTH, LENGTH, dtype=torch.bool).triu(1)
    return scores.masked_fill(hidden, float("-inf"))


@pytest.mark.parametrize("case, fn, said", [
    ("dropout", lambda q, k, v, m: _attention(q, k, v, m, dropout=0.1), "dropout with p > 0"),
    ("boolean mask", lambda q, k, v, m: _attention(q, k, v, m, hook=_masked_fill),
     "masked_fill.Scalar) lies between the first matmul and the softmax"),
    ("extra op", lambda q, k, v, m: _attention(q, k, v, m, hook=lambda s: torch.relu(s + m)),
     "relu.default) lies between the first matmul and the softmax"),
    ("weights returned", lambda q, k, v, m: _attention(q, k, v, m, returns_weights=True),
     "is read by"),
])
def test_a_chain_that_differs_is_left_whole_with_a_note_saying_how(case, fn, said):
    gm, before, notes = _run_pass(fn)
    assert gm.code == before
    assert len(notes) == 1 and said in notes[0], notes


def test_a_softmax_between_no_matmuls_is_passed_over_silently():
    """A router's softmax (linear, softmax, top-k) is not attention: no note, no change."""
    def router(x, w):
        return torch.softmax(x @ w, dim=-1).topk(2, dim=-1).values

    gm = make_fx(router, tracing_mode="fake")(torch.randn(2, 6, 8), torch.randn(8, 4))
    before = gm.code
    eager_attention_pass(gm, [torch.randn(2, 6, 8), torch.randn(8, 4)])
    assert gm.code == before and not gm.meta.get(NOTES)


@pytest.mark.parametrize("causal", [True, False])
def test_a_chunk_of_queries_over_its_prefix_equals_the_whole_op(causal):
    """Queries 2-5 of 6 over keys 0-5 with their rows of the mask and of an ALiBi-like bias,
    softcapped, softmax in float32: the chunk's output and gradients equal the whole op's rows
    and gradients (float64 roundoff: the same ops on the same rows)."""
    q, k, v, mask = _inputs(requires_grad=True)
    bias = torch.arange(LENGTH, dtype=q.dtype).expand(BATCH, HEADS, 1, LENGTH) * -0.1
    options = {"scale": 0.3, "softcap": 5.0, "softmax_dtype": torch.float32, "bias": bias}
    first, end = 2, 5
    whole = EAGER_ATTENTION(q, k, v, None if causal else mask, 0.0, causal, **options)
    grad = torch.randn(whole.shape, generator=torch.Generator().manual_seed(2), dtype=q.dtype)
    grad[:, :, :first] = grad[:, :, end:] = 0  # only the chunk's rows reach the loss
    expected = torch.autograd.grad(whole, [q, k, v], grad)
    part = prefix_eager_attention(q[:, :, first:end], k[:, :, :end], v[:, :, :end],
                                  None if causal else mask[..., first:end, :end], causal,
                                  options["scale"], options["softcap"], torch.float32,
                                  bias[..., :end])
    assert relative_error(part, whole[:, :, first:end]) <= 1e-12
    found = torch.autograd.grad(part, [q, k, v], grad[:, :, first:end])
    for g, g_ref in zip(found, expected):
        assert relative_error(g, g_ref) <= 1e-12


def test_the_eager_mask_hides_keys_with_the_lowest_value():
    """transformers' eager mask adds finfo.min, not -inf. It counts as causal where every row
    sees a key; a row that sees none weighs every key alike, later ones too."""
    *_, mask = _inputs(torch.float32)
    assert is_causal_mask(mask, min_hides=True) and not is_causal_mask(mask)
    assert mask_is_causal(mask, min_hides=True) and not mask_is_causal(mask)
    padded = mask.clone()
    padded[0, :, :, 0] = torch.finfo(torch.float32).min  # a left pad: query 0 sees nothing
    assert not mask_is_causal(padded, min_hides=True)


# ---- Hugging Face models ----------------------------------------------------------------------

transformers = pytest.importorskip("transformers")

_SIZES = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
CONFIGS = {
    "gemma2": lambda **more: transformers.Gemma2Config(**_SIZES, head_dim=16, **more),
    "llama_eager": lambda **more: transformers.LlamaConfig(**_SIZES,
                                                           attn_implementation="eager", **more),
    "bloom": lambda **more: transformers.BloomConfig(vocab_size=256, hidden_size=64, n_layer=2,
                                                     n_head=4, **more),
}
OPTIONS = {"runtime": "eager", "stream": {"chunk_size": 8, "logits_chunk_size": 8}}


def _model(arch: str, dtype: torch.dtype = torch.float32, **more) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(CONFIGS[arch](**more),
                                                               dtype=dtype)
    return model.train()


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(7))
    return {"input_ids": ids, "labels": ids}


def _assert_streams_every_layer(records, layers: int) -> None:
    (record,) = records
    assert record.kind == "stream"
    assert len(record.stream_plan.layers) == layers
    assert record.stream_plan.head is not None
    replaced = [t for name, t in record.notes if name == "eager_attention"]
    assert len(replaced) == layers and all("replaced by" in t for t in replaced), replaced


@pytest.mark.parametrize("form", ["loss", "model"])
@pytest.mark.parametrize("arch", ["gemma2", "llama_eager"])
def test_eager_attention_models_stream_every_layer_under_the_float32_rule(arch, form):
    """As shipped (softcapping on, Gemma2's sliding window of 4096 equal to the causal mask at
    24 tokens): every layer and the head stream, within the float32 rule against float64
    eager, as a compiled loss and as the compiled model returning loss and logits."""
    eager32 = _model(arch)
    model = clone_model(eager32)
    batch = _batch()
    torch._dynamo.reset()
    if form == "loss":
        step = torch.compile(lambda b: model(**b).loss, backend="memcompile", options=OPTIONS)
    else:
        model.config.use_cache = False
        compiled = torch.compile(model, backend="memcompile", options=OPTIONS)

        def step(b):
            return compiled(**b)
    with recording() as records, warnings.catch_warnings():
        warnings.simplefilter("error", memcompile.MemcompileWarning)
        out = step(clone_inputs(batch))
    loss, logits = (out, None) if form == "loss" else (out.loss, out.logits)
    loss.backward()
    _assert_streams_every_layer(records, model.config.num_hidden_layers)
    ref64 = clone_model(eager32, dtype=torch.float64)
    assert_float32_rule(loss, model, eager32, ref64, batch, arch, logits=logits)


@pytest.fixture
def in_float64(monkeypatch):
    """Everything in the model's dtype: transformers computes RMSNorm and the eager softmax in
    float32 whatever the model's dtype (and its loss from float32 logits, see `_float64_loss`),
    which would put float32 roundoff into a float64 comparison."""
    from transformers.models.gemma2 import modeling_gemma2
    from transformers.models.llama import modeling_llama

    def gemma2_norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)

    def llama_norm(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)
                                              + self.variance_epsilon))

    softmax = F.softmax

    def softmax_in_input_dtype(x, dim=None, _stacklevel=3, dtype=None):
        return softmax(x, dim)

    monkeypatch.setattr(modeling_gemma2.Gemma2RMSNorm, "forward", gemma2_norm)
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", llama_norm)
    monkeypatch.setattr(F, "softmax", softmax_in_input_dtype)


def _float64_loss(model, batch):
    logits = model(input_ids=batch["input_ids"]).logits
    following = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    return F.cross_entropy(logits.flatten(0, 1), following.flatten())


@pytest.mark.parametrize("arch, more, keys_values", [
    ("gemma2", {}, "once"),
    ("gemma2", {}, "per_chunk"),
    ("gemma2", {"sliding_window": 8}, "once"),
    ("llama_eager", {}, "once"),
    ("bloom", {}, "per_chunk"),
])
def test_eager_attention_streams_exactly_in_float64(arch, more, keys_values, in_float64,
                                                    caplog):
    """Every layer streams within 1e-10 of eager. A sliding window of 8 of 24 tokens is no
    causal mask: its layers keep the mask and chunks take its rows (the window hides every
    later key, so no layer runs whole)."""
    model = _model(arch, torch.float64, **more)
    ref = clone_model(model)
    batch = _batch()
    options = {**OPTIONS, "stream": {**OPTIONS["stream"], "keys_values": keys_values}}
    torch._dynamo.reset()
    step = torch.compile(lambda b: _float64_loss(model, b), backend="memcompile",
                         options=options)
    with recording() as records, caplog.at_level(logging.WARNING):
        loss = step(clone_inputs(batch))
        loss.backward()
    ref_loss = _float64_loss(ref, clone_inputs(batch))
    ref_loss.backward()
    _assert_streams_every_layer(records, model.config.num_hidden_layers)
    assert not [r for r in caplog.records if "re-runs it whole" in r.getMessage()]
    kept = [t for name, t in records[0].notes if name == "causal_mask" and "kept" in t]
    assert len(kept) == (1 if more else 0), kept  # Gemma2's sliding layers: layer 0 of 2
    err, where = worst_error(loss.detach(), ref_loss.detach(), model, ref)
    assert err <= FLOAT64_TOL, f"{err:.3e} at {where}"


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_padded_batch_keeps_its_mask_rows_and_stays_exact(side, in_float64, caplog):
    """A padding mask (from an input) stays whole, and each chunk takes its rows. Padded on the
    right, every query sees a key, so finfo.min hides later keys exactly and the layers chunk.
    Padded on the left, the first pad sees no key, and transformers' mask then weighs every
    key alike, later ones too: those layers' backward runs whole (a warning in the log)."""
    model = _model("llama_eager", torch.float64)
    ref = clone_model(model)
    batch = _batch()
    padding = torch.ones(2, 24, dtype=torch.long)
    padding[1, 18:] = 0 if side == "right" else 1
    padding[1, :5] = 0 if side == "left" else 1
    batch = {**batch, "attention_mask": padding,
             "labels": batch["labels"].masked_fill(padding == 0, -100)}

    def loss_of(m, b):
        logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        following = F.pad(b["labels"][:, 1:], (0, 1), value=-100)
        return F.cross_entropy(logits.flatten(0, 1), following.flatten())

    torch._dynamo.reset()
    step = torch.compile(lambda b: loss_of(model, b), backend="memcompile", options=OPTIONS)
    with recording() as records, caplog.at_level(logging.WARNING):
        loss = step(clone_inputs(batch))
        loss.backward()
    ref_loss = loss_of(ref, clone_inputs(batch))
    ref_loss.backward()
    _assert_streams_every_layer(records, model.config.num_hidden_layers)
    whole = [r for r in caplog.records if "re-runs it whole" in r.getMessage()]
    assert bool(whole) == (side == "left"), whole
    err, where = worst_error(loss.detach(), ref_loss.detach(), model, ref)
    assert err <= FLOAT64_TOL, f"{err:.3e} at {where}"
