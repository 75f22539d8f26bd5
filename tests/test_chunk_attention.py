"""Chunk attention by chunk, not by block: `runtime.chunk_attention.key_block` gives a call the
whole visible prefix where its estimated transient fits the chunk's bound, else the most keys
that fit; outputs and gradients stay those of full causal attention (float64)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import memcompile.runtime.attention_kernels as attention_kernels
import memcompile.runtime.chunk_attention as chunk_attention
from memcompile.measure_calls import count_calls

CPU_FORWARD = "aten::_scaled_dot_product_flash_attention_for_cpu"
CPU_BACKWARD = "aten::_scaled_dot_product_flash_attention_for_cpu_backward"


def _qkv(keys: int, heads: int = 4, key_heads: int = 2, dim: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, h, keys, dim, dtype=torch.float64, generator=gen).requires_grad_()
            for h in (heads, key_heads, key_heads)]


def _chunk_step(queries: int, keys: int):
    """The last `queries` rows of causal attention over `keys`, chunked (keys' and values'
    gradients into sinks, as the stream runtime does) and whole; the kernel calls the chunked
    forward and backward made, and both results."""
    q, k, v = _qkv(keys)
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    grad = torch.randn(full.shape, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(1))[:, :, -queries:]
    expected = torch.autograd.grad(full[:, :, -queries:], (q, k, v), grad)
    sinks = (torch.zeros_like(k), torch.zeros_like(v))
    got = {}

    def step():
        out, _ = chunk_attention.prefix_causal_attention(q[:, :, -queries:], k, v, None, sinks)
        got["out"] = out
        (got["grad_q"],) = torch.autograd.grad(out, q, grad)

    calls = count_calls(step, device="cpu").names
    torch.testing.assert_close(got["out"], full[:, :, -queries:], rtol=0, atol=1e-14)
    for name, a, b in zip(("q", "k", "v"), (got["grad_q"], *sinks), expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13, msg=name)
    return calls.get(CPU_FORWARD, 0), calls.get(CPU_BACKWARD, 0)


def test_the_prefix_is_one_call_where_the_chunk_bound_holds_it():
    """64 queries (4 heads of 8, float64) over a prefix of 300 keys (2 key heads): the chunk's
    bound is 64 * 4 * 8 * (4 * 8 + 8) = 81,920 bytes, the CPU kernel's backward holds
    2 * 2 * 8 * 8 = 256 bytes per key (keys' and values' gradients): up to 320 keys fit, so
    forward and backward each call the kernel twice (prefix, diagonal), where blocks of 64
    keys (the chunk's length, the floor) would call the backward 6 times."""
    q, k, _ = _qkv(364)
    assert chunk_attention.chunk_bound(q[:, :, -64:]) == 81_920
    assert chunk_attention.transient_per_key(q[:, :, -64:], k, "cpu", backward=True) == 256
    assert _chunk_step(64, 364) == (2, 2)


def test_a_prefix_beyond_the_bound_runs_in_blocks_of_what_fits():
    """The same chunk over a prefix of 1,000 keys: the forward still calls the kernel twice (it
    holds nothing per key), the backward over blocks of 320 keys, four of them, plus the
    diagonal; exact all the same."""
    q, k, _ = _qkv(1064)
    assert chunk_attention.key_block(q[:, :, -64:], k, backward=True) == 320
    assert chunk_attention.key_block(q[:, :, -64:], k, backward=False) == 1000
    assert _chunk_step(64, 1064) == (2, 1 + math.ceil(1000 / 320))


def test_plain_ops_get_blocks_of_the_chunk_length(monkeypatch):
    """Plain ops (devices without a fused kernel) hold a block's scores, `queries × keys` per
    head, several times over: far above the bound per key, so each call gets the floor, the
    chunk's own length, in the forward too; a larger bound gives more keys."""
    monkeypatch.setattr(chunk_attention, "kernel_kind", lambda q, k, op=None: "math")
    q, k, _ = _qkv(1064)
    chunk = q[:, :, -64:]
    per_key = chunk_attention.transient_per_key(chunk, k, "math", backward=True)
    assert per_key == 4 * 4 * 64 * 8 + 2 * 4 * 8 * 8
    assert chunk_attention.transient_per_key(chunk, k, "math", backward=False) == 2 * 4 * 64 * 8
    for backward in (True, False):
        assert chunk_attention.key_block(chunk, k, backward=backward) == 64
    assert chunk_attention.key_block(chunk, k, backward=True, bound=100 * per_key) == 100


@pytest.mark.parametrize("kind", ["cpu", "flash", "efficient", "math"])
@pytest.mark.parametrize("queries,keys,heads,key_heads,dtype", [
    (1, 5000, 4, 4, torch.float32), (64, 64, 8, 2, torch.bfloat16),
    (128, 9000, 16, 4, torch.bfloat16), (1024, 65536, 16, 4, torch.float16),
    (37, 1000, 2, 1, torch.float64)])
def test_a_block_fits_the_bound_or_is_the_floor(monkeypatch, kind, queries, keys, heads,
                                                key_heads, dtype):
    """Invariants on any shape and kernel: a call's keys times its transient per key stay
    within the bound unless the block is the chunk's length (the floor); the whole prefix is
    one block whenever it fits."""
    monkeypatch.setattr(chunk_attention, "kernel_kind", lambda q, k, op=None: kind)
    q = torch.empty(1, heads, queries, 8, dtype=dtype, device="meta")
    k = torch.empty(1, key_heads, keys, 8, dtype=dtype, device="meta")
    prefix, bound = keys - queries, chunk_attention.chunk_bound(q)
    for backward in (True, False):
        per_key = chunk_attention.transient_per_key(q, k, kind, backward)
        block = chunk_attention.key_block(q, k, backward=backward)
        assert block * per_key <= bound or block == queries
        if prefix * per_key <= bound:
            assert block >= prefix
