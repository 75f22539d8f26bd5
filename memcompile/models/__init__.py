"""Benchmark and test models: a pure-PyTorch Llama and small Hugging Face causal LMs."""

from memcompile.models.hf import HF_ARCHS, build_hf_model
from memcompile.models.llama import (
    PRESETS,
    CausalLMOutput,
    LlamaConfig,
    LlamaForCausalLM,
    build_model,
    make_batch,
)

__all__ = [
    "HF_ARCHS",
    "PRESETS",
    "CausalLMOutput",
    "LlamaConfig",
    "LlamaForCausalLM",
    "build_hf_model",
    "build_model",
    "make_batch",
]
