"""remove_noops_pass on hand-built graphs: what goes, what stays, and idempotence."""

import torch
import torch.fx as fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.testing import FileCheck

from memcompile.passes.remove_noops import remove_noops_pass

aten = torch.ops.aten


def build(body) -> fx.GraphModule:
    """Trace `body(x)` on a (4, 6) input into an aten graph with FakeTensor metadata."""
    g = fx.Graph()
    x = g.placeholder("x")
    g.output(body(g, x))
    gm = fx.GraphModule(torch.nn.Module(), g)
    FakeTensorProp(gm).propagate(torch.randn(4, 6))
    return gm


def test_identities_go_and_real_views_stay():
    """
    def f(x):
        a = aten.alias(x); d = aten.detach(a)
        v = aten.view(d, [4, 6])        # same shape: identity
        r = aten.view(v, [6, 4])        # a real reshape: kept
        e = aten.expand(r, [6, 4])      # same shape: identity
        return (aten.sin(e),)
    """
    def body(g, x):
        a = g.call_function(aten.alias.default, (x,))
        d = g.call_function(aten.detach.default, (a,))
        v = g.call_function(aten.view.default, (d, [4, 6]))
        r = g.call_function(aten.view.default, (v, [6, 4]))
        e = g.call_function(aten.expand.default, (r, [6, 4]))
        return (g.call_function(aten.sin.default, (e,)),)

    gm = remove_noops_pass(build(body), [])
    FileCheck().check("aten.view.default(x, [6, 4])").check("aten.sin.default(view_default_1)") \
        .check_not("alias").check_not("detach").check_not("expand").run(gm.code)
    assert remove_noops_pass(gm, []).code == gm.code  # idempotent


def test_an_identity_that_is_a_graph_output_is_kept():
    """
    def f(x):
        s = aten.sin(x)
        return (aten.alias(s), aten.view(s, [4, 6]))
    """
    def body(g, x):
        s = g.call_function(aten.sin.default, (x,))
        return (g.call_function(aten.alias.default, (s,)),
                g.call_function(aten.view.default, (s, [4, 6])))

    gm = build(body)
    before = gm.code
    assert remove_noops_pass(gm, []).code == before


def test_results_are_unchanged():
    def body(g, x):
        t = g.call_function(aten.t.default, (x,))
        d = g.call_function(aten.detach.default, (t,))
        return (g.call_function(aten.mul.Tensor, (d, d)),)

    gm = build(body)
    x = torch.randn(4, 6)
    expected = gm(x)[0]
    assert torch.equal(remove_noops_pass(gm, [])(x)[0], expected)
