"""The numbers of an evaluation, as functions of judge features and labels: CLIP score, CLIP accuracy, KID,
rates, each with a seeded bootstrap 95% interval (resampling images), so a rerun gives the same table.

Features are L2-normalised judge embeddings (n, d) as float64 numpy arrays; every function is pure.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

ROUNDS = 1000  # bootstrap resamples
LEVEL = 0.95


def interval(stat: Callable[[np.ndarray], float], n: int, seed: int = 0, rounds: int = ROUNDS) -> list[float]:
    """Percentile bootstrap interval of ``stat(idx)`` over ``rounds`` resamples of ``range(n)``."""
    if n == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    values = np.array([stat(rng.integers(0, n, n)) for _ in range(rounds)])
    if np.isnan(values).all():  # a statistic undefined on every resample (e.g. KID of too few images)
        return [float("nan"), float("nan")]
    lo, hi = np.nanquantile(values, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return [float(lo), float(hi)]


def estimate(values: np.ndarray, seed: int = 0) -> dict[str, float | list[float]]:
    """Mean of per-image ``values`` and its bootstrap interval: ``{"value", "ci"}``."""
    values = np.asarray(values, np.float64)
    return {
        "value": float(values.mean()) if values.size else float("nan"),
        "ci": interval(lambda i: values[i].mean(), values.size, seed),
    }


def paired(before: np.ndarray, after: np.ndarray, seed: int = 0) -> dict[str, float | list[float] | int]:
    """A per-image rate before and after an edit, same images: both means, the drop, each with an interval
    (one resample of images serves all three, so the drop's interval is paired)."""
    b, a = np.asarray(before, np.float64), np.asarray(after, np.float64)
    n = b.size
    out: dict[str, float | list[float] | int] = {"n": int(n)}
    for name, fn in (
        ("before", lambda i: b[i].mean()),
        ("after", lambda i: a[i].mean()),
        ("drop", lambda i: b[i].mean() - a[i].mean()),
    ):
        out[name] = float(fn(np.arange(n))) if n else float("nan")
        out[f"{name}_ci"] = interval(fn, n, seed)
    return out


def cosines(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two (n, d) feature sets paired by row (same prompt, same seed)."""
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    y = y / np.linalg.norm(y, axis=-1, keepdims=True)
    return np.sum(x * y, -1)


def closer_to(images: np.ndarray, text_a: np.ndarray, text_b: np.ndarray) -> np.ndarray:
    """Per image, whether it is closer (cosine) to the row of ``text_a`` than of ``text_b`` (each (n, d))."""
    return cosines(images, text_a) > cosines(images, text_b)


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's kernel (x . y / d + 1)^3 (Binkowski et al. 2018)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _mmd2(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray, idx: np.ndarray) -> float:
    """The U-statistic MMD^2 of paired samples (Gretton et al. 2012, eq. 3) over the resample ``idx``:
    the mean over pairs i != j of k(x_i, x_j) + k(y_i, y_j) - k(x_i, y_j) - k(x_j, y_i). Pairs of one
    source image are left out, so repeats do not bias it, and identical sets give exactly 0."""
    mask = idx[:, None] != idx[None, :]
    if not mask.any():
        return float("nan")
    sxy = kxy[np.ix_(idx, idx)]
    h = kxx[np.ix_(idx, idx)] + kyy[np.ix_(idx, idx)] - sxy - sxy.T
    return float(h[mask].mean())


def kid(x: np.ndarray, y: np.ndarray, seed: int = 0) -> dict[str, float | list[float]]:
    """Kernel Inception Distance (Binkowski et al. 2018's kernel) between two feature sets of equal size
    paired by row (same prompt and seed), here in the judge's image space: the unbiased estimate and a
    bootstrap interval over pairs; 0 means the same distribution."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape:
        raise ValueError(f"KID compares paired sets of one shape, got {x.shape} and {y.shape}")
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    value = _mmd2(kxx, kyy, kxy, np.arange(len(x)))
    return {"value": value, "ci": interval(lambda i: _mmd2(kxx, kyy, kxy, i), len(x), seed)}
