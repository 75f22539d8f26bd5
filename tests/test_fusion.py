"""The Inductor memory model: which values Inductor's kernels inline, and the peak it implies.

Structure on tiny aten graphs (`make_fx`), exact bytes on whole-MiB joint graphs, and the
planner pricing plans on it when the runtime is Inductor. (Against the allocator, the model put
the save-everything plan of `small` at 1,024 tokens at 362.2 MiB, measured 362.2, and of a
4-layer Hugging Face Llama at 512 tokens, output kept, at 275.8 MiB, measured 275.8.)
"""

from __future__ import annotations

import logging

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.fx.experimental.proxy_tensor import make_fx

from helpers import compile_memcompile, train_step
from torch._inductor.decomposition import select_decomp_table

from memcompile.analysis.fusion import aliases, kernel_order, kinds, unmaterialized
from memcompile.analysis.joint import _storages
from memcompile.analysis.schedule import layout, simulate_layout
from memcompile.models import build_model, make_batch
from memcompile.report import recording
from test_remat_plan import MiB, joint_of


def _inlined(fn, *args, returned=()):
    gm = make_fx(fn, tracing_mode="fake")(*args)
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    storages = {n: _storages(n) for n in gm.graph.nodes}
    outputs = {o for o in gm.graph.output_node().all_input_nodes}
    picked = {n for n in nodes if n.name in returned}
    return {n.name for n in unmaterialized(nodes, outputs | picked, storages)}


def _kernel_order(fn, *args):
    gm = make_fx(fn, tracing_mode="fake")(*args)
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    storages = {n: _storages(n) for n in gm.graph.nodes}
    order = kernel_order(nodes, kinds(gm.graph.nodes), aliases(nodes, storages))
    return [n.name for n in order]


def test_pointwise_and_views_read_by_fused_kernels_are_inlined():
    """
    h = mm(x, w)        an extern kernel's output: stored
    g = relu(h) * 2     relu is inlined into the mul; the mul is read by a matmul: stored
    y = mm(g, w)
    s = sum(t(y))       the transpose is read by a reduction: inlined
    """
    def f(x, w):
        g = torch.relu(torch.mm(x, w)) * 2
        return torch.mm(g, w).t().sum()

    assert _inlined(f, torch.randn(4, 4), torch.randn(4, 4)) == {"relu", "t"}


def test_returned_values_and_the_bases_of_views_a_matmul_reads_are_stored():
    """
    a = exp(x)                  returned: stored
    b = sin(x)                  read by a matmul through a view: the view and b are stored
    c = mm(view(b), w)
    d = cos(x)                  returned by the caller's choice (saved for a backward): stored
    e = d + 1                   read by nothing but the output: stored
    """
    def f(x, w):
        b = torch.sin(x).view(4, 4)
        d = torch.cos(x)
        return torch.exp(x), torch.mm(b, w), d + 1

    assert _inlined(f, torch.randn(16), torch.randn(4, 4), returned={"cos"}) == set()


def test_swiglu_peak_in_exact_bytes_eager_and_inductor():
    """
    loss = sum(silu(x @ w1) * (x @ w2)), x 2048x512 (4 MiB), w 512x512 (1 MiB).

    Saving everything keeps mm, silu and mm_1 (12 MiB) and the 4-byte loss; the backward holds
    the 4-byte tangent too (the +8 bytes below).
    - eager: mul_1 = tangent * silu is a new 4 MiB buffer while silu is still held: 16 MiB.
    - Inductor: mul_1 takes over silu's buffer (silu dies with it); mul_2 is inlined into
      silu_backward, which takes over mm's buffer. The peak is the 1 MiB gradient of w2 on top
      of mm, mm_1 and mul_1: 13 MiB.
    """
    torch.manual_seed(0)
    w1 = torch.randn(512, 512, requires_grad=True)
    w2 = torch.randn(512, 512, requires_grad=True)
    joint = joint_of(lambda x: (torch.nn.functional.silu(x @ w1) * (x @ w2)).sum(),
                     torch.randn(2048, 512))
    save_all = layout(joint, frozenset())
    eager = simulate_layout(joint, save_all)
    inductor = simulate_layout(joint, save_all, fusion=True)
    assert eager.saved_bytes == inductor.saved_bytes == 12 * MiB + 4
    assert (eager.peak_bytes, eager.peak_node) == (16 * MiB + 8, "mul_1")
    assert (inductor.peak_bytes, inductor.peak_node) == (13 * MiB + 8, "mm_2")
    # The order Inductor's kernels run in is the same ops, each after what it reads.
    for order in (save_all.forward_order, save_all.backward_order):
        ran = kernel_order(order, kinds(joint.gm.graph.nodes), joint.aliases, joint.inputs)
        assert sorted(n.name for n in ran) == sorted(n.name for n in order)
        done = set()
        for node in ran:
            assert all(i in done for i in joint.inputs[node] if i in set(order))
            done.add(node)


def test_an_embedding_gradient_scatters_into_its_zeros_and_the_tangent_dies_early():
    """
    out = embedding(ids, w) * 2, w 4096x256 (4 MiB), 1024 ids: out and its tangent are 1 MiB.
    The backward after Inductor's decompositions:
        mul_1 = tangent * 2                        1 MiB
        mask = (ids >= 0) & (ids < 4096) & ...     1 KiB
        full = zeros(4096, 256)                    4 MiB
        grad = masked_index_put_accumulate(full, mask, ids, mul_1)
    - eager: autograd holds the tangent throughout and the scatter allocates its own output,
      beside out, mul_1 and full: 1 + 1 + 1 + 4 + 4 MiB (+ the mask).
    - Inductor: the scatter's kernel computes its added values and mask inline (mul_1 and the
      mask hold no buffer; the tangent stays until the scatter reads it), and writes into full,
      which dies with it: 1 + 1 + 4 MiB.
    A caller that drops `out` before the backward saves its 1 MiB in both.
    """
    w = torch.randn(4096, 256, requires_grad=True)
    ids = torch.randint(0, 4096, (1024,), generator=torch.Generator().manual_seed(0))
    joint = joint_of(lambda ids: torch.nn.functional.embedding(ids, w) * 2, ids,
                     decompositions=select_decomp_table())
    save_all = layout(joint, frozenset())
    assert simulate_layout(joint, save_all).peak_bytes == 11 * MiB + 1024
    assert simulate_layout(joint, save_all, fusion=True).peak_bytes == 6 * MiB
    # As the planner prices it: the caller drops the (non-scalar) output before the backward.
    assert simulate_layout(joint, save_all, drop_outputs=True).peak_bytes == 10 * MiB + 1024
    assert simulate_layout(joint, save_all, fusion=True, drop_outputs=True).peak_bytes == 5 * MiB


def test_the_inductor_runtime_prices_plans_on_inductors_buffers():
    model = build_model("tiny")
    batch = make_batch("tiny", seq_len=32)
    compiled = compile_memcompile(model, memory_budget="auto", runtime="inductor")
    with recording() as records:
        train_step(compiled, batch)
    (record,) = [r for r in records if r.kind == "training"]
    assert record.plan.priced_on == "inductor"
    assert record.plan.chosen_peak <= record.plan.save_all_peak
    assert any("on inductor's buffers" in text for _, text in record.notes)


def test_an_expensive_value_read_across_a_matmul_is_stored_once():
    """
    s = sigmoid(x)      read by two kernels a matmul apart: on CPU Inductor computes an exp
    a = s * 2           once and stores it (should_realize_on_reuse), not once per reader
    h = mm(a, w)
    out = sum(h * s)    h * s is inlined into the sum
    """
    def f(x, w):
        s = torch.sigmoid(x)
        return (torch.mm(s * 2, w) * s).sum()

    assert _inlined(f, torch.randn(4, 4), torch.randn(4, 4)) == {"mul_1"}


def test_an_expensive_value_whose_readers_share_a_kernel_stays_inlined():
    """Both readers of sigmoid run in one generated kernel: the value never leaves it. A cheap
    value (relu) read across a matmul is inlined into each reader."""
    def together(x):
        s = torch.sigmoid(x)
        return (s * 2).sum() + (s * 3).sum()

    def cheap(x, w):
        r = torch.relu(x)
        return (torch.mm(r * 2, w) * r).sum()

    assert {"sigmoid", "mul", "mul_1"} <= _inlined(together, torch.randn(4, 4))
    assert "relu" in _inlined(cheap, torch.randn(4, 4), torch.randn(4, 4))


def test_a_kernel_runs_where_its_reader_runs():
    """t = y * 2 is read only by the add after the matmul: Inductor fuses it into the add's
    kernel, so it runs after the matmul, not before."""
    def f(x, w, y):
        t = y * 2
        return torch.mm(x, w) + t

    assert _kernel_order(f, *(torch.randn(4, 4) for _ in range(3))) == ["mm", "mul", "add"]


def test_kernels_sharing_a_read_fuse_and_pull_what_they_need_ahead():
    """
    a = x * 2; p = mm(a, w)       kernel A, then a matmul that needs it
    g = mm(v, w); b = g * x       a matmul, then kernel B: same size as A, reads x too
    Inductor fuses A and B into one kernel where A stood; B needs g, so that matmul runs first.
    """
    def f(x, w, v):
        p = torch.mm(x * 2, w)
        return p, torch.mm(v, w) * x

    assert _kernel_order(f, *(torch.randn(4, 4) for _ in range(3))) == [
        "mm_1", "mul", "mul_1", "mm"]


def test_kernels_sharing_a_read_fuse_only_within_64_kernels_of_each_other():
    """
    a = x * 2; p = mm(a, w)                    kernel A reads x
    g = v; n times: g = mm(relu(g), w)         n kernels in between that do not read x
    b = g * x                                  kernel B: same size as A, reads x
    Inductor tries to fuse a buffer's readers only among the last 64 kernels: B joins A (and
    the chain it needs runs first) up to 63 kernels between them, and stays last from 64.
    """
    def chain(n):
        def f(x, w, v):
            p = torch.mm(x * 2, w)
            g = v
            for _ in range(n):
                g = torch.mm(torch.relu(g), w)
            return p, g * x
        return f

    for n, fused in [(3, True), (63, True), (64, False)]:
        order = _kernel_order(chain(n), *(torch.randn(4, 4) for _ in range(3)))
        assert (order[-3:] == ["mul", "mul_1", "mm"]) is fused, n
        assert (order[:2] == ["mul", "mm"] and order[-1] == "mul_1") is not fused, n


def test_kernels_are_not_fused_across_a_dependency():
    """b reads x like a does, but needs a through the matmul: fused, the kernel would wait on
    itself, so the order stays."""
    def f(x, w):
        return torch.mm(x * 2, w) * x

    assert _kernel_order(f, torch.randn(4, 4), torch.randn(4, 4)) == ["mul", "mm", "mul_1"]


def test_a_reduction_read_through_a_view_runs_in_its_readers_kernel():
    """r = sum(x) is read only through expand(r) by the kernel after the matmul, which loops
    over what r reduces: Inductor computes r in that kernel (a view is an index expression),
    so it runs after the matmul."""
    def f(x, w):
        r = x.sum(1, keepdim=True)
        return torch.mm(x, w) * r.expand(4, 4)

    assert _kernel_order(f, torch.randn(4, 4), torch.randn(4, 4)) == [
        "mm", "sum_1", "expand", "mul"]


def test_an_inlined_op_is_copied_into_each_kernel_that_reads_it():
    """
    c = x * 3                        inlined: computed inside each kernel reading it
    p = mm(c * 2, w)                 kernel A (c first placed with it), then a matmul
    g = mm(v, w); s = sum(c * g, 0)  kernel S reads c: it waits on x, not on kernel A
    b = g * x + mm(s, w)             kernel B: A's size, reads x; needs S through a matmul
    B needing A through S would forbid fusing B into A; since S computes c itself, B fuses
    into A, and what B needs runs first (the Hugging Face Llama pattern: a norm's backward
    fused with the recomputation of its output, ahead of the weight-gradient matmuls)."""
    def f(x, w, v):
        c = x * 3
        p = torch.mm(c * 2, w)
        g = torch.mm(v, w)
        t = torch.mm((c * g).sum(0).unsqueeze(0), w)
        return p, g * x + t

    assert _kernel_order(f, *(torch.randn(4, 4) for _ in range(3))) == [
        "mm_1", "mul", "mul_2", "sum_1", "unsqueeze", "mm_2", "mul_1", "mul_3", "add", "mm"]


@st.composite
def _random_programs(draw):
    """Straight-line programs over 4x4 values: matmuls (extern kernels) and pointwise ops, each
    reading two earlier values; every value has one size, so kernels fuse side by side freely."""
    steps = []
    for i in range(draw(st.integers(3, 14))):
        op = draw(st.sampled_from(["mm", "add", "mul", "sigmoid"]))
        steps.append((op, draw(st.integers(0, i + 1)), draw(st.integers(0, i + 1))))
    return steps


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=_random_programs())
def test_kernel_order_is_a_topological_order_of_the_same_ops(caplog, steps):
    def program(x, y):
        values = [x, y]
        for op, a, b in steps:
            u, v = values[a], values[b]
            values.append(torch.mm(u, v) if op == "mm" else u + v if op == "add"
                          else u * v if op == "mul" else torch.sigmoid(u))
        return values[2:]

    gm = make_fx(program, tracing_mode="fake")(torch.randn(4, 4), torch.randn(4, 4))
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    storages = {n: _storages(n) for n in gm.graph.nodes}
    with caplog.at_level(logging.DEBUG, logger="memcompile.analysis.fusion"):
        ran = kernel_order(nodes, kinds(gm.graph.nodes), aliases(nodes, storages))
    assert sorted(n.name for n in ran) == sorted(n.name for n in nodes)
    done: set = set()
    for node in ran:
        assert all(i in done for i in node.all_input_nodes if i in set(nodes))
        done.add(node)
    assert "made a cycle" not in caplog.text


def test_a_kernel_writes_all_its_outputs_before_its_inputs_die_in_exact_bytes():
    """
    h1 = x @ w1; h2 = x @ w2                    4 MiB each (x 2048x512, w 512x512)
    a = h1 * h2; b = h1 + h2                    one kernel, two outputs: both are allocated
                                                while h1 and h2 live (16 MiB), and neither
                                                takes their buffers (both ops read both)
    loss = sum(a @ w3) + sum(b @ w3)            each sum runs right after its matmul (it
                                                reduces to a scalar), so a @ w3 dies first
    Saving everything keeps h1, h2, a and b: 16 MiB. The forward peaks at 20 MiB (h1, h2, a,
    b and one product), the backward at 22 MiB + 4 bytes; Inductor's code measured 22 MiB on
    the CPU allocator. Counting the sums with the scalar add, the model said 24 MiB.
    """
    torch.manual_seed(0)
    w1, w2, w3 = (torch.randn(512, 512, requires_grad=True) for _ in range(3))

    def loss(x):
        h1, h2 = x @ w1, x @ w2
        return ((h1 * h2) @ w3).sum() + ((h1 + h2) @ w3).sum()

    joint = joint_of(loss, torch.randn(2048, 512))
    save_all = layout(joint, frozenset())
    inductor = simulate_layout(joint, save_all, fusion=True)
    assert inductor.saved_bytes == 16 * MiB + 4
    assert (inductor.peak_bytes, inductor.peak_phase) == (22 * MiB + 4, "backward")
