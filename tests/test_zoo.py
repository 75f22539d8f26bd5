"""StreamBP on a zoo of Hugging Face causal LMs, each built from its config class's defaults with
only the sizes changed (as a pretrained checkpoint's config would be, scaled down): `use_cache`
on, dropout as shipped, the attention implementation transformers picks.

Each architecture either streams every layer and the loss head, within the design's float32 rule
against float64 eager, or is left whole with a `MemcompileWarning` whose reason names what
stops it. The README's table ("Which architectures stream") is this file's `ZOO`.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import assert_float32_rule, clone_inputs, clone_model

import memcompile
from memcompile.report import recording

transformers = pytest.importorskip("transformers")

_SIZES = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
_HEAD16 = {**_SIZES, "head_dim": 16}
STREAMS = None
"""Expected outcome of an architecture that streams every layer and its head."""

ZOO: dict[str, tuple[str, dict, str | None]] = {
    # architecture: (config class, sizes, None if it streams, else the reason's words)
    "llama": ("LlamaConfig", _SIZES, STREAMS),
    "mistral": ("MistralConfig", _SIZES, STREAMS),
    "qwen2": ("Qwen2Config", _SIZES, STREAMS),
    "qwen3": ("Qwen3Config", _HEAD16, STREAMS),
    "gemma": ("GemmaConfig", _HEAD16, STREAMS),
    "gemma3": ("Gemma3TextConfig", _HEAD16, STREAMS),
    "phi3": ("Phi3Config", {**_SIZES, "pad_token_id": 0}, STREAMS),  # its pad id is a vocab id
    "olmo2": ("Olmo2Config", _SIZES, STREAMS),
    "granite": ("GraniteConfig", _SIZES, STREAMS),
    "starcoder2": ("Starcoder2Config", _SIZES, STREAMS),
    "cohere": ("CohereConfig", _SIZES, STREAMS),
    "stablelm": ("StableLmConfig", _SIZES, STREAMS),
    "phi": ("PhiConfig", {k: v for k, v in _SIZES.items() if k != "num_key_value_heads"},
            STREAMS),
    "gpt_neox": ("GPTNeoXConfig", {k: v for k, v in _SIZES.items()
                                   if k != "num_key_value_heads"}, STREAMS),
    "falcon": ("FalconConfig", {"vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2,
                                "num_attention_heads": 4}, STREAMS),
    "gptj": ("GPTJConfig", {"vocab_size": 256, "n_embd": 64, "n_layer": 2, "n_head": 4,
                            "rotary_dim": 8}, STREAMS),
    # Eager attention (matmul, softmax, matmul), made one op by the eager_attention pass:
    # Gemma2 for its logit softcapping, Bloom for ALiBi (baddbmm's added term).
    "gemma2": ("Gemma2Config", _HEAD16, STREAMS),
    "bloom": ("BloomConfig", {"vocab_size": 256, "hidden_size": 64, "n_layer": 2, "n_head": 4},
              STREAMS),
    # Dropout 0.1 by default: a layer re-run in the backward would draw new masks, so it stays
    # whole (the streamed step would not match the unstreamed one).
    "opt": ("OPTConfig", {"vocab_size": 256, "hidden_size": 64, "ffn_dim": 128,
                          "num_hidden_layers": 2, "num_attention_heads": 4,
                          "word_embed_proj_dim": 64}, "draws random numbers"),
    # GPT-2 breaks the graph before its loss, so its layers' graph returns the cache it built.
    "gpt2": ("GPT2Config", {"vocab_size": 256, "n_embd": 64, "n_inner": 128, "n_layer": 2,
                            "n_head": 4, "bos_token_id": 255, "eos_token_id": 255},
             "set model.config.use_cache = False"),
    # Mixture of experts: tokens are sorted by expert, across the sequence.
    "mixtral": ("MixtralConfig", _SIZES, "chooses along the sequence"),
}


NO_FLOAT64 = {"mixtral"}
"""Architectures with no float64 reference: Mixtral's grouped expert matmul has no float64
kernel (eager float64 raises)."""


def build(arch: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The architecture from its config class's defaults and the zoo's sizes, seeded."""
    config_name, sizes, _ = ZOO[arch]
    config = getattr(transformers, config_name)(**sizes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.train()


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(7))
    return {"input_ids": ids, "labels": ids}


def _has_dropout(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


def _loss(model, batch):
    return model(**batch).loss


OPTIONS = {"runtime": "eager", "stream": {"chunk_size": 8, "logits_chunk_size": 8}}


@pytest.mark.parametrize("form", ["loss", "model"])
@pytest.mark.parametrize("arch", list(ZOO))
def test_zoo_streams_or_says_why(arch, form):
    """Two forms: a compiled function returning the loss, and the compiled model itself
    returning its output (loss and logits), as a trainer calls it, with the cache off (the
    documented recipe; `test_stream_models` covers leaving it on)."""
    eager32 = build(arch)
    model = clone_model(eager32)
    batch = _batch()
    torch._dynamo.reset()
    if form == "loss":
        step = torch.compile(lambda b: _loss(model, b), backend="memcompile", options=OPTIONS)
    else:
        model.config.use_cache = False
        compiled = torch.compile(model, backend="memcompile", options=OPTIONS)

        def step(b):
            return compiled(**b)
    expected = ZOO[arch][2]
    if form == "model" and arch == "gpt2":
        # Called whole, GPT-2's forward reaches transformers' logger (`warning_once`, about its
        # config's `loss_type=None`), where Dynamo breaks the graph: no graph holds a layer.
        expected = "no attention over the sequence was found"
    with recording() as records, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = step(clone_inputs(batch))
    loss, logits = (out, None) if form == "loss" else (out.loss, out.logits)
    loss.backward()
    said = [str(w.message) for w in caught if issubclass(w.category, memcompile.MemcompileWarning)]
    if expected is STREAMS:
        assert not said, said
        (record,) = records
        assert record.kind == "stream"
        assert len(record.stream_plan.layers) == model.config.num_hidden_layers
        assert record.stream_plan.head is not None
    else:
        assert any(expected in text for text in said), said  # graph breaks make several
        assert all(r.kind != "stream" for r in records)
    if _has_dropout(model):
        return  # random masks: eager draws others, there is nothing to compare against
    if arch in NO_FLOAT64:
        return
    ref64 = clone_model(eager32, dtype=torch.float64)
    assert_float32_rule(loss, model, eager32, ref64, batch, arch, logits=logits)
