"""GaLore's one-sided projector: which side a weight is projected on, its refresh by SVD, and the
projection to and from the rank-r subspace.

A weight's gradient G (m×n) is projected on one side only:

- side ``"right"``: Q (r×n) holds the top-r right singular vectors (rows of Vᴴ); R = G Qᵀ (m×r)
  and the step is projected back as N Q;
- side ``"left"``: P (m×r) holds the top-r left singular vectors; R = Pᵀ G (r×n) and back as P N.

``proj_type="std"`` projects the smaller side (right when m ≥ n), as galore-torch does;
``"reverse_std"`` the larger one; ``"left"`` and ``"right"`` force a side. The side depends on the
weight's shape only, so it is fixed for the life of the state (galore-torch decides it again in
``project_back`` from the low-rank shape, which breaks ``reverse_std`` on square low-rank
matrices; here the two directions cannot disagree).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

PROJ_TYPES = ("std", "reverse_std", "left", "right")
"""The projection types a parameter group may name in ``proj_type``."""

SVD_METHODS = ("exact", "randomized")
"""How a refresh computes the singular vectors: ``torch.linalg.svd`` or a randomized range
finder (Halko, Martinsson and Tropp 2011, Algorithm 4.4 with power iterations)."""


SIGN_CONVENTIONS = ("continuous", "svd")
"""A singular vector's sign is arbitrary, yet GaLore keeps Adam's moments across a refresh, so the
sign decides how old moments combine with new gradients. ``"continuous"`` (memcompile's default)
flips each new vector to point the way the old one did (the first time: its largest entry
positive), so a gradient that changed by rounding gives a projector that changed by rounding.
``"svd"`` keeps the signs the SVD returns, as galore-torch does: bit-level changes of the gradient
(a different summation order, a fused kernel) can flip a sign and move the run by O(lr)."""


@dataclass(frozen=True, kw_only=True)
class ProjectorSpec:
    """How one weight is projected; built once per parameter group from its keys."""

    rank: int
    """Dimension r of the subspace; at most the smaller side of every weight in the group."""
    proj_type: str = "std"
    """One of :data:`PROJ_TYPES`."""
    scale: float = 0.25
    """α: the projected-back step is multiplied by it (GaLore's ``scale``)."""
    update_proj_gap: int = 200
    """T: the projector is recomputed at steps 0, T, 2T, ... (steps counted from 0)."""
    svd: str = "exact"
    """One of :data:`SVD_METHODS`."""
    oversample: int = 8
    """Randomized SVD only: extra sketch columns beyond r (more is more accurate)."""
    power_iters: int = 2
    """Randomized SVD only: power iterations; each multiplies the error by σ_{r+p+1}/σ_r again."""
    signs: str = "continuous"
    """One of :data:`SIGN_CONVENTIONS`: how a refresh picks each singular vector's sign."""

    def __post_init__(self) -> None:
        if self.proj_type not in PROJ_TYPES:
            raise ValueError(
                f"proj_type {self.proj_type!r} is not supported; valid values: {list(PROJ_TYPES)}"
                " (galore-torch's two-sided 'full' is not implemented)"
            )
        if self.signs not in SIGN_CONVENTIONS:
            raise ValueError(
                f"signs {self.signs!r} is not supported; valid values: {list(SIGN_CONVENTIONS)}"
            )
        if self.svd not in SVD_METHODS:
            raise ValueError(
                f"svd {self.svd!r} is not supported; valid values: {list(SVD_METHODS)}"
            )
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"rank must be a positive int, got {self.rank!r}")
        if (isinstance(self.update_proj_gap, bool) or not isinstance(self.update_proj_gap, int)
                or self.update_proj_gap <= 0):
            raise ValueError(
                f"update_proj_gap must be a positive int, got {self.update_proj_gap!r}"
            )
        if self.oversample < 0 or self.power_iters < 0:
            raise ValueError(
                "oversample and power_iters must be >= 0, got "
                f"{self.oversample}, {self.power_iters}"
            )

    def side(self, shape: torch.Size | tuple[int, ...]) -> str:
        """``"left"`` or ``"right"``: the side a weight of this shape is projected on."""
        m, n = shape
        if self.proj_type in ("left", "right"):
            return self.proj_type
        smaller = "right" if m >= n else "left"
        if self.proj_type == "std":
            return smaller
        return "left" if smaller == "right" else "right"

    def projector_shape(self, shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
        """Shape of the stored projector: (m, r) on the left, (r, n) on the right."""
        m, n = shape
        return (m, self.rank) if self.side(shape) == "left" else (self.rank, n)

    def lowrank_shape(self, shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
        """Shape of the projected gradient (and of Adam's moments): (r, n) or (m, r)."""
        m, n = shape
        return (self.rank, n) if self.side(shape) == "left" else (m, self.rank)

    def check_shape(self, shape: torch.Size | tuple[int, ...], name: str = "parameter") -> None:
        """Raise ValueError unless a weight of this shape can be projected at this rank."""
        if len(shape) != 2:
            raise ValueError(
                f"{name} has shape {tuple(shape)}: only 2-D weights can be projected; "
                "put other tensors in a group without 'rank'"
            )
        if self.rank > min(shape):
            raise ValueError(
                f"rank {self.rank} exceeds the smaller side of {name} of shape {tuple(shape)}; "
                f"valid ranks: 1..{min(shape)}"
            )


def svd_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a refresh computes in: float64 stays float64, anything narrower runs in float32.

    galore-torch runs every non-float32 gradient through float32, float64 included; keeping
    float64 makes the float64 path exact rather than float32-accurate.
    """
    return torch.promote_types(dtype, torch.float32)


def refresh(grad: torch.Tensor, spec: ProjectorSpec) -> torch.Tensor:
    """The new projector for ``grad``: its top-r singular vectors on ``spec.side``, in grad's
    dtype."""
    side = spec.side(grad.shape)
    matrix = grad.to(svd_dtype(grad.dtype))
    if spec.svd == "exact":
        u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
        basis = u[:, : spec.rank] if side == "left" else vh[: spec.rank, :]
    else:
        # The right singular vectors of G are the left ones of Gᵀ: one range finder serves both.
        target = matrix if side == "left" else matrix.mT
        basis = randomized_left_vectors(target, spec.rank, spec.oversample, spec.power_iters)
        basis = basis if side == "left" else basis.mT
    return basis.to(grad.dtype).contiguous()


def align_signs(new: torch.Tensor, old: torch.Tensor, side: str) -> torch.Tensor:
    """``new`` with each singular vector (a column on the left, a row on the right) flipped to
    have a non-negative inner product with the same vector of ``old``; where that is zero (the
    first refresh, whose ``old`` is zeros), flipped so its largest-magnitude entry is positive."""
    dim = 0 if side == "left" else 1  # the axis along which one vector's entries run
    dots = (new * old).sum(dim=dim, keepdim=True)
    largest = new.gather(dim, new.abs().argmax(dim=dim, keepdim=True))
    reference = torch.where(dots != 0, dots, largest)
    return new * torch.where(reference < 0, -1.0, 1.0).to(new.dtype)


def randomized_left_vectors(a: torch.Tensor, rank: int, oversample: int,
                            power_iters: int) -> torch.Tensor:
    """Approximate top-``rank`` left singular vectors of ``a`` (m×n) as an m×rank matrix.

    Cost O(m·n·k·(2q+2)) for k = rank + oversample and q = power_iters, against O(m·n·min(m, n))
    for the exact SVD. Accuracy: the captured subspace's error shrinks like
    (σ_{k+1}/σ_rank)^(2q+1), so a spectrum with a clear gap after σ_rank is found almost exactly
    with q = 1-2, while a flat spectrum (no gap) gives a subspace only as good as the gap allows,
    as for the exact SVD, whose subspace is then ill-defined too. The sketch draws from torch's
    global RNG: resuming bit for bit needs that RNG state restored, as dropout does.
    """
    k = min(rank + oversample, min(a.shape))
    omega = torch.randn(a.shape[1], k, dtype=a.dtype, device=a.device)
    q, _ = torch.linalg.qr(a @ omega)
    for _ in range(power_iters):
        # Re-orthonormalize after each product: without it the columns collapse onto the top
        # singular vector in floating point and the rest of the subspace is lost.
        w, _ = torch.linalg.qr(a.mT @ q)
        q, _ = torch.linalg.qr(a @ w)
    u_small, _, _ = torch.linalg.svd(q.mT @ a, full_matrices=False)
    return q @ u_small[:, :rank]


def project(grad: torch.Tensor, projector: torch.Tensor, side: str) -> torch.Tensor:
    """The low-rank gradient: Pᵀ G on the left (r×n), G Qᵀ on the right (m×r)."""
    return projector.mT @ grad if side == "left" else grad @ projector.mT


def project_back(lowrank: torch.Tensor, projector: torch.Tensor, side: str,
                 scale: float) -> torch.Tensor:
    """The full-size step α·P N (left) or α·N Q (right)."""
    full = projector @ lowrank if side == "left" else lowrank @ projector
    return full * scale
