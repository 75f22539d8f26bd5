"""`stream={"keep_attention": True}`: each held layer keeps its attention outputs from the
forward pass, and its backward chunks replay them instead of running attention's forward
again (`runtime.kept_attention`). Gradients stay exact (float64 against eager), the attention
forward runs once per layer instead of twice, the estimate counts the kept bytes and bounds the
measured peak, and where nothing can be kept a warning says why."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from helpers import FLOAT64_TOL, assert_float32_rule, clone_inputs, clone_model, step_error

import memcompile
from memcompile.errors import MemcompileWarning, OptionsError
from memcompile.models import LlamaConfig, LlamaForCausalLM, build_hf_model, build_model
from memcompile.models.llama import PRESETS
from memcompile.report import recording
from memcompile.runtime.kept_attention import _empty_in_order_of

CPU_FLASH = "aten::_scaled_dot_product_flash_attention_for_cpu"


def _loss(model, stream, runtime="eager", **options):
    torch._dynamo.reset()
    return torch.compile(lambda b: model(**b).loss, backend="memcompile",
                         options={"stream": stream, "runtime": runtime, **options})


def _attention_forwards(step, batch) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(batch).backward()
    return sum(1 for e in prof.events() if e.name == CPU_FLASH)


def _tiny_batch(seq_len=64):
    ids = torch.randint(0, 128, (2, seq_len), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("runtime", ["eager", "inductor"])
@pytest.mark.parametrize("checkpoints", ["auto", 2])
def test_kept_attention_is_exact_and_skips_the_backward_attention_forward(runtime, checkpoints):
    """Four layers of the built-in tiny model in float64, 64 tokens in chunks of 16. Kept
    outputs: gradients within the float64 rule of eager's, and the flash kernel's forward runs
    half as often as without (all inputs held); with 2 held, the layers the forward keeps
    replay and the others run attention again."""
    model = build_model(dataclasses.replace(PRESETS["tiny"], num_layers=4), dtype=torch.float64)
    ref = clone_model(model)
    batch = _tiny_batch()
    stream = {"chunk_size": 16, "checkpoints": checkpoints}
    counts = {}
    for keep in (False, True):
        step = _loss(model, {**stream, "keep_attention": keep}, runtime)
        err, where = step_error(step, model, ref, batch)
        assert err <= FLOAT64_TOL, (keep, where, err)
        counts[keep] = _attention_forwards(step, batch)
    if checkpoints == "auto":
        assert counts[True] * 2 == counts[False], counts
    else:
        assert counts[False] // 2 < counts[True] < counts[False], counts


@pytest.mark.parametrize("runtime", ["eager", "inductor"])
@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_kept_attention_on_hugging_face_llama_from_its_default_config(runtime, padding):
    """transformers' Llama from its default config (sizes changed only, so `use_cache=True`),
    SDPA, chunks of 4 over 20 tokens. Padding gives the kernel a mask over keys
    (`passes.key_mask`); with 9 tokens of left padding whole chunks of queries see no key, and
    the kept log-sum-exp must be the one the backward normalizes by. Held to the float32 rule,
    as the other Hugging Face models (their RMSNorm computes in float32)."""
    eager32 = build_hf_model("llama", dtype=torch.float32, seed=0)
    ref64 = clone_model(eager32, dtype=torch.float64)
    model = clone_model(eager32)
    length = 20
    ids = torch.randint(0, 256, (2, length), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": ids, "labels": ids.clone()}
    if padding:
        mask = torch.ones_like(ids)
        if padding == "left":
            mask[0, :9] = 0
        else:
            mask[0, -9:] = 0
        batch["attention_mask"] = mask
        batch["labels"] = ids.masked_fill(mask == 0, -100)
    step = _loss(model, {"chunk_size": 4, "logits_chunk_size": 4, "keep_attention": True},
                 runtime)
    model.zero_grad(set_to_none=True)
    loss = step(clone_inputs(batch))
    loss.backward()
    assert_float32_rule(loss, model, eager32, ref64, batch, f"{runtime}, {padding} padding")


def _hidden_dominated_model():
    config = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=128, num_layers=6,
                         num_heads=2, num_kv_heads=1)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def _estimated_peak(records) -> int:
    (note,) = [t for _, t in records[0].notes if t.startswith("layer inputs:")]
    return int(note.split("estimated peak ")[1].split(" ")[0].replace(",", ""))


def test_the_estimate_counts_kept_outputs_and_bounds_the_measured_peak():
    """Six layers of hidden 128 at 2,048 tokens, float32: each layer keeps its output
    (2,048 x 128 floats, 1 MiB) and log-sum-exp (2 heads x 2,048 floats, 16 KiB). The estimate
    rises by exactly six of those; the measured peak rises, and stays under the estimate."""
    model = _hidden_dominated_model()
    ids = torch.randint(0, 64, (1, 2048), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    estimates, peaks = {}, {}
    for keep in (False, True):
        step = _loss(model, {"chunk_size": 256, "keep_attention": keep})
        with recording() as records:
            step(batch).backward()
        model.zero_grad(set_to_none=True)
        estimates[keep] = _estimated_peak(records)

        def run():
            step(batch).backward()
            model.zero_grad(set_to_none=True)
        peaks[keep] = memcompile.measure(run, repeat=1, method="tracked").peak_bytes
    kept_per_layer = 2048 * 128 * 4 + 2 * 2048 * 4
    assert estimates[True] - estimates[False] == 6 * kept_per_layer
    assert peaks[False] < peaks[True] <= estimates[True], (peaks, estimates)


def test_keep_attention_that_cannot_apply_warns_why():
    """keys_values "per_chunk" recomputes keys per chunk: nothing is kept, and the warning
    says so; the gradients are those of the plain stream."""
    model = build_model("tiny", dtype=torch.float64)
    ref = clone_model(model)
    step = _loss(model, {"chunk_size": 16, "keys_values": "per_chunk", "keep_attention": True})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        err, _ = step_error(step, model, ref, _tiny_batch())
    assert err <= FLOAT64_TOL
    texts = [str(w.message) for w in caught if issubclass(w.category, MemcompileWarning)]
    assert any("keep_attention" in t and "per_chunk" in t for t in texts), texts


def test_keep_attention_must_be_a_bool():
    with pytest.raises(OptionsError, match="stream.keep_attention.*valid: True or False"):
        memcompile.Options(stream={"keep_attention": "yes"})


@pytest.mark.parametrize("layout", ["BLHD", "BHLD"])
def test_kept_buffer_rows_lie_in_memory_as_the_kernel_output(layout):
    """The buffer orders its dimensions in memory as the kernel's output does: models project
    to `(B, L, H, D)` and transpose, and the CPU kernel then returns `(B, H, L, D)` stored as
    `(B, L, H, D)`; a chunk's rows read back have that output's strides but for the batch's
    (what the compiled segments after attention were compiled for)."""
    if layout == "BLHD":
        q = torch.randn(2, 16, 4, 8).transpose(1, 2)
    else:
        q = torch.randn(2, 4, 16, 8)
    out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, q, q, 0.0, True)
    buffer = _empty_in_order_of(out, 64)
    assert buffer.shape == (2, 4, 64, 8)

    def order(t):
        return sorted(range(4), key=lambda d: (-t.stride(d), d))
    assert order(buffer) == order(out)
    if layout == "BLHD":
        assert buffer.narrow(2, 16, 16).stride()[1:] == out.stride()[1:]
