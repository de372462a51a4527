import math

import pytest
import torch

from ddpm.evaluation.metrics import fid, frechet_distance, kid, precision_recall


def test_frechet_distance_of_diagonal_gaussians_closed_form():
    # For commuting covariances: d^2 = |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    s1, s2 = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 1.0])
    expected = 1 + 0 + 4 + (1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 1) ** 2
    assert frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2)) == pytest.approx(expected)


def test_frechet_distance_of_rotated_gaussians():
    # The same covariance in another basis: the distance is basis-independent.
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    c1, c2 = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0])), torch.diag(torch.tensor([2.0, 2.0, 1.0, 0.5]))
    mu = torch.zeros(4, dtype=torch.float64)
    plain = frechet_distance(mu, c1, mu, c2)
    rotated = frechet_distance(mu, q @ c1.double() @ q.T, mu, q @ c2.double() @ q.T)
    assert rotated == pytest.approx(plain, rel=1e-9)
    assert plain == pytest.approx(
        sum((math.sqrt(a) - math.sqrt(b)) ** 2 for a, b in [(1, 2), (2, 2), (3, 1), (4, 0.5)])
    )


def test_sample_fid_approaches_the_gaussian_distance():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=g)
    b = torch.randn(20000, 3, generator=g) * 2 + 1
    assert fid(a, b) == pytest.approx(3 * 1 + 3 * (2 - 1) ** 2, rel=0.03)


def test_identical_sets_score_zero():
    x = torch.randn(500, 8, generator=torch.Generator().manual_seed(1))
    assert fid(x, x) == pytest.approx(0.0, abs=1e-6)
    assert precision_recall(x, x) == (1.0, 1.0)
    # KID is unbiased for independent samples of one distribution: zero up to its spread
    y = torch.randn(500, 8, generator=torch.Generator().manual_seed(2))
    mean, std = kid(x, y, subsets=10, subset_size=200)
    assert abs(mean) < 3 * std


def test_kid_separates_distributions():
    g = torch.Generator().manual_seed(2)
    same = kid(
        torch.randn(800, 8, generator=g), torch.randn(800, 8, generator=g), subsets=20, subset_size=400
    )
    shifted = kid(
        torch.randn(800, 8, generator=g), torch.randn(800, 8, generator=g) + 1, subsets=20, subset_size=400
    )
    assert abs(same[0]) < 3 * same[1] + 1e-3
    assert shifted[0] > 20 * abs(same[0]) + 0.05


def test_precision_and_recall_tell_fidelity_from_coverage():
    g = torch.Generator().manual_seed(3)
    real = torch.randn(600, 2, generator=g)
    collapsed = torch.randn(600, 2, generator=g) * 0.1  # inside the real manifold, covering a small part
    far = torch.randn(600, 2, generator=g) + 20
    p, r = precision_recall(real, collapsed)
    assert p > 0.95 and r < 0.3
    assert precision_recall(real, far) == (0.0, 0.0)


def test_non_finite_samples_get_no_scores_and_a_warning():
    """A diverged model's NaN images: the scores are None with a warning, not a LinAlgError from eigh."""
    from types import SimpleNamespace

    from ddpm.evaluation.evaluate import score

    real = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    fake = real.clone()
    fake[3, 1] = float("nan")
    cfg = SimpleNamespace(kid_subsets=2, kid_subset_size=16, seed=0, knn_k=3)
    result, warning = score(real, fake, cfg)
    assert result["fid"] is None and result["kid"] is None and result["precision"] is None
    assert warning == "1 of 64 images have non-finite features: no scores"
    assert score(real, real, cfg)[0]["fid"] is not None  # finite features are scored as before
