"""A Llama-style causal decoder in plain PyTorch, used as a benchmark and test workload.

The model mirrors the Hugging Face Llama architecture (RMSNorm, rotary position embeddings,
grouped-query attention, SwiGLU MLP, pre-norm residuals) but has no dependency beyond torch, no
caches and no buffers sized by a maximum length, so graphs captured by ``torch.compile`` stay
small and work with dynamic sequence lengths. Weights are random: nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

_INIT_STD = 0.02


@dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Sizes and hyper-parameters of a :class:`LlamaForCausalLM`."""

    vocab_size: int
    """Number of token ids; rows of the embedding and outputs of the LM head."""
    hidden_size: int
    """Width of the residual stream."""
    intermediate_size: int
    """Width of the SwiGLU MLP's gate and up projections."""
    num_layers: int
    """Number of decoder layers."""
    num_heads: int
    """Number of query heads; ``hidden_size / num_heads`` is the head dim and must be even."""
    num_kv_heads: int
    """Number of key/value heads (grouped-query attention); must divide ``num_heads``."""
    rope_theta: float = 10000.0
    """Base of the rotary embedding frequencies."""
    rms_norm_eps: float = 1e-6
    """Epsilon added to the mean square in RMSNorm."""
    tie_embeddings: bool = False
    """Share one weight between the token embedding and the LM head."""
    ignore_index: int = -100
    """Label value excluded from the loss."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
        for name in ("rope_theta", "rms_norm_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(
                    f"LlamaConfig.{name} must be a positive number, got {getattr(self, name)!r}"
                )
        # Rotary embeddings rotate pairs of channels, hence the even head dim.
        valid_heads = [n for n in _divisors(self.hidden_size) if (self.hidden_size // n) % 2 == 0]
        if self.num_heads not in valid_heads:
            raise ValueError(
                f"LlamaConfig.num_heads={self.num_heads} must divide hidden_size="
                f"{self.hidden_size} into an even head dim; valid values: {valid_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LlamaConfig.num_kv_heads={self.num_kv_heads} must divide num_heads="
                f"{self.num_heads}; valid values: {_divisors(self.num_heads)}"
            )

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.hidden_size // self.num_heads


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


PRESETS: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_layers=2,
                        num_heads=4, num_kv_heads=2),
    "small": LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_layers=4,
                         num_heads=8, num_kv_heads=8),
    "wide": LlamaConfig(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_layers=8,
                        num_heads=16, num_kv_heads=4),
}
"""Named configurations: ``tiny`` for tests, ``small`` and ``wide`` for benchmarks."""


class CausalLMOutput(NamedTuple):
    """Result of :meth:`LlamaForCausalLM.forward`: exactly one of the fields is set."""

    loss: torch.Tensor | None
    """Mean next-token cross-entropy, when labels were given."""
    logits: torch.Tensor | None
    """``(batch, seq, vocab)`` scores, when no labels were given."""


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned scale, computed in the input dtype."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` over its last dimension."""
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary_cos_sin(
    seq_len: int, head_dim: int, theta: float, *, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the ``(seq_len, head_dim)`` cosine and sine tables for positions ``0..seq_len-1``.

    They are rebuilt on every call instead of cached in a max-length buffer, so any sequence
    length works (also as a dynamic size under ``torch.compile``) and the tables cost nothing to
    recompute under activation checkpointing. Angles are computed in at least float32 because
    half-precision positions lose integer accuracy beyond a few hundred tokens.
    """
    work_dtype = torch.promote_types(dtype, torch.float32)
    exponents = torch.arange(0, head_dim, 2, device=device, dtype=work_dtype) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    positions = torch.arange(seq_len, device=device, dtype=work_dtype)
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotary_cos_sin_at(
    positions: torch.Tensor, head_dim: int, theta: float, *, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(batch, 1, seq, head_dim)`` cosine and sine tables at ``positions`` ``(batch,
    seq)``: what :func:`rotary_cos_sin` gives at ``0..seq_len-1``, at any positions (a shard of
    a sequence split across ranks holds positions from its middle), with the same arithmetic."""
    work_dtype = torch.promote_types(dtype, torch.float32)
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=work_dtype) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    angles = positions.to(work_dtype)[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape ``(batch, heads, seq, head_dim)`` by the position angles."""
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Causal grouped-query self-attention with rotary position embeddings."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.rope_theta = config.rope_theta
        kv_size = config.num_kv_heads * config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, kv_size, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, kv_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def _heads(self, x: torch.Tensor, num_heads: int) -> torch.Tensor:
        batch, seq, _ = x.shape
        return x.view(batch, seq, num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Attend over ``x`` of shape ``(batch, seq, hidden)``, its tokens at ``position_ids``
        ``(batch, seq)`` (default ``0..seq-1``)."""
        batch, seq, hidden = x.shape
        q = self._heads(self.q_proj(x), self.num_heads)
        k = self._heads(self.k_proj(x), self.num_kv_heads)
        v = self._heads(self.v_proj(x), self.num_kv_heads)
        if position_ids is None:
            cos, sin = rotary_cos_sin(seq, self.head_dim, self.rope_theta,
                                      dtype=x.dtype, device=x.device)
        else:
            cos, sin = rotary_cos_sin_at(position_ids, self.head_dim, self.rope_theta,
                                         dtype=x.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # enable_gqa lets SDPA broadcast the kv heads instead of materialising repeated copies.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, hidden))


class MLP(nn.Module):
    """SwiGLU feed-forward block: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP to ``x`` of shape ``(..., hidden)``."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """One pre-norm transformer block: attention then MLP, each added to the residual."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, hidden: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Map hidden states ``(batch, seq, hidden)`` to the next layer's hidden states."""
        hidden = hidden + self.attn(self.input_norm(hidden), position_ids)
        return hidden + self.mlp(self.post_attn_norm(hidden))


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Mean cross-entropy of predicting ``labels[:, t + 1]`` from ``logits[:, t]``.

    Matches Hugging Face's ``ForCausalLMLoss``: low-precision logits are upcast to float32, and
    the labels (not the logits) are shifted, padding the last position with ``ignore_index`` so
    no shifted copy of the large logits tensor is made.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    targets = F.pad(labels, (0, 1), value=ignore_index)[:, 1:]
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=ignore_index)


class LlamaForCausalLM(nn.Module):
    """Llama-style decoder with an LM head; see :class:`LlamaConfig` for the sizes."""

    gradient_checkpointing: bool = False
    """Recompute each decoder layer in the backward pass instead of storing its activations."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def enable_gradient_checkpointing(self) -> None:
        """Checkpoint every decoder layer while the model is in training mode."""
        self.gradient_checkpointing = True

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """Run the model on ``(batch, seq)`` token ids.

        With ``labels`` (same shape; the shift happens here) return only the loss, so the full
        logits tensor is not kept alive as an output; without, return only the logits.
        ``position_ids`` ``(batch, seq)``: each token's position for the rotary embeddings
        (default ``0..seq-1``; a sequence-parallel shard passes its global positions).
        """
        hidden = self.embed_tokens(input_ids)
        extra = () if position_ids is None else (position_ids,)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                hidden = checkpoint(layer, hidden, *extra, use_reentrant=False)
            else:
                hidden = layer(hidden, *extra)
        logits = self.lm_head(self.norm(hidden))
        if labels is None:
            return CausalLMOutput(loss=None, logits=logits)
        return CausalLMOutput(loss=causal_lm_loss(logits, labels, self.config.ignore_index),
                              logits=None)


def resolve_config(preset_or_config: str | LlamaConfig) -> LlamaConfig:
    """Return ``preset_or_config`` itself or the :data:`PRESETS` entry it names."""
    if isinstance(preset_or_config, LlamaConfig):
        return preset_or_config
    if preset_or_config not in PRESETS:
        raise ValueError(
            f"unknown Llama preset {preset_or_config!r}; valid presets: {sorted(PRESETS)}"
        )
    return PRESETS[preset_or_config]


def _init_weights(model: nn.Module, generator: torch.Generator) -> None:
    for module in model.modules():
        if isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=_INIT_STD, generator=generator)


def build_model(
    preset_or_config: str | LlamaConfig,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> LlamaForCausalLM:
    """Build a randomly initialised :class:`LlamaForCausalLM` in training mode.

    Weights are drawn on the CPU in float32 from a generator seeded with ``seed`` (normal with
    std 0.02 for linears and embeddings, ones for norms) and only then moved to ``device`` and
    ``dtype``, so a seed gives the same weights on every device and dtype.
    """
    config = resolve_config(preset_or_config)
    # fork_rng keeps the throwaway default initialisation from advancing the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    _init_weights(model, torch.Generator().manual_seed(seed))
    return model.to(device=device, dtype=dtype)


def make_batch(
    config: str | LlamaConfig,
    *,
    batch_size: int = 1,
    seq_len: int,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """Return ``input_ids`` and ``labels`` (a copy; the loss shifts it) of random token ids."""
    config = resolve_config(config)
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=generator)
    input_ids = input_ids.to(device)
    return {"input_ids": input_ids, "labels": input_ids.clone()}
