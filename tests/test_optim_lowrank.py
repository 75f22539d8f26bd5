"""memcompile.optim.lowrank: which weights it projects, what it keeps, what it refuses, and the
optimizer-state bytes it saves."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import memcompile
from memcompile.models import build_model, make_batch
from memcompile.optim import GaLoreAdamW, NaturalGaLoreAdamW, lowrank, state_bytes


def projected(opt: torch.optim.Optimizer) -> set[int]:
    """ids of the parameters in the optimizer's projected groups."""
    return {id(p) for g in opt.param_groups if "rank" in g for p in g["params"]}


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    """``steps`` steps on the tiny model's random batch."""
    batch = make_batch("tiny", seq_len=16)
    for _ in range(steps):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()


def test_importable_as_attribute():
    """``memcompile.optim.lowrank`` works after a plain ``import memcompile``."""
    assert memcompile.optim.lowrank is lowrank


def test_builtin_llama_selection():
    """Every attention and MLP projection is projected; embedding, norms and LM head are not."""
    model = build_model("tiny")
    opt = lowrank(torch.optim.AdamW(model.parameters(), lr=1e-3), model=model, rank=8)
    names = {id(p): n for n, p in model.named_parameters()}
    chosen = sorted(names[i] for i in projected(opt))
    assert chosen == sorted(n for n in names.values()
                            if n.endswith("proj.weight") and n.startswith("layers."))
    assert len(chosen) == 2 * 7
    assert type(opt) is GaLoreAdamW and opt.fused_backward is False


def test_builtin_llama_tied_head():
    """With tied embeddings the shared weight (embedding and head at once) stays unprojected."""
    from memcompile.models import LlamaConfig
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1,
                         num_heads=2, num_kv_heads=2, tie_embeddings=True)
    model = build_model(config)
    opt = lowrank(torch.optim.AdamW(model.parameters()), model=model, rank=4)
    assert id(model.embed_tokens.weight) not in projected(opt)
    assert len(projected(opt)) == 7


def test_hf_llama_tied_embeddings():
    """A Hugging Face Llama from a config: lm_head (tied to embed_tokens) is not projected."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    opt = lowrank(torch.optim.AdamW(model.parameters()), model=model, rank=4,
                  method="natural_galore", natural_history=5)
    names = {id(p): n for n, p in model.named_parameters()}
    chosen = [names[i] for i in projected(opt)]
    assert len(chosen) == 2 * 7 and all("proj" in n for n in chosen)
    assert isinstance(opt, NaturalGaLoreAdamW)
    group = next(g for g in opt.param_groups if "rank" in g)
    assert group["natural_history"] == 5 and group["damping"] == 1e-3


def test_hyperparameters_kept_and_unprojected_follow_torch_exactly():
    """lr/betas/eps/decay carry over; unprojected weights step exactly as torch's AdamW would.

    After one step from the same weights and batch the gradients are the same, so every weight
    left on torch's rule must be bit-identical to torch's own AdamW, and every projected one not.
    """
    model, twin = build_model("tiny"), build_model("tiny")
    hyper = {"lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-7, "weight_decay": 0.05}
    opt = lowrank(torch.optim.AdamW(model.parameters(), **hyper), model=model, rank=8)
    for group in opt.param_groups:
        assert {k: group[k] for k in hyper} == hyper
    train(model, opt, 1)
    train(twin, torch.optim.AdamW(twin.parameters(), **hyper), 1)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q) == (id(p) not in projected(opt)), name


def test_adam_without_decay_accepted_and_existing_state_carried():
    """Adam (weight_decay=0) converts; unprojected state carries over, projected restarts."""
    model = build_model("tiny")
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    train(model, adam, 1)
    with pytest.warns(UserWarning, match="projected moments start from zero"):
        opt = lowrank(adam, model=model, rank=8)
    embed = model.embed_tokens.weight
    assert opt.state[embed]["exp_avg"] is adam.state[embed]["exp_avg"]
    assert all(p not in opt.state for p in model.parameters() if id(p) in projected(opt))
    train(model, opt, 2)
    assert opt.state[embed]["step"].item() == 3


@pytest.mark.parametrize("make, kwargs, error, match", [
    (lambda p: torch.optim.SGD(p, lr=0.1), {}, TypeError, "Adam or torch.optim.AdamW, got .*SGD"),
    (lambda p: torch.optim.AdamW(p, amsgrad=True), {}, ValueError, "amsgrad=True"),
    (lambda p: torch.optim.Adam(p, weight_decay=0.1), {}, ValueError, "L2 penalty.*AdamW"),
    (lambda p: torch.optim.AdamW(p), {"rank": 0}, ValueError, "rank must be a positive int"),
    (lambda p: torch.optim.AdamW(p), {"rank": 33}, ValueError, r"exceeds.*valid ranks: 1\.\.32"),
    (lambda p: torch.optim.AdamW(p), {"method": "lora"}, ValueError,
     "valid: \\['galore', 'natural_galore'\\]"),
    (lambda p: torch.optim.AdamW(p), {"proj_type": "full"}, ValueError, "valid values"),
    (lambda p: torch.optim.AdamW(p), {"damping": 1.0}, TypeError, "natural_galore"),
    (lambda p: torch.optim.AdamW(p), {"fused_backward": "yes"}, TypeError,
     "fused_backward must be True or False"),
    (lambda p: torch.optim.AdamW(p), {"micro_batches": 0}, ValueError,
     "micro_batches must be an int >= 1"),
    (lambda p: torch.optim.AdamW(p), {"max_grad_norm": -1.0}, ValueError,
     "max_grad_norm must be a number > 0 or None"),
])
def test_bad_input_says_what_is_valid(make, kwargs, error, match):
    """Unsupported optimizers, flags, ranks, methods and options name the problem and the fix."""
    model = build_model("tiny")
    args = {"rank": 8, **kwargs}
    with pytest.raises(error, match=match):
        lowrank(make(model.parameters()), model=model, **args)


def test_bad_params_say_what_is_wrong():
    """params: exactly one of model/params, 2-D only, and only tensors the optimizer holds."""
    model = build_model("tiny")
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="exactly one of model= or params="):
        lowrank(opt, rank=4)
    with pytest.raises(ValueError, match="exactly one of model= or params="):
        lowrank(opt, model=model, params=[model.lm_head.weight], rank=4)
    with pytest.raises(ValueError, match=r"params\[0\] has shape \(64,\); only 2-D"):
        lowrank(opt, params=[model.norm.weight], rank=4)
    stranger = nn.Parameter(torch.zeros(8, 8))
    with pytest.raises(ValueError, match="not in the optimizer"):
        lowrank(opt, params=[stranger], rank=4)
    chosen = lowrank(opt, params=[model.lm_head.weight], rank=4)
    assert projected(chosen) == {id(model.lm_head.weight)}


def test_state_bytes_at_rank_quarter_hidden():
    """At rank hidden/4 GaLore's state over the projected weights is ≥ 65% below AdamW's."""
    model, twin = build_model("tiny"), build_model("tiny")
    rank = model.config.hidden_size // 4
    opt = lowrank(torch.optim.AdamW(model.parameters()), model=model, rank=rank)
    ref = torch.optim.AdamW(twin.parameters())
    train(model, opt, 1)
    train(twin, ref, 1)
    weights = [p for p in model.parameters() if id(p) in projected(opt)]
    twin_weights = [q for p, q in zip(model.parameters(), twin.parameters())
                    if id(p) in projected(opt)]
    galore, adamw = state_bytes(opt, weights), state_bytes(ref, twin_weights)
    # AdamW: two fp32 moments per weight element, plus a 4-byte step per weight.
    assert adamw == sum(8 * p.numel() + 4 for p in twin_weights)
    assert galore <= 0.35 * adamw, (galore, adamw)


def test_randomized_svd_and_natural_keys_reach_the_groups(monkeypatch):
    """Extra keywords become group keys, and the steps use them: each projected weight's refresh
    is a randomized SVD with the power iterations asked, and each natural step uses the damping
    asked. (It checked only that the weights stayed finite.)"""
    from memcompile.optim import natural, projector

    svd_calls, dampings = [], []
    randomized, natural_gradient = projector.randomized_left_vectors, natural.natural_gradient
    monkeypatch.setattr(projector, "randomized_left_vectors",
                        lambda a, rank, over, iters: svd_calls.append((rank, over, iters))
                        or randomized(a, rank, over, iters))
    monkeypatch.setattr(natural, "natural_gradient",
                        lambda g, h, damping: dampings.append(damping)
                        or natural_gradient(g, h, damping))
    model = build_model("tiny")
    opt = lowrank(torch.optim.AdamW(model.parameters()), model=model, rank=8,
                  method="natural_galore", svd="randomized", power_iters=1, damping=1e-2)
    group = next(g for g in opt.param_groups if "rank" in g)
    assert (group["svd"], group["power_iters"], group["oversample"]) == ("randomized", 1, 8)
    assert (group["natural_history"], group["damping"]) == (20, 1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, 2)
    assert svd_calls == [(8, 8, 1)] * 14  # one refresh per projected weight, at the first step
    assert dampings == [1e-2] * 28  # every projected weight, both steps
    assert all(torch.isfinite(p).all() and not torch.equal(p, q)
               for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("key, value, match", [
    ("natural_history", 0, "natural_history must be a positive int"),
    ("damping", 0.0, "damping must be > 0"),
    ("svd", "qr", "valid values: \\['exact', 'randomized'\\]"),
])
def test_bad_group_keys(key, value, match):
    """NaturalGaLoreAdamW checks its group keys when the group is added."""
    weight = nn.Parameter(torch.zeros(8, 6))
    with pytest.raises(ValueError, match=match):
        NaturalGaLoreAdamW([{"params": [weight], "rank": 2, key: value}])
