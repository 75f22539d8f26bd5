"""A small DiT-style denoiser and reward backpropagation through its unrolled DDIM sampler.

AlignProp fine-tunes a diffusion model by backpropagating a reward of the final sample through
every denoising step; time-step gradient checkpointing (end-to-end diffusion pruning) keeps only
each step's latent and recomputes the step in the backward. `RewardThroughSampler` is that
workload: `torch.compile` unrolls its loop into one graph of `num_steps` denoiser calls, and
memcompile's planner should then save about one latent per step, not each step's activations.

Weights are random and nothing is downloaded. The sampler is deterministic (DDIM with eta = 0),
so the gradient of the reward is exact and comparable with eager.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True, kw_only=True)
class DenoiserConfig:
    """Sizes of a :class:`TinyDiT`."""

    channels: int = 4
    """Latent channels."""
    image_size: int = 16
    """Latent height and width."""
    patch_size: int = 2
    """Side of the square patches that become tokens."""
    hidden_size: int = 64
    """Token width."""
    num_heads: int = 4
    """Attention heads; must divide hidden_size."""
    num_layers: int = 2
    """Transformer blocks."""

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"DenoiserConfig.patch_size={self.patch_size} must divide "
                             f"image_size={self.image_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"DenoiserConfig.num_heads={self.num_heads} must divide "
                             f"hidden_size={self.hidden_size}")


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of diffusion times `t` (shape (B,)) into `dim` channels."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=t.dtype, device=t.device)
                      / half)
    args = t[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class DiTBlock(nn.Module):
    """Pre-norm attention and MLP, each scaled, shifted and gated by the time embedding (adaLN)."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * hidden, hidden))
        self.modulation = nn.Linear(hidden, 6 * hidden)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """`x`: (B, N, hidden) tokens; `emb`: (B, hidden) time embedding."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(emb)).chunk(6, -1)
        h = self.norm1(x) * (1 + scale1[:, None]) + shift1[:, None]
        b, n, d = h.shape
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + gate1[:, None] * self.proj(attn)
        h = self.norm2(x) * (1 + scale2[:, None]) + shift2[:, None]
        return x + gate2[:, None] * self.mlp(h)


class TinyDiT(nn.Module):
    """A DiT-style noise predictor: patchify, adaLN transformer blocks, unpatchify."""

    def __init__(self, config: DenoiserConfig) -> None:
        super().__init__()
        self.config = c = config
        self.patchify = nn.Conv2d(c.channels, c.hidden_size, c.patch_size, stride=c.patch_size)
        tokens = (c.image_size // c.patch_size) ** 2
        self.position = nn.Parameter(torch.randn(1, tokens, c.hidden_size) * 0.02)
        self.time_mlp = nn.Sequential(nn.Linear(c.hidden_size, c.hidden_size), nn.SiLU(),
                                      nn.Linear(c.hidden_size, c.hidden_size))
        self.blocks = nn.ModuleList(DiTBlock(c.hidden_size, c.num_heads)
                                    for _ in range(c.num_layers))
        self.norm = nn.LayerNorm(c.hidden_size, elementwise_affine=False)
        self.out = nn.Linear(c.hidden_size, c.patch_size ** 2 * c.channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Predict the noise in latents `x` (B, C, H, W) at times `t` (B,)."""
        c = self.config
        b = x.shape[0]
        h = self.patchify(x).flatten(2).transpose(1, 2) + self.position
        emb = self.time_mlp(timestep_embedding(t, c.hidden_size))
        for block in self.blocks:
            h = block(h, emb)
        h = self.out(self.norm(h))
        side, p = c.image_size // c.patch_size, c.patch_size
        h = h.view(b, side, side, p, p, c.channels).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(b, c.channels, c.image_size, c.image_size)


def ddim_alphas(num_train_steps: int = 1000) -> torch.Tensor:
    """Cumulative signal fractions (alpha-bar) of a linear beta schedule, float64."""
    betas = torch.linspace(1e-4, 0.02, num_train_steps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


class RewardThroughSampler(nn.Module):
    """Loss = minus a reward of the sample that `num_steps` DDIM steps make from `noise`.

    The reward is a fixed linear scorer of the final latent (a stand-in for an aesthetic
    model), so the gradient flows through every denoising step into the denoiser's weights.
    `checkpoint_steps=True` wraps each step in `torch.utils.checkpoint` (the hand-written
    baseline: keep each step's input latent, recompute the step in the backward).
    """

    def __init__(self, config: DenoiserConfig = DenoiserConfig(), *, num_steps: int = 20,
                 checkpoint_steps: bool = False) -> None:
        super().__init__()
        if num_steps < 1:
            raise ValueError(f"num_steps must be at least 1, got {num_steps}")
        self.denoiser = TinyDiT(config)
        self.num_steps = num_steps
        self.checkpoint_steps = checkpoint_steps
        alphas = ddim_alphas()
        times = torch.linspace(len(alphas) - 1, 0, num_steps + 1).round().long()
        self.register_buffer("times", times.float(), persistent=False)
        self.register_buffer("alpha", alphas[times].float(), persistent=False)
        scorer = torch.Generator().manual_seed(1234)
        shape = (config.channels, config.image_size, config.image_size)
        self.register_buffer("scorer", torch.randn(shape, generator=scorer), persistent=False)

    def step(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """One DDIM step (eta = 0) from step i's latent to step i+1's."""
        a, a_next = self.alpha[i], self.alpha[i + 1]
        t = self.times[i].expand(x.shape[0]).to(x.dtype)
        eps = self.denoiser(x, t)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        """Minus the mean reward of the samples drawn from `noise` (B, C, H, W)."""
        x = noise
        for i in range(self.num_steps):
            if self.checkpoint_steps:
                x = checkpoint(self.step, x, i, use_reentrant=False)
            else:
                x = self.step(x, i)
        return -(x * self.scorer).flatten(1).sum(1).mean()


def build_reward_sampler(*, num_steps: int = 20, config: DenoiserConfig = DenoiserConfig(),
                         dtype: torch.dtype = torch.float32, seed: int = 0,
                         checkpoint_steps: bool = False) -> RewardThroughSampler:
    """A :class:`RewardThroughSampler` with weights drawn from `seed`, in `dtype`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = RewardThroughSampler(config, num_steps=num_steps,
                                     checkpoint_steps=checkpoint_steps)
    return model.to(dtype)
