"""Confidence intervals and verdicts for the comparison tables.

Every number the comparison reports carries a 95 % bootstrap interval over its queries
(:func:`bootstrap_ci`: :func:`scipy.stats.bootstrap`'s interval), and every similarity is set
against each of its baselines through the interval of the paired difference
(:func:`paired_difference`): the same queries, both runs, resampled together.
:func:`verdict` reads that interval: ``"beats baseline"`` only when it lies above 0.

>>> import numpy as np
>>> x = np.linspace(0.0, 1.0, 41)
>>> lo, hi = bootstrap_ci(x)
>>> bool(lo < 0.5 < hi)
True
>>> verdict(*paired_difference(x + 0.3, x)[1:])
'beats baseline'
>>> verdict(-0.1, 0.2)
'not distinguishable'
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from scipy import special as _sp

CONFIDENCE = 0.95
N_RESAMPLES = 2000


def _finite_rows(*arrays: np.ndarray) -> list[np.ndarray]:
    arrays = [np.asarray(a, dtype=float) for a in arrays]
    ok = np.ones(len(arrays[0]), dtype=bool)
    for a in arrays:
        ok &= np.isfinite(a)
    return [a[ok] for a in arrays]


def bootstrap_ci(values: np.ndarray, statistic: Callable = np.mean, *, seed: int = 0,
                 confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES,
                 method: str = "BCa") -> tuple[float, float]:
    """Bootstrap interval of ``statistic`` over ``values`` (NaNs dropped). A statistic must
    accept ``axis=`` (NumPy reductions do). Fewer than two values: ``(nan, nan)``; values all
    equal: the degenerate interval ``(v, v)``. ``method``: ``"BCa"`` or ``"percentile"``.

    The interval is :func:`scipy.stats.bootstrap`'s, bit for bit (the same resamples from
    ``numpy.random.default_rng(seed)``, the same BCa levels, the same linear quantile; a test
    holds the two equal), computed here without SciPy's input handling, which cost three
    quarters of each of the ~200 intervals of a comparison (0.24 s of compare() on the
    embedded model)."""
    (x,) = _finite_rows(values)
    if len(x) < 2:
        return float("nan"), float("nan")
    if np.all(x == x[0]):
        v = float(statistic(x, axis=-1))
        return v, v
    if method.lower() not in ("bca", "percentile"):
        raise ValueError(f"method={method!r}: expected 'BCa' or 'percentile'")
    stat = _order_free(statistic)
    rng = np.random.default_rng(seed)
    theta_b = stat(x[rng.integers(0, len(x), (n_resamples, len(x)))], axis=-1)
    alpha = (1 - confidence) / 2
    with np.errstate(all="ignore"):  # a degenerate BCa falls back to percentile below
        if method.lower() == "bca":
            levels = _bca_levels(x, stat, theta_b, alpha)
        else:
            levels = np.stack([np.asarray(alpha), 1 - np.asarray(alpha)])
        lo, hi = _quantile(theta_b, levels)
    if not (np.isfinite(lo) and np.isfinite(hi)) and method.lower() != "percentile":
        return bootstrap_ci(x, statistic, seed=seed, confidence=confidence,
                            n_resamples=n_resamples, method="percentile")
    return float(lo), float(hi)


def _bca_levels(x: np.ndarray, stat: Callable, theta_b: np.ndarray, alpha: float
                ) -> np.ndarray:
    """The bias-corrected and accelerated quantile levels of the bootstrap distribution
    ``theta_b`` (Efron and Tibshirani 1993, 14.3; the acceleration from the jackknife), in
    the order of operations SciPy uses, so that the levels are its bits."""
    theta_hat = np.expand_dims(stat(x, axis=-1), -1)
    below = np.count_nonzero(theta_b < theta_hat, axis=-1) + \
        np.count_nonzero(theta_b <= theta_hat, axis=-1)
    z0 = _sp.ndtri(np.asarray(below.astype(theta_hat.dtype) / (2 * theta_b.shape[-1]),
                              dtype=theta_hat.dtype))
    n = len(x)
    keep = ~np.eye(n, dtype=bool)  # jackknife: row i leaves out observation i
    theta_i = stat(x[np.broadcast_to(np.arange(n), (n, n))[keep].reshape(n, n - 1)], axis=-1)
    u = (float(n) - 1) * (np.mean(theta_i, axis=-1, keepdims=True) - theta_i)
    num, den = np.sum(u ** 3, axis=-1) / float(n) ** 3, np.sum(u ** 2, axis=-1) / float(n) ** 2
    a_hat = 1 / 6 * num / den ** (3 / 2)
    z_alpha = float(_sp.ndtri(alpha))
    levels = []
    for z in (z_alpha, -z_alpha):
        step = z0 + z
        levels.append(_sp.ndtr(z0 + step / (1 - a_hat * step)))
    return np.stack(levels, axis=-1)


def _quantile(sample: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Hyndman and Fan's type-7 ("linear") quantiles ``p`` of a 1-D sample, computed as
    :func:`scipy.stats.quantile` computes them (NaN for a level that is NaN or outside
    [0, 1])."""
    y = np.sort(sample)
    n = np.asarray(float(len(y)))
    bad = np.isnan(p) | (p < 0) | (p > 1)
    p = np.where(bad, 0.5, p)
    jg = p * n + (1 - p)
    jp1 = jg // 1
    j = jp1 - 1
    g = np.where(j < 0, 0.0, jg % 1)
    j, jp1 = np.clip(j, 0.0, n - 1), np.clip(jp1, 0.0, n - 1)
    out = (1 - g) * y[j.astype(np.int64)] + g * y[jp1.astype(np.int64)]
    return np.where(bad, np.nan, out)


def _order_free(statistic: Callable) -> Callable:
    """``statistic`` of the sorted sample. BCa counts the resamples whose statistic lies below
    the observed one; with few queries many resamples are permutations of the sample, whose
    mean differs from the observed mean only by the order of a floating-point sum, so one ulp
    of noise in the inputs (another CPU's kernels) moved intervals by up to 0.02 (n = 4).
    Sorting first makes every permutation give the observed value bit for bit."""

    def stat(x: np.ndarray, axis: int = -1) -> np.ndarray:
        return statistic(np.sort(x, axis=axis), axis=axis)

    return stat


def paired_difference(ours: np.ndarray, baseline: np.ndarray, *, seed: int = 0,
                      confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """Mean of ``ours − baseline`` over the items both have (paired: the same queries) and
    its bootstrap interval: ``(mean, low, high)``."""
    a, b = _finite_rows(ours, baseline)
    d = a - b
    if len(d) == 0:
        return float("nan"), float("nan"), float("nan")
    lo, hi = bootstrap_ci(d, seed=seed, confidence=confidence)
    return float(d.mean()), lo, hi


def rec2ftp_vec(zs: np.ndarray, icl: np.ndarray, ft: np.ndarray, axis: int = -1) -> np.ndarray:
    """Rec2FTP along ``axis`` (boolean arrays), NaN where fine-tuning fixes no zero-shot
    error: the vectorised form of :func:`icl_probe.comparison.rec2ftp` for the bootstrap."""
    zs, icl, ft = (np.asarray(a).astype(bool) for a in (zs, icl, ft))
    gain = ft & ~zs
    den = gain.sum(axis=axis)
    num = (gain & icl).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1) * 100.0, np.nan)


def rec2ftp_interval(ours: tuple, baseline: tuple | None = None, *, seed: int = 0
                     ) -> tuple[float, float, float]:
    """Rec2FTP of ``ours`` = (zs, icl, ft) correctness arrays over the same queries, or with
    ``baseline`` the paired difference ours − baseline; ``(value, low, high)`` with a
    percentile bootstrap interval that resamples queries (every run of a query together).

    Rec2FTP is a ratio that is undefined when fine-tuning fixes nothing, so resamples where
    it is undefined are left out; ``scipy.stats.bootstrap`` would let them turn the whole
    interval into NaN, hence the resampling here. Fewer than 10 defined resamples: no
    interval."""
    runs = [np.asarray(a, dtype=bool) for a in ours]
    other = [np.asarray(a, dtype=bool) for a in baseline] if baseline is not None else None

    def stat(idx: Any) -> np.ndarray:
        v = rec2ftp_vec(*(x[idx] for x in runs))
        return v if other is None else v - rec2ftp_vec(*(x[idx] for x in other))

    n = len(runs[0])
    point = float(stat(np.arange(n)))
    if n < 2:
        return point, float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, n, size=(N_RESAMPLES, n))
    vals = stat(idx)
    vals = vals[np.isfinite(vals)]
    if len(vals) < 10:
        return point, float("nan"), float("nan")
    a = (1 - CONFIDENCE) / 2
    return point, float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a))


def verdict(low: float, high: float) -> str:
    """``"beats baseline"`` when the interval of (ours − baseline) lies above 0, ``"below
    baseline"`` when it lies below, ``"not distinguishable"`` when it holds 0, ``"n/a"``
    without an interval."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return "n/a"
    if low > 0:
        return "beats baseline"
    if high < 0:
        return "below baseline"
    return "not distinguishable"
