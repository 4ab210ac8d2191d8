"""Metric properties: Fréchet distance, PSNR and Clopper-Pearson intervals."""

import numpy as np
import pytest
import torch
from scipy import stats

from stablekit.eval.metrics import frechet_distance, psnr, rate_interval


def test_frechet_identical_sets_is_zero():
    x = np.random.default_rng(0).normal(size=(500, 16))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(torch.from_numpy(x).float(), x) == pytest.approx(0.0, abs=1e-4)


def test_frechet_shifted_gaussians_is_squared_mean_shift():
    x = np.random.default_rng(1).normal(size=(2000, 8))
    shift = np.arange(8) * 0.5
    assert frechet_distance(x, x + shift) == pytest.approx((shift**2).sum(), rel=1e-6)


def test_frechet_scaled_gaussians_matches_closed_form():
    # N(0, I) vs N(0, 4I) in d dims: d * (1 + 4 - 2 * 2) = d
    rng = np.random.default_rng(2)
    d = 4
    fd = frechet_distance(rng.normal(size=(20000, d)), 2 * rng.normal(size=(20000, d)))
    assert fd == pytest.approx(d, rel=0.05)
    assert fd > 0.5 * d  # differs from the identical-set case


def test_frechet_is_symmetric_and_real_for_rank_deficient_sets():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(10, 32)), rng.normal(size=(10, 32)) + 1  # fewer samples than dims: singular
    fab, fba = frechet_distance(a, b), frechet_distance(b, a)
    assert np.isfinite(fab) and isinstance(fab, float)
    assert fab == pytest.approx(fba, rel=1e-3)
    assert fab > 32 * 0.5  # the mean shift of 1 per dim dominates


def test_psnr_of_known_mse():
    a = np.zeros((8, 8, 3))
    assert psnr(a, a + 0.1) == pytest.approx(20.0)  # mse 0.01 -> 20 dB
    assert psnr(a, a + 0.01) == pytest.approx(40.0)
    assert psnr(np.zeros((4, 4)), np.full((4, 4), 25.5), data_range=255) == pytest.approx(20.0)
    assert psnr(torch.ones(3, 4, 4), torch.ones(3, 4, 4)) == float("inf")


def test_interval_contains_rate_and_shrinks_with_n():
    widths = []
    for n in (20, 200, 2000):
        k = int(0.7 * n)
        lo, hi = rate_interval(k, n)
        assert lo < k / n < hi
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    assert widths[2] < 0.05


def test_clopper_pearson_edges():
    n = 30
    lo, hi = rate_interval(0, n)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / n))
    lo, hi = rate_interval(n, n)
    assert hi == 1.0 and lo == pytest.approx(0.025 ** (1 / n))
    assert rate_interval(0, 0) == (0.0, 1.0)


def test_clopper_pearson_coverage_is_conservative():
    # the exact interval covers the true rate at least 95% of the time
    p, n = 0.3, 50
    pmf = stats.binom.pmf(np.arange(n + 1), n, p)
    cover = sum(pmf[k] for k in range(n + 1) if rate_interval(k, n)[0] <= p <= rate_interval(k, n)[1])
    assert cover >= 0.95
