"""`options={"sequence_parallel": ...}` on spawned gloo ranks, in float64.

Exactness (docs/design.md): each rank runs the compiled step on its shard (`shard_batch`), its
loss being its targets' share of the global mean (`shard_loss`); the ranks' losses summed
(`global_loss`) and every parameter's gradient on every rank equal single-process eager on the
whole batch to FLOAT64_TOL. Also: the backward never runs attention's forward again, the
gradients are all-reduced in the backward graph, what is refused is refused on every rank
with the reason, and a dead rank is named.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn.functional as F
from dist_ranks import RankPool, run_ranks
from helpers import FLOAT64_TOL, relative_error

import memcompile
from memcompile.config import Options
from memcompile.distributed import (PeerError, global_loss, shard_batch, shard_loss,
                                    shard_sequence, unshard_sequence, unshard_shards)
from memcompile.distributed import dist_attention_backward, dist_attention_forward
from memcompile.distributed.masks import additive, local_keys
from memcompile.errors import NotAvailableError, OptionsError
from memcompile.models import build_hf_model, build_model
from memcompile.passes.sequence_parallel import sequence_parallel_pass
from memcompile.report import recording

TINY = "tiny"
SEQ = 16
"""Global length: 4 zigzag chunks of 4 on 2 ranks, 8 of 2 on 4."""


# --- batches and references (main process) -------------------------------------------------

def _batch(vocab: int, pad: int = 3, seed: int = 0, length: int = SEQ
           ) -> dict[str, torch.Tensor]:
    """Two rows of `length` ids; row 0 right-padded by `pad` (mask 0, labels -100)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, length), generator=gen)
    mask = torch.ones_like(ids)
    if pad:
        mask[0, -pad:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _reference_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    targets = F.pad(labels, (0, 1), value=-100)[:, 1:]
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


def _builtin_reference(batch):
    model = build_model(TINY, dtype=torch.float64)
    loss = model(batch["input_ids"], labels=batch["labels"]).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _hf_reference(batch):
    model = build_hf_model("llama", dtype=torch.float64)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                labels=batch["labels"], use_cache=False)
    loss = _reference_loss(out.logits, batch["labels"])
    loss.backward()
    return loss.detach(), out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _assert_exact(results, ref_loss, ref_grads, tol=FLOAT64_TOL):
    for rank, result in enumerate(results):
        errors = {"loss": relative_error(result["loss"], ref_loss)}
        errors.update({name: relative_error(g, ref_grads[name])
                       for name, g in result["grads"].items()})
        worst = max(errors, key=errors.__getitem__)
        assert errors[worst] <= tol, f"rank {rank}: {errors[worst]:.3e} at {worst}"
        assert set(result["grads"]) == set(ref_grads)


# --- jobs (module level: spawned ranks import them) ------------------------------------------

def _sp_options(options, layout):
    return {**options, "sequence_parallel": {"layout": layout, "timeout": 60}}


def _graph_codes(records):
    return {"forward": "\n".join(r.forward_code or "" for r in records),
            "backward": "\n".join(r.backward_code or "" for r in records),
            "notes": [text for r in records for _, text in r.notes]}


def _builtin_job(batch, options, layout):
    """One compiled step of the built-in model on this rank's shard."""
    torch._dynamo.reset()
    model = build_model(TINY, dtype=torch.float64)
    shard = shard_batch(batch["input_ids"], batch["labels"], layout=layout)

    def step(ids, positions, targets, count):
        return shard_loss(model(ids, position_ids=positions).logits, targets, count)

    compiled = torch.compile(step, backend="memcompile", options=_sp_options(options, layout))
    count = torch.tensor(float(shard.num_tokens), dtype=torch.float64)
    with recording() as records:
        loss = compiled(shard.input_ids, shard.position_ids, shard.shift_labels, count)
        loss.backward()
    return {"loss": global_loss(loss), "grads": {n: p.grad for n, p in model.named_parameters()},
            **_graph_codes(records)}


def _hf_job(batch, options, layout, with_mask):
    """One compiled step of a transformers Llama on this rank's shard: the float64 loss from
    its logits (backpropagated) and its own loss (`num_items_in_batch`, float32 inside)."""
    torch._dynamo.reset()
    model = build_hf_model("llama", dtype=torch.float64)
    shard = shard_batch(batch["input_ids"], batch["labels"], batch["attention_mask"],
                        layout=layout)
    compiled = torch.compile(model, backend="memcompile", options=_sp_options(options, layout))
    count = torch.tensor(shard.num_tokens)
    mask = shard.attention_mask if with_mask else None
    with recording() as records:
        out = compiled(input_ids=shard.input_ids, position_ids=shard.position_ids,
                       attention_mask=mask, labels=shard.shift_labels,
                       shift_labels=shard.shift_labels, num_items_in_batch=count,
                       use_cache=False)
        loss = shard_loss(out.logits, shard.shift_labels, count)
        loss.backward()
    return {"loss": global_loss(loss), "native": global_loss(out.loss),
            "grads": {n: p.grad for n, p in model.named_parameters()}, **_graph_codes(records)}


def _masked_attention_job(q, k, v, grad, keys, layout):
    """This rank's output and q/k/v gradients of the distributed attention's halves with the
    global padding `keys` (B, S)."""
    cut = [shard_sequence(t, 2, layout=layout) for t in (q, k, v)]
    mask = additive(keys, q.dtype)
    options = dict(layout=layout, timeout=30, keys=mask)
    out, lse = dist_attention_forward(*cut, **options)
    grads = dist_attention_backward(shard_sequence(grad, 2, layout=layout), *cut, out, lse,
                                    **options)
    return {"out": out, "grads": grads}


def _pass_job():
    """The pass on hand-built graphs: what it makes, what it refuses, its idempotence."""
    options = Options(sequence_parallel=True)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, SEQ, 4, dtype=torch.float64) for h in (4, 2, 2))

    def causal(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True) * 2

    gm = sequence_parallel_pass(fx.symbolic_trace(causal), [], options=options)
    code = gm.code
    again = sequence_parallel_pass(gm, [], options=options).code
    out = gm(*(shard_sequence(t, 2) for t in (q, k, v)))
    report = {"code": code, "idempotent": again == code,
              "error": relative_error(unshard_sequence(out, 2), causal(q, k, v))}

    def dropout(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1, is_causal=True)

    def full(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    def eager(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v

    for name, fn in (("dropout", dropout), ("full", full), ("eager", eager)):
        try:
            sequence_parallel_pass(fx.symbolic_trace(fn), [], options=options)
            report[name] = None
        except NotAvailableError as error:
            report[name] = str(error)
    return report


def _dead_peer_job():
    """Rank 1 dies before the step; rank 0 reports the error its step raised. (A fixed cost
    model: the measured one is agreed on by a collective at compile time, before any
    transfer.)"""
    if dist.get_rank() == 1:
        os._exit(5)
    try:
        _builtin_job(_batch(256), {"runtime": "eager", "cost_model": "fixed"}, "zigzag")
    except PeerError as error:
        return {"peers": error.peers, "message": str(error)}
    return {"peers": None}


# --- tests ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ranks():
    pool = RankPool(2)
    yield pool
    pool.close()


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_builtin_model_matches_one_device(ranks, layout):
    batch = _batch(256)
    results = ranks.run(_builtin_job, batch, {"runtime": "eager"}, layout, timeout=120)
    _assert_exact(results, *_builtin_reference(batch))
    for result in results:
        # Attention's forward runs once: the backward reads its saved output and
        # log-sum-exp, and every parameter's gradient is summed over the ranks in it.
        assert result["forward"].count("memcompile.sp_attention.default(") == 2
        assert "memcompile.sp_attention.default(" not in result["backward"]
        assert result["backward"].count("memcompile.sp_attention_backward.default(") == 2
        params = len(result["grads"])
        assert result["backward"].count("_c10d_functional.all_reduce.default(") == params
        assert any("attend across 2 ranks" in note for note in result["notes"])
        assert any("stream 'auto': off under sequence_parallel" in n for n in result["notes"])


def test_builtin_model_with_a_memory_budget(ranks):
    """128 tokens, 64 per rank: long enough that the budget makes the planner recompute."""
    batch = _batch(256, length=128)
    results = ranks.run(_builtin_job, batch, {"runtime": "eager", "memory_budget": 0.7},
                        "zigzag", timeout=120)
    _assert_exact(results, *_builtin_reference(batch))
    for result in results:
        assert "memcompile.sp_attention.default(" not in result["backward"]
        (plan,) = [n for n in result["notes"] if n.startswith("budget 0.7")]
        assert "recomputes 0 ops" not in plan, plan


def test_hugging_face_llama_with_padding_matches_one_device(ranks):
    batch = _batch(256)
    results = ranks.run(_hf_job, batch, {"runtime": "eager"}, "zigzag", True, timeout=180)
    ref_loss, ref_native, ref_grads = _hf_reference(batch)
    _assert_exact(results, ref_loss, ref_grads)
    for result in results:
        # transformers' own loss (`num_items_in_batch`) computes in float32: its tolerance.
        assert relative_error(result["native"], ref_native) <= 1e-6


def test_position_built_mask_is_refused_on_every_rank(ranks):
    """Without attention_mask, transformers builds a packed-sequence mask from the zigzag
    positions: rank 0's shard looks like two documents. Both ranks raise, naming rank 0."""
    with pytest.raises(AssertionError) as failure:
        ranks.run(_hf_job, _batch(256, pad=0), {"runtime": "eager"}, "zigzag", False,
                  timeout=180)
    text = str(failure.value)
    assert text.count("the attention mask of rank(s) [0] is not the causal rule") == 2
    assert "pass attention_mask" in text


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_attention_with_padding_keys_matches_sdpa(ranks, layout):
    """Keys hidden at the end of row 0 and in the middle of row 1: some query chunks see no
    key of a whole block (a -inf log-sum-exp in the merge); every query sees key 0."""
    gen = torch.Generator().manual_seed(1)
    q, grad = (torch.randn(2, 4, SEQ, 3, dtype=torch.float64, generator=gen) for _ in "qg")
    k, v = (torch.randn(2, 2, SEQ, 3, dtype=torch.float64, generator=gen) for _ in "kv")
    keys = torch.ones(2, SEQ, dtype=torch.bool)
    keys[0, 11:] = False
    keys[1, 3:9] = False
    results = ranks.run(_masked_attention_job, q, k, v, grad, keys, layout)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    mask = torch.ones(SEQ, SEQ, dtype=torch.bool).tril() & keys[:, None, None, :]
    expected = F.scaled_dot_product_attention(*leaves, attn_mask=mask, enable_gqa=True)
    expected.backward(grad)
    got = unshard_shards([r["out"] for r in results], 2, layout)
    assert relative_error(got, expected) <= 1e-12
    for i, leaf in enumerate(leaves):
        got = unshard_shards([r["grads"][i] for r in results], 2, layout)
        assert relative_error(got, leaf.grad) <= 1e-12, "qkv"[i]


def test_pass_on_hand_built_graphs(ranks):
    report = ranks.run(_pass_job)[0]
    assert "torch.ops.memcompile.sp_attention.default(" in report["code"]
    assert "scaled_dot_product_attention" not in report["code"]
    assert report["idempotent"]
    assert report["error"] <= 1e-12
    assert "dropout_p=0.1" in report["dropout"]
    assert "every query sees every key" in report["full"]
    assert "attn_implementation='sdpa'" in report["eager"]


def test_dead_rank_is_named():
    answers, exit_codes = run_ranks(_dead_peer_job, 2, timeout=120)
    ok, report = answers[0]
    assert ok, report
    assert report["peers"] == [1], report
    assert "rank(s) 1" in report["message"]
    assert exit_codes[1] == 5


# --- without processes ------------------------------------------------------------------------

def test_options_normalize_and_refuse():
    sp = Options(sequence_parallel=True).sequence_parallel
    assert (sp.group, sp.layout, sp.timeout) == (None, "zigzag", 300.0)
    assert Options(sequence_parallel={"schedule": "ring"}).sequence_parallel.layout == \
        "contiguous"
    assert Options(sequence_parallel={"layout": "contiguous", "timeout": 5}
                   ).sequence_parallel.timeout == 5.0
    with pytest.raises(OptionsError, match="valid keys: group, layout, schedule, timeout"):
        Options(sequence_parallel={"groups": None})
    with pytest.raises(OptionsError, match="valid: zigzag, contiguous"):
        Options(sequence_parallel={"layout": "ring"})
    with pytest.raises(OptionsError, match="give one of them"):
        Options(sequence_parallel={"layout": "zigzag", "schedule": "ring"})
    with pytest.raises(OptionsError, match="positive number of seconds"):
        Options(sequence_parallel={"timeout": 0})
    with pytest.raises(OptionsError, match="ProcessGroup"):
        Options(sequence_parallel={"group": "world"})
    with pytest.raises(OptionsError, match="keys and values of the whole shard"):
        Options(sequence_parallel=True, stream={"keys_values": "per_chunk"})


def test_the_passes_run_only_under_the_option():
    from memcompile.passes.registry import active_options, default_pipeline

    assert active_options(Options()) == set()
    assert active_options(Options(sequence_parallel=True)) == {"sequence_parallel"}
    assert default_pipeline("eager") == ["remove_noops", "plan_remat"]
    assert default_pipeline(graph="capture") == []
    on = {"sequence_parallel"}
    assert default_pipeline("eager", options_on=on) == ["remove_noops",
                                                        "sequence_parallel_grads", "plan_remat"]
    assert default_pipeline(graph="capture", options_on=on) == ["sequence_parallel"]


def test_without_torch_distributed_the_error_says_so():
    assert not dist.is_initialized()
    model = torch.nn.Linear(4, 4)
    compiled = torch.compile(model, backend="memcompile", options={"sequence_parallel": True})
    with pytest.raises(Exception, match="needs torch.distributed initialized"):
        compiled(torch.randn(2, 4))
    with pytest.raises(OptionsError, match="torchrun"):
        memcompile.explain(lambda x: x.sum(), torch.randn(3, requires_grad=True),
                           options={"sequence_parallel": True})


def test_local_keys_reads_padding_and_refuses_other_masks():
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    padding = torch.tensor([[True, True, True, False], [True] * 4])
    mask = causal & padding[:, None, None, :]
    keys, why = local_keys(mask, 4)
    assert why is None and torch.equal(keys, padding)
    additive = torch.where(mask, 0.0, torch.finfo(torch.float32).min)
    assert torch.equal(local_keys(additive, 4)[0], padding)
    documents = causal.clone()
    documents[2:, :2] = False  # two documents of two tokens
    assert "not the causal rule" in local_keys(documents, 4)[1]
    assert "bias" in local_keys(torch.where(mask, 0.5, float("-inf")), 4)[1]
    assert "shaped" in local_keys(mask, 8)[1]


# --- 4 ranks ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_four_ranks_match_one_device():
    pool = RankPool(4)
    try:
        batch = _batch(256)
        results = pool.run(_builtin_job, batch, {"runtime": "eager"}, "zigzag", timeout=240)
        _assert_exact(results, *_builtin_reference(batch))
    finally:
        pool.close()


@pytest.mark.slow
def test_inductor_runtime_matches_one_device(ranks):
    batch = _batch(256)
    results = ranks.run(_builtin_job, batch, {"runtime": "inductor"}, "zigzag", timeout=400)
    _assert_exact(results, *_builtin_reference(batch))
