"""Attention kernels' argument layouts, and the plain-ops attention kernel against the CPU one."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from memcompile.analysis import attention
from memcompile.runtime import attention_kernels

aten = torch.ops.aten


def _call(target, args, kwargs=None) -> fx.Node:
    """A hand-built graph with one attention call on three placeholders."""
    graph = fx.Graph()
    q, k, v = (graph.placeholder(name) for name in "qkv")
    bias = graph.placeholder("bias")
    named = {"q": q, "k": k, "v": v, "bias": bias}
    args = tuple(named.get(a, a) if isinstance(a, str) else a for a in args)
    kwargs = {key: named.get(a, a) if isinstance(a, str) else a
              for key, a in (kwargs or {}).items()}
    return graph.call_function(target, args, kwargs)


def test_each_kernel_is_read_at_its_own_positions():
    cpu = _call(aten._scaled_dot_product_flash_attention_for_cpu.default,
                ("q", "k", "v", 0.0, True), {"attn_mask": "bias"})
    assert attention.is_causal(cpu) and attention.mask(cpu).name == "bias"
    flash = _call(aten._scaled_dot_product_flash_attention.default, ("q", "k", "v", 0.1))
    assert not attention.is_causal(flash) and attention.dropout(flash) == 0.1
    assert attention.mask(flash) is None
    # The memory-efficient kernel: (q, k, v, attn_bias, compute_log_sumexp, dropout, causal).
    # Its compute_log_sumexp sits where the CPU kernel keeps is_causal: it must not read as it.
    efficient = _call(aten._scaled_dot_product_efficient_attention.default,
                      ("q", "k", "v", None, True))
    assert not attention.is_causal(efficient) and attention.dropout(efficient) == 0.0
    assert attention.mask(efficient) is None
    biased = _call(aten._scaled_dot_product_cudnn_attention.default,
                   ("q", "k", "v", "bias", True, 0.0, True))
    assert attention.is_causal(biased) and attention.mask(biased).name == "bias"


def test_with_causal_sets_the_flag_and_drops_the_mask():
    node = _call(aten._scaled_dot_product_efficient_attention.default,
                 ("q", "k", "v", "bias", True))
    args, kwargs = attention.with_causal(node.args, node.kwargs, node.target, True)
    assert args[3] is None and args[6] is True and args[5] == 0.0 and kwargs == {}
    node = _call(aten._scaled_dot_product_flash_attention_for_cpu.default, ("q", "k", "v"),
                 {"attn_mask": "bias", "scale": 0.5})
    args, kwargs = attention.with_causal(node.args, node.kwargs, node.target, True)
    assert args[3:] == (0.0, True) and kwargs == {"scale": 0.5}


def test_layouts_are_read_from_the_kernels_schemas():
    layouts = attention.LAYOUTS
    assert layouts[aten._scaled_dot_product_flash_attention_for_cpu.default] == \
        attention.AttentionLayout(3, 4, "attn_mask", 2)
    assert layouts[aten._scaled_dot_product_flash_attention.default] == \
        attention.AttentionLayout(3, 4, None, 9)
    assert layouts[aten._scaled_dot_product_efficient_attention.default] == \
        attention.AttentionLayout(5, 6, 3, 4)
    assert layouts[aten._scaled_dot_product_cudnn_attention.default] == \
        attention.AttentionLayout(5, 6, 3, 9)


def test_with_causal_takes_keyword_arguments_it_makes_positional():
    node = _call(aten._scaled_dot_product_flash_attention_for_cpu.default, ("q", "k", "v"),
                 {"dropout_p": 0.0, "attn_mask": "bias"})
    args, kwargs = attention.with_causal(node.args, node.kwargs, node.target, True)
    assert args[3:] == (0.0, True) and kwargs == {}
    node = _call(aten._scaled_dot_product_efficient_attention.default, ("q", "k", "v", "bias"),
                 {"compute_log_sumexp": True, "is_causal": False})
    args, kwargs = attention.with_causal(node.args, node.kwargs, node.target, True)
    assert args[3:] == (None, True, 0.0, True) and kwargs == {}


def test_the_device_kernel_by_device_dtype_and_heads():
    kernel = attention_kernels.device_kernel
    assert kernel("cpu", torch.float64, False) == "cpu"
    assert kernel("cuda", torch.bfloat16, False) == "flash"
    assert kernel("cuda", torch.float16, True) == "flash"
    assert kernel("cuda", torch.float32, True) == "efficient"
    assert kernel("cuda", torch.float32, False) == "math"  # no fused kernel for grouped heads
    assert kernel("cuda", torch.float64, True) == "math"
    assert kernel("mps", torch.float32, True) == "math"


def test_the_captured_kernel_is_kept():
    q, k = torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 8)
    kind = attention_kernels.kernel_kind
    assert kind(q, k) == "cpu"
    assert kind(q, k, aten._scaled_dot_product_efficient_attention.default) == "efficient"
    assert kind(q, k, aten._scaled_dot_product_cudnn_attention.default) == "flash"
    meta = torch.zeros(1, 4, 2, 8, device="meta")
    assert kind(meta, meta) == "math"


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)])
def test_math_kernel_equals_the_cpu_kernel(causal, heads):
    """Output, log-sum-exp and the backward given them, in float64, grouped heads broadcast."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, heads[0], 6, 8, dtype=torch.float64, generator=gen)
    k, v = (torch.randn(2, heads[1], 6, 8, dtype=torch.float64, generator=gen) for _ in "kv")
    grad = torch.randn(q.shape, dtype=torch.float64, generator=gen)
    out, lse = attention_kernels.math_forward(q, k, v, causal, 0.3)
    ref_out, ref_lse, _ = attention_kernels.attend(q, k, v, causal, 0.3)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-13)
    torch.testing.assert_close(lse, ref_lse.to(lse.dtype), rtol=0, atol=1e-13)
    got = attention_kernels.math_backward(grad, q, k, v, out, lse, causal, 0.3)
    expected = attention_kernels.attend_backward(grad, q, k, v, ref_out, ref_lse, causal, 0.3,
                                                 None)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    full = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(out, full, rtol=0, atol=1e-13)


def _mask_graph(window: int | None):
    """make_fx of transformers' padding mask: where(causal & padding [& window], 0, -inf)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def mask_of(pad: torch.Tensor) -> torch.Tensor:
        length = pad.shape[1]
        q = torch.arange(length)[None, None, :, None]
        k = torch.arange(length)[None, None, None, :]
        visible = (k <= q) & pad[:, None, None, :]
        if window is not None:
            visible = visible & (q - k < window)
        zero, hidden = torch.scalar_tensor(0.0), torch.scalar_tensor(float("-inf"))
        return torch.where(visible.expand(2, 1, length, length), zero, hidden)

    gm = make_fx(mask_of, tracing_mode="fake")(torch.ones(2, 6, dtype=torch.bool))
    return next(n for n in gm.graph.nodes if n.op == "output").args[0]


def test_a_padding_mask_splits_into_the_causal_rule_and_keys():
    from memcompile.analysis.masks import KeyMaskSplit, split_key_mask

    found = split_key_mask(_mask_graph(None))
    assert isinstance(found, KeyMaskSplit)
    assert [tuple(t.meta["val"].shape) for t in found.keys] == [(2, 1, 1, 6)]


def test_a_window_mask_is_not_split_and_says_why():
    from memcompile.analysis.masks import split_key_mask

    reason = split_key_mask(_mask_graph(3))
    assert isinstance(reason, str) and "varies along the queries" in reason
