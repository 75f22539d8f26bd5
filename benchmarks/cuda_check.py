"""StreamBP on a CUDA device: its attention kernels and its gradients against eager.

Two checks, each printed as one JSON line and judged by the rule for reduced precision of
docs/design.md, "Exactness, defined" (memcompile's error against a float64 reference at most
max(1.5 × eager's own error in the same dtype, 1e-6)):

1. `kernels`: a chunk's causal attention over its prefix (`prefix_causal_attention`, key/value
   gradients into sinks, blocks of keys), for each kernel the device offers: flash (bfloat16,
   grouped heads), memory-efficient (float32, equal heads), plain ops (float64, grouped heads).
2. `model`: one training step of a `wide`-shaped model with 4 layers at 4,096 tokens, streamed
   in chunks of 1,024 with 2 layer inputs held, against eager, in bfloat16 (flash attention,
   grouped heads) and in float32 with equal head counts (memory-efficient attention), chunk
   bodies run op by op (`runtime="eager"`); and in bfloat16 with compiled chunk bodies
   (`runtime="inductor"`), also with attention outputs kept (`keep_attention`).

    python benchmarks/cuda_check.py

Needs a CUDA device; prints what failed and exits 1 when any check fails.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

import memcompile
from memcompile.models import LlamaConfig, build_model, make_batch
from memcompile.runtime.attention_kernels import accumulation_dtype, kernel_kind
from memcompile.runtime.chunk_attention import prefix_causal_attention


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """`‖a − b‖ / ‖b‖` in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _judge(ours: float, eager: float) -> bool:
    return ours <= max(1.5 * eager, 1e-6)


def check_kernels() -> bool:
    """Chunk attention per kernel against float64 full causal attention's rows."""
    ok = True
    cases = [(torch.bfloat16, 16, 4), (torch.float32, 16, 16), (torch.float64, 16, 4)]
    for dtype, heads, kv_heads in cases:
        gen = torch.Generator(device="cuda").manual_seed(0)
        length, first, dim = 3000, 2000, 64
        q64 = torch.randn(2, heads, length, dim, device="cuda", dtype=torch.float64,
                          generator=gen)
        k64, v64 = (torch.randn(2, kv_heads, length, dim, device="cuda", dtype=torch.float64,
                                generator=gen) for _ in "kv")
        grad64 = torch.randn(q64.shape, device="cuda", dtype=torch.float64, generator=gen)
        leaves64 = [t.clone().requires_grad_() for t in (q64, k64, v64)]
        ref = F.scaled_dot_product_attention(*leaves64, is_causal=True, enable_gqa=True)
        ref_grads = torch.autograd.grad(ref[:, :, first:], leaves64, grad64[:, :, first:])
        leaves = [t.to(dtype).requires_grad_() for t in (q64, k64, v64)]
        grad = grad64.to(dtype)
        # Eager in this dtype: its own error against float64 is the bar.
        eager = F.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=True)
        eager_grads = torch.autograd.grad(eager[:, :, first:], leaves, grad[:, :, first:])
        wide = accumulation_dtype(dtype)  # the runtime keeps its sums so
        sinks = (torch.zeros_like(leaves[1], dtype=wide), torch.zeros_like(leaves[2], dtype=wide))
        out, _ = prefix_causal_attention(leaves[0][:, :, first:], leaves[1], leaves[2], None,
                                         sinks)
        (grad_q,) = torch.autograd.grad(out, leaves[0], grad[:, :, first:])
        ours = {"out": relative_error(out, ref[:, :, first:]),
                "grad_q": relative_error(grad_q, ref_grads[0]),
                "grad_k": relative_error(sinks[0], ref_grads[1]),
                "grad_v": relative_error(sinks[1], ref_grads[2])}
        theirs = {"out": relative_error(eager[:, :, first:], ref[:, :, first:]),
                  **{f"grad_{n}": relative_error(g, r)
                     for n, g, r in zip("qkv", eager_grads, ref_grads)}}
        passed = all(_judge(ours[key], theirs[key]) for key in ours)
        ok &= passed
        print(json.dumps({"check": "kernels", "dtype": str(dtype), "heads": [heads, kv_heads],
                          "kernel": kernel_kind(leaves[0], leaves[1]), "ours": ours,
                          "eager": theirs, "passed": passed}), flush=True)
    return ok


def _grads(model: torch.nn.Module, step, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    step(**batch).backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def check_model() -> bool:
    """One streamed training step against eager, per dtype, against a float64 reference."""
    ok = True
    for dtype, kv_heads, runtime in ((torch.bfloat16, 4, "eager"), (torch.float32, 16, "eager"),
                                     (torch.bfloat16, 4, "inductor"),
                                     (torch.bfloat16, 4, "inductor+keep")):
        config = LlamaConfig(vocab_size=4096, hidden_size=1024, intermediate_size=2816,
                             num_layers=4, num_heads=16, num_kv_heads=kv_heads)
        batch = make_batch(config, seq_len=4096, device="cuda")
        reference = build_model(config, dtype=torch.float64, device="cuda")
        ref = _grads(reference, lambda **b: reference(**b).loss, batch)
        model = build_model(config, dtype=dtype, device="cuda")
        model.load_state_dict({k: v.to(dtype) for k, v in reference.state_dict().items()})
        eager = _grads(model, lambda **b: model(**b).loss, batch)
        torch._dynamo.reset()
        base, _, keep = runtime.partition("+")
        options = {"runtime": base, "stream": {"chunk_size": 1024, "checkpoints": 2,
                                               "keep_attention": keep == "keep"}}
        with memcompile.report.recording() as records:
            compiled = torch.compile(lambda **b: model(**b).loss, backend="memcompile",
                                     options=options)
            ours = _grads(model, compiled, batch)
        # Streamed: the plan re-runs runs of layers in chunks (else the pass said why not).
        streamed = any(r.stream_plan is not None and r.stream_plan.runs for r in records)
        notes = [text for r in records for _, text in r.notes] if not streamed else []
        worst = max(relative_error(ours[n], ref[n]) for n in ref)
        eager_worst = max(relative_error(eager[n], ref[n]) for n in ref)
        passed = streamed and _judge(worst, eager_worst)
        ok &= passed
        print(json.dumps({"check": "model", "dtype": str(dtype), "kv_heads": kv_heads,
                          "runtime": runtime,
                          "ours": worst, "eager": eager_worst, "passed": passed,
                          "streamed": streamed, "notes": notes[:8]}), flush=True)
    return ok


def main() -> int:
    """Run both checks; 0 when every one passed."""
    if not torch.cuda.is_available():
        print("cuda_check needs a CUDA device; none is available", file=sys.stderr)
        return 2
    print(json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name()}))
    ok = check_kernels()
    ok &= check_model()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
