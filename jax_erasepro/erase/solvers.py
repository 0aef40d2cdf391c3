"""Closed-form erasure solvers (ErasePro's constrained edit, UCE): many weights against one factorisation.

Weights are in PyTorch layout ``W`` of shape ``(..., d_out, d_in)`` acting as ``W @ x``; a Flax
``nnx.Linear`` kernel is ``W.T``, so callers pass ``jnp.swapaxes(kernel, -1, -2)`` and transpose back.
Features are columns: ``x``, ``y`` are ``(d_in, N)`` (one column per token), ``preserve`` is ``(d_in, M)``.
Leading axes of ``W`` share one factorisation of the features (the U-Net ``to_k``/``to_v`` of one shape
bucket); features that differ per layer (CLIP's 12 layers) go through ``jax.vmap`` over both arguments.
No solve forms ``C^T C`` or ``X X^T``: hard columns are factorised by blocked Gram-Schmidt (C_h = Q R), soft
ones and UCE's by SVDs with singular values masked below ``rcond * sigma_max``; shapes stay static, all jits.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp
from flax import struct
from jax import Array

from jax_erasepro.errors import EraseError

Precision = Literal["float32", "float64"]

# Singular values below DEFAULT_RCOND * sigma_max count as zero, so a hard set has condition <= 1e4. Measured
# on CLIP-like features (tests/erase/test_solvers.py), float32 then reaches relative residuals of ~1e-6 at
# condition <= 1e3 and ~3e-5 at the cutoff; pass precision="float64" for tighter ones.
DEFAULT_RCOND = 1e-4
SOFT_SIZES = (64, 256)
# Up to this many candidate columns, singular values come from an SVD of a (K, K) triangular factor
# (0.3 ms at K = 77); beyond it, power iteration is cheaper.
EXACT_SVD_MAX = 128  # column counts of the smaller soft-part SVDs (up to all K columns)


class RankDeficientError(EraseError):
    """The columns asked to hold exactly are linearly dependent beyond the rank cutoff."""


@struct.dataclass
class SolveReport:
    """What a constrained solve reached: the columns held exactly, the rank used, residuals per column."""

    hard: Array  # (K,) bool: columns held exactly, W c_k = t_k
    preserved: Array  # (K,) bool: preservation columns (t_k = W_o c_k), for the group residuals
    rank: Array  # (): singular values of the hard columns kept above the cutoff
    sigma_min_kept: Array  # (): smallest kept singular value of the hard columns (0 when none kept)
    condition: Array  # (): largest / smallest kept singular value of the hard columns (0 when none kept)
    column_residual_sq: Array  # (..., K): ||W c_k - t_k||^2 for the returned W
    column_target_sq: Array  # (..., K): ||t_k||^2
    relative_change: Array  # (...,): ||W - W_o||_F / ||W_o||_F

    def residual(self, columns: Array) -> Array:
        """Relative residual ||W C_S - T_S||_F / ||T_S||_F over the columns of a (K,) mask (0 if empty)."""
        num = jnp.sum(jnp.where(columns, self.column_residual_sq, 0), -1)
        den = jnp.sum(jnp.where(columns, self.column_target_sq, 0), -1)
        return jnp.sqrt(num / jnp.maximum(den, jnp.finfo(den.dtype).tiny))

    @property
    def residual_hard(self) -> Array:
        return self.residual(self.hard)

    @property
    def residual_soft(self) -> Array:
        return self.residual(~self.hard)

    @property
    def residual_target(self) -> Array:
        return self.residual(~self.preserved)

    @property
    def residual_preserve(self) -> Array:
        return self.residual(self.preserved)


@struct.dataclass
class UCEReport:
    """UCE's objective at the returned W, its relative change and its residual per column group."""

    objective: Array  # (...,): lam||W - W_o||^2 + s_e ||W X - W_o Y||^2 + s_p ||W P - W_o P||^2
    relative_change: Array  # (...,): ||W - W_o||_F / ||W_o||_F
    residual_target: Array  # (...,): ||W X - W_o Y||_F / ||W_o Y||_F
    residual_preserve: Array  # (...,): ||W P - W_o P||_F / ||W_o P||_F (0 without preserved columns)


def _compute_dtype(precision: Precision) -> jnp.dtype:
    if precision == "float32":
        return jnp.float32
    if precision == "float64":
        if not jax.config.jax_enable_x64:
            raise ValueError(
                "precision='float64' needs 64-bit JAX: call it inside `with jax.enable_x64(True):`"
            )
        return jnp.float64
    raise ValueError(f"precision must be 'float32' or 'float64', got {precision!r}")


def _check_shapes(w_o: Array, c: Array, t: Array | None = None) -> None:
    if c.ndim != 2 or w_o.ndim < 2 or w_o.shape[-1] != c.shape[0]:
        raise ValueError(
            f"need W (..., d_out, d_in) and features (d_in, K); got W {w_o.shape}, features {c.shape}"
        )
    if t is not None and (t.shape[-2:] != (w_o.shape[-2], c.shape[1])):
        raise ValueError(f"targets must be (..., d_out={w_o.shape[-2]}, K={c.shape[1]}), got {t.shape}")


def _ratio(num: Array, den: Array) -> Array:
    return jnp.sqrt(num / jnp.maximum(den, jnp.finfo(den.dtype).tiny))


def _masked_svd(a: Array, tol: Array) -> tuple[Array, Array, Array, Array, Array]:
    """Thin SVD of ``a`` and the reciprocal singular values, zeroed at or below ``tol`` (static shapes)."""
    u, s, vt = jnp.linalg.svd(a, full_matrices=False)
    keep = s > tol
    return u, s, jnp.where(keep, 1 / jnp.where(keep, s, 1), 0), vt, keep


def _sigma_max(c: Array, iterations: int = 64) -> Array:
    """Largest singular value of ``c`` by power iteration on C^T C, approached from below (CLIP-like
    features have a dominant mean direction, so it converges in a few steps)."""
    v = jnp.sum(c * c, 0)  # column norms^2: a start with weight on the dominant direction

    def step(v: Array, _: None) -> tuple[Array, None]:
        v = c.T @ (c @ v)
        return v / jnp.maximum(jnp.linalg.norm(v), jnp.finfo(c.dtype).tiny), None

    v, _ = jax.lax.scan(step, v / jnp.maximum(jnp.linalg.norm(v), jnp.finfo(c.dtype).tiny), length=iterations)
    return jnp.linalg.norm(c @ v)


def _select_hard(
    c: Array, requested: Array, rcond: Array, core: Array | None = None, n_core: int | None = None
) -> tuple[Array, Array, Array, Array]:
    """The hard columns of ``c``, their Q (d, K) and R^-1 (K, K) (zeros elsewhere), and the cutoff
    ``tol = rcond * sigma_max(c)``, by one Householder QR in the common cases.

    Greedy admission keeps requested columns in order while ||R^-1||_F <= 1 / tol over those kept; the R^-1
    of a prefix is the leading block of the whole R^-1, so that norm only grows along the sequence and when
    the whole requested set passes, greedy admits all of it. That common case (N <= d_in, full rank) then
    costs one QR of the columns, requested ones first (whose leading block of R is their own R), instead of
    K sequential steps; R also gives sigma_max(c). Q R differs from Gram-Schmidt's by column signs only,
    which C_h^+ = R^-1 Q^T and the projector Q Q^T do not see.
    When the requested set fails and ``core`` (K,) marks a subset (the columns that matter most: concept
    tokens, EOS, preserved ones; not padding), only the requested core may be hard: all of it when its
    leading block passes (free from the same R), otherwise greedily among the first ``n_core`` (static)
    columns of that order, which must hold every requested core column. Default: the core is the whole
    requested set (plain greedy admission).
    """
    d, k = c.shape
    if k > d:
        tol = rcond * _sigma_max(c)
        want = requested if core is None else requested & core
        return (*_select_hard_greedy(c, want, tol), tol)
    core = requested if core is None else requested & core
    perm = jnp.argsort(jnp.where(core, 0, jnp.where(requested, 1, 2)), stable=True)  # core, rest, others
    lead = jnp.arange(k) < jnp.sum(requested)
    lead_core = jnp.arange(k) < jnp.sum(core)
    c_perm = c[:, perm]
    q, r = jnp.linalg.qr(c_perm)
    s_max = jnp.linalg.svd(r, compute_uv=False)[0] if k <= EXACT_SVD_MAX else _sigma_max(r)
    tol = rcond * s_max
    block = lead[:, None] & lead[None, :]
    r = jnp.where(block, r, jnp.eye(k, dtype=c.dtype))  # the requested block; identity elsewhere
    r_inv = jnp.where(block, jax.scipy.linalg.solve_triangular(r, jnp.eye(k, dtype=c.dtype), lower=False), 0)
    diag_ok = jnp.diagonal(r) != 0

    def passes(mask: Array) -> Array:
        fro2 = jnp.sum(jnp.where(mask[:, None] & mask, r_inv, 0) ** 2)  # a leading block of R^-1 inverts
        return jnp.all(diag_ok | ~mask) & jnp.isfinite(fro2) & (fro2 * tol**2 <= 1)  # its block of R

    back = jnp.argsort(perm)

    def held(mask: Array) -> Callable[[None], tuple[Array, Array, Array]]:
        sub = mask[:, None] & mask
        return lambda _: (mask[back], jnp.where(mask, q, 0)[:, back], jnp.where(sub, r_inv, 0)[back][:, back])

    def greedy(_: None) -> tuple[Array, Array, Array]:
        m = k if n_core is None else min(n_core, k)
        kept, q_g, r_inv_g = _select_hard_greedy(c_perm[:, :m], lead_core[:m], tol)
        kept = jnp.pad(kept, (0, k - m))
        q_g, r_inv_g = jnp.pad(q_g, ((0, 0), (0, k - m))), jnp.pad(r_inv_g, ((0, k - m), (0, k - m)))
        return kept[back], q_g[:, back], r_inv_g[back][:, back]

    branch = jnp.where(passes(lead), 0, jnp.where(passes(lead_core), 1, 2))
    return (*jax.lax.switch(branch, [held(lead), held(lead_core), greedy], None), tol)


def _select_hard_greedy(
    c: Array, requested: Array, tol: Array, block: int = 64
) -> tuple[Array, Array, Array]:
    """Greedy admission of ``c``'s columns in order while ||C_h^+||_F <= 1 / tol, so sigma_min(C_h) >= tol.

    Gram-Schmidt grows C_h = Q R and R^-1 (whose Frobenius norm is ||C_h^+||_F) one column at a time, in
    blocks: each block is projected on the admitted basis with two GEMMs, then scanned column by column with
    only block-sized carries. Returns the admitted mask (K,), Q (d, K) and R^-1 (K, K), both with zeros in
    the rejected columns (and rows), so C_h^+ = R^-1 Q^T with the rejected columns zeroed.
    """
    d, k = c.shape
    nb = -(-k // block)
    c = jnp.pad(c, ((0, 0), (0, nb * block - k)))
    requested = jnp.pad(requested, (0, nb * block - k))
    kp = nb * block

    def admit_block(carry: tuple, b: Array) -> tuple[tuple, None]:
        q, r_inv, fro2 = carry
        cb = jax.lax.dynamic_slice_in_dim(c, b * block, block, 1)
        p1 = q.T @ cb
        v = cb - q @ p1
        p2 = q.T @ v  # second pass: the basis stays orthogonal to working precision
        v, a = v - q @ p2, r_inv @ (p1 + p2)  # a = R^-1 P: the block's coefficients in R^-1 terms
        req = jax.lax.dynamic_slice_in_dim(requested, b * block, block)

        def admit(inner: tuple, j: Array) -> tuple[tuple, None]:
            u, s_inv, fro2 = inner
            s1 = u.T @ v[:, j]
            w = v[:, j] - u @ s1
            s2 = u.T @ w
            w, t = w - u @ s2, s_inv @ (s1 + s2)
            rho = jnp.linalg.norm(w)
            safe = jnp.where(rho > 0, rho, 1)
            # new column of R^-1: -[R^-1 P_j - A t; t] / rho, with 1 / rho on the diagonal
            new_fro2 = fro2 + (jnp.sum((a[:, j] - a @ t) ** 2) + jnp.sum(t**2) + 1) / safe**2
            ok = req[j] & (rho > 0) & (new_fro2 * tol**2 <= 1)
            col = (-t / safe).at[j].set(1 / safe)
            inner = (
                u.at[:, j].set(jnp.where(ok, w / safe, 0)),
                s_inv.at[:, j].set(jnp.where(ok, col, 0)),
                jnp.where(ok, new_fro2, fro2),
            )
            return inner, None

        init = (jnp.zeros((d, block), c.dtype), jnp.zeros((block, block), c.dtype), fro2)
        (u, s_inv, fro2), _ = jax.lax.scan(admit, init, jnp.arange(block))
        # R_new^-1 = [[R^-1, -A S^-1], [0, S^-1]]: the block's columns of R^-1 (rows of A at the block are 0)
        cols = jax.lax.dynamic_update_slice_in_dim(-(a @ s_inv), s_inv, b * block, 0)
        q = jax.lax.dynamic_update_slice_in_dim(q, u, b * block, 1)
        return (q, jax.lax.dynamic_update_slice_in_dim(r_inv, cols, b * block, 1), fro2), None

    init = (jnp.zeros((d, kp), c.dtype), jnp.zeros((kp, kp), c.dtype), jnp.zeros((), c.dtype))
    (q, r_inv, _), _ = jax.lax.scan(admit_block, init, jnp.arange(nb))
    kept = jnp.diagonal(r_inv) != 0
    return kept[:k], q[:, :k], r_inv[:k, :k]


def _hard_edit(w0: Array, c: Array, resid: Array, kept: Array, q: Array, r_inv: Array, order: Array, h: int):
    """D_h = R_h C_h^+, the minimal-norm D with D C_h = R_h over at most ``h`` (static) hard columns,
    gathered first so every product with the hard set is h wide, plus one step of iterative refinement on
    the rounded weight (residual to its floor): D_h = R_h C_h^+ + E_h C_h^+."""
    sel = jnp.argsort(~kept, stable=True)[:h]  # the kept columns, in sorted order, then others
    held = kept[sel]
    q_h, r_inv_h = q[:, sel], r_inv[sel][:, sel]  # (d, h), (h, h): zero off the kept columns
    pinv = r_inv_h @ q_h.T  # (h, d): C_h^+
    cols = order[sel]
    c_h = jnp.where(held, c[:, cols], 0)
    r_hard = jnp.where(held, resid[..., cols], 0)
    d_hard = r_hard @ pinv
    e_hard = r_hard - ((w0 + d_hard) - w0) @ c_h  # (..., d_out, h)
    return d_hard + e_hard @ pinv, r_hard, e_hard, q_h, pinv, c_h, r_inv_h


def _soft_edit(
    c: Array,
    resid: Array,
    skip: Array,
    r_hard: Array,
    e_hard: Array,
    q_h: Array,
    pinv: Array,
    tol: Array,
    m: int,
) -> Array:
    """D_s with rows orthogonal to span(C_h) = span(Q_h) (so D_s C_h = 0) fitting what is left of the soft
    columns in least squares with minimal norm: D_s = (R_s - D_h C_s) B^+, B = (I - Q_h Q_h^T) C_s. Only the
    soft columns enter B (zero columns add nothing to B^+): the first ``m`` (static) after a stable sort."""
    idx = jnp.argsort(skip, stable=True)[:m]
    c_s = jnp.where(skip[idx], 0, c[:, idx])
    pc = pinv @ c_s  # (h, m): D_h C_s = R_h pc + E_h pc, h wide
    e = jnp.where(skip[idx], 0, resid[..., idx]) - (r_hard @ pc + e_hard @ pc)
    ub, _, inv_b, vbt, _ = _masked_svd(c_s - q_h @ (q_h.T @ c_s), tol)
    d_soft = ((e @ vbt.T) * inv_b) @ ub.T
    return d_soft - (d_soft @ q_h) @ q_h.T  # remove the rounding-level leak into span(C_h)


def _hard_extremes(r_inv_h: Array, c_h: Array, dtype: jnp.dtype) -> tuple[Array, Array]:
    """sigma_min and sigma_max of the hard block, from 1 / ||R^-1||_2 (no SVD of the block past 128)."""
    tiny = jnp.finfo(dtype).tiny
    if r_inv_h.shape[-1] <= EXACT_SVD_MAX:  # R^-1's nonzero singular values are 1 / those of C_h
        sv = jnp.linalg.svd(r_inv_h, compute_uv=False)
        return 1 / jnp.maximum(sv[0], tiny), 1 / jnp.maximum(jnp.min(jnp.where(sv > 0, sv, jnp.inf)), tiny)
    return 1 / jnp.maximum(_sigma_max(r_inv_h, 256), tiny), _sigma_max(c_h, 256)


def _edit(h: int, sizes: list[int], w0, c, resid, kept, q, r_inv, order, skip, tol, dtype) -> tuple:
    """D = W - W_o with at most ``h`` hard columns and the soft rest, and the hard set's extreme singular
    values; the soft fit is as wide as the smallest of ``sizes`` that holds every soft column."""
    d_hard, r_hard, e_hard, q_h, pinv, c_h, r_inv_h = _hard_edit(w0, c, resid, kept, q, r_inv, order, h)
    n_soft = jnp.sum(~skip)
    soft = [partial(_soft_edit, c, resid, skip, r_hard, e_hard, q_h, pinv, tol, m) for m in sizes]
    branch = jnp.where(n_soft == 0, 0, 1 + jnp.sum(jnp.asarray(sizes) < n_soft))
    d_soft = jax.lax.switch(branch, [lambda: jnp.zeros_like(d_hard), *soft])
    return d_hard + d_soft, *_hard_extremes(r_inv_h, c_h, dtype)


@partial(jax.jit, static_argnames=("precision", "candidates", "n_core"))
def _constrained(
    w_o: Array,
    c: Array,
    t: Array,
    hard: Array,
    priority: Array,
    preserved: Array,
    rcond: Array,
    precision: Precision,
    candidates: int | None = None,
    core: Array | None = None,
    n_core: int | None = None,
) -> tuple[Array, SolveReport]:
    """Admit the hard columns (``_select_hard``), then the edit of the narrowest program that holds them."""
    dtype = _compute_dtype(precision)
    w0, c, t = w_o.astype(dtype), c.astype(dtype), t.astype(dtype)
    k = c.shape[1]
    n_c = k if candidates is None else candidates  # only the first n_c columns can be hard
    order = jnp.argsort(priority[:n_c], descending=True, stable=True)
    c_sorted = c[:, order]
    core_sorted = None if core is None else core[:n_c][order]
    kept, q, r_inv, tol = _select_hard(c_sorted, hard[:n_c][order], rcond, core_sorted, n_core)
    hard = jnp.zeros(k, bool).at[order].set(kept)
    resid = t - w0 @ c  # (..., d_out, K): what the edit D = W - W_o must add on each column
    # All-zero columns (callers' shape padding) fit nothing whatever D is: they are left out of the soft fit.
    skip = hard | ~jnp.any(c != 0, axis=0)
    sizes = sorted({min(m, k) for m in (*SOFT_SIZES, k)})
    rank = jnp.sum(kept)
    # a narrow program when only the core could be held (n_core bounds it), the full width otherwise
    widths = [n_c] if n_core is None or n_core >= n_c else [n_core, n_c]
    edits = [partial(_edit, h, sizes, w0, c, resid, kept, q, r_inv, order, skip, tol, dtype) for h in widths]
    d_edit, s_min, s_max = jax.lax.switch(jnp.sum(jnp.asarray(widths[:-1]) < rank), edits)
    w = (w0 + d_edit).astype(w_o.dtype)
    delta = w.astype(dtype) - w0
    report = SolveReport(
        hard=hard,
        preserved=preserved,
        rank=rank,
        sigma_min_kept=jnp.where(rank > 0, s_min, 0),
        condition=jnp.where(rank > 0, s_max / s_min, 0),
        column_residual_sq=jnp.sum((delta @ c - resid) ** 2, -2),
        column_target_sq=jnp.sum(t**2, -2),
        relative_change=_ratio(jnp.sum(delta**2, (-2, -1)), jnp.sum(w0**2, (-2, -1))),
    )
    return w, report


def constrained_solve(
    w_o: Array,
    c: Array,
    t: Array,
    *,
    hard: Array | None = None,
    priority: Array | None = None,
    preserved: Array | None = None,
    rcond: float = DEFAULT_RCOND,
    precision: Precision = "float32",
    strict: bool = False,
    candidates: int | None = None,
    core: Array | None = None,
    n_core: int | None = None,
) -> tuple[Array, SolveReport]:
    """Minimal ||W - W_o||_F with W c_k = t_k exactly on hard columns and least squares on the others.

    ``w_o`` (..., d_out, d_in) and ``t`` (..., d_out, K) share one factorisation of ``c`` (d_in, K).
    ``hard`` (K,) bool (default all) asks for exact columns; they are admitted in decreasing ``priority``
    (K,) (default: column order) while ``||C_h^+||_F <= 1 / (rcond * sigma_max(c))`` (so cond(C_h) <=
    1 / rcond; sigma_max by power iteration); the rest become soft. Among the minimisers of the soft
    residual, W is the closest to W_o.
    ``strict`` raises RankDeficientError when a requested hard column could not be held (host check).
    ``precision="float64"`` needs ``jax.enable_x64``; W is returned in ``w_o``'s dtype.
    ``candidates`` (static) lets only the first that many columns be hard, with sigma_max taken over them:
    the admission costs O(d K^2), so callers with many soft columns bound it this way.
    ``core`` (K,) bool: when the requested set is rank-deficient, only its core may be hard (all of it
    when well conditioned, else greedily among at most ``n_core`` (static) columns of the core, which come
    first in priority order); the rest is fitted in least squares. Sequential greedy admission over many
    nearly collinear columns (CLIP's padding) is what it spares. Default: the whole requested set.
    """
    _check_shapes(w_o, c, t)
    _compute_dtype(precision)
    k = c.shape[1]
    requested = jnp.ones(k, bool) if hard is None else jnp.asarray(hard, bool)
    priority = jnp.arange(k, 0, -1) if priority is None else jnp.asarray(priority)
    preserved = jnp.zeros(k, bool) if preserved is None else jnp.asarray(preserved, bool)
    if candidates is not None and not 1 <= candidates <= k:
        raise ValueError(f"candidates must be in [1, {k}], got {candidates}")
    core = None if core is None else jnp.asarray(core, bool)
    concrete = not any(isinstance(a, jax.core.Tracer) for a in (core, requested))
    if core is not None and n_core is not None and concrete:
        n = int(jnp.sum(core & requested))
        if n > n_core:
            raise ValueError(f"n_core={n_core} is smaller than the {n} core columns")
    w, report = _constrained(
        w_o, c, t, requested, priority, preserved, rcond, precision, candidates, core, n_core
    )
    if strict:
        _check_rank(requested, report, rcond)
    return w, report


def _check_rank(requested: Array, report: SolveReport, rcond: float) -> None:
    if isinstance(report.rank, jax.core.Tracer):
        raise ValueError(
            "strict=True checks the rank on the host: call it outside jit/vmap or check report.rank"
        )
    n, held, rank = int(jnp.sum(requested)), int(jnp.sum(report.hard)), int(report.rank)
    if held < n or rank < n:
        raise RankDeficientError(
            f"the {n} hard columns have rank {min(held, rank)} at rcond={rcond:g}: mark fewer columns hard "
            "or pass strict=False to fit the rest in least squares"
        )


def erasepro_solve(
    w_o: Array,
    x: Array,
    y: Array,
    preserve: Array | None = None,
    *,
    hard: Array | None = None,
    priority: Array | None = None,
    rcond: float = DEFAULT_RCOND,
    precision: Precision = "float32",
    strict: bool = False,
    candidates: int | None = None,
) -> tuple[Array, SolveReport]:
    """ErasePro edit: W x_i = W_o y_i (targets map to their anchors), W p_j = W_o p_j, min ||W - W_o||_F.

    Columns are C = [x, preserve]. ``hard`` (N,) marks the target columns to hold exactly (default all);
    preserved columns are always hard. ``priority`` (N + M,) orders admission when the rank runs out
    (default: target columns in order, then preserved ones). See ``constrained_solve`` for the rest.
    """
    if x.shape != y.shape:
        raise ValueError(f"targets x {x.shape} and anchors y {y.shape} must have the same shape")
    d_in, n = x.shape
    preserve = jnp.zeros((d_in, 0), x.dtype) if preserve is None else preserve
    c = jnp.concatenate([x, preserve], axis=1)
    _check_shapes(w_o, c)
    dtype = _compute_dtype(precision)
    t = w_o.astype(dtype) @ jnp.concatenate([y, preserve], axis=1).astype(dtype)
    m = preserve.shape[1]
    target_hard = jnp.ones(n, bool) if hard is None else jnp.asarray(hard, bool)
    return constrained_solve(
        w_o,
        c,
        t,
        hard=jnp.concatenate([target_hard, jnp.ones(m, bool)]),
        priority=priority,
        preserved=jnp.arange(n + m) >= n,
        rcond=rcond,
        precision=precision,
        strict=strict,
        candidates=candidates,
    )


@partial(jax.jit, static_argnames=("precision",))
def _uce(
    w_o: Array, x: Array, y: Array, p: Array, lam: Array, s_e: Array, s_p: Array, precision: Precision
) -> tuple[Array, UCEReport]:
    dtype = _compute_dtype(precision)
    w0, x, y, p = (a.astype(dtype) for a in (w_o, x, y, p))
    r_x = w0 @ (y - x)  # W_o (Y - X): the target offsets on the erased columns
    # W = W_o + R~ K~^+_lam with K~ = [sqrt(s_e) X, sqrt(s_p) P], R~ = [sqrt(s_e) R_x, 0] and the ridge
    # inverse K~^T (lam I + K~ K~^T)^-1 = V diag(s / (s^2 + lam)) U^T (push-through identity).
    k_t = jnp.concatenate([jnp.sqrt(s_e) * x, jnp.sqrt(s_p) * p], axis=1)
    r_t = jnp.concatenate([jnp.sqrt(s_e) * r_x, jnp.zeros(r_x.shape[:-1] + p.shape[1:], dtype)], axis=-1)
    u, s, vt = jnp.linalg.svd(k_t, full_matrices=False)
    w = (w0 + ((r_t @ vt.T) * (s / (s**2 + lam))) @ u.T).astype(w_o.dtype)

    delta = w.astype(dtype) - w0
    change_sq, res_x_sq, res_p_sq = (jnp.sum(a**2, (-2, -1)) for a in (delta, delta @ x - r_x, delta @ p))
    report = UCEReport(
        objective=lam * change_sq + s_e * res_x_sq + s_p * res_p_sq,
        relative_change=_ratio(change_sq, jnp.sum(w0**2, (-2, -1))),
        residual_target=_ratio(res_x_sq, jnp.sum((w0 @ y) ** 2, (-2, -1))),
        residual_preserve=_ratio(res_p_sq, jnp.sum((w0 @ p) ** 2, (-2, -1))),
    )
    return w, report


def uce_solve(
    w_o: Array,
    x: Array,
    y: Array,
    preserve: Array | None = None,
    *,
    lam: float = 0.5,
    erase_scale: float = 1.0,
    preserve_scale: float | None = None,
    precision: Precision = "float32",
) -> tuple[Array, UCEReport]:
    """UCE (Gandikota et al.) W = (lam W_o + s_e W_o Y X^T + s_p W_o P P^T)(lam I + s_e X X^T + s_p P P^T)^-1.

    Evaluated as the ridge solve W_o + R~ V diag(s / (s^2 + lam)) U^T from the SVD of the scaled features,
    which is exact for lam > 0, bounded by 1 / (2 sqrt(lam)) and never forms X X^T.
    """
    if x.shape != y.shape:
        raise ValueError(f"targets x {x.shape} and anchors y {y.shape} must have the same shape")
    _check_shapes(w_o, x)
    _compute_dtype(precision)
    if not isinstance(lam, jax.core.Tracer) and lam <= 0:
        raise ValueError(f"UCE needs lam > 0, got {lam}")
    if preserve is not None and preserve_scale is None:
        raise ValueError("preserve columns given without preserve_scale")
    preserve = jnp.zeros((x.shape[0], 0), x.dtype) if preserve is None else preserve
    s_p = 0.0 if preserve_scale is None else preserve_scale
    return _uce(w_o, x, y, preserve, lam, erase_scale, s_p, precision)
