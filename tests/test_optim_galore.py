"""GaLoreAdamW and NaturalGaLoreAdamW: parity with galore-torch 1.0, the Woodbury formula, the
history cleared at a refresh, and resuming from a state dict bit for bit."""

from __future__ import annotations

import warnings

import pytest
import torch

from memcompile.optim import GaLoreAdamW, NaturalGaLoreAdamW
from memcompile.optim.natural import natural_gradient

SHAPES = [(24, 16), (12, 20)]  # a tall weight (right projector) and a wide one (left projector)
RANK = 4


def orthonormal(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """An n×k matrix with orthonormal columns, drawn from ``generator``."""
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=torch.float64))
    return q


def separated_gradient(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """G = U diag(s) Vᵀ + small noise, with a clear gap after the RANK-th singular value.

    With near-equal singular values at the cut the top-r subspace is ill-defined, and two correct
    implementations may pick different ones; the gap makes the subspace, hence the test, stable.
    """
    m, n = shape
    k = min(m, n)
    s = torch.cat([torch.linspace(8.0, 4.0, RANK), torch.linspace(1.0, 0.1, k - RANK)])
    u, v = orthonormal(m, k, generator), orthonormal(n, k, generator)
    noise = 1e-3 * torch.randn(m, n, generator=generator, dtype=torch.float64)
    return (u * s.double()) @ v.T + noise


def make_params(dtype: torch.dtype = torch.float64) -> list[torch.nn.Parameter]:
    """Two weights of SHAPES and a bias, the same values on every call."""
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(*shape, generator=g, dtype=torch.float64) for shape in SHAPES]
    tensors.append(torch.randn(7, generator=g, dtype=torch.float64))
    return [torch.nn.Parameter(t.to(dtype)) for t in tensors]


def make_groups(params: list[torch.nn.Parameter], proj_type: str = "std",
                gap: int = 10, **extra) -> list[dict]:
    """galore-torch's group layout: the bias plain, the weights projected."""
    return [{"params": params[2:]},
            {"params": params[:2], "rank": RANK, "update_proj_gap": gap, "scale": 0.25,
             "proj_type": proj_type, **extra}]


def gradient_stream(steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    """Per step, one separated gradient per weight and a random bias gradient."""
    g = torch.Generator().manual_seed(seed)
    return [[separated_gradient(shape, g) for shape in SHAPES]
            + [torch.randn(7, generator=g, dtype=torch.float64)] for _ in range(steps)]


def run(optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
        grads: list[list[torch.Tensor]]) -> None:
    """Step ``optimizer`` once per entry of ``grads``."""
    for step_grads in grads:
        for p, grad in zip(params, step_grads):
            p.grad = grad.to(p.dtype)
        optimizer.step()


def span(projector: torch.Tensor) -> torch.Tensor:
    """The orthogonal projection onto the projector's subspace (sign- and basis-free)."""
    basis = projector if projector.shape[0] >= projector.shape[1] else projector.T
    return basis @ basis.T


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_parity_with_galore_torch(proj_type):
    """50 steps with refreshes every 10 (float64) follow galore-torch 1.0's GaLoreAdamW, with the
    singular vectors' signs as the SVD returns them (galore-torch's convention)."""
    # galore_torch imports bitsandbytes (for its 8-bit optimizer); both install from the test
    # extra. Only this test needs them.
    galore_torch = pytest.importorskip("galore_torch")
    ours, theirs = make_params(), make_params()
    hyper = {"lr": 1e-2, "weight_decay": 0.1, "betas": (0.9, 0.99)}
    opt = GaLoreAdamW(make_groups(ours, proj_type, signs="svd"), **hyper)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref = galore_torch.GaLoreAdamW(make_groups(theirs, proj_type), **hyper,
                                       no_deprecation_warning=True)
    grads = gradient_stream(50)
    run(opt, ours, grads)
    run(ref, theirs, grads)
    for a, b in zip(ours, theirs):
        assert (a - b).abs().max().item() < 1e-6
    for p, q in zip(ours[:2], theirs[:2]):
        ours_p, ref_p = opt.state[p]["projector"], ref.state[q]["projector"].ortho_matrix
        assert torch.allclose(span(ours_p), span(ref_p), atol=1e-5)
    assert opt.state[ours[0]]["step"].item() == ref.state[theirs[0]]["step"] == 50


def test_defaults_match_reference():
    """eps 1e-6, betas (0.9, 0.999), no decay and bias correction on, as galore-torch."""
    opt = GaLoreAdamW([torch.nn.Parameter(torch.zeros(2))])
    assert {k: opt.defaults[k] for k in ("lr", "betas", "eps", "weight_decay", "correct_bias")} \
        == {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.0,
            "correct_bias": True}


EPS64 = torch.finfo(torch.float64).eps


def fisher_matrix(history: torch.Tensor, damping: float) -> torch.Tensor:
    """F = λI + Σ h hᵀ over the rows h of ``history``, written out (k×k, float64)."""
    rows = history.double()
    return damping * torch.eye(rows.shape[1], dtype=torch.float64) + rows.T @ rows


def solve_direct(g: torch.Tensor, fisher: torch.Tensor) -> torch.Tensor:
    """F⁻¹ g by LU on the explicit k×k matrix: another formulation than the code's Woodbury."""
    return torch.linalg.solve(fisher, g.double().reshape(-1)).reshape(g.shape)


def solve_bound(fisher: torch.Tensor) -> float:
    """How far two float64 solves of F x = g may differ, relative to ‖x‖: 2 · k · cond(F) · eps.

    A backward-stable solve (LU, Cholesky, Woodbury through a Cholesky of I + GᵀG/λ) errs by
    about k · cond(F) · eps relative; the code's and :func:`solve_direct` err independently, hence
    the 2. With λ = 1e-3, cond(F) = (λ + σ²_max)/λ is 1e3 to 1e5 here: a fixed 1e-10 would hold
    on one BLAS and not another (it did not: 2.0e-10 on one machine).
    """
    return 2 * fisher.shape[0] * torch.linalg.cond(fisher).item() * EPS64


@pytest.mark.parametrize("filled", [1, 5, 20])
def test_natural_gradient_is_woodbury(filled):
    """The Cholesky/Woodbury form equals the explicit solve; unwritten (zero) rows are inert."""
    g = torch.Generator().manual_seed(filled)
    history = torch.zeros(20, 48, dtype=torch.float64)
    history[:filled] = 0.1 * torch.randn(filled, 48, generator=g, dtype=torch.float64)
    grad = history[filled - 1].reshape(4, 12).clone()  # the current gradient is in the history
    got = natural_gradient(grad, history, 1e-3)
    fisher = fisher_matrix(history[:filled], 1e-3)
    want = solve_direct(grad, fisher)
    err, bound = ((got - want).norm() / want.norm()).item(), solve_bound(fisher)
    assert err <= bound, f"relative error {err:.2e} > {bound:.2e}"


def test_natural_step_uses_woodbury_of_its_history():
    """A NaturalGaLoreAdamW step (the third: two rows already in the history) moves the weight
    by Adam's update of F⁻¹ g̃, F = λI + Σ h hᵀ over the history with g̃ = G Qᵀ pushed, the whole
    update recomputed here from the state before the step, in float64.

    The bound follows the conditioning: F⁻¹ g̃ is good to :func:`solve_bound`, and Adam's
    direction m/(√v + ε) amplifies that by at most max|∂d/∂g̃| · ‖g̃_nat‖/‖d‖ (computed from the
    state); projecting back by Q's orthonormal rows and scaling changes no relative error.
    """
    lr, damping, (beta1, beta2), eps, scale = 1e-2, 1e-3, (0.9, 0.999), 1e-6, 0.25
    params = make_params()
    opt = NaturalGaLoreAdamW(make_groups(params), lr=lr, betas=(beta1, beta2), eps=eps)
    grads = gradient_stream(3)
    run(opt, params, grads[:2])
    weight, state = params[0], opt.state[params[0]]
    before = {name: t.clone() for name, t in state.items()}
    weight_before = weight.detach().clone()
    run(opt, params, grads[2:])
    got = weight.detach() - weight_before

    assert torch.equal(state["projector"], before["projector"])  # step 2 of 10: no refresh
    lowrank = grads[2][0] @ before["projector"].T  # tall weight: right projector
    assert torch.equal(state["history"][2], lowrank.reshape(-1))
    fisher = fisher_matrix(torch.cat([before["history"][:2], lowrank.reshape(1, -1)]), damping)
    natural = solve_direct(lowrank, fisher)
    exp_avg = beta1 * before["exp_avg"] + (1 - beta1) * natural
    exp_avg_sq = beta2 * before["exp_avg_sq"] + (1 - beta2) * natural * natural
    denom = exp_avg_sq.sqrt() + eps
    direction = exp_avg / denom
    step_size = lr * (1 - beta2 ** 3) ** 0.5 / (1 - beta1 ** 3)
    want = -step_size * scale * (direction @ before["projector"])

    # ∂d/∂g̃ per element (d depends on its own g̃ only): (1−β₁)/s − m(1−β₂)g̃/(s²√v).
    slope = (1 - beta1) / denom - exp_avg * (1 - beta2) * natural / (denom ** 2 * exp_avg_sq.sqrt())
    adam_cond = (slope.abs().max() * natural.norm() / direction.norm()).item()
    bound = adam_cond * solve_bound(fisher) + 8 * EPS64
    err = ((got - want).norm() / want.norm()).item()
    assert err <= bound, f"relative error {err:.2e} > {bound:.2e} (Adam's amplification {adam_cond:.1f})"


def test_history_cleared_and_moments_kept_at_refresh():
    """At a refresh the natural history restarts from the new gradient alone; the moments carry.

    galore-torch keeps Adam's moments across a subspace change; we do the same (GaLore parity,
    and Natural GaLore then differs from GaLore only in the preconditioner). The history is ours to
    clear: its rows are coordinates in the old basis.
    """
    params = make_params()
    opt = NaturalGaLoreAdamW(make_groups(params, gap=4), lr=1e-2)
    grads = gradient_stream(5)
    run(opt, params, grads[:4])
    state = opt.state[params[0]]
    assert (state["history"][:4].abs().sum(dim=1) > 0).all()
    exp_avg_before = state["exp_avg"].clone()
    old_projector = state["projector"].clone()
    run(opt, params, grads[4:])  # step index 4: a refresh
    assert not torch.allclose(span(old_projector), span(state["projector"]), atol=1e-3)
    lowrank = grads[4][0] @ state["projector"].T
    assert torch.equal(state["history"][0], lowrank.reshape(-1))
    assert state["history"][1:].abs().sum() == 0
    # Moments kept: β₁·m_old + (1−β₁)·g̃ with g̃ = g/(λ + |g|²), the history being g alone.
    # F = λI + g gᵀ has g as an eigenvector: F⁻¹g = g/(λ + |g|²) exactly. The code's Woodbury
    # form is good to solve_bound(F) relative to it (cond(F) = 1 + |g|²/λ ≈ 1e5 here).
    natural = lowrank / (1e-3 + lowrank.pow(2).sum())
    want = 0.9 * exp_avg_before + 0.1 * natural
    bound = 0.1 * solve_bound(fisher_matrix(lowrank.reshape(1, -1), 1e-3)) * natural.norm() \
        + 4 * EPS64 * want.norm()
    assert (state["exp_avg"] - want).norm() <= bound


@pytest.mark.parametrize("cls", [GaLoreAdamW, NaturalGaLoreAdamW])
def test_state_dict_resumes_bit_for_bit(cls):
    """Train 12 steps, save, train 9; a fresh optimizer loaded from the save trains the same 9."""
    grads = gradient_stream(21, seed=3)
    params = make_params(torch.float32)
    opt = cls(make_groups(params, gap=5), lr=1e-2, weight_decay=0.01)
    run(opt, params, grads[:12])
    saved_state = opt.state_dict()
    saved_state = {"state": {k: {n: t.clone() for n, t in v.items()}
                             for k, v in saved_state["state"].items()},
                   "param_groups": saved_state["param_groups"]}
    saved_params = [p.detach().clone() for p in params]
    run(opt, params, grads[12:])

    resumed = [torch.nn.Parameter(t.clone()) for t in saved_params]
    fresh = cls(make_groups(resumed, gap=5), lr=1e-2, weight_decay=0.01)
    fresh.load_state_dict(saved_state)
    assert all(isinstance(v, torch.Tensor) for s in fresh.state.values() for v in s.values())
    run(fresh, resumed, grads[12:])
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)
