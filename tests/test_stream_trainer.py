"""StreamBP in the form trainers use: the model itself compiled (`model.compile(backend=
"memcompile", options=...)`), called with labels, returning its loss and its logits.

The layers and the loss head stream; the logits are written chunk by chunk into the value
returned, and nothing else of the head's length-sized values (log-softmax, the logits'
gradient) exists: in exact bytes, the compiled model's step peaks at the loss-only step's peak
plus the returned logits. A gradient that reaches the returned logits (a loss built outside the
model from them) is taken back exactly (float64, on the built-in Llama: Hugging Face's RMSNorm
computes in float32 even in a float64 model). A real `transformers.Trainer` run trains through
it.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from helpers import FLOAT64_TOL, assert_float32_rule, clone_model, grad_errors, relative_error
from memcompile.measure import tracked_peak
from memcompile.models import LlamaConfig, LlamaForCausalLM, build_hf_model
from memcompile.models.llama import causal_lm_loss
from memcompile.report import recording

transformers = pytest.importorskip("transformers")

STREAM = {"chunk_size": 8, "logits_chunk_size": 8}
TINY = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_layers=2,
                   num_heads=4, num_kv_heads=2)


def _llama(dtype=torch.float64, **sizes):
    return build_hf_model("llama", dtype=dtype, seed=0, **sizes).train()


def _ids(length=24, batch=2, vocab=256, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_the_compiled_model_streams_layers_and_head():
    """Hugging Face Llama compiled whole (float32, its default attention): layers and head
    stream, and loss, gradients and logits keep the design's float32 rule."""
    eager32 = _llama(torch.float32)
    model = clone_model(eager32)
    ids = _ids()
    torch._dynamo.reset()
    model.compile(backend="memcompile", options={"runtime": "eager", "stream": STREAM})
    with recording() as records:
        out = model(input_ids=ids, labels=ids)
    (record,) = records
    assert record.kind == "stream"
    assert len(record.stream_plan.layers) == 2
    head = record.stream_plan.head
    assert head is not None and [tuple(o.meta["val"].shape) for o in head.sequence_outputs] == [
        (2, 24, 256)]
    out.loss.backward()
    assert_float32_rule(out.loss, model, eager32, clone_model(eager32, dtype=torch.float64),
                        {"input_ids": ids, "labels": ids}, "llama", logits=out.logits)


def _loss_and_logits(model):
    """A step returning the loss and the logits, as a model called with labels does, on the
    built-in Llama (float64 throughout, so exactness is float64's)."""
    def step(ids):
        logits = model(input_ids=ids).logits
        return causal_lm_loss(logits, ids, -100), logits
    return step


@pytest.mark.parametrize("affine", [True, False])
def test_returned_logits_and_a_gradient_reaching_them_are_exact(affine):
    """Besides the model's own loss (affine in the head's reductions: taken in the forward's
    one pass; or squared, not affine), a loss built outside the compiled step from the returned
    logits: its gradient is taken back through the head, chunk by chunk."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(TINY).double()
    reference = clone_model(model)
    ids = _ids(length=20)
    torch._dynamo.reset()
    step = torch.compile(_loss_and_logits(model), backend="memcompile",
                         options={"runtime": "eager", "stream": STREAM})
    with recording() as records:
        loss, logits = step(ids)
    assert records[0].stream_plan.head.sequence_outputs
    ref_loss, ref_logits = _loss_and_logits(reference)(ids)
    assert relative_error(logits, ref_logits) < FLOAT64_TOL
    assert relative_error(loss, ref_loss) < FLOAT64_TOL
    for own, out, m in ((loss, logits, model), (ref_loss, ref_logits, reference)):
        (own if affine else own ** 2).add(out.sin().mean()).backward()
    assert max(grad_errors(model, reference).values()) < FLOAT64_TOL


def _step_peak(model, form: str, ids: torch.Tensor) -> int:
    """The tracked peak of a streamed step (forward and backward) above its start, `.grad`
    existing; the output is held until the backward is done, as a trainer holds it."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="memcompile",
                             options={"runtime": "eager", "stream": STREAM})
    if form == "loss":
        def step():
            compiled_loss(ids).backward()

        def compiled_loss(x):
            return compiled_fn(x)

        compiled_fn = torch.compile(lambda x: model(input_ids=x, labels=x).loss,
                                    backend="memcompile",
                                    options={"runtime": "eager", "stream": STREAM})
    else:
        def step():
            out = compiled(input_ids=ids, labels=ids)
            out.loss.backward()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    step()  # compiles
    return tracked_peak(step)


def test_the_returned_logits_are_the_only_whole_length_head_value():
    """Float32, vocabulary 4,096 and 256 tokens: the logits (4 MiB) dwarf every other value of
    the step; the model form peaks exactly 4 MiB above the loss form."""
    model = _llama(torch.float32, vocab_size=4096)
    ids = _ids(length=256, batch=1, vocab=4096)
    loss_form = _step_peak(model, "loss", ids)
    model_form = _step_peak(model, "model", ids)
    assert model_form - loss_form == 256 * 4096 * 4


def test_a_model_called_whole_with_its_cache_on_warns_and_still_trains():
    """The default config returns the cache it builds: the warning names the setting."""
    model = _llama(use_cache=True)
    ids = _ids()
    torch._dynamo.reset()
    model.compile(backend="memcompile", options={"runtime": "eager", "stream": STREAM})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(input_ids=ids, labels=ids).loss.backward()
    assert any("model.config.use_cache = False" in str(w.message) for w in caught)


def test_per_token_log_probabilities_stream_without_a_loss():
    """A graph returning per-token values and no loss (GRPO's reference or old
    log-probabilities, `token_logps(model(ids).logits, labels)`): the head runs chunk by chunk
    and writes each chunk's rows, with and without autograd."""
    from memcompile.losses import token_logps

    torch.manual_seed(0)
    model = LlamaForCausalLM(TINY).double()
    reference = clone_model(model)
    ids = _ids(length=20)
    torch._dynamo.reset()
    step = torch.compile(lambda x: token_logps(model(input_ids=x).logits, x),
                         backend="memcompile", options={"runtime": "eager", "stream": STREAM})
    with recording() as records:
        logps = step(ids)
    (record,) = records
    assert record.kind == "stream" and record.stream_plan.head is not None
    expected = token_logps(reference(input_ids=ids).logits, ids)
    assert relative_error(logps, expected) < FLOAT64_TOL
    weights = torch.randn(logps.shape, dtype=logps.dtype,
                          generator=torch.Generator().manual_seed(1))
    (logps * weights).sum().backward()
    (expected * weights).sum().backward()
    assert max(grad_errors(model, reference).values()) < FLOAT64_TOL
    with torch.no_grad():
        assert relative_error(step(ids), expected) < FLOAT64_TOL
