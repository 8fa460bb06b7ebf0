"""Uncertainty over images: percentile bootstrap of per-block means and of similar-block counts, and Wilson intervals.

    draws = resample_weights(n_images=64, n_boot=1000, seed=0)         # [n_boot, n] how often each image is drawn
    lo, hi = mean_interval(per_image_values, draws)                    # [L] each: 95% interval of the per-block mean
    counts = count_draws(per_image_neighbour, draws, threshold=0.9)    # [n_boot] similar-block count per draw
    low, high = wilson(successes=310, n=360)                           # 95% interval of a proportion

Why per-image values, not per-(head, token) ones: images are the unit a user samples (heads and tokens of one image are
not independent draws), so every interval here is over images. Each image has equal weight, which matches the streamed
means (every image contributes the same number of heads and tokens). Images excluded from a block (non-finite maps) are
NaN in the per-image arrays and left out of that block's mean in every draw.
"""
from __future__ import annotations

import math
import warnings

import numpy as np

CONFIDENCE = 0.95
N_BOOT = 1000


def resample_weights(n_images: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """[n_boot, n_images] multiplicities of a bootstrap resample of the images (each row sums to ``n_images``)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_images, size=(n_boot, n_images))
    w = np.zeros((n_boot, n_images))
    np.add.at(w, (np.arange(n_boot)[:, None], idx), 1.0)
    return w


def weighted_means(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """values [n, ...] (NaN = image left out), weights [D, n] -> [D, ...] weighted means over the images."""
    v = np.asarray(values, dtype=float)
    ok = np.isfinite(v)
    flat, okf = np.where(ok, v, 0.0).reshape(v.shape[0], -1), ok.reshape(v.shape[0], -1).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (weights @ flat) / (weights @ okf)
    return out.reshape((weights.shape[0], *v.shape[1:]))


def interval(draws: np.ndarray, confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval over the first axis of ``draws`` [D, ...] (NaN where every draw is NaN)."""
    a = (1 - confidence) / 2
    d = np.asarray(draws, dtype=float)
    if d.size == 0 or not np.isfinite(d).any():
        nan = np.full(d.shape[1:], math.nan)
        return nan, nan.copy()
    with warnings.catch_warnings():  # all-NaN columns (a block every image skipped) stay NaN quietly
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanquantile(d, a, axis=0), np.nanquantile(d, 1 - a, axis=0)


def mean_interval(values: np.ndarray, weights: np.ndarray, confidence: float = CONFIDENCE
                  ) -> tuple[np.ndarray, np.ndarray]:
    """values [n, ...] -> (low, high), each [...]: bootstrap interval of the mean over images."""
    return interval(weighted_means(values, weights), confidence)


def count_draws(values: np.ndarray, weights: np.ndarray, threshold: float) -> np.ndarray:
    """values [n, L] per-image block statistic (e.g. similarity with the previous block) -> [D] number of blocks whose
    resampled mean exceeds ``threshold`` (NaN means never count, as in ``functional.blocks_above``)."""
    m = weighted_means(values, weights)
    with np.errstate(invalid="ignore"):
        return (np.nan_to_num(m, nan=-np.inf) > threshold).sum(axis=1).astype(float)


def wilson(successes: float, n: float, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a proportion successes / n, as fractions; (nan, nan) for n = 0. The one implementation
    (accuracies in figures, changed predictions in interventions).

    centre (p + z²/2n) / (1 + z²/n), half-width z sqrt(p(1 - p)/n + z²/4n²) / (1 + z²/n), p = successes / n. Unlike
    p ± z sqrt(p(1-p)/n) it stays inside [0, 1] and is not empty at p = 0 or 1.
    """
    if n <= 0:
        return math.nan, math.nan
    if not 0 <= successes <= n:
        raise ValueError(f"wilson: need 0 <= successes <= n, got {successes} of {n}")
    from statistics import NormalDist

    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    p, z2 = successes / n, z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(max(p * (1 - p) / n + z2 / (4 * n * n), 0.0)) / denom
    # at 0 (n) successes the lower (upper) bound is exactly 0 (1); computed, it would carry rounding of order 1e-17
    return (0.0 if successes == 0 else max(0.0, centre - half)), (1.0 if successes == n else min(1.0, centre + half))
