"""Distributed causal attention (`memcompile.distributed`) on spawned gloo ranks, in float64.

Exactness: each rank's output and q/k/v gradients, put back in global order, equal
`scaled_dot_product_attention(..., is_causal=True)` on the whole tensors in one process, to
1e-12 relative to the reference's largest magnitude (float64 sums of a few dozen terms differ in
the last bits only). The schedule, the balance and the byte volumes are plain arithmetic, tested
without processes; the bytes a rank really sends must equal the schedule's volume exactly.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_ranks import RankPool, run_ranks
from memcompile.distributed import (
    PeerError,
    count_bytes,
    dist_attention_backward,
    dist_attention_forward,
    dist_causal_attention,
    shard_batch,
    shard_indices,
    shard_sequence,
    unshard_sequence,
    unshard_shards,
)
from memcompile.distributed import schedule

TOL = 1e-12
"""Largest error allowed, relative to the reference's largest magnitude, in float64."""


# --- jobs run on every rank (module level, so spawned ranks can import them) ---------------

def _attention_job(q, k, v, grad, layout, scale, split):
    """This rank's output and gradients of the distributed attention of the global tensors,
    with the bytes it sent; `split`: through the forward and backward halves."""
    cut = [shard_sequence(t, 2, layout=layout).requires_grad_() for t in (q, k, v)]
    grad = shard_sequence(grad, 2, layout=layout)
    options = dict(layout=layout, scale=scale, timeout=30)
    with count_bytes() as sent:
        if split:
            out, lse = dist_attention_forward(*cut, **options)
            grads = dist_attention_backward(grad, *cut, out, lse, **options)
        else:
            out = dist_causal_attention(*cut, **options)
            out.backward(grad)
            grads = [t.grad for t in cut]
    return {"out": out.detach(), "grads": grads, "forward": sent.forward,
            "backward": sent.backward, "calls": sent.calls}


def _error_job(q_shape, kv_shape, layout):
    """The ValueError message of a call with these local shapes (None if it ran)."""
    q, kv = torch.zeros(q_shape, dtype=torch.float64), torch.zeros(kv_shape, dtype=torch.float64)
    try:
        dist_causal_attention(q, kv, kv, layout=layout, timeout=10)
    except ValueError as error:
        return str(error)
    return None


def _unshard_job(tensor, layout):
    return unshard_sequence(shard_sequence(tensor, 1, layout=layout), 1, layout=layout)


def _failing_job(mode, timeout):
    """Rank 1 fails (`mode`: raises, dies or stalls); rank 0 reports the error it got."""
    torch.manual_seed(0)
    q = torch.randn(1, 2, 8, 4, dtype=torch.float64)
    if dist.get_rank() == 1:
        if mode == "raise":
            raise RuntimeError("rank 1 fails on purpose")
        if mode == "die":
            os._exit(7)
        time.sleep(timeout + 1)  # stall past rank 0's deadline
        return None
    start = time.monotonic()
    try:
        dist_causal_attention(q, q[:, :1], q[:, :1], timeout=timeout)
    except PeerError as error:
        return {"peers": error.peers, "message": str(error),
                "elapsed": time.monotonic() - start}
    return {"peers": None}


# --- helpers ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ranks():
    pool = RankPool(2)
    yield pool
    pool.close()


def _inputs(batch, heads, kv_heads, length, dim, seed=0):
    generator = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(batch, h, length, dim, dtype=torch.float64,  # noqa: E731
                                 generator=generator)
    return make(heads), make(kv_heads), make(kv_heads), make(heads)


def _assert_close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=TOL, atol=TOL * expected.abs().max(),
                               msg=lambda m: f"{what}: {m}")


def _check_exact(pool, layout, batch, heads, kv_heads, length, dim, scale=None, seed=0,
                 split=False):
    """Run the distributed attention on the pool's ranks and compare it with SDPA; also the
    bytes each rank sent with the schedule's volume."""
    q, k, v, grad = _inputs(batch, heads, kv_heads, length, dim, seed)
    results = pool.run(_attention_job, q, k, v, grad, layout, scale, split)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = F.scaled_dot_product_attention(*leaves, is_causal=True, scale=scale,
                                              enable_gqa=True)
    expected.backward(grad)
    _assert_close(unshard_shards([r["out"] for r in results], 2, layout), expected.detach(),
                  "output")
    for i, name in enumerate("qkv"):
        _assert_close(unshard_shards([r["grads"][i] for r in results], 2, layout),
                      leaves[i].grad, f"grad of {name}")
    for rank, result in enumerate(results):
        volume = schedule.schedule_bytes(layout, pool.world, rank, batch=batch,
                                         kv_heads=kv_heads, seq_len=length, head_dim=dim,
                                         itemsize=8)
        assert (result["forward"], result["backward"], result["calls"]) == (
            volume["forward"], volume["backward"], 1), f"bytes sent by rank {rank}"


# --- exactness on 2 ranks -----------------------------------------------------------------

@pytest.mark.parametrize("layout", schedule.LAYOUTS)
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (3, 3)])
def test_matches_sdpa(ranks, layout, heads, kv_heads):
    _check_exact(ranks, layout, batch=2, heads=heads, kv_heads=kv_heads, length=12, dim=5)


def test_explicit_scale_and_one_token_chunks(ranks):
    _check_exact(ranks, "zigzag", batch=1, heads=2, kv_heads=1, length=4, dim=3, scale=0.37)


@pytest.mark.parametrize("layout", schedule.LAYOUTS)
def test_forward_and_backward_halves_match_sdpa(ranks, layout):
    _check_exact(ranks, layout, batch=1, heads=4, kv_heads=2, length=8, dim=6, split=True)


@settings(max_examples=6, deadline=None)
@given(layout=st.sampled_from(schedule.LAYOUTS), batch=st.integers(1, 2),
       kv_heads=st.integers(1, 3), group=st.integers(1, 3), chunk=st.integers(1, 4),
       dim=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_random_shapes_match_sdpa(ranks, layout, batch, kv_heads, group, chunk, dim, seed):
    length = chunk * schedule.chunk_count(layout, 2)
    _check_exact(ranks, layout, batch, kv_heads * group, kv_heads, length, dim, seed=seed)


def test_bad_shapes_raise_clear_errors(ranks):
    odd = ranks.run(_error_job, (1, 2, 5, 4), (1, 2, 5, 4), "zigzag")
    assert all("multiple of 4" in message and "global 10" in message for message in odd)
    assert ranks.run(_error_job, (1, 3, 6, 4), (1, 2, 6, 4), "zigzag")[0] is not None
    with pytest.raises(ValueError, match="multiple of 4"):
        shard_indices(10, 2, 0, "zigzag")


def test_unshard_sequence_gathers_in_global_order(ranks):
    whole = torch.arange(24.0).reshape(2, 12)
    for layout in schedule.LAYOUTS:
        for gathered in ranks.run(_unshard_job, whole, layout):
            assert torch.equal(gathered, whole)


# --- failures: a rank that raises, dies or stalls ------------------------------------------

@pytest.mark.parametrize("mode", ["raise", "die", "stall"])
def test_failed_peer_is_named(mode):
    timeout = 3.0
    answers, exit_codes = run_ranks(_failing_job, 2, mode, timeout)
    ok, report = answers[0]
    assert ok, report
    assert report["peers"] == [1], report
    assert "rank(s) 1" in report["message"]
    # Never a hang: a dead peer is seen at once, a silent one at the deadline.
    assert report["elapsed"] < timeout + 2.0
    if mode == "die":
        assert exit_codes[1] == 7 and 1 not in answers


# --- the schedule, without processes --------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(layout=st.sampled_from(schedule.LAYOUTS), world=st.integers(1, 7))
def test_every_causal_block_is_computed_once(layout, world):
    done = [(schedule.rank_chunks(layout, world, rank)[b.query],
             schedule.step_keys(layout, world, rank, step)[b.key], b.causal)
            for rank in range(world) for step in range(world)
            for b in schedule.blocks(layout, world, rank, step)]
    chunks = schedule.chunk_count(layout, world)
    assert sorted(done) == [(q, k, q == k) for q in range(chunks) for k in range(q + 1)]


def test_work_balance():
    for world in (2, 3, 4, 8):
        assert schedule.work_imbalance("zigzag", world, 64 * world) == 1.0
    assert schedule.work_imbalance("contiguous", 2, 8192) == pytest.approx(1.5, abs=1e-3)
    assert schedule.work_imbalance("contiguous", 4, 8192) == pytest.approx(1.75, abs=1e-3)


def test_volumes_by_hand():
    """P=2, zigzag: rank 0 sends its early chunk (rank 1 sees only that), rank 1 sends both
    of its chunks (rank 0's late chunk sees them); backward: the same again plus the gradients
    of what each received. One chunk's keys and values: 2·B·Hkv·c·D elements."""
    shape = dict(batch=1, kv_heads=4, seq_len=4096, head_dim=64, itemsize=4)
    pair = 2 * 4 * 1024 * 64 * 4
    assert schedule.schedule_bytes("zigzag", 2, 0, **shape) == {"forward": pair,
                                                               "backward": 3 * pair}
    assert schedule.schedule_bytes("zigzag", 2, 1, **shape) == {"forward": 2 * pair,
                                                               "backward": 3 * pair}
    assert schedule.schedule_bytes("contiguous", 2, 1, **shape) == {"forward": 0,
                                                                   "backward": 2 * pair}


# --- batch sharding, without processes --------------------------------------------------------

def test_shard_batch_shifts_before_sharding():
    ids = torch.arange(100, 108).reshape(1, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]])
    shards = [shard_batch(ids, attention_mask=mask, rank=r, world_size=2) for r in range(2)]
    # zigzag over 2 ranks: 4 chunks of 2; rank 0 holds positions 0,1,6,7, rank 1 2,3,4,5.
    assert shards[0].position_ids.tolist() == [[0, 1, 6, 7]]
    assert shards[1].position_ids.tolist() == [[2, 3, 4, 5]]
    assert shards[0].input_ids.tolist() == [[100, 101, 106, 107]]
    # Position 1's target is token 102, which rank 1 holds: shifted before sharding.
    assert shards[0].shift_labels.tolist() == [[101, 102, -100, -100]]
    assert shards[1].shift_labels.tolist() == [[103, 104, 105, -100]]
    assert [s.num_tokens for s in shards] == [5, 5]  # targets 101..105, over all ranks
    assert shards[1].attention_mask.tolist() == [[1, 1, 1, 1]]
    contiguous = shard_batch(ids, rank=0, world_size=2, layout="contiguous")
    assert contiguous.shift_labels.tolist() == [[101, 102, 103, 104]]
    assert contiguous.num_tokens == 7


def test_shard_batch_refuses_left_padding():
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="left"):
        shard_batch(ids, attention_mask=torch.tensor([[0, 1, 1, 1]]), rank=0, world_size=2)


@settings(max_examples=20, deadline=None)
@given(layout=st.sampled_from(schedule.LAYOUTS), world=st.integers(1, 5),
       chunk=st.integers(1, 3))
def test_shards_partition_the_sequence(layout, world, chunk):
    length = chunk * schedule.chunk_count(layout, world)
    whole = torch.randn(2, length, 3)
    shards = [shard_sequence(whole, 1, layout=layout, rank=r, world_size=world)
              for r in range(world)]
    assert torch.equal(unshard_shards(shards, 1, layout), whole)


# --- 4 ranks --------------------------------------------------------------------------------

@pytest.mark.slow
def test_four_ranks_match_sdpa():
    pool = RankPool(4)
    try:
        for layout in schedule.LAYOUTS:
            _check_exact(pool, layout, batch=2, heads=4, kv_heads=2, length=24, dim=5)
            _check_exact(pool, layout, batch=1, heads=3, kv_heads=1, length=8, dim=7, seed=1)
    finally:
        pool.close()
