"""The GaLore projector: sides and shapes, the refresh by exact and randomized SVD, and the round
trip through the subspace."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memcompile.optim.projector import (
    PROJ_TYPES,
    ProjectorSpec,
    project,
    project_back,
    refresh,
)


@st.composite
def shapes_and_ranks(draw):
    """(m, n, rank) with 1 ≤ rank ≤ min(m, n)."""
    m, n = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    return m, n, draw(st.integers(1, min(m, n)))


@settings(max_examples=40, deadline=None)
@given(shapes_and_ranks(), st.sampled_from(PROJ_TYPES))
def test_round_trip_in_subspace(mnr, proj_type):
    """A gradient inside the projector's subspace comes back as itself, times the scale."""
    m, n, rank = mnr
    spec = ProjectorSpec(rank=rank, proj_type=proj_type, scale=0.5)
    g = torch.Generator().manual_seed(m * 100 + n * 10 + rank)
    grad = torch.randn(m, n, generator=g, dtype=torch.float64)
    side = spec.side(grad.shape)
    basis = refresh(grad, spec)
    assert tuple(basis.shape) == spec.projector_shape(grad.shape)
    gram = basis.T @ basis if side == "left" else basis @ basis.T
    torch.testing.assert_close(gram, torch.eye(rank, dtype=torch.float64))
    lowrank = project(grad, basis, side)
    assert tuple(lowrank.shape) == spec.lowrank_shape(grad.shape)
    inside = project_back(lowrank, basis, side, 1.0)  # grad's part inside the subspace
    again = project_back(project(inside, basis, side), basis, side, spec.scale)
    torch.testing.assert_close(again, 0.5 * inside)


@pytest.mark.parametrize("shape, proj_type, side", [
    ((8, 4), "std", "right"), ((4, 8), "std", "left"), ((6, 6), "std", "right"),
    ((8, 4), "reverse_std", "left"), ((4, 8), "reverse_std", "right"),
    ((8, 4), "left", "left"), ((4, 8), "right", "right"),
])
def test_side(shape, proj_type, side):
    """std projects the smaller side (right when m ≥ n, as galore-torch), reverse_std the other."""
    assert ProjectorSpec(rank=2, proj_type=proj_type).side(shape) == side


def test_bad_spec_names_valid_values():
    """Unknown proj_type or svd lists the valid ones; ranks are checked against the shape."""
    valid = r"valid values: \['std', 'reverse_std', 'left', 'right'\]"
    with pytest.raises(ValueError, match=valid):
        ProjectorSpec(rank=2, proj_type="full")
    with pytest.raises(ValueError, match=r"valid values: \['exact', 'randomized'\]"):
        ProjectorSpec(rank=2, svd="lanczos")
    with pytest.raises(ValueError, match="valid ranks: 1..3"):
        ProjectorSpec(rank=4).check_shape((3, 10))
    with pytest.raises(ValueError, match="only 2-D"):
        ProjectorSpec(rank=1).check_shape((3, 4, 5))


def spectrum_matrix(m: int, n: int, singular: torch.Tensor, seed: int) -> torch.Tensor:
    """U diag(singular) Vᵀ with random orthonormal U, V (float64)."""
    g = torch.Generator().manual_seed(seed)
    k = singular.numel()
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return (u * singular) @ v.T


def span(basis: torch.Tensor) -> torch.Tensor:
    """The orthogonal projection onto a projector's subspace."""
    b = basis if basis.shape[0] >= basis.shape[1] else basis.T
    return b @ b.T


@pytest.mark.parametrize("shape", [(96, 64), (64, 96)])
def test_randomized_matches_exact_on_separated_spectrum(shape):
    """With a gap after σ_r, the randomized subspace's error (‖PPᵀ − P*P*ᵀ‖₂) stays within
    the documented (σ_{k+1}/σ_r)^(2q+1) (k = r + oversample, q power iterations); without
    oversampling and power iterations it is far worse: the accuracy the option trades."""
    m, n = shape
    rank = 8
    singular = torch.cat([torch.linspace(10, 5, rank), torch.linspace(0.5, 0.01, 56)]).double()
    grad = spectrum_matrix(m, n, singular, seed=m)
    exact = refresh(grad, ProjectorSpec(rank=rank))
    torch.manual_seed(0)
    fast = refresh(grad, ProjectorSpec(rank=rank, svd="randomized", power_iters=2, oversample=8))
    rough = refresh(grad, ProjectorSpec(rank=rank, svd="randomized", power_iters=0, oversample=0))
    assert fast.shape == exact.shape
    good = torch.linalg.matrix_norm(span(fast) - span(exact), ord=2).item()
    bad = torch.linalg.matrix_norm(span(rough) - span(exact), ord=2).item()
    bound = (singular[rank + 8] / singular[rank - 1]).item() ** 5
    assert good < 10 * bound < 1e-4 and bad > 100 * good


def test_refresh_keeps_dtype_and_upcasts_half():
    """The projector is in the gradient's dtype; bfloat16 gradients are decomposed in float32."""
    grad = spectrum_matrix(16, 12, torch.linspace(4, 1, 12).double(), seed=1)
    basis = refresh(grad.to(torch.bfloat16), ProjectorSpec(rank=3))
    assert basis.dtype == torch.bfloat16
    exact = refresh(grad, ProjectorSpec(rank=3))
    assert torch.linalg.matrix_norm(span(basis.double()) - span(exact), ord=2) < 0.05


def test_continuous_signs_keep_each_vector_pointing_the_old_way():
    """The default sign convention (a deliberate difference from galore-torch): each refreshed
    singular vector points the way the previous one did, and the first refresh makes each
    vector's largest entry positive; the subspace is the SVD's either way."""
    from memcompile.optim.functional import refresh_projector
    from memcompile.optim.projector import ProjectorSpec, align_signs

    g = torch.Generator().manual_seed(3)
    grad = torch.randn(12, 40, generator=g, dtype=torch.float64)
    spec = ProjectorSpec(rank=4, update_proj_gap=1)
    state = {"step": torch.zeros(()), "projector": torch.zeros(12, 4, dtype=torch.float64)}
    refresh_projector(grad, state, spec, traced=False)
    first = state["projector"].clone()
    largest = first.gather(0, first.abs().argmax(dim=0, keepdim=True))
    assert (largest > 0).all()
    u = torch.linalg.svd(grad, full_matrices=False)[0][:, :4]
    assert torch.allclose(first @ first.T, u @ u.T, atol=1e-12)
    # A second refresh from a nearby gradient: every vector keeps its direction.
    refresh_projector(grad + 1e-3 * torch.randn(12, 40, generator=g, dtype=torch.float64),
                      state, spec, traced=False)
    assert ((state["projector"] * first).sum(dim=0) > 0).all()
    # Flipping the old projector's vectors flips the new ones with them.
    flipped = align_signs(first, -first, "left")
    assert torch.equal(flipped, -first)
