"""memcompile.measure in exact bytes, deterministic, and without knocking Dynamo into eager."""

import pytest
import torch

import memcompile
from memcompile.measure import allocator_peak, tracked_peak
from memcompile.report import recording

MiB = 2**20


def three_then_one():
    """Peaks at 3 MiB: a (1 MiB) and b (2 MiB) live together, then a goes and c (1 MiB) comes."""
    a = torch.empty(MiB, dtype=torch.uint8)
    b = torch.empty(2 * MiB, dtype=torch.uint8)
    del a
    c = torch.empty(MiB, dtype=torch.uint8)
    v = c.view(1024, 1024)  # a view: no new storage
    v.zero_()  # in place: no new storage
    return b, c


@pytest.mark.parametrize("peak_fn", [allocator_peak, tracked_peak])
def test_peaks_in_exact_bytes(peak_fn):
    assert [peak_fn(three_then_one) for _ in range(3)] == [3 * MiB] * 3


def test_measure_reports_baseline_peak_time_and_method():
    without = memcompile.measure(three_then_one, warmup=1, repeat=3, method="allocator")
    keep = torch.empty(4 * MiB, dtype=torch.uint8)  # live when the measured function starts
    with_it = memcompile.measure(three_then_one, warmup=1, repeat=3, method="allocator")
    del keep
    assert with_it.baseline_bytes - without.baseline_bytes == 4 * MiB
    assert with_it.peak_bytes == without.peak_bytes == 3 * MiB
    assert with_it.method == "allocator" and with_it.seconds > 0
    assert memcompile.measure(three_then_one, method="tracked").peak_bytes == 3 * MiB


def test_auto_is_the_allocator_on_cpu():
    assert memcompile.measure(three_then_one, repeat=1).method == (
        "cuda" if torch.cuda.is_available() else "allocator")


def test_bad_arguments():
    with pytest.raises(ValueError, match="valid: auto, allocator, tracked, cuda"):
        memcompile.measure(three_then_one, method="rss")
    with pytest.raises(ValueError, match="repeat >= 1"):
        memcompile.measure(three_then_one, repeat=0)


def test_tracked_mode_does_not_make_dynamo_skip_frames():
    """torch 2.13 skips (for good) frames compiled under a non-infra dispatch mode; the tracker
    declares ignore_compile_internals, so compiling under it still produces a graph."""
    torch._dynamo.reset()
    w = torch.randn(256, 256, requires_grad=True)
    f = torch.compile(lambda x: (x @ w).relu().sum(), backend="memcompile",
                      options={"runtime": "eager"})
    x = torch.randn(256, 256)

    def step():
        f(x).backward()
        w.grad = None

    with recording() as records:
        first = tracked_peak(step)  # compiles under the mode
    assert [r.kind for r in records] == ["training"]
    assert tracked_peak(step) == first == records[0].simulate().peak_bytes


def test_allocator_sees_inductor_buffers():
    """Inductor's fused kernels allocate outside the dispatcher: only the allocator sees them."""
    torch._dynamo.reset()
    f = torch.compile(lambda x: (x.sin() * 2).cos() + 1)
    x = torch.randn(512, 512)
    f(x)
    assert allocator_peak(lambda: f(x)) == MiB
    assert tracked_peak(lambda: f(x)) == 0
