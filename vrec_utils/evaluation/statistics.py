"""Bootstrap intervals and paired permutation p-values over per-query metric values.

Percentile or BCa bootstrap intervals of each column's mean, resampling queries with
``np.random.default_rng(seed)`` exactly as ``scipy.stats.bootstrap`` does, but computing every
column's resampled mean in one matrix product; the same resamples serve every column, so paired
differences use them too. The paired test is a two-sided sign-flip permutation test.
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtr, ndtri

from .config import CI_METHODS


def resample_means(values: np.ndarray, n_resamples: int, rng: np.random.Generator, chunk: int = 250) -> np.ndarray:
    """Bootstrap means of each column of ``values`` (n, m) -> (n_resamples, m).

    Draws ``rng.integers(0, n, (n_resamples, n))`` row indices, the stream scipy.stats.bootstrap
    draws with the same generator (drawn by chunks of whole rows, which leaves it unchanged),
    and turns each row into counts so that all columns are averaged in one matrix product."""
    n = len(values)
    out = np.empty((n_resamples, values.shape[1]), dtype=np.float64)
    chunk += chunk % 2  # an even number of draws per chunk keeps the stream identical to one call
    for start in range(0, n_resamples, chunk):
        b = min(chunk, n_resamples - start)
        idx = rng.integers(0, n, (b, n))
        counts = np.bincount((idx + (np.arange(b) * n)[:, None]).ravel(), minlength=b * n).reshape(b, n)
        out[start : start + b] = counts @ values / n
    return out


def col_sum(x: np.ndarray) -> np.ndarray:
    """Column sums computed row by row of the transpose: each column's sum is the same bits as
    ``np.sum`` of that column alone, whatever the other columns (axis-0 sums of a 2-d array
    are not), so a number does not change with the set of rows it is computed beside."""
    return np.ascontiguousarray(x.T).sum(axis=1)


def col_mean(x: np.ndarray) -> np.ndarray:
    return col_sum(x) / len(x)


def jackknife_acceleration(jackknife: np.ndarray) -> np.ndarray:
    """BCa acceleration from leave-one-out statistics (n, m), as scipy computes it."""
    u = col_mean(jackknife) - jackknife
    num = col_sum(u**3)
    den = 6.0 * col_sum(u**2) ** 1.5
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def mean_jackknife(values: np.ndarray) -> np.ndarray:
    n = len(values)
    return (col_sum(values) - values) / (n - 1)


def interval(
    theta_hat: np.ndarray, theta_b: np.ndarray, accel: np.ndarray | None, confidence: float, method: str
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile or BCa interval per column; BCa falls back to percentile where the bias
    correction is infinite (the estimate lies outside every resample)."""
    alpha = (1.0 - confidence) / 2.0
    m = theta_b.shape[1]
    lo_q = np.full(m, alpha)
    hi_q = np.full(m, 1.0 - alpha)
    if method == "bca":
        b = len(theta_b)
        pct = ((theta_b < theta_hat).sum(axis=0) + (theta_b <= theta_hat).sum(axis=0)) / (2.0 * b)
        z0 = ndtri(pct)
        z = ndtri(alpha)
        with np.errstate(invalid="ignore", divide="ignore"):
            n1, n2 = z0 + z, z0 - z
            a1 = ndtr(z0 + n1 / (1 - accel * n1))
            a2 = ndtr(z0 + n2 / (1 - accel * n2))
        ok = np.isfinite(a1) & np.isfinite(a2)
        lo_q = np.where(ok, a1, lo_q)
        hi_q = np.where(ok, a2, hi_q)
    low = np.array([np.quantile(theta_b[:, j], lo_q[j]) for j in range(m)])
    high = np.array([np.quantile(theta_b[:, j], hi_q[j]) for j in range(m)])
    return low, high


def bootstrap_ci(
    values: np.ndarray,
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    method: str = "bca",
    seed: int | np.random.Generator = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap confidence interval of the mean of each column of ``values`` ((n,) or (n, m)).

    Matches ``scipy.stats.bootstrap(values.T, np.mean, method=..., n_resamples=...,
    rng=np.random.default_rng(seed))`` up to floating-point summation order, much faster for
    many columns. Returns ``(low, high)`` arrays (scalars for 1-d input); NaN for no rows, as
    the mean of nothing is NaN (an empty query group), without drawing from ``seed``."""
    values = np.asarray(values, dtype=np.float64)
    one = values.ndim == 1
    values = values[:, None] if one else values
    if method not in CI_METHODS:
        raise ValueError(f"ci method must be one of {', '.join(CI_METHODS)}, got {method!r}")
    if len(values) == 0:
        return (np.nan, np.nan) if one else (np.full(values.shape[1], np.nan), np.full(values.shape[1], np.nan))
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    theta_b = resample_means(values, n_resamples, rng)
    accel = jackknife_acceleration(mean_jackknife(values)) if method == "bca" else None
    low, high = interval(col_mean(values), theta_b, accel, confidence, method)
    return (low[0], high[0]) if one else (low, high)


def paired_permutation_pvalue(
    differences: np.ndarray, *, n_permutations: int = 10000, seed: int | np.random.Generator = 0, chunk: int = 500
) -> np.ndarray:
    """Two-sided paired sign-flip test of mean(differences) = 0, per column of ``differences``
    ((n,) or (n, m)). Exact (all 2**n sign patterns) when 2**n <= n_permutations, else
    ``(1 + #{|mean of flipped| >= |observed|}) / (1 + n_permutations)`` with random flips
    shared by all columns."""
    d = np.asarray(differences, dtype=np.float64)
    one = d.ndim == 1
    d = d[:, None] if one else d
    n = len(d)
    observed = np.abs(col_mean(d))
    threshold = observed - 1e-12 * np.maximum(observed, 1e-300)
    exact = n <= 30 and 2**n <= n_permutations
    count = np.zeros(d.shape[1], dtype=np.int64)
    if exact:
        total = 2**n
        for start in range(0, total, chunk):
            codes = np.arange(start, min(total, start + chunk))
            signs = 1.0 - 2.0 * ((codes[:, None] >> np.arange(n)) & 1)
            count += (np.abs(signs @ d / n) >= threshold).sum(axis=0)
        p = count / total
    else:
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        total = col_sum(d)
        for start in range(0, n_permutations, chunk):
            b = min(chunk, n_permutations - start)
            # one random bit per (permutation, query): flipped where 1; sum(s*d) = total - 2*sum(flipped d)
            flips = np.unpackbits(rng.integers(0, 256, (b, (n + 7) // 8), dtype=np.uint8), axis=1, count=n)
            count += (np.abs((total - 2.0 * (flips.astype(np.float64) @ d)) / n) >= threshold).sum(axis=0)
        p = (count + 1) / (n_permutations + 1)
    return p[0] if one else p


__all__ = [
    "bootstrap_ci", "col_mean", "col_sum", "interval", "jackknife_acceleration", "mean_jackknife", "paired_permutation_pvalue",
    "resample_means",
]
