"""Benchmark and test models: a pure-PyTorch Llama, small Hugging Face causal LMs, and a small
diffusion denoiser with reward backpropagation through its sampler."""

from memcompile.models.diffusion import DenoiserConfig, RewardThroughSampler, build_reward_sampler
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
    "DenoiserConfig",
    "RewardThroughSampler",
    "build_reward_sampler",
    "HF_ARCHS",
    "PRESETS",
    "CausalLMOutput",
    "LlamaConfig",
    "LlamaForCausalLM",
    "build_hf_model",
    "build_model",
    "make_batch",
]
