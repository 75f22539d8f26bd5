"""Sequence parallelism with the low-rank optimizers, on spawned gloo ranks, in float64.

Each rank trains the built-in tiny Llama on its shard of the same batches (`shard_batch`,
`shard_loss`) with GaLore or Natural GaLore; `sequence_parallel_grads` sums the weights'
gradients over the ranks inside the backward. After STEPS steps every rank's weights equal a
single-process eager run of the same optimizer on the whole batches to FLOAT64_TOL, with the
ordinary `opt.step()` and with `fused_backward=True`, where each projected weight steps inside
the compiled backward: that update must read the summed gradient, never its rank's part (the
ranks would then step apart). Memory: the fused updates do not wait for the end of the backward
(where the sums are placed), so the projected gradients still never coexist.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from dist_ranks import RankPool
from helpers import FLOAT64_TOL, relative_error

from memcompile import MemcompileWarning
from memcompile.distributed import shard_batch, shard_loss, shard_sequence
from memcompile.measure import tracked_peak
from memcompile.models import build_model
from memcompile.optim import lowrank
from memcompile.report import recording

TINY = "tiny"
SEQ = 16
STEPS = 3
"""Projector refreshes at steps 0 and 2 (`update_proj_gap=2`)."""
RANK = 8
"""Below both sides of every projected weight of the tiny Llama (64x64 to 176x64)."""
UPDATE = torch.ops.memcompile.lowrank_update.default
ALL_REDUCE = torch.ops._c10d_functional.all_reduce.default
WAIT = torch.ops._c10d_functional.wait_tensor.default


def _batches(vocab: int = 256) -> list[dict[str, torch.Tensor]]:
    """One batch per step: two rows of SEQ ids, row 0's last 3 unscored (labels -100)."""
    batches = []
    for seed in range(STEPS):
        ids = torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(seed))
        labels = ids.clone()
        labels[0, -3:] = -100
        batches.append({"input_ids": ids, "labels": labels})
    return batches


def _optimizer(model, method, fused):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return lowrank(opt, model=model, rank=RANK, update_proj_gap=2, method=method,
                   fused_backward=fused)


def _reference(batches, method):
    """Single-process eager training on the whole batches: the weights after STEPS steps."""
    model = build_model(TINY, dtype=torch.float64)
    opt = _optimizer(model, method, fused=False)
    for batch in batches:
        model(batch["input_ids"], labels=batch["labels"]).loss.backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach() for n, p in model.named_parameters()}


# --- jobs (module level: spawned ranks import them) ------------------------------------------

def _train_job(batches, method, fused, runtime="eager"):
    """STEPS compiled steps on this rank's shards: the weights, which of them were projected,
    and the fused backward's structure."""
    torch._dynamo.reset()
    model = build_model(TINY, dtype=torch.float64)
    opt = _optimizer(model, method, fused)

    def step(ids, positions, targets, count):
        return shard_loss(model(ids, position_ids=positions).logits, targets, count)

    compiled = torch.compile(step, backend="memcompile", options={
        "runtime": runtime, "sequence_parallel": {"timeout": 60}})
    with recording() as records:
        for batch in batches:
            shard = shard_batch(batch["input_ids"], batch["labels"])
            count = torch.tensor(float(shard.num_tokens), dtype=torch.float64)
            compiled(shard.input_ids, shard.position_ids, shard.shift_labels, count).backward()
            stepped_inside = [p.grad is None for g in opt.param_groups if "rank" in g
                              for p in g["params"]]
            opt.step()
            opt.zero_grad()
    names = {id(p): n for n, p in model.named_parameters()}
    (record,) = [r for r in records if r.kind == "training"]
    return {"weights": {n: p.detach() for n, p in model.named_parameters()},
            "projected": {names[id(p)]: tuple(p.shape) for g in opt.param_groups
                          if "rank" in g for p in g["params"]},
            "stepped_inside": stepped_inside, "updates": _update_sums(record.backward.graph)}


def _update_sums(bw):
    """For each fused update of `bw`: (it reads an all-reduced sum, that sum's all-reduce
    starts right after its rank's part is computed, the update comes before the next weight
    gradient's all-reduce)."""
    nodes = list(bw.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    facts = []
    for update in bw.find_nodes(op="call_function", target=UPDATE):
        grad = update.args[0]
        started = grad.args[0] if grad.target is WAIT else None
        is_sum = getattr(started, "target", None) is ALL_REDUCE
        early = is_sum and started.prev is started.args[0]
        later_sums = [n for n in nodes[order[started] + 1:] if n.target is ALL_REDUCE] \
            if is_sum else []
        facts.append((is_sum, early, not later_sums or order[update] < order[later_sums[0]]))
    return facts


def _chain_peak_job(fused, steps=8):
    """Tracked peaks of the backwards of steps 2 to `steps` under sequence_parallel of four
    bias-free 512x512 linears with tanh (test_optim_fused's chain) on this rank's 8 of the 16
    rows, all four weights projected; and the weights after them."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layers = [torch.nn.Linear(512, 512, bias=False) for _ in range(4)]
    model = torch.nn.Sequential(*itertools.chain.from_iterable(
        (layer, torch.nn.Tanh()) for layer in layers))
    x = shard_sequence(torch.randn(1, 16, 512), 1)
    opt = lowrank(torch.optim.AdamW(model.parameters()),
                  params=[layer.weight for layer in layers], rank=128, fused_backward=fused)
    compiled = torch.compile(model, backend="memcompile", options={
        "runtime": "eager", "sequence_parallel": {"timeout": 60}})
    peaks = []
    for _ in range(steps):  # the first step compiles and creates the optimizer state
        loss = compiled(x).sum()
        peaks.append(tracked_peak(loss.backward))
        opt.step()
        opt.zero_grad()
    return {"peaks": peaks[1:], "weights": [layer.weight.detach() for layer in layers]}


def _subgroup_job():
    """Fused GaLore under sequence_parallel over a group of this rank alone, as with data
    parallelism over the other rank: the warnings, and whether the weights kept their .grad."""
    torch._dynamo.reset()
    groups = [torch.distributed.new_group([r]) for r in range(2)]  # every rank makes each
    torch.manual_seed(0)
    layers = [torch.nn.Linear(64, 64, bias=False) for _ in range(2)]
    model = torch.nn.Sequential(layers[0], torch.nn.Tanh(), layers[1])
    opt = lowrank(torch.optim.AdamW(model.parameters()),
                  params=[layer.weight for layer in layers], rank=8, fused_backward=True)
    group = groups[torch.distributed.get_rank()]
    compiled = torch.compile(model, backend="memcompile", options={
        "runtime": "eager", "sequence_parallel": {"group": group, "timeout": 60}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MemcompileWarning)
        compiled(torch.randn(1, 8, 64)).sum().backward()
    kept = [layer.weight.grad is not None for layer in layers]
    opt.step()
    return {"warnings": [str(w.message) for w in caught
                         if issubclass(w.category, MemcompileWarning)], "kept": kept}


# --- tests ------------------------------------------------------------------------------------

def _ready():
    return torch.distributed.get_rank()


@pytest.fixture(scope="module")
def ranks():
    pool = RankPool(2)
    pool.run(_ready)  # the ranks' start (spawn, import, join the group) counts as setup
    yield pool
    pool.close()


@pytest.mark.parametrize("fused", [False, True], ids=["step", "fused"])
@pytest.mark.parametrize("method", ["galore", "natural_galore"])
def test_lowrank_training_matches_one_device(ranks, method, fused):
    """float64, eager runtime, 3 steps through two projector refreshes: both ranks' weights
    equal single-process eager training on the whole batches, and each other bit for bit."""
    _assert_matches_one_device(ranks, method, fused, "eager")


@pytest.mark.slow
def test_fused_galore_under_inductor_matches_one_device(ranks):
    _assert_matches_one_device(ranks, "galore", True, "inductor")


def _assert_matches_one_device(ranks, method, fused, runtime):
    batches = _batches()
    results = ranks.run(_train_job, batches, method, fused, runtime, timeout=400)
    reference = _reference(batches, method)
    initial = dict(build_model(TINY, dtype=torch.float64).named_parameters())
    for rank, result in enumerate(results):
        assert set(result["weights"]) == set(reference)
        # Each weight, and (stricter: the weight's unchanged bulk left out) its total update.
        for name, weight in result["weights"].items():
            ref, start = reference[name], initial[name].detach()
            error = max(relative_error(weight, ref), relative_error(weight - start, ref - start))
            assert error <= FLOAT64_TOL, f"rank {rank}: {error:.3e} at {name}"
        # GaLore projected the attention and MLP matrices (rank 8 below both sides).
        assert len(result["projected"]) == 14
        assert all(RANK < min(shape) for shape in result["projected"].values())
        # Fused: each projected weight stepped inside the backward (no .grad was left).
        assert result["stepped_inside"] == [fused] * 14
    for name, weight in results[0]["weights"].items():
        assert torch.equal(weight, results[1]["weights"][name]), name


def test_fused_updates_read_the_sum_as_soon_as_it_is_complete(ranks):
    """Each fused update reads `wait_tensor(all_reduce(part))`, not the rank's part; the
    all-reduce starts right after the part is computed, and the update runs before the next
    weight's all-reduce (not at the end of the backward, where the sums are placed)."""
    results = ranks.run(_train_job, _batches()[:1], "galore", True, timeout=120)
    for result in results:
        assert len(result["updates"]) == 14
        assert all(facts == (True, True, True) for facts in result["updates"]), \
            result["updates"]


def test_projected_gradients_never_coexist_under_sequence_parallel(ranks):
    """
    The backward's tracked peak in exact bytes on each rank (+4: the loss's tangent), four
    bias-free 512x512 float32 linears with tanh on 8 rows (each weight gradient 1 MiB, each
    activation gradient 16 KiB).
    - step: the four sums come at the end of the backward; the last all-reduce copies its
      1 MiB part while the other three sums and that part are alive: 5 MiB.
    - fused: each gradient's sum starts as soon as its part is computed and its update follows
      at the weight's last reader: one part and its sum, with the activation gradient computed
      next to them, 2 MiB + 16 KiB. (Updates anchored on sums left at the end of the backward
      would hold all four parts there: 5 MiB again.)
    A sum's buffer is freed when its last reference drops, and gloo's worker thread holds one
    until it has finished with the collective, an instant after the wait returns: now and then
    (about one step in eight here) that drop comes after the next allocation, and the step
    measures one buffer more than the schedule holds. So: every step below the step mode's
    peak, and the smallest of seven steps exactly the schedule's. The step mode's sums become
    the .grads and are never freed inside the backward: its every step is exact.
    """
    step = ranks.run(_chain_peak_job, False, timeout=120)
    fused = ranks.run(_chain_peak_job, True, timeout=120)
    for rank in range(2):
        for a, b in zip(step[rank]["weights"], fused[rank]["weights"]):
            assert relative_error(a, b) <= 1e-6  # float32: the same training
        assert step[rank]["peaks"] == [5 * 2**20 + 4] * 7
        assert min(fused[rank]["peaks"]) == 2 * 2**20 + 16 * 2**10 + 4, fused[rank]["peaks"]
        assert max(fused[rank]["peaks"]) < 5 * 2**20 + 4, fused[rank]["peaks"]


def test_fused_updates_stay_off_over_a_sequence_parallel_subgroup(ranks):
    """Over a subgroup the other ranks are data-parallel replicas, whose gradient average must
    come before any step: nothing is fused, each weight keeps its .grad for optimizer.step(),
    and a warning says why."""
    for result in ranks.run(_subgroup_job, timeout=120):
        assert result["kept"] == [True, True]
        assert any("sequence-parallel group of 1 of 2 ranks" in w for w in result["warnings"]), \
            result["warnings"]
