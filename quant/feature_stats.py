"""Statistics of feature sets (rows = samples): the Fréchet distance between two sets and the mean
pairwise cosine similarity within one, overall and per class.

Why: a calibration pool is only as good as the activations it makes the model produce. The Fréchet
distance of the classifier's penultimate features (FID's formula on the model being quantized)
measures how far a pool's feature distribution is from real images' (mixup-class prompting, arXiv
2507.21947, Fig. 4); the mean pairwise cosine within a class is EnhancingDFQ's intra-class
similarity (its Fig. 4): 1.0 for identical samples, lower for a more diverse pool.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix, by eigendecomposition
    (eigenvalues that rounding made slightly negative count as 0)."""
    sym = (matrix + matrix.T) / 2.0
    values, vectors = np.linalg.eigh(sym)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64, unbiased) of `features` (n >= 2 rows)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature rows of shape (n, d), got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets `a` (n, d) and `b` (m, d):
    |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)).

    The trace term is computed as the trace of the square root of the symmetric PSD matrix
    S_a^(1/2) S_b S_a^(1/2) (same eigenvalues as S_a S_b), so it stays real and stable where
    `scipy.linalg.sqrtm` of the non-symmetric product returns complex noise for singular covariances
    (fewer samples than dimensions). Never negative.
    """
    mu_a, cov_a = gaussian_stats(a)
    mu_b, cov_b = gaussian_stats(b)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature dimensions differ: {mu_a.shape[0]} and {mu_b.shape[0]}")
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    eig = np.linalg.eigvalsh((middle + middle.T) / 2.0)
    trace_sqrt = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mu_a - mu_b
    value = float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt)
    return max(value, 0.0)


def cosine_matrix(features: np.ndarray) -> np.ndarray:
    """Pairwise cosine similarities of the rows (a zero row has similarity 0 with everything)."""
    f = np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(f, axis=1, keepdims=True)
    unit = np.divide(f, norms, out=np.zeros_like(f), where=norms > 0)
    return unit @ unit.T


def mean_pairwise_cosine(features: np.ndarray) -> float | None:
    """Mean cosine similarity over distinct pairs of rows (None with fewer than 2 rows)."""
    n = len(features)
    if n < 2:
        return None
    sim = cosine_matrix(features)
    return float((sim.sum() - np.trace(sim)) / (n * (n - 1)))


def class_similarity(features: np.ndarray, labels: np.ndarray) -> dict:
    """Mean pairwise cosine overall and within each class (classes with >= 2 samples), and the
    unweighted mean over those classes."""
    labels = np.asarray(labels)
    per_class = {}
    for c in np.unique(labels):
        value = mean_pairwise_cosine(features[labels == c])
        if value is not None:
            per_class[int(c)] = value
    return {
        "overall": mean_pairwise_cosine(features),
        "per_class": per_class,
        "mean_per_class": float(np.mean(list(per_class.values()))) if per_class else None,
    }


def per_class_frechet(
    a: np.ndarray, labels_a: np.ndarray, b: np.ndarray, labels_b: np.ndarray, min_samples: int = 2
) -> dict[int, float]:
    """Fréchet distance between the two sets' samples of each class both hold `min_samples` of."""
    labels_a, labels_b = np.asarray(labels_a), np.asarray(labels_b)
    out = {}
    for c in np.intersect1d(np.unique(labels_a), np.unique(labels_b)):
        fa, fb = a[labels_a == c], b[labels_b == c]
        if len(fa) >= max(2, min_samples) and len(fb) >= max(2, min_samples):
            out[int(c)] = frechet_distance(fa, fb)
    return out


def mean_of(values: Mapping[int, float]) -> float | None:
    return float(np.mean(list(values.values()))) if values else None


def subsample_indices(n: int, k: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded draw of k of n rows (all n when k >= n)."""
    if n <= k:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, k, replace=False))
