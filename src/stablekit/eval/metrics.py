"""Image-set and rate metrics: Fréchet distance on features, PSNR, and confidence intervals for rates."""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg, stats

from ..latents import psnr

__all__ = ["frechet_distance", "psnr", "rate_interval"]


def _np(x) -> np.ndarray:
    """float64 numpy array from a numpy array, a (possibly GPU) torch tensor or a PIL image."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def frechet_distance(feats_a, feats_b) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D):
    ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))."""
    a, b = _np(feats_a), _np(feats_b)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    covmean = linalg.sqrtm(s_a @ s_b)
    if not np.isfinite(covmean).all():  # singular product: offset the diagonals slightly
        eps = np.eye(len(s_a)) * 1e-6
        covmean = linalg.sqrtm((s_a + eps) @ (s_b + eps))
    covmean = covmean.real  # drop the imaginary round-off of sqrtm
    return float(max(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean), 0.0))


def rate_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson (exact binomial) interval for a rate of `k` successes in `n` trials."""
    if n == 0:
        return 0.0, 1.0
    alpha = 1 - level
    lo = 0.0 if k == 0 else stats.beta.ppf(alpha / 2, k, n - k + 1)
    hi = 1.0 if k == n else stats.beta.ppf(1 - alpha / 2, k + 1, n - k)
    return float(lo), float(hi)
