"""memcompile.explain: the report's decisions, peaks, graphs, text and plot."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import memcompile
from memcompile.models import build_model, make_batch

MiB = 2**20


class Blocks(torch.nn.Module):
    """Two 512-wide blocks; the first inside torch.utils.checkpoint."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(512, 512, bias=False)
        self.b = torch.nn.Linear(512, 512, bias=False)

    def forward(self, x):
        h = checkpoint(lambda t: torch.nn.functional.gelu(self.a(t)), x, use_reentrant=False)
        return self.b(h).tanh().sum()


def test_report_on_a_checkpointed_model():
    torch.manual_seed(0)
    model, x = Blocks(), torch.randn(512, 512)
    report = memcompile.explain(model, x, options={"runtime": "eager"})
    (graph,) = report.records
    recomputed = {d.node: d for d in graph.decisions_of("recomputed")}
    for node in ("mm", "gelu"):  # the checkpointed block
        assert recomputed[node].bytes == MiB
        assert "inside a torch.utils.checkpoint region" in recomputed[node].reason
    saved = {d.node: d for d in graph.decisions_of("saved")}
    assert list(saved) == ["tanh"] and saved["tanh"].bytes == MiB  # tanh's backward reads it
    assert report.simulated_peak_bytes == report.measured["tracked"] == report.measured["allocator"]
    assert model.a.weight.grad is None  # the user's gradients are left as they were


def test_report_text_and_graphs():
    model = build_model("tiny")
    report = memcompile.explain(model, options={"runtime": "eager"},
                                example_kwargs=make_batch("tiny", seq_len=16))
    text = str(report)
    assert text.startswith("memcompile report: 1 graph(s), runtime=eager")
    assert "pass remove_noops:" in text and "simulated peak" in text
    assert ("  simulated on the eager runtime's buffers (every op's output, as the tracked peak "
            "counts them)\n") in text
    assert report.simulated_peak_bytes == report.planned_peak_bytes == report.measured["tracked"]
    assert f"measured allocator {report.measured['allocator']:,} B" in text
    stages = report.graphs["graph_" + report.records[0].name.split("_")[1]]
    assert list(stages) == ["joint", "after remove_noops", "after plan_remat", "forward",
                            "backward"]
    assert "aten.detach" in stages["joint"] and "aten.detach" not in stages["after remove_noops"]


def test_plot_writes_a_png(tmp_path):
    report = memcompile.explain(lambda x, w: (x @ w).relu().sum(), torch.randn(64, 64),
                                torch.randn(64, 64, requires_grad=True),
                                options={"runtime": "eager"})
    _assert_png(report.plot(str(tmp_path / "memory.png")))


def _axes(report):
    import matplotlib.pyplot as plt

    fig = report.figure()
    plt.close(fig)
    return fig.axes


def _assert_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_inductor_runtime_reports_the_allocator_peak_only():
    model = build_model("tiny")
    report = memcompile.explain(model, example_kwargs=make_batch("tiny", seq_len=16))
    assert set(report.measured) == {"allocator"} and report.measured["allocator"] > 0
    # The report simulates the plan on the model the planner priced it on.
    (graph,) = report.records
    assert graph.simulated_on == graph.plan.priced_on == "inductor"
    assert report.simulated_peak_bytes == report.planned_peak_bytes == graph.plan.chosen_peak


class MLP(torch.nn.Module):
    """x 512x512 -> linear -> gelu -> linear -> tanh -> sum: every activation 1 MiB."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(512, 512, bias=False)
        self.b = torch.nn.Linear(512, 512, bias=False)

    def forward(self, x):
        return self.b(torch.nn.functional.gelu(self.a(x))).tanh().sum()


def test_inductor_report_simulates_the_plan_on_inductors_buffers(tmp_path):
    """
    h = mm(x, a)        1 MiB       Inductor: gelu's pointwise chain (mul, erf, add, mul) is
    g = gelu(h)         4 x 1 MiB   one kernel writing one 1 MiB buffer; in the eager
    y = mm(g, b)        1 MiB       runtime every op of it holds its own 1 MiB.
    loss = tanh(y).sum()
    The plan (auto) saves 2 MiB and peaks at 3 MiB on Inductor's buffers; the report's
    simulation, text and plot say the same 3 MiB (the eager model said 6), and so does the
    allocator, but for a scalar.
    """
    torch.manual_seed(0)
    report = memcompile.explain(MLP(), torch.randn(512, 512), options={"runtime": "inductor"})
    (graph,) = report.records
    assert graph.plan.priced_on == graph.simulated_on == "inductor"
    assert report.simulated_on == ["inductor"]
    assert report.simulated_peak_bytes == graph.plan.chosen_peak == 3 * MiB + 4
    assert graph.simulate().saved_bytes == 2 * MiB + 4
    assert graph.simulate(on="eager").peak_bytes == 6 * MiB + 8  # what the report said before
    # The allocator also sees a scalar or two that autograd allocates below the dispatcher.
    assert 0 <= report.measured["allocator"] - report.simulated_peak_bytes <= 64
    text = str(report)
    assert ("  simulated on Inductor's buffers (what its fused kernels store, analysis.fusion), "
            "the model plan_remat priced its plan on") in text
    assert (f"simulated {3 * MiB + 4:,} B on Inductor's buffers; planned {3 * MiB + 4:,} B; "
            f"measured allocator {report.measured['allocator']:,} B") in text
    assert "planned peak 3.00 MiB on inductor's buffers" in text  # plan_remat's note
    with pytest.raises(ValueError, match="example sizes only"):
        graph.simulate(sizes={})
    (ax,) = _axes(report)
    assert ax.get_title().endswith("simulated on Inductor's buffers")
    assert "Inductor's kernel order" in ax.get_xlabel()
    assert max(ax.lines[0].get_ydata()) == (3 * MiB + 4) / MiB
    _assert_png(report.plot(str(tmp_path / "memory.png")))


def test_without_a_plan_the_report_names_the_eager_model():
    """plan_remat disabled under Inductor: no plan, so no layout to run Inductor's model on."""
    torch.manual_seed(0)
    report = memcompile.explain(MLP(), torch.randn(512, 512), measure=False,
                                options={"runtime": "inductor", "disable_passes": ["plan_remat"]})
    (graph,) = report.records
    assert graph.plan is None and graph.simulated_on == "eager"
    assert report.planned_peak_bytes is None
    assert report.simulated_peak_bytes == graph.simulate(on="eager").peak_bytes
    text = str(report)
    assert ("  simulated on the eager runtime's buffers (every op's output, as the tracked peak "
            "counts them); plan_remat made no plan for this graph") in text
    assert "on the eager runtime's buffers; not measured" in text
    (ax,) = _axes(report)
    assert ax.get_title().endswith("simulated on the eager runtime's buffers")


def test_a_function_that_does_not_return_a_loss_is_refused():
    with pytest.raises(TypeError, match="returns a scalar loss"):
        memcompile.explain(lambda x: x * 2, torch.randn(3, requires_grad=True),
                           options={"runtime": "eager"})


def test_a_function_closing_over_parameters():
    """Gradients of parameters the function closes over are set aside and put back, so every
    measured step starts without gradients, as the simulated one does."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 512, bias=False), torch.nn.Tanh())
    model[0].weight.grad = torch.ones(512, 512)
    x = torch.randn(512, 512)
    report = memcompile.explain(lambda t: model(t).sum(), x, options={"runtime": "eager"})
    assert report.simulated_peak_bytes == report.measured["tracked"] == 2 * MiB + 8
    # The allocator also sees a scalar or two that autograd allocates below the dispatcher.
    assert 0 <= report.measured["allocator"] - report.measured["tracked"] <= 64
    assert torch.equal(model[0].weight.grad, torch.ones(512, 512))


def test_unrunnable_options_are_refused_before_capture():
    with pytest.raises(memcompile.OptionsError, match="needs torch.distributed initialized"):
        memcompile.explain(lambda x: x.sum(), torch.randn(3, requires_grad=True),
                           options={"sequence_parallel": True})
