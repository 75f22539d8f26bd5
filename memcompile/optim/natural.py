"""Natural GaLore: precondition the low-rank gradient by the inverse empirical Fisher.

With the last s low-rank gradients as the columns of G (k×s, k = r·n or m·r, the current
gradient included) and damping λ, the Fisher estimate is F = λI + G Gᵀ, and by Woodbury

    g̃ = F⁻¹ g = (1/λ) g − (1/λ²) G (I + GᵀG/λ)⁻¹ Gᵀ g,

which needs only the s×s matrix S = I + GᵀG/λ (symmetric, eigenvalues ≥ 1, so its Cholesky
factorization always exists) and products with G. This is the paper's one-sided form on GaLore's
r×n (or m×r) gradient, not the reference code's two-sided r×r Tucker core.

The history is a fixed-size ring buffer (s rows of k numbers, zeros where nothing was written yet):
a zero row is a zero column of G, which changes neither S's other entries nor the result, so a
partly filled history needs no special case and the shapes stay static for torch.compile.
"""

from __future__ import annotations

import torch


def natural_gradient(g: torch.Tensor, history: torch.Tensor, damping: float) -> torch.Tensor:
    """F⁻¹ g for F = λI + Σ h hᵀ over the rows h of ``history`` (s×k); ``g``: any shape, k numbers.

    Computed in float64 for float64 inputs and in float32 otherwise. F's condition number is
    (λ + σ²_max)/λ (σ² the history's largest Gram eigenvalue): rounding in g is amplified by up
    to that much, here visible as the cancellation in the subtraction below. With λ = 1e-3 and
    |g|² ≈ 1 float32 keeps about 4 digits; the loss comes from F, not from this formula.
    """
    dtype = torch.promote_types(g.dtype, torch.float32)
    vec = g.reshape(-1).to(dtype)
    rows = history.to(dtype)
    gram = rows @ rows.mT
    eye = torch.eye(gram.shape[0], dtype=dtype, device=gram.device)
    chol = torch.linalg.cholesky(eye + gram * (1.0 / damping))
    z = torch.cholesky_solve((rows @ vec).unsqueeze(-1), chol).squeeze(-1)
    # Coefficients are folded into multiplications (never an alpha on an add of a matmul):
    # Inductor's pattern matcher turns add(x, mm, alpha=c) into addmm and drops c (§7.3 of the
    # research note).
    out = vec * (1.0 / damping) - (z @ rows) * (1.0 / damping ** 2)
    return out.reshape(g.shape).to(g.dtype)


def push_history(history: torch.Tensor, g: torch.Tensor, position: torch.Tensor) -> None:
    """Write ``g`` (flattened) into row ``position`` (an int64 tensor, any shape of one element)."""
    history.index_copy_(0, position.reshape(1), g.reshape(1, -1).to(history.dtype))
