"""Distances between two sets of features (rows are images): FID, KID and k-NN precision / recall."""

from __future__ import annotations

import torch


def mean_cov(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = features.double()
    return x.mean(0), torch.cov(x.T)


def sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix, by eigendecomposition."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """d^2 = |mu1 - mu2|^2 + Tr(C1 + C2 - 2 (C1 C2)^(1/2)) between N(mu1, C1) and N(mu2, C2) (Dowson &
    Landau 1982; FID of Heusel et al. 2017). Tr (C1 C2)^(1/2) is taken as the sum of the square roots of
    the eigenvalues of C1^(1/2) C2 C1^(1/2), which is symmetric, so no complex parts arise."""
    root1 = sqrtm_psd(cov1.double())
    middle = root1 @ cov2.double() @ root1
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    diff = mu1.double() - mu2.double()
    return float(diff @ diff + cov1.double().trace() + cov2.double().trace() - 2 * trace_sqrt)


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    return frechet_distance(*mean_cov(real), *mean_cov(fake))


def _mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD^2 with the cubic polynomial kernel k(a, b) = (a.b / d + 1)^3 (Binkowski et al. 2018)."""
    d = x.shape[1]
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    m, n = x.shape[0], y.shape[0]
    return (
        (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
        + (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
        - 2 * kxy.mean()
    )


def kid(
    real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception Distance: mean and standard deviation of the unbiased MMD^2 over random subsets."""
    size = min(subset_size, real.shape[0], fake.shape[0])
    g = torch.Generator().manual_seed(seed)
    values = torch.stack(
        [
            _mmd2_unbiased(
                real.double()[torch.randperm(real.shape[0], generator=g)[:size]],
                fake.double()[torch.randperm(fake.shape[0], generator=g)[:size]],
            )
            for _ in range(subsets)
        ]
    )
    return float(values.mean()), float(values.std()) if subsets > 1 else 0.0


def _knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each row to its k-th nearest other row."""
    dist = torch.cdist(x, x)
    return dist.kthvalue(k + 1, dim=1).values  # the 1st is the row itself, at distance 0


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> float:
    """Share of ``points`` inside at least one ball (centre, radius)."""
    return float((torch.cdist(points, centres) <= radii[None, :]).any(dim=1).double().mean())


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): precision is the share of generated
    samples inside the k-NN manifold of the real ones, recall the share of real ones inside the generated
    manifold."""
    real, fake = real.double(), fake.double()
    precision = _coverage(fake, real, _knn_radii(real, k))
    recall = _coverage(real, fake, _knn_radii(fake, k))
    return precision, recall
