"""Randomly initialised Hugging Face causal LMs built from configs, nothing downloaded.

``transformers`` is an optional dependency, so it is imported only when a model is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

_LLAMA_LIKE: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "attention_dropout": 0.0,
    "use_cache": False,
}

# Config class name and test-sized defaults per architecture. Qwen3 and Gemma default head_dim
# to a fixed value rather than hidden/heads, so it is pinned to match the other models.
_ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", _LLAMA_LIKE),
    "mistral": ("MistralConfig", _LLAMA_LIKE),
    "qwen2": ("Qwen2Config", _LLAMA_LIKE),
    "qwen3": ("Qwen3Config", {**_LLAMA_LIKE, "head_dim": 16}),
    "gemma": ("GemmaConfig", {**_LLAMA_LIKE, "head_dim": 16}),
    "gpt2": (
        "GPT2Config",
        {
            "vocab_size": 256,
            "n_embd": 64,
            "n_inner": 128,
            "n_layer": 2,
            "n_head": 4,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "summary_first_dropout": 0.0,
            # GPT-2's default special tokens (50256) lie outside the small vocabulary.
            "bos_token_id": 255,
            "eos_token_id": 255,
            "use_cache": False,
        },
    ),
}

HF_ARCHS: tuple[str, ...] = tuple(sorted(_ARCHS))
"""Architecture names accepted by :func:`build_hf_model`."""


def build_hf_model(
    arch: str, *, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides: Any
) -> PreTrainedModel:
    """Build a small, randomly initialised Hugging Face causal LM for ``arch``.

    Defaults are test-sized (2 layers, hidden 64, 4 heads, 2 kv heads where the architecture has
    them, vocab 256, intermediate 128); ``overrides`` are keyword arguments of the
    architecture's config class and replace them. Attention uses SDPA, the KV cache is off and
    dropout probabilities are 0, so the model stays in training mode yet is deterministic.
    Initialisation is seeded with ``seed`` without disturbing the caller's RNG state.
    """
    if arch not in _ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid archs: {list(HF_ARCHS)}")
    try:
        import transformers
    except ImportError as err:
        raise ImportError("build_hf_model needs the optional dependency 'transformers'") from err
    config_name, defaults = _ARCHS[arch]
    config = getattr(transformers, config_name)(**{**defaults, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.AutoModelForCausalLM.from_config(
            config, attn_implementation="sdpa", dtype=dtype
        )
