"""`extern_embedding_backward`: the decomposed embedding weight gradient back as one extern op."""

from __future__ import annotations

import torch
from torch._inductor.decomposition import select_decomp_table

from helpers import FLOAT64_TOL, compile_memcompile, grad_errors, train_step
from memcompile.config import Options
from memcompile.models import build_model, make_batch
from memcompile.passes.embedding_backward import extern_embedding_backward_pass
from memcompile.report import recording
from test_remat_plan import joint_of

aten = torch.ops.aten


def _embedding_joint(padding_idx):
    w = torch.randn(64, 8, requires_grad=True)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    return joint_of(lambda ids: torch.nn.functional.embedding(ids, w, padding_idx) * 2, ids,
                    decompositions=select_decomp_table())


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_the_decomposed_scatter_becomes_one_op_with_its_padding_idx():
    for padding_idx, expected in ((None, -1), (3, 3)):
        gm = _embedding_joint(padding_idx).gm
        assert aten._unsafe_masked_index_put_accumulate.default in _targets(gm)
        extern_embedding_backward_pass(gm, [], options=Options(runtime="inductor"))
        (node,) = [n for n in gm.graph.nodes
                   if n.target is torch.ops.memcompile.embedding_dense_backward.default]
        assert node.args[2:] == (64, expected)
        assert aten._unsafe_masked_index_put_accumulate.default not in _targets(gm)
        assert aten.full.default not in _targets(gm)  # the zeros it scattered into are gone


def test_the_eager_runtime_is_left_alone():
    gm = _embedding_joint(None).gm
    before = _targets(gm)
    extern_embedding_backward_pass(gm, [], options=Options(runtime="eager"))
    assert _targets(gm) == before


def test_a_model_trains_to_the_same_gradients_through_inductor():
    """float64, the default (Inductor) runtime: the embedding's gradient is unchanged."""
    model = build_model("tiny", dtype=torch.float64)
    ref = build_model("tiny", dtype=torch.float64)
    batch = make_batch("tiny", seq_len=32)
    train_step(ref, batch)
    with recording() as records:
        train_step(compile_memcompile(model), batch)
    assert any("run as one extern kernel" in text for r in records for _, text in r.notes)
    # The design's rule, per parameter over the whole tensor: an element-wise rtol with atol=0
    # holds each near-zero sum of cancelling terms to 1e-10 of itself, which no reordering of a
    # reduction (Inductor's) need meet.
    errors = grad_errors(model, ref)
    assert max(errors.values()) <= FLOAT64_TOL, errors
