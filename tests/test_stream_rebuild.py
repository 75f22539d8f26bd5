"""A run's first layer input made again in the backward instead of held (`runtime.stream_rebuild`).

Structure on hand-built graphs: an embedding of token ids (scaled or not) qualifies; a float
input along the sequence, a random op, an op inside a region or too many ops do not. Memory in
exact bytes: the streamed step's peak is one hidden state lower than holding the input. Values:
the same gradients as eager in float64, and the report says what was rebuilt.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.fx as fx

from helpers import FLOAT64_TOL, compile_memcompile, relative_error
from memcompile.measure import tracked_peak
from memcompile.models import LlamaConfig, LlamaForCausalLM
from memcompile.report import recording
from memcompile.runtime import stream_program
from memcompile.runtime.stream_rebuild import MAX_REBUILD_OPS, Rebuild, rebuild_chain

aten = torch.ops.aten
T, H, V = 32, 64, 50  # ids: 8 bytes a token, a hidden state 256: 32x smaller


def _graph(make):
    """A graph with inputs `weight` (V, H), `ids` (1, T) int64 and `embeds` (1, T, H) float,
    whose output is `make(graph, weight, ids, embeds)`; meta vals filled (on the meta device)."""
    graph = fx.Graph()
    weight, ids, embeds = (graph.placeholder(n) for n in ("weight", "ids", "embeds"))
    weight.meta["val"] = torch.empty(V, H, device="meta")
    ids.meta["val"] = torch.empty(1, T, dtype=torch.long, device="meta")
    embeds.meta["val"] = torch.empty(1, T, H, device="meta")
    out = make(graph, weight, ids, embeds)
    graph.output(out)
    for node in graph.nodes:
        if node.op == "call_function":
            args = fx.node.map_arg(node.args, lambda a: a.meta["val"])
            node.meta["val"] = node.target(*args, **node.kwargs)
    return graph, out


ALONG = {"ids", "embeds"}
"""Inputs along the sequence; every call result is too."""
INFO = SimpleNamespace(dim_of=lambda n: None if n.op == "placeholder" and n.name not in ALONG
                       else 1)


def test_a_scaled_embedding_of_token_ids_is_rebuilt():
    def make(g, weight, ids, embeds):
        looked_up = g.call_function(aten.embedding.default, (weight, ids))
        return g.call_function(aten.mul.Tensor, (looked_up, 4.0))

    graph, out = _graph(make)
    chain = rebuild_chain(out, {}, INFO)
    assert [n.target for n in chain] == [aten.embedding.default, aten.mul.Tensor]


def test_a_float_input_along_the_sequence_is_held():
    def make(g, weight, ids, embeds):
        return g.call_function(aten.mul.Tensor, (embeds, 2.0))

    graph, out = _graph(make)
    assert rebuild_chain(out, {}, INFO) is None


def test_random_ops_and_ops_in_a_region_are_held():
    def random(g, weight, ids, embeds):
        looked_up = g.call_function(aten.embedding.default, (weight, ids))
        noise = g.call_function(aten.rand_like.default, (looked_up,))
        return g.call_function(aten.add.Tensor, (looked_up, noise))

    graph, out = _graph(random)
    assert rebuild_chain(out, {}, INFO) is None

    def plain(g, weight, ids, embeds):
        return g.call_function(aten.embedding.default, (weight, ids))

    graph, out = _graph(plain)
    assert rebuild_chain(out, {out: "a region"}, INFO) is None


def test_more_ops_than_the_limit_are_held():
    def long(g, weight, ids, embeds):
        x = g.call_function(aten.embedding.default, (weight, ids))
        for _ in range(MAX_REBUILD_OPS):
            x = g.call_function(aten.mul.Tensor, (x, 1.0))
        return x

    graph, out = _graph(long)
    assert rebuild_chain(out, {}, INFO) is None


def test_the_rebuilt_value_is_the_same_bits():
    def make(g, weight, ids, embeds):
        looked_up = g.call_function(aten.embedding.default, (weight, ids))
        return g.call_function(aten.mul.Tensor, (looked_up, 3.0))

    graph, out = _graph(make)
    chain = rebuild_chain(out, {}, INFO)
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    weight, ids = torch.randn(V, H), torch.randint(0, V, (1, T))
    rebuild = Rebuild(chain, {placeholders["weight"]: weight, placeholders["ids"]: ids})
    assert torch.equal(rebuild(), torch.embedding(weight, ids) * 3.0)


def _model() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_layers=2,
                         num_heads=4, num_kv_heads=4)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).double()


IDS = torch.randint(0, 64, (1, 64), generator=torch.Generator().manual_seed(0))
STREAM = {"chunk_size": 16, "logits_chunk_size": 16}


def _step_peak() -> int:
    model = _model()
    run = compile_memcompile(model, runtime="eager", stream=STREAM)
    for _ in range(2):  # the first call compiles
        peak = tracked_peak(lambda: run(input_ids=IDS, labels=IDS).loss.backward())
    return peak


def test_the_step_peaks_one_hidden_state_lower(monkeypatch):
    """Holding the embedding (the rebuild switched off in the test process) peaks exactly one
    float64 hidden state, 64 x 256 x 8 bytes, higher: the top layer's backward holds every
    layer input."""
    rebuilt = _step_peak()
    monkeypatch.setattr(stream_program, "rebuild_chain", lambda *args: None)
    held = _step_peak()
    assert held - rebuilt == 64 * 256 * 8


def test_gradients_equal_eager_and_the_report_says_what_was_rebuilt():
    model, reference = _model(), _model()
    run = compile_memcompile(model, runtime="eager", stream=STREAM)
    with recording() as records:
        run(input_ids=IDS, labels=IDS).loss.backward()
    reference(input_ids=IDS, labels=IDS).loss.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert relative_error(p.grad, q.grad) < FLOAT64_TOL, name
    notes = [text for r in records for _, text in r.notes]
    assert any(text.startswith("first layer input ") and
               "made again in the backward (1 ops from" in text for text in notes), notes
