"""A small CLIP-style dual encoder (image patches and text, one transformer block each) for the
contrastive setting: a loss that couples every sample of the batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DualEncoderConfig:
    """Sizes of `DualEncoder`."""

    image_size: int = 16
    patch: int = 4
    channels: int = 3
    vocab_size: int = 128
    text_length: int = 8
    hidden: int = 32
    heads: int = 4
    layers: int = 1
    embed: int = 16


class Block(nn.Module):
    """Pre-norm transformer block (bidirectional attention within a sample, GELU MLP)."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(),
                                 nn.Linear(4 * hidden, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over the tokens of each sample, then the MLP; both residual."""
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        attended = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                  v.transpose(1, 2))
        x = x + self.out(attended.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class DualEncoder(nn.Module):
    """Image tower (patch convolution) and text tower (embeddings), each blocks, a mean over
    tokens and a projection; returns both embeddings of a batch of pairs."""

    def __init__(self, config: DualEncoderConfig = DualEncoderConfig()):
        super().__init__()
        c = config
        self.patches = nn.Conv2d(c.channels, c.hidden, c.patch, stride=c.patch)
        self.image_pos = nn.Parameter(torch.randn((c.image_size // c.patch) ** 2, c.hidden) / 8)
        self.image_blocks = nn.ModuleList(Block(c.hidden, c.heads) for _ in range(c.layers))
        self.image_proj = nn.Linear(c.hidden, c.embed, bias=False)
        self.tokens = nn.Embedding(c.vocab_size, c.hidden)
        self.text_pos = nn.Parameter(torch.randn(c.text_length, c.hidden) / 8)
        self.text_blocks = nn.ModuleList(Block(c.hidden, c.heads) for _ in range(c.layers))
        self.text_proj = nn.Linear(c.hidden, c.embed, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, images: torch.Tensor, ids: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(batch, channels, size, size)` images and `(batch, length)` ids to embeddings."""
        x = self.patches(images).flatten(2).transpose(1, 2) + self.image_pos
        for block in self.image_blocks:
            x = block(x)
        t = self.tokens(ids) + self.text_pos
        for block in self.text_blocks:
            t = block(t)
        return self.image_proj(x.mean(1)), self.text_proj(t.mean(1))
