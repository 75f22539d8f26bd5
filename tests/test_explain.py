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
    assert f"measured allocator {report.measured['allocator']:,} B" in text
    stages = report.graphs["graph_" + report.records[0].name.split("_")[1]]
    assert list(stages) == ["joint", "after remove_noops", "after plan_remat", "forward",
                            "backward"]
    assert "aten.detach" in stages["joint"] and "aten.detach" not in stages["after remove_noops"]


def test_plot_writes_a_png(tmp_path):
    report = memcompile.explain(lambda x, w: (x @ w).relu().sum(), torch.randn(64, 64),
                                torch.randn(64, 64, requires_grad=True),
                                options={"runtime": "eager"})
    path = report.plot(str(tmp_path / "memory.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_inductor_runtime_reports_the_allocator_peak_only():
    model = build_model("tiny")
    report = memcompile.explain(model, example_kwargs=make_batch("tiny", seq_len=16))
    assert set(report.measured) == {"allocator"} and report.measured["allocator"] > 0


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


def test_unbuilt_options_are_refused_before_capture():
    with pytest.raises(memcompile.NotAvailableError, match="attention across devices"):
        memcompile.explain(lambda x: x.sum(), torch.randn(3, requires_grad=True),
                           options={"sequence_parallel": True})
