"""Maximum-entropy distributions over the rating bins 1..K with a given mean (and std).

The paper trains on data sets labelled by a mean opinion score and its standard deviation
by turning each (mean, std) into the distribution of maximum entropy with those two
moments. Among all distributions on the bins 1..K with mean m and variance v, that one
has the form p_i ~ exp(a*i + b*i^2) (a and b are the Lagrange multipliers of the two
constraints); with the mean alone, p_i ~ exp(a*i). The multipliers are found for every
row at once by Newton's method on the convex dual, log Z(a, b) - a*m - b*E[i^2], with a
backtracking line search per row.

Which (m, v) exist. With m in [1, K], v lies between
    v_min(m) = f (1 - f), f = m - floor(m)   (all mass on the two bins around m), and
    v_max(m) = (m - 1) (K - m)               (all mass on the bins 1 and K).
Strictly between, the solution exists and is unique. On either bound the only
distribution with those moments is that two-bin one (the limit of the family), and it is
also the closest reachable one for a std beyond the bound: a std too small for its mean
gets the two bins around the mean, one too large gets the extremes. `clipped` marks the
rows whose std could not be met to TOLERANCE; callers count and report them.
"""
from dataclasses import dataclass

import numpy as np

TOLERANCE = 1e-6          # the largest error in mean or std a reachable row may have
_SNAP = 1e-7              # a std this close to a bound takes the bound's distribution (within TOLERANCE)
_MAX_ITER = 100


@dataclass
class MaxEntResult:
    dists: np.ndarray     # (N, K) float64, rows sum to 1
    mean: np.ndarray      # (N,) mean of each row of dists
    std: np.ndarray       # (N,) std of each row of dists
    clipped: np.ndarray   # (N,) bool: the target std was out of reach; the closest reachable was used


def std_bounds(mean, num_bins: int):
    """(smallest, largest) std of a distribution on the bins 1..num_bins with this mean."""
    mean = np.asarray(mean, np.float64)
    f = mean - np.floor(mean)
    return np.sqrt(f * (1 - f)), np.sqrt(np.maximum((mean - 1) * (num_bins - mean), 0.0))


def moments(dists):
    """(mean, std) of (N, K) distributions over the bins 1..K."""
    bins = np.arange(1, dists.shape[1] + 1, dtype=np.float64)
    mean = dists @ bins
    # Centred (two-pass): E[i^2] - m^2 would lose a small std to cancellation.
    return mean, np.sqrt((dists * (bins[None, :] - mean[:, None]) ** 2).sum(axis=1))


def maxent_distributions(mean, std=None, num_bins: int = 10) -> MaxEntResult:
    """The maximum-entropy distribution on the bins 1..num_bins of each row's mean (N,)
    and, when given, std (N,). Means must lie in [1, num_bins] (ValueError otherwise)."""
    mean = np.atleast_1d(np.asarray(mean, np.float64))
    if not (np.all(np.isfinite(mean)) and np.all(mean >= 1) and np.all(mean <= num_bins)):
        raise ValueError(f"every mean must be a finite number in [1, {num_bins}]")
    if std is not None:
        std = np.atleast_1d(np.asarray(std, np.float64))
        if std.shape != mean.shape or not (np.all(np.isfinite(std)) and np.all(std >= 0)):
            raise ValueError("std must be finite, >= 0 and one per mean")
    n, bins = len(mean), np.arange(1, num_bins + 1, dtype=np.float64)
    dists = np.zeros((n, num_bins))
    if std is None:
        # Mean only: a point mass at an end bin, otherwise p ~ exp(a*i).
        bound = (mean <= 1) | (mean >= num_bins)
        _two_bins(dists, bound, mean, np.floor(mean), num_bins)
        dists[~bound] = _newton(mean[~bound], None, bins)
    else:
        low, high = std_bounds(mean, num_bins)
        lower = std <= low + _SNAP
        upper = ~lower & (std >= high - _SNAP)
        bound = lower | upper
        _two_bins(dists, lower, mean, np.floor(mean), num_bins)      # the two bins around the mean
        _two_bins(dists, upper, mean, np.ones(n), num_bins, far=True)  # the bins 1 and K
        # Most rows of real data lie well inside, where Newton from the sampled Gaussian of
        # that variance takes a few steps; a row that start does not bring to its target is
        # solved again from the uniform distribution, from which every inside target is reached.
        fast = ~bound & (std ** 2 < (num_bins ** 2 - 1) / 24) & (std > 2 * low + 0.1)
        dists[fast] = _newton(mean[fast], std[fast], bins, gaussian_start=True)
        got_mean, got_std = moments(dists)
        redo = ~bound & ~(fast & (np.abs(got_mean - mean) < 1e-9) & (np.abs(got_std - std) < 1e-9))
        dists[redo] = _newton(mean[redo], std[redo], bins)
    got_mean, got_std = moments(dists)
    clipped = np.zeros(n, bool) if std is None else np.abs(got_std - std) > TOLERANCE
    missed = (np.abs(got_mean - mean) > TOLERANCE) | (clipped & ~bound)
    if missed.any():  # a solver bug, never a property of the data: say so loudly
        k = int(np.nonzero(missed)[0][0])
        raise RuntimeError(f"maximum-entropy solver missed mean {mean[k]!r}" + ("" if std is None else f", std {std[k]!r}"))
    return MaxEntResult(dists, got_mean, got_std, clipped)


def _two_bins(dists, rows, mean, lower_bin, num_bins, far=False):
    """Put the mass of `rows` on two bins with the row's mean: the bins floor(m) and
    floor(m) + 1, or (far) the bins 1 and num_bins."""
    if not rows.any():
        return
    m = mean[rows]
    lo = lower_bin[rows].astype(int)
    hi = np.full_like(lo, num_bins) if far else np.minimum(lo + 1, num_bins)
    weight_hi = np.where(hi > lo, (m - lo) / np.maximum(hi - lo, 1), 0.0)
    index = np.nonzero(rows)[0]
    dists[index, lo - 1] += 1 - weight_hi
    dists[index, hi - 1] += weight_hi


def _newton(mean, std, bins, gaussian_start=False):
    """Damped Newton on the dual, in coordinates centred on each row's mean and scaled to
    [-1, 1] (y = (i - m) / (K - 1)): the constraints become E[y] = 0 and E[y^2] = v / (K - 1)^2,
    and the multipliers stay of moderate size."""
    n = len(mean)
    if n == 0:
        return np.zeros((0, len(bins)))
    scale = bins[-1] - bins[0]
    y = (bins[None, :] - mean[:, None]) / scale                    # (n, K)
    y2 = y ** 2
    two = std is not None
    target = (std / scale) ** 2 if two else np.zeros(n)             # E[y^2] (E[y] = 0)
    a, b = np.zeros(n), np.zeros(n)                                 # p ~ exp(a y + b y^2)
    if two and gaussian_start:
        b = -scale ** 2 / (2 * std ** 2)                            # the sampled Gaussian of that variance
    active = np.ones(n, bool)
    for _ in range(_MAX_ITER):
        i = np.nonzero(active)[0]
        if len(i) == 0:
            break
        value, p = _dual(a[i], b[i], y[i], y2[i], target[i])
        e1, e2 = (p * y[i]).sum(axis=1), (p * y2[i]).sum(axis=1)
        # The Hessian is the covariance of (y, y^2) under p, from centred values (no cancellation).
        c1, c2 = y[i] - e1[:, None], y2[i] - e2[:, None]
        h11, h12, h22 = (p * c1 * c1).sum(axis=1), (p * c1 * c2).sum(axis=1), (p * c2 * c2).sum(axis=1)
        g1, g2 = e1, (e2 - target[i]) if two else np.zeros(len(i))
        d1, d2 = _solve(h11, h12, h22, g1, g2, two)
        decrement = -(g1 * d1 + g2 * d2)                            # >= 0: a descent direction
        std_err = np.abs(np.sqrt(np.maximum((p * c1 * c1).sum(axis=1), 0)) * scale - std[i]) if two else 0.0
        done = ((np.abs(e1) * scale < 1e-13) & (std_err < 1e-13)) | (decrement < 1e-30)
        # Near the optimum a full step is right, and the dual's decrease is below its rounding.
        alpha = np.where(decrement < 1e-8, 1.0, 0.0)
        search = ~done & (alpha == 0)
        alpha[search] = 1.0
        for _ in range(60):                                         # backtracking (Armijo)
            k = np.nonzero(search)[0]
            if len(k) == 0:
                break
            ik = i[k]
            trial, _ = _dual(a[ik] + alpha[k] * d1[k], b[ik] + alpha[k] * d2[k], y[ik], y2[ik], target[ik])
            ok = trial <= value[k] - 1e-4 * alpha[k] * decrement[k]
            search[k[ok]] = False
            alpha[k[~ok]] *= 0.5
        alpha[search | done] = 0.0                                  # converged, or no decrease found
        a[i] += alpha * d1
        b[i] += alpha * d2
        active[i[alpha == 0]] = False
    return _dual(a, b, y, y2, target)[1]


def _dual(a, b, y, y2, target):
    """(log Z - b * target, p) per row (E[y] = 0 has no term), the log-sum-exp kept finite."""
    logits = a[:, None] * y + b[:, None] * y2
    top = logits.max(axis=1, keepdims=True)
    w = np.exp(logits - top)
    z = w.sum(axis=1, keepdims=True)
    return np.log(z[:, 0]) + top[:, 0] - b * target, w / z


def _solve(h11, h12, h22, g1, g2, two):
    """Newton steps -H^-1 g of 2x2 systems (1x1 with the mean alone); a singular H (all
    mass on one or two bins) falls back to a step along each coordinate."""
    tiny = 1e-300
    if not two:
        return -g1 / np.maximum(h11, tiny), np.zeros_like(g1)
    det = h11 * h22 - h12 * h12
    good = det > 1e-13 * h11 * h22
    safe = np.where(good, det, 1.0)
    d1 = np.where(good, -(h22 * g1 - h12 * g2) / safe, -g1 / np.maximum(h11, tiny))
    d2 = np.where(good, -(h11 * g2 - h12 * g1) / safe, -g2 / np.maximum(h22, tiny))
    return d1, d2
