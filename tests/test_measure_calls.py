"""`memcompile.measure_calls.count_calls`: counts exact on functions whose calls are known."""

from __future__ import annotations

import torch

from memcompile.measure_calls import CallCount, count_calls, kernel_profile, tally


def test_each_aten_call_is_one_event():
    """`a.add_(b)` five times, then `torch.mul`: six operator calls, nothing nested in them
    (`torch.mm` would not do: it calls `aten::resolve_conj` on its operands)."""
    a, b = torch.ones(4, 4), torch.ones(4, 4)

    def fn():
        for _ in range(5):
            a.add_(b)
        torch.mul(a, b)

    count = count_calls(fn, device="cpu")
    assert count == CallCount(aten=6, kernels=0, device="cpu")
    assert count.names == {"aten::add_": 5, "aten::mul": 1}
    assert count.calls == 6


def test_the_backward_on_the_autograd_thread_is_counted():
    """`(x * y).sum().backward()` with only `x` requiring a gradient: one `aten::mul` forward,
    one in `MulBackward` (the gradient times `y`), which runs on the autograd engine's side."""
    x = torch.ones(4, requires_grad=True)
    y = torch.full((4,), 2.0)
    count = count_calls(lambda: (x * y).sum().backward(), device="cpu")
    assert count.names["aten::mul"] == 2
    assert torch.equal(x.grad, y)


def test_inductor_kernels_are_counted_when_compiled_under_kernel_profile():
    """One fused kernel (`(t * 2 + 1).relu()`): compiled inside `kernel_profile()` it is one
    call and no aten event (its output buffer is allocated without the dispatcher); compiled
    outside, the profiler sees nothing of it."""
    t = torch.randn(8, 8)
    torch._dynamo.reset()
    with kernel_profile():
        seen = torch.compile(lambda x: (x * 2 + 1).relu())
        seen(t)
    unseen = torch.compile(lambda x: (x * 3 + 1).relu())
    unseen(t)
    count = count_calls(lambda: seen(t), device="cpu")
    assert (count.aten, count.kernels, count.calls) == (0, 1, 1)
    (name,) = count.names
    assert "cpp_fused" in name
    assert count_calls(lambda: unseen(t), device="cpu").calls == 0


def test_tally_counts_launches_on_cuda_and_generated_kernels_on_the_cpu():
    names = ["aten::mm", "cudaLaunchKernel", "graph_3_cpp_fused_add_0", "cpp_fused_mul_1",
             "cudaLaunchKernel", "void gemm_kernel<float>", "cudaMemcpyAsync", "Optimizer.step"]
    cuda = tally(names, "cuda")
    assert (cuda.aten, cuda.kernels, cuda.calls) == (1, 2, 2)
    cpu = tally(names, "cpu")
    assert (cpu.aten, cpu.kernels, cpu.calls) == (1, 2, 3)
    assert cpu.top(1) == [("aten::mm", 1)]
