"""Property tests of the closed-form erasure solvers against float64 numpy references (CLIP-like data)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jax_erasepro.erase.solvers import RankDeficientError, constrained_solve, erasepro_solve, uce_solve
from tests.conftest import assert_close


def clip_like(rng: np.random.Generator, d: int, n: int, decay: float = 0.05, mean: float = 8.0) -> np.ndarray:
    """Columns sharing a large mean direction plus a geometrically decaying spectrum (ill-conditioned)."""
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (mean * q[:, :1] + (q * np.exp(-decay * np.arange(d))) @ rng.standard_normal((d, n))).astype(
        np.float32
    )


def weights(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)


def f64(*arrays):
    return [np.asarray(a, np.float64) for a in arrays]


def rel_residual(w, c, t) -> np.ndarray:
    """||W C - T||_F / ||T||_F per batch element, in float64."""
    w, c, t = f64(w, c, t)
    return np.linalg.norm(w @ c - t, axis=(-2, -1)) / np.linalg.norm(t, axis=(-2, -1))


def kkt_reference(w_o, c, t, hard) -> np.ndarray:
    """Generic float64 solve of min ||W C_s - T_s|| s.t. W C_h = T_h through its KKT system (one W)."""
    w_o, c, t = f64(w_o, c, t)
    r = t - w_o @ c
    c_h, c_s, r_h, r_s = c[:, hard], c[:, ~hard], r[:, hard], r[:, ~hard]
    h = c_h.shape[1]
    kkt = np.block([[c_s @ c_s.T, c_h], [c_h.T, np.zeros((h, h))]])
    rhs = np.concatenate([c_s @ r_s.T, r_h.T])
    sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
    return w_o + sol[: c.shape[0]].T


@pytest.mark.parametrize(
    ("d_in", "n", "decay", "batch"), [(64, 2, 0.05, (3,)), (64, 40, 0.05, (2, 2)), (768, 100, 0.03, (2,))]
)
def test_full_rank_residual_and_reference(d_in, n, decay, batch):
    rng = np.random.default_rng(d_in + n)
    x, y = clip_like(rng, d_in, n, decay), clip_like(rng, d_in, n, decay)
    w_o = weights(rng, *batch, 48, d_in)
    w, rep = erasepro_solve(jnp.asarray(w_o), jnp.asarray(x), jnp.asarray(y))
    res = rel_residual(w, x, f64(w_o)[0] @ f64(y)[0])
    assert res.max() <= 1e-5, res
    assert int(rep.rank) == n and bool(rep.hard.all())
    np.testing.assert_allclose(rep.residual_target, res, atol=2e-6)
    w_o64, x64, y64 = f64(w_o, x, y)
    ref = w_o64 + (w_o64 @ (y64 - x64)) @ np.linalg.pinv(x64)
    assert_close(w, ref, rel=1e-4)
    change = np.linalg.norm(ref - w_o64, axis=(-2, -1)) / np.linalg.norm(w_o64, axis=(-2, -1))
    np.testing.assert_allclose(rep.relative_change, change, rtol=1e-4)
    s = np.linalg.svd(x64, compute_uv=False)
    np.testing.assert_allclose([rep.sigma_min_kept, rep.condition], [s[-1], s[0] / s[-1]], rtol=1e-3)


def test_minimal_change_and_null_space_untouched():
    rng = np.random.default_rng(1)
    d_in, n, m = 96, 12, 20
    x, y, p = clip_like(rng, d_in, n), clip_like(rng, d_in, n), clip_like(rng, d_in, m)
    w_o = weights(rng, 4, 32, d_in)
    w, _ = erasepro_solve(jnp.asarray(w_o), jnp.asarray(x), jnp.asarray(y), jnp.asarray(p))
    w, w_o64, c = f64(w, w_o, np.concatenate([x, p], 1))
    d = w - w_o64
    proj_perp = np.eye(d_in) - c @ np.linalg.pinv(c)  # projector onto span(C)'s orthogonal complement
    # Rows of the edit lie in span(C): any feasible W' = W + E (I - C C^+) is farther from W_o (Pythagoras).
    assert np.linalg.norm(d @ proj_perp) <= 1e-5 * np.linalg.norm(d)
    for _ in range(5):
        w_alt = w + rng.standard_normal(w.shape) @ proj_perp * 0.01
        assert np.abs(w_alt @ c - w @ c).max() <= 1e-10 * np.abs(w @ c).max()
        assert np.all(np.linalg.norm(w_alt - w_o64, axis=(-2, -1)) > np.linalg.norm(d, axis=(-2, -1)))
    v = proj_perp @ rng.standard_normal((d_in, 7))  # directions orthogonal to every constraint column
    assert np.abs(w @ v - w_o64 @ v).max() <= 1e-5 * np.abs(w_o64 @ v).max()


def test_preserved_features_held():
    rng = np.random.default_rng(2)
    d_in, n, m = 128, 10, 30
    x, y, p = clip_like(rng, d_in, n), clip_like(rng, d_in, n), clip_like(rng, d_in, m)
    w_o = weights(rng, 5, 64, d_in)
    w, rep = erasepro_solve(jnp.asarray(w_o), jnp.asarray(x), jnp.asarray(y), jnp.asarray(p))
    w_o64, y64, p64 = f64(w_o, y, p)
    assert rel_residual(w, p, w_o64 @ p64).max() <= 1e-5
    assert rel_residual(w, x, w_o64 @ y64).max() <= 1e-5
    assert np.asarray(rep.preserved).tolist() == [False] * n + [True] * m
    assert float(rep.residual_preserve.max()) <= 1e-5 and float(rep.residual_target.max()) <= 1e-5


@pytest.mark.parametrize("d_in", [32, 64])
def test_overdetermined_hard_exact_soft_optimal(d_in):
    """More columns than d_in: hard columns exact, soft ones the float64 KKT optimum (W unique here)."""
    rng = np.random.default_rng(d_in)
    n, m = d_in + 8, 8
    x, y, p = (
        clip_like(rng, d_in, n, decay=0.02),
        clip_like(rng, d_in, n, decay=0.02),
        clip_like(rng, d_in, m),
    )
    w_o = weights(rng, 3, 24, d_in)
    hard_x = np.zeros(n, bool)
    hard_x[rng.choice(n, 10, replace=False)] = True  # "concept tokens and EOS"
    w, rep = erasepro_solve(jnp.asarray(w_o), jnp.asarray(x), jnp.asarray(y), jnp.asarray(p), hard=hard_x)
    hard = np.concatenate([hard_x, np.ones(m, bool)])
    assert np.asarray(rep.hard).tolist() == hard.tolist() and int(rep.rank) == hard.sum()
    c = np.concatenate([x, p], 1)
    t = f64(w_o)[0] @ f64(np.concatenate([y, p], 1))[0]
    assert rel_residual(w, c[:, hard], t[..., hard]).max() <= 1e-5
    for b in range(w_o.shape[0]):
        ref = kkt_reference(w_o[b], c, t[b], hard)
        soft_ours = rel_residual(w[b], c[:, ~hard], t[b][:, ~hard])
        soft_ref = rel_residual(ref, c[:, ~hard], t[b][:, ~hard])
        assert soft_ref > 1e-2  # exact alignment is impossible here
        np.testing.assert_allclose(soft_ours, soft_ref, rtol=1e-4)
        np.testing.assert_allclose(rep.residual_soft[b], soft_ref, rtol=1e-3)
        assert_close(w[b], ref, rel=1e-4)


def test_priority_admits_top_columns_until_rank_runs_out():
    rng = np.random.default_rng(3)
    d_in, k = 24, 40
    c = rng.standard_normal((d_in, k)).astype(np.float32)
    t = weights(rng, 2, 16, k)
    w_o = weights(rng, 2, 16, d_in)
    priority = rng.permutation(k)
    w, rep = constrained_solve(
        jnp.asarray(w_o), jnp.asarray(c), jnp.asarray(t), priority=jnp.asarray(priority)
    )
    hard = np.asarray(rep.hard)
    assert hard.sum() == int(rep.rank) == d_in
    assert set(np.flatnonzero(hard)) == set(np.argsort(-priority)[:d_in])
    assert float(rep.residual_hard.max()) <= 1e-5
    for b in range(2):
        ref = kkt_reference(w_o[b], c, t[b], hard)
        np.testing.assert_allclose(
            rel_residual(w[b], c[:, ~hard], t[b][:, ~hard]),
            rel_residual(ref, c[:, ~hard], t[b][:, ~hard]),
            rtol=1e-4,
        )
    with pytest.raises(RankDeficientError, match="hard columns have rank 24"):
        constrained_solve(jnp.asarray(w_o), jnp.asarray(c), jnp.asarray(t), strict=True)


def test_dependent_hard_column_becomes_soft_or_raises():
    rng = np.random.default_rng(4)
    d_in, n = 48, 6
    x, y = clip_like(rng, d_in, n), clip_like(rng, d_in, n)
    x[:, 5] = 2 * x[:, 1] - x[:, 3]  # the hard set is rank deficient
    w_o = jnp.asarray(weights(rng, 16, d_in))
    w, rep = erasepro_solve(w_o, jnp.asarray(x), jnp.asarray(y))
    assert np.asarray(rep.hard).tolist() == [True] * 5 + [False]
    assert float(rep.residual_hard) <= 1e-5 and float(rep.residual_soft) > 1e-2
    d = np.float64(w) - np.float64(
        w_o
    )  # among the soft minimisers, the edit with rows in span(X) is smallest
    assert np.linalg.norm(d - d @ x @ np.linalg.pinv(np.float64(x))) <= 1e-5 * np.linalg.norm(d)
    with pytest.raises(RankDeficientError):
        erasepro_solve(w_o, jnp.asarray(x), jnp.asarray(y), strict=True)
    erasepro_solve(w_o, jnp.asarray(x[:, :5]), jnp.asarray(y[:, :5]), strict=True)  # independent: no error


def test_float32_normal_equations_fail_where_svd_succeeds():
    rng = np.random.default_rng(5)
    d_in, n = 256, 60
    x, y = clip_like(rng, d_in, n, decay=0.08), clip_like(rng, d_in, n, decay=0.08)
    w_o = weights(rng, 32, d_in)
    s = np.linalg.svd(x.astype(np.float64), compute_uv=False)
    assert 1e3 < s[0] / s[-1] < 1e4  # cond(X^T X) > 1e6: beyond float32
    w, rep = erasepro_solve(jnp.asarray(w_o), jnp.asarray(x), jnp.asarray(y))
    t = f64(w_o)[0] @ f64(y)[0]
    assert int(rep.rank) == n and rel_residual(w, x, t) <= 3e-5
    gram_inv = np.linalg.inv(x.T @ x)  # float32 normal equations
    w_ne = w_o + (w_o @ (y - x)) @ gram_inv @ x.T
    assert rel_residual(w_ne, x, t) > 1e-3


def test_vmap_over_layers_and_jit():
    rng = np.random.default_rng(6)
    layers, d_in, n = 3, 40, 8
    x = np.stack([clip_like(rng, d_in, n) for _ in range(layers)])
    y = np.stack([clip_like(rng, d_in, n) for _ in range(layers)])
    w_o = weights(rng, layers, 20, d_in)
    w, rep = jax.jit(jax.vmap(erasepro_solve))(jnp.asarray(w_o), jnp.asarray(x), jnp.asarray(y))
    for i in range(layers):
        w_i, rep_i = erasepro_solve(jnp.asarray(w_o[i]), jnp.asarray(x[i]), jnp.asarray(y[i]))
        np.testing.assert_allclose(w[i], w_i, rtol=1e-5, atol=1e-6)
        assert int(rep.rank[i]) == int(rep_i.rank) == n
    assert float(rep.residual_target.max()) <= 1e-5
    with pytest.raises(ValueError, match="strict=True"):
        jax.jit(lambda *a: erasepro_solve(*a, strict=True))(
            jnp.asarray(w_o[0]), jnp.asarray(x[0]), jnp.asarray(y[0])
        )


def test_float64_precision():
    rng = np.random.default_rng(7)
    x, y, w_o = clip_like(rng, 64, 30), clip_like(rng, 64, 30), weights(rng, 16, 64)
    with pytest.raises(ValueError, match="enable_x64"):
        erasepro_solve(jnp.asarray(w_o), jnp.asarray(x), jnp.asarray(y), precision="float64")
    with jax.enable_x64(True):
        w, rep = erasepro_solve(*(jnp.asarray(a, jnp.float64) for a in (w_o, x, y)), precision="float64")
        w32, _ = erasepro_solve(jnp.asarray(w_o), jnp.asarray(x), jnp.asarray(y), precision="float64")
        assert float(rep.residual_target) <= 1e-12
    assert w.dtype == jnp.float64 and w32.dtype == jnp.float32
    assert rel_residual(w, x, f64(w_o)[0] @ f64(y)[0]) <= 1e-12


def uce_reference(w_o, x, y, p, lam, s_e, s_p) -> np.ndarray:
    """The UCE formula B A^-1 evaluated in float64 numpy."""
    w_o, x, y, p = f64(w_o, x, y, p)
    a = lam * np.eye(x.shape[0]) + s_e * x @ x.T + s_p * p @ p.T
    b = w_o @ (lam * np.eye(x.shape[0]) + s_e * y @ x.T + s_p * p @ p.T)
    return np.linalg.solve(a, np.swapaxes(b, -1, -2)).swapaxes(-1, -2)  # A symmetric: W = (A^-1 B^T)^T


def uce_objective(w, w_o, x, y, p, lam, s_e, s_p):
    return (
        lam * jnp.sum((w - w_o) ** 2)
        + s_e * jnp.sum((w @ x - w_o @ y) ** 2)
        + s_p * jnp.sum((w @ p - w_o @ p) ** 2)
    )


@pytest.mark.parametrize(("d_in", "n", "m"), [(64, 5, 20), (256, 100, 40), (32, 30, 60)])
def test_uce_matches_formula_and_minimises_objective(d_in, n, m):
    rng = np.random.default_rng(d_in + m)
    x, y, p = clip_like(rng, d_in, n), clip_like(rng, d_in, n), clip_like(rng, d_in, m)
    w_o = weights(rng, 2, 24, d_in)
    lam, s_e, s_p = 0.5, 1.0, 0.3
    w, rep = uce_solve(*(jnp.asarray(a) for a in (w_o, x, y, p)), preserve_scale=s_p)
    ref = uce_reference(w_o, x, y, p, lam, s_e, s_p)
    assert_close(w, ref, rel=1e-4)
    w64, w_o64, x64, y64, p64 = f64(w, w_o, x, y, p)
    grad = 2 * (
        lam * (w64 - w_o64)
        + s_e * (w64 @ x64 - w_o64 @ y64) @ x64.T
        + s_p * (w64 @ p64 - w_o64 @ p64) @ p64.T
    )
    scale = 2 * s_e * np.abs(w_o64 @ y64 @ x64.T).max()
    assert np.abs(grad).max() <= 1e-5 * scale
    objective = [float(uce_objective(ref[b], w_o64[b], x64, y64, p64, lam, s_e, s_p)) for b in range(2)]
    np.testing.assert_allclose(rep.objective, objective, rtol=1e-4)
    # A few hundred Adam steps from W* never reach a lower objective.
    args = tuple(jnp.asarray(a) for a in (w_o[0], x, y, p))
    opt = optax.adam(1e-3)

    def loss(v):
        return uce_objective(v, *args, lam, s_e, s_p)

    def step(carry, _):
        params, state = carry
        updates, state = opt.update(jax.grad(loss)(params), state)
        params = optax.apply_updates(params, updates)
        return (params, state), loss(params)

    _, losses = jax.jit(lambda w0: jax.lax.scan(step, (w0, opt.init(w0)), length=300))(w[0])
    assert float(losses.min()) >= objective[0] * (1 - 1e-5)


def test_uce_without_preservation_and_checks():
    rng = np.random.default_rng(8)
    x, y, w_o = clip_like(rng, 48, 6), clip_like(rng, 48, 6), weights(rng, 3, 10, 48)
    w, rep = uce_solve(jnp.asarray(w_o), jnp.asarray(x), jnp.asarray(y), lam=0.1, erase_scale=2.0)
    ref = uce_reference(w_o, x, y, np.zeros((48, 0), np.float32), 0.1, 2.0, 0.0)
    assert_close(w, ref, rel=1e-4)
    assert float(rep.residual_preserve.max()) == 0.0 and float(rep.residual_target.max()) < 1
    with pytest.raises(ValueError, match="preserve_scale"):
        uce_solve(jnp.asarray(w_o), jnp.asarray(x), jnp.asarray(y), jnp.asarray(x))
    with pytest.raises(ValueError, match="lam > 0"):
        uce_solve(jnp.asarray(w_o), jnp.asarray(x), jnp.asarray(y), lam=0.0)


@pytest.mark.parametrize("case", ["all", "some_requested", "rank_deficient"])
def test_qr_fast_path_equals_greedy_admission(case):
    from jax_erasepro.erase.solvers import _select_hard, _select_hard_greedy

    rng = np.random.default_rng(3)
    c = rng.standard_normal((48, 20)).astype(np.float32) + 3.0  # a dominant mean direction, as CLIP's
    requested = np.ones(20, bool)
    if case == "some_requested":
        requested[[1, 7, 8, 19]] = False
    if case == "rank_deficient":
        c[:, 5] = c[:, 2] + c[:, 3]
    kept, q, r_inv, tol = _select_hard(jnp.asarray(c), jnp.asarray(requested), jnp.float32(1e-4))
    assert_close(tol, 1e-4 * np.linalg.norm(c, 2), rel=1e-5)
    kept_g, q_g, r_inv_g = _select_hard_greedy(jnp.asarray(c), jnp.asarray(requested), tol)
    np.testing.assert_array_equal(np.asarray(kept), np.asarray(kept_g))
    assert (case == "rank_deficient") == (not bool(kept[5]))
    # the same pseudo-inverse of the admitted columns and the same projector
    assert_close(np.asarray(r_inv @ q.T), np.asarray(r_inv_g @ q_g.T), rel=1e-4)
    assert_close(np.asarray(q @ q.T), np.asarray(q_g @ q_g.T), rel=1e-4)


def test_zero_padding_columns_change_nothing():
    """Shape padding (all-zero columns, not requested) leaves W as the unpadded solve gives it."""
    rng = np.random.default_rng(7)
    d_in, n, pad = 96, 20, 12
    x, y = clip_like(rng, d_in, n), clip_like(rng, d_in, n)
    w_o = weights(rng, 2, 16, d_in)
    w, _ = erasepro_solve(jnp.asarray(w_o), jnp.asarray(x), jnp.asarray(y))
    zeros = np.zeros((d_in, pad), np.float32)
    hard = np.arange(n + pad) < n
    x_pad, y_pad = (jnp.asarray(np.concatenate([a, zeros], 1)) for a in (x, y))
    w_pad, rep = erasepro_solve(jnp.asarray(w_o), x_pad, y_pad, hard=jnp.asarray(hard))
    assert np.asarray(rep.hard).tolist() == hard.tolist()
    assert_close(w_pad, w, rel=1e-6)


@pytest.mark.parametrize("core_deficient", [False, True])
def test_core_columns_stay_hard_when_padding_is_collinear(core_deficient):
    """Requested columns made rank-deficient by near-duplicate 'padding' columns: only the core is hard (all
    of it when it is well conditioned, greedily within it otherwise); padding is fitted in least squares
    and never admitted."""
    rng = np.random.default_rng(11)
    d_in, n_core, n_pad = 64, 6, 20
    core_cols = clip_like(rng, d_in, n_core)
    if core_deficient:
        core_cols[:, 4] = core_cols[:, 1]  # an exact duplicate, as layer-0 EOS columns of equal position
    else:
        core_cols[:, 4] += core_cols[:, 1]  # so t[:, 4] = t[:, 1] below is one more independent target
    pad = core_cols[:, :1] + 1e-7 * rng.standard_normal((d_in, n_pad)).astype(np.float32)
    c = np.concatenate([core_cols, pad], 1)
    t = weights(rng, 8, d_in) @ clip_like(rng, d_in, n_core + n_pad)
    t[:, n_core:] = t[:, :1]  # padding targets consistent with the first core column
    t[:, 4] = t[:, 1]  # and the duplicate's with its original (no effect when there is none)
    w_o = weights(rng, 8, d_in)
    core = np.arange(n_core + n_pad) < n_core
    w, rep = constrained_solve(
        jnp.asarray(w_o), jnp.asarray(c), jnp.asarray(t), core=jnp.asarray(core), n_core=8
    )
    hard = np.asarray(rep.hard)
    expected = core.copy()
    if core_deficient:
        expected[4] = False
    np.testing.assert_array_equal(hard, expected)
    assert rel_residual(w, c[:, hard], t[:, hard]) <= 1e-5
    assert float(rep.residual_soft) <= 1e-3  # the padding sits (nearly) on an admitted column
    # the same hard set as a solve that is told it directly
    w_ref, _ = constrained_solve(jnp.asarray(w_o), jnp.asarray(c), jnp.asarray(t), hard=jnp.asarray(expected))
    assert_close(w, w_ref, rel=1e-4)
