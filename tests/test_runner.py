"""The pass runner: order, disabling, timing and op diffs in the log, dumps, and failures."""

import logging
import os

import pytest
import torch
import torch.fx as fx

from memcompile import Options, PassError
from memcompile.passes import registry
from memcompile.runner import run_passes

aten = torch.ops.aten


def tiny_graph() -> fx.GraphModule:
    """
    def f(x):
        a = aten.sin(x)
        b = aten.alias(a)
        return aten.cos(b)
    """
    g = fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.empty(4)
    a = g.call_function(aten.sin.default, (x,))
    b = g.call_function(aten.alias.default, (a,))
    c = g.call_function(aten.cos.default, (b,))
    for n in (a, b, c):
        n.meta["val"] = torch.empty(4)
    g.output((c,))
    return fx.GraphModule(torch.nn.Module(), g)


@pytest.fixture
def test_passes():
    """Register three throwaway passes; unregister them afterwards."""
    calls = []

    def add_neg(gm, example_inputs, *, options):
        calls.append("add_neg")
        out = gm.graph.find_nodes(op="output")[0]
        (last,) = out.args[0]
        with gm.graph.inserting_before(out):
            neg = gm.graph.call_function(aten.neg.default, (last,))
        out.args = ((neg,),)
        gm.recompile()
        return gm

    def boom(gm, example_inputs, *, options):
        calls.append("boom")
        raise RuntimeError("kaboom")

    def returns_none(gm, example_inputs, *, options):
        return None

    fns = {"test_add_neg": add_neg, "test_boom": boom, "test_returns_none": returns_none}
    for name, fn in fns.items():
        registry.register_pass(name)(fn)
    yield calls
    for name in fns:
        registry.PASSES.pop(name)


def test_passes_run_in_the_order_named(test_passes):
    gm, records = run_passes(tiny_graph(), [], graph_name="g",
                             options=Options(passes=["test_add_neg", "remove_noops"]))
    assert [r.name for r in records] == ["test_add_neg", "remove_noops"]
    assert records[0].op_diff == {"aten.neg.default": 1}
    assert records[1].op_diff == {"aten.alias.default": -1}
    assert test_passes == ["add_neg"]
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets == [aten.sin.default, aten.cos.default, aten.neg.default]


def test_disabled_passes_do_not_run(test_passes):
    _, records = run_passes(tiny_graph(), [], graph_name="g", options=Options(
        passes=["test_add_neg", "remove_noops"], disable_passes=["test_add_neg"]))
    assert [r.name for r in records] == ["remove_noops"]
    assert test_passes == []


def test_default_pipeline_runs_when_passes_is_none():
    _, records = run_passes(tiny_graph(), [], graph_name="g", options=Options())
    assert [r.name for r in records] == registry.default_pipeline()


def test_log_has_timing_and_op_diff(caplog):
    with caplog.at_level(logging.INFO, logger="memcompile.runner"):
        run_passes(tiny_graph(), [], graph_name="g7", options=Options())
    line = next(r.getMessage() for r in caplog.records if "pass remove_noops took" in r.getMessage())
    assert line.startswith("g7: pass remove_noops took ")
    assert "op diff {'aten.alias.default': -1}" in line


def test_dump_dir_gets_the_graph_before_and_after_each_pass(tmp_path):
    run_passes(tiny_graph(), [], graph_name="g", options=Options(dump_dir=str(tmp_path)))
    before = (tmp_path / "g" / "00_remove_noops_before.py").read_text()
    after = (tmp_path / "g" / "00_remove_noops_after.py").read_text()
    assert "aten.alias.default" in before and "aten.alias.default" not in after


def test_failure_names_the_pass_and_those_before_it_and_keeps_the_graph(test_passes, tmp_path):
    options = Options(passes=["remove_noops", "test_add_neg", "test_boom"], dump_dir=str(tmp_path))
    with pytest.raises(PassError) as e:
        run_passes(tiny_graph(), [], graph_name="g", options=options)
    message = str(e.value)
    assert message.startswith("pass 'test_boom' failed with RuntimeError: kaboom (passes run "
                              "before it: remove_noops, test_add_neg)")
    assert isinstance(e.value.__cause__, RuntimeError)
    dumped = tmp_path / "g" / "02_test_boom_failed_on.py"
    assert dumped.exists() and str(dumped) in message
    assert "aten.neg.default" in dumped.read_text()


def test_failure_without_dump_dir_still_writes_the_graph(test_passes):
    with pytest.raises(PassError) as e:
        run_passes(tiny_graph(), [], graph_name="g", options=Options(passes=["test_boom"]))
    path = str(e.value).rsplit(" is in ", 1)[1]
    assert os.path.exists(path)


def test_a_pass_must_return_a_graph_module(test_passes):
    with pytest.raises(PassError) as e:
        run_passes(tiny_graph(), [], graph_name="g", options=Options(passes=["test_returns_none"]))
    assert "returned NoneType, not a GraphModule" in str(e.value.__cause__)


def test_unknown_pass_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid passes: sequence_parallel, remove_noops, extern_embedding_backward, sequence_parallel_grads, plan_remat, eager_attention, causal_mask, key_mask, document_mask, stream_plan"):
        registry.get_pass("nope")


def test_torch_logs_shows_the_passes():
    """`TORCH_LOGS="+memcompile"` turns on memcompile's loggers with no code of ours."""
    import subprocess
    import sys

    code = ("import torch\n"
            "m = torch.nn.Linear(8, 8)\n"
            "torch.compile(m, backend='memcompile', options={'runtime': 'eager'})"
            "(torch.randn(2, 8)).sum().backward()\n")
    env = {**os.environ, "TORCH_LOGS": "+memcompile"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "graph_0: running passes ['remove_noops', 'plan_remat']" in result.stderr
    assert "graph_0: pass remove_noops took" in result.stderr
    assert "saved" in result.stderr and "recomputed" in result.stderr


def test_dump_dir_gets_the_split_and_the_decisions(tmp_path):
    import torch

    torch._dynamo.reset()
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())
    cm = torch.compile(m, backend="memcompile",
                       options={"runtime": "eager", "dump_dir": str(tmp_path)})
    cm(torch.randn(2, 8)).sum().backward()
    (folder,) = [p for p in tmp_path.iterdir() if (p / "decisions.tsv").exists()]
    assert (folder / "00_remove_noops_before.py").exists()
    assert "def forward" in (folder / "backward.py").read_text()
    rows = (folder / "decisions.tsv").read_text().splitlines()
    assert rows[0] == "pass\tkind\tnode\tbytes\treason"
    assert any(row.startswith("plan_remat\tsaved\ttanh\t64\t") for row in rows)


def test_the_default_pipeline_depends_on_the_runtime():
    from memcompile.passes.registry import default_pipeline

    assert default_pipeline("eager") == ["remove_noops", "plan_remat"]
    assert default_pipeline("inductor") == ["remove_noops", "extern_embedding_backward",
                                            "plan_remat"]
