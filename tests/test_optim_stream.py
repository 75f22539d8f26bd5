"""Fused optimizer updates inside the streamed backward (`lowrank(..., fused_backward=True)` with
`options={"stream": ...}`; `memcompile.runtime.stream_fused`).

Exactness: N steps of a streamed compiled float64 model with fused updates give the weights of
the unfused optimizer run eagerly, to 1e-10 (the stream's gradients are eager's to ~1e-14 in
float64, and the optimizer steps are the same functions of them), through projector refreshes,
with clipping and accumulation. Each projected weight is handed to its update exactly once per
backward and gets no `.grad`. Weights read in two places (tied embedding and LM head; one weight
in two layers) are updated once, after the last reader. Memory: a layer's gradients are freed
inside the run's backward, so no two layers' gradients coexist.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from helpers import FLOAT64_TOL, compile_memcompile
from memcompile.measure import tracked_peak
from memcompile.models import LlamaConfig, LlamaForCausalLM, build_hf_model, make_batch
from memcompile.optim import GaLoreAdamW, lowrank

TINY = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_layers=2,
                   num_heads=4, num_kv_heads=2)
STREAM = {"chunk_size": 8, "logits_chunk_size": 8}


@pytest.fixture
def handovers(monkeypatch):
    """Counts, per parameter, the gradients handed to fused updates (in order in `.order`)."""
    counts: Counter = Counter()
    counts.order = []
    original = GaLoreAdamW._fused_update

    def counting(self, p, grad):
        counts[id(p)] += 1
        counts.order.append(p)
        return original(self, p, grad)

    monkeypatch.setattr(GaLoreAdamW, "_fused_update", counting)
    return counts


def tiny(config=TINY):
    torch.manual_seed(0)
    return LlamaForCausalLM(config).double()


def projected(opt):
    return [p for g in opt.param_groups if "rank" in g for p in g["params"]]


def train(model, opt, *, stream, steps, micro_batches=1, batch=make_batch):
    """`steps` optimizer steps of `micro_batches` backward passes each, streamed (compiled) or
    eager; projected weights of a fused optimizer must have no `.grad` after each backward."""
    run = compile_memcompile(model, runtime="eager", stream=stream) if stream else model
    fused = {id(p) for p in projected(opt)} if opt.fused_backward and stream else set()
    for s in range(steps):
        for m in range(micro_batches):
            loss = run(**batch("tiny", seq_len=20, seed=s * micro_batches + m)).loss
            (loss / micro_batches).backward()
            assert all(p.grad is None for p in model.parameters() if id(p) in fused)
        opt.step()
        opt.zero_grad()


def lowrank_of(model, fused, *, params=None, **options):
    select = {"params": params} if params is not None else {"model": model}
    return lowrank(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), rank=8,
                   update_proj_gap=2, fused_backward=fused, **select, **options)


def max_param_error(a, b):
    return max(((p - q).norm() / q.norm()).item() for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("method,max_grad_norm,micro_batches,keys_values", [
    ("galore", None, 1, "once"),
    ("natural_galore", None, 1, "per_chunk"),
    ("galore", 0.5, 2, "once"),
])
def test_streamed_fused_updates_give_the_eager_unfused_parameters(
        handovers, method, max_grad_norm, micro_batches, keys_values):
    """float64, 4 steps through refreshes at steps 0 and 2; lengths the chunks do not divide."""
    options = dict(method=method, max_grad_norm=max_grad_norm, micro_batches=micro_batches)
    reference = tiny()
    train(reference, lowrank_of(reference, False, **options), stream=None, steps=4,
          micro_batches=micro_batches)
    model = tiny()
    opt = lowrank_of(model, True, **options)
    train(model, opt, stream={**STREAM, "keys_values": keys_values}, steps=4,
          micro_batches=micro_batches)
    assert max_param_error(model, reference) <= FLOAT64_TOL
    # Once per weight and backward: 14 projected weights, 4 steps.
    assert {handovers[id(p)] for p in projected(opt)} == {4 * micro_batches}
    assert len(handovers) == 14


def _tied(model):
    """Tied embedding and LM head (`tie_embeddings=True`): read by the embedding, outside every
    region, and by the head."""
    return model


def _shared_across_layers(model):
    """One MLP weight read by both layers (two regions of one run of layers)."""
    model.layers[1].mlp.up_proj.weight = model.layers[0].mlp.up_proj.weight
    return model


def _every_2d_weight_projected(config, share, fused):
    model = share(tiny(config))
    opt = lowrank_of(model, fused, params=[p for p in model.parameters() if p.dim() == 2])
    train(model, opt, stream=STREAM if fused else None, steps=3)
    return model, opt


@pytest.mark.parametrize("config,share", [
    (LlamaConfig(**{**TINY.__dict__, "tie_embeddings": True}), _tied),
    (TINY, _shared_across_layers),
])
def test_a_weight_read_in_two_places_is_updated_once_after_its_last_reader(handovers, config,
                                                                           share):
    reference, _ = _every_2d_weight_projected(config, share, False)
    model, opt = _every_2d_weight_projected(config, share, True)
    assert max_param_error(model, reference) <= FLOAT64_TOL
    assert len(handovers) == len(projected(opt))
    assert set(handovers.values()) == {3}


def test_the_gradients_of_a_layer_are_freed_inside_the_runs_backward():
    """
    Four float64 layers of hidden 256 and MLP width 512, 16 tokens: each layer's projected
    weights (q, k, v, o: 256x256; gate, up: 512x256; down: 256x512) have exactly 5 MiB of
    gradients, more than anything else the backward holds. Unfused, the run of layers returns
    its four layers' gradients together; fused, each layer's are handed to the optimizer and
    dropped as soon as that layer's backward is done, so the backward's tracked peak is lower
    by exactly the three other layers' gradients.
    """
    config = LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_layers=4,
                         num_heads=4, num_kv_heads=4)
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(0))

    def backward_peak(fused):
        model = tiny(config)
        opt = lowrank(torch.optim.AdamW(model.parameters()), model=model, rank=64,
                      fused_backward=fused)
        run = compile_memcompile(model, runtime="eager", stream={"chunk_size": 8})
        for _ in range(2):  # the first step compiles and creates the optimizer state
            loss = run(input_ids=ids, labels=ids).loss
            peak = tracked_peak(loss.backward)
            opt.step()
            opt.zero_grad()
        return peak

    assert backward_peak(False) - backward_peak(True) == 3 * 5 * 2**20


def test_hf_llama_streamed_fused_updates_give_the_unfused_parameters(handovers):
    """Hugging Face Llama (float64, use_cache=False). Its RMSNorm computes in float32, so its
    streamed gradients meet eager's only to the float32 rule (README, "Exactness"); fusing is
    checked against the same streamed run unfused: the same gradients, stepped in `step()`."""
    def run(fused):
        model = build_hf_model("llama", dtype=torch.float64, use_cache=False)
        opt = lowrank_of(model, fused)
        train(model, opt, stream=STREAM, steps=3,
              batch=lambda name, seq_len, seed: _hf_batch(model, seq_len, seed))
        return model, opt

    reference, _ = run(False)
    model, opt = run(True)
    assert max_param_error(model, reference) <= FLOAT64_TOL
    assert {handovers[id(p)] for p in projected(opt)} == {3}


def _hf_batch(model, length, seed):
    ids = torch.randint(0, model.config.vocab_size, (1, length),
                        generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def test_where_each_weight_is_updated_is_decided_from_its_readers():
    """
        def f(ids, tied, w, shared):
            h = embedding(tied, ids)            # outside every region
            a = h @ w.t() @ shared.t()          # region A: w, shared
            return (a @ shared.t() @ tied.t()).sum()   # region B: shared, tied

    w is read by region A only: updated by A's backward. shared (A and B) and tied (B and an op
    outside regions) are updated on their summed gradient. Each gets a recorded decision.
    """
    from types import SimpleNamespace

    from torch.fx.experimental.proxy_tensor import make_fx

    from memcompile.meta import DECISIONS
    from memcompile.optim import fused
    from memcompile.runtime.stream_fused import plan_updates

    def f(ids, tied, w, shared):
        h = torch.nn.functional.embedding(ids, tied)
        a = h @ w.t() @ shared.t()
        return (a @ shared.t() @ tied.t()).sum()

    weights = [torch.randn(8, 8, requires_grad=True) for _ in range(3)]
    inputs = [torch.zeros(1, 4, dtype=torch.long), *weights]
    gm = make_fx(f)(*inputs)
    opt = lowrank(torch.optim.AdamW(weights), params=weights, rank=2, fused_backward=True)
    nodes = list(gm.graph.nodes)
    mm = [n for n in nodes if n.target is torch.ops.aten.mm.default]
    a, b = SimpleNamespace(kind="layer"), SimpleNamespace(kind="head")
    owner = {}
    for node in nodes:
        if node.op == "call_function" and node.target is not torch.ops.aten.embedding.default:
            region = a if nodes.index(node) <= nodes.index(mm[1]) else b
            owner[node] = SimpleNamespace(region=region)
    updates = plan_updates(gm, fused.slots_of(inputs), owner)
    tied, w, shared = gm.graph.find_nodes(op="placeholder")[1:]
    assert updates.of(a) == {w: fused.slot_of(weights[1])} and updates.of(b) == {}
    assert set(updates.on_grad) == {tied, shared}
    decisions = gm.meta[DECISIONS]
    assert [d.node for d in decisions] == [tied.name, w.name, shared.name]
    assert all(d.kind == "fused update" and d.bytes == 8 * 8 * 4 for d in decisions)
    assert "by the layer reading it" in decisions[1].reason
    del opt


def test_a_loss_streamed_along_the_batch_updates_its_weights_inside_the_backward(handovers):
    """CLIP-style dual encoder, its towers run 4 of 13 samples at a time (`StreamBatch`): the
    projected weights are updated at the end of the region's backward, once per step, with the
    parameters of the same streamed run unfused (float64, 3 steps)."""
    from memcompile.losses import contrastive_loss
    from memcompile.models.clip import DualEncoder

    def run(fused):
        torch.manual_seed(0)
        model = DualEncoder().double()
        weights = [p for p in model.parameters() if p.dim() == 2 and min(p.shape) >= 8]
        opt = lowrank_of(model, fused, params=weights)
        step = compile_memcompile(
            lambda images, ids: contrastive_loss(*model(images, ids), model.logit_scale),
            runtime="eager", stream={"dim": "batch", "chunk_size": 4})
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            images = torch.randn(13, 3, 16, 16, generator=gen, dtype=torch.float64)
            step(images, torch.randint(0, 100, (13, 8), generator=gen)).backward()
            assert all((p.grad is None) == fused for p in weights)
            opt.step()
            opt.zero_grad()
        return model, weights

    reference, _ = run(False)
    model, weights = run(True)
    assert max_param_error(model, reference) <= FLOAT64_TOL
    assert [handovers[id(p)] for p in weights] == [3] * len(weights)
