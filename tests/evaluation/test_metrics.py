"""The evaluation's numbers on cases whose answer is known: identical sets, different distributions."""

import numpy as np

from jax_erasepro.evaluation import metrics


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_identical_sets_give_kid_zero_within_interval_and_cosine_one():
    x = _unit(np.random.default_rng(0).normal(size=(60, 16)))
    k = metrics.kid(x, x)
    assert k["value"] == 0.0 and k["ci"] == [0.0, 0.0]
    assert np.isclose(metrics.estimate(metrics.cosines(x, x))["value"], 1.0)


def test_two_samples_of_one_distribution_have_kid_interval_covering_zero():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(80, 8)), rng.normal(size=(80, 8))
    lo, hi = metrics.kid(x, y)["ci"]
    assert lo <= 0 <= hi


def test_different_distributions_have_clearly_positive_kid():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(80, 8)), rng.normal(size=(80, 8)) + 1.5
    k = metrics.kid(x, y)
    assert k["value"] > 0.1 and k["ci"][0] > 0


def test_kid_matches_its_definition_on_a_small_case():
    """The paired U-statistic MMD^2 with k(x, y) = (x.y / d + 1)^3, written out by loops."""
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))

    def k(a, b):
        return (a @ b / 3 + 1) ** 3

    n = len(x)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    h = sum(k(x[i], x[j]) + k(y[i], y[j]) - k(x[i], y[j]) - k(x[j], y[i]) for i, j in pairs) / len(pairs)
    assert np.isclose(metrics.kid(x, y)["value"], h)


def test_paired_rates_drop_and_seeded_intervals():
    before = np.array([1, 1, 1, 1, 0, 1, 1, 1, 1, 1], float)
    after = np.zeros(10)
    r = metrics.paired(before, after, seed=0)
    assert r["before"] == 0.9 and r["after"] == 0.0 and np.isclose(r["drop"], 0.9)
    assert r["drop_ci"][0] <= 0.9 <= r["drop_ci"][1] and r["after_ci"] == [0.0, 0.0]
    assert metrics.paired(before, after, seed=0) == r  # same seed, same table


def test_closer_to_picks_the_nearer_text():
    img = _unit(np.array([[1.0, 0.1], [0.1, 1.0]]))
    a, b = np.array([[1.0, 0.0]] * 2), np.array([[0.0, 1.0]] * 2)
    assert metrics.closer_to(img, a, b).tolist() == [True, False]


def test_an_interval_of_a_statistic_undefined_everywhere_is_nan_without_a_warning():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(metrics.interval(lambda i: float("nan"), 5)).all()
