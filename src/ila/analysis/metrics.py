"""Representation metrics of the layer-wise SFT analysis; every formula comes from seeds/004 (Sec. 3 and 4.1).

Pure torch functions: inputs of any float dtype, computed in float64, returned as Python floats. The metric names of
`ila analyze` that use them:

- ``prompt_entropy``: `gram_entropy` of each prompt's tokens × D matrix, averaged over prompts (Sec. 3.3, Eq. 2);
- ``dataset_entropy``: `gram_entropy` of the examples × D matrix of mean-pooled states (Sec. 3.3, Eq. 3);
- ``effective_rank``: `effective_rank` (Sec. 3.3, Eq. 4); ``rank_deficiency``: `rank_deficiency` (Sec. 3.3);
- ``sparsity``: `sparsity` (Sec. 3.3, threshold from Sec. 4.1); ``curvature``: `curvature` (Sec. 3.4, Eq. 5);
- ``cka``: `linear_cka` (Sec. 3.4, Eq. 6); ``cosine``: `mean_cosine` and ``mean_shift``: `mean_shift` (Sec. 3.4, Eq. 7).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "gram_entropy",
    "effective_rank",
    "rank_deficiency",
    "sparsity",
    "curvature",
    "linear_cka",
    "mean_cosine",
    "mean_shift",
]


def _matrix(z: Tensor, name: str = "z") -> Tensor:
    """`z` as a float64 2-D tensor; ValueError when it is not 2-D or has no entries."""
    if z.dim() != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {tuple(z.shape)}")
    if z.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(z.shape)})")
    return z.detach().to(torch.float64)


def gram_entropy(z: Tensor, alpha: float = 1.0) -> float:
    """Normalised alpha-order matrix entropy of the N×D matrix `z` (seeds/004 Sec. 3.1, 3.3; normalisation Sec. 4.1).

    K = z zᵀ scaled to trace 1; its eigenvalues λ (negatives clamped to 0, renormalised) form a distribution.
    S_α = log(Σ λ^α) / (1 − α), and for α = 1 the Shannon limit −Σ λ log λ. Returns S_α / log N, in [0, 1] (clamped
    against rounding). The D×D matrix zᵀz (same nonzero eigenvalues) is used when N > D, so the cost is min(N, D)³.
    N = 1 or an all-zero `z` gives 0.0. Raises ValueError unless alpha > 0.
    """
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    x = _matrix(z)
    n, d = x.shape
    if n == 1:
        return 0.0
    gram = x @ x.T if n <= d else x.T @ x
    trace = torch.trace(gram)
    if trace <= 0:
        return 0.0
    lam = torch.linalg.eigvalsh(gram / trace).clamp_min(0.0)
    lam = lam / lam.sum()
    lam = lam[lam > 0]
    if alpha == 1.0:
        entropy = float(-(lam * lam.log()).sum())
    else:
        entropy = float(torch.log((lam**alpha).sum())) / (1.0 - alpha)
    return min(max(entropy / math.log(n), 0.0), 1.0)


def effective_rank(z: Tensor) -> float:
    """Effective rank exp(−Σ p log p), p = σ / Σσ over the singular values σ of `z` (seeds/004 Sec. 3.3, Eq. 4).

    Zero singular values are dropped (0 log 0 = 0). An all-zero `z` gives 0.0.
    """
    sigma = torch.linalg.svdvals(_matrix(z))
    total = sigma.sum()
    if total <= 0:
        return 0.0
    p = sigma / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def rank_deficiency(z: Tensor, rtol: float | None = None) -> float:
    """Rank deficiency min(N, D) − rank(z) of the N×D matrix `z` (seeds/004 Sec. 3.3).

    The numerical rank is torch.linalg.matrix_rank's with relative tolerance `rtol`; by default torch's own
    max(N, D)·eps, with eps that of the input's dtype (not float64's), so the rounding of a float32 or bfloat16 input
    does not count as rank.
    """
    x = _matrix(z)
    if rtol is None:
        eps = torch.finfo(z.dtype if z.is_floating_point() else torch.float64).eps
        rtol = max(x.shape) * eps
    return float(min(x.shape) - int(torch.linalg.matrix_rank(x, rtol=rtol)))


def sparsity(z: Tensor, threshold: float) -> float:
    """Fraction of the entries of `z` (any shape) with |z| < threshold (seeds/004 Sec. 3.3; threshold Sec. 4.1)."""
    if z.numel() == 0:
        raise ValueError("z is empty")
    return float((z.detach().to(torch.float64).abs() < threshold).to(torch.float64).mean())


def curvature(h: Tensor) -> float:
    """Mean turning angle (radians) of one prompt's path of token states `h`, T×D (seeds/004 Sec. 3.4, Eq. 5).

    Steps v_t = h_{t+1} − h_t of zero norm are dropped; the result is the mean over consecutive remaining steps of
    arccos(cos(v_t, v_{t+1})), the cosine clamped to [−1, 1]. A straight path gives 0; fewer than 3 tokens, or fewer
    than two nonzero steps, give 0.0.
    """
    x = _matrix(h, "h")
    if x.shape[0] < 3:
        return 0.0
    v = x[1:] - x[:-1]
    norms = v.norm(dim=1)
    keep = norms > 0
    v, norms = v[keep], norms[keep]
    if v.shape[0] < 2:
        return 0.0
    cos = (v[:-1] * v[1:]).sum(dim=1) / (norms[:-1] * norms[1:])
    return float(torch.arccos(cos.clamp(-1.0, 1.0)).mean())


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA between N×D1 `x` and N×D2 `y`, rows paired (seeds/004 Sec. 3.4, Eq. 6).

    With columns centred, CKA = ‖yᵀx‖_F² / (‖xᵀx‖_F ‖yᵀy‖_F), equal to tr(KHLH) / sqrt(tr(KHKH) tr(LHLH)) for
    K = xxᵀ, L = yyᵀ. Returns 0.0 when either centred matrix is zero (e.g. all rows identical): no structure to align.
    """
    a, b = _matrix(x, "x"), _matrix(y, "y")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"x and y must have the same rows, got {a.shape[0]} and {b.shape[0]}")
    a = a - a.mean(dim=0, keepdim=True)
    b = b - b.mean(dim=0, keepdim=True)
    denom = torch.linalg.matrix_norm(a.T @ a) * torch.linalg.matrix_norm(b.T @ b)
    if denom <= 0:
        return 0.0
    return float(torch.linalg.matrix_norm(b.T @ a) ** 2 / denom)


def mean_cosine(a: Tensor, b: Tensor) -> float:
    """Mean over rows t of cos(a[t], b[t]) for T×D `a` and `b` (seeds/004 Sec. 3.4, Eq. 7).

    Rows where either vector has zero norm are skipped; 0.0 when none is left.
    """
    u, w = _matrix(a, "a"), _matrix(b, "b")
    if u.shape != w.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(u.shape)} and {tuple(w.shape)}")
    nu, nw = u.norm(dim=1), w.norm(dim=1)
    keep = (nu > 0) & (nw > 0)
    if not bool(keep.any()):
        return 0.0
    cos = (u[keep] * w[keep]).sum(dim=1) / (nu[keep] * nw[keep])
    return float(cos.clamp(-1.0, 1.0).mean())


def mean_shift(a: Tensor, b: Tensor) -> float:
    """Distance ‖mean_rows(a) − mean_rows(b)‖₂ between the centroids of `a` and `b` (seeds/004 Sec. 3.4, Eq. 7).

    The row counts may differ; the widths must match.
    """
    u, w = _matrix(a, "a"), _matrix(b, "b")
    if u.shape[1] != w.shape[1]:
        raise ValueError(f"a and b must have the same width, got {u.shape[1]} and {w.shape[1]}")
    return float((u.mean(dim=0) - w.mean(dim=0)).norm())
