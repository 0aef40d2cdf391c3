"""ErasePro (Algorithms 1 and 2): progressive hard-constrained edits of CLIP q/k/v, then U-Net to_k/to_v.

Anchor features come from the ORIGINAL text encoder, run once. The target (and preserved) prompts then go
through the text encoder one layer at a time inside ONE ``lax.scan``: layer i's q/k/v (one shared input,
``layer_norm1(h)``, so one factorisation serves all three) are solved so ``W x = W_o y`` on every column,
and the UPDATED layer produces the next layer's target features. Finally the U-Net's cross-attention
``to_k``/``to_v`` are solved with the erased encoder's output as X. The edit is linear in W_o (targets are
``W_o y``), so each solve yields one operator P with ``W = W_o + W_o (Y - X) P`` for every weight reading
those features: one factorisation for q/k/v, one for all U-Net buckets.
Preserved prompts are columns whose anchor is themselves in the original model: ``W x_edited = W_o x_orig``
pulls them back to exactly where they were even if an earlier layer could only fit them in least squares.
When there are more columns than ``d_in``, only the first ``d_in`` (by priority) may be hard; the rest are
compressed exactly (``||[W, -W_o] M||_F`` is unchanged by an orthogonal mix of M's columns, M = [X; Y]) into
at most ``2 d_in`` least-squares columns, so the solve costs O(d_in^2 N), not O(N^2).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_erasepro.erase.columns import CONCEPT, KINDS, PADDING, Columns, EraseError, build_columns
from jax_erasepro.erase.layers import Bucket, qkv_keys, replace_buckets, replace_qkv, unet_cross_attention
from jax_erasepro.erase.methods import Request, check_choices, option
from jax_erasepro.erase.report import EraseReport
from jax_erasepro.erase.retain import default_retain
from jax_erasepro.erase.solvers import DEFAULT_RCOND, constrained_solve
from jax_erasepro.sd import StableDiffusion
from jax_erasepro.tokenizer import tokenize

DEFAULT_PROMPTS = ("{}", "a photo of {}", "a painting by {}", "art by {}", "an image of {}")
FORMS = ("protected", "paper")
# The protected form starts at the second encoder layer: the first one's inputs are bare token + position
# embeddings, which a retain set of a few dozen prompts spans whole (77 positions, hundreds of tokens), so
# whitening leaves no quiet direction there. Measured on shapes-sd from layer 1: "heart" -> "circle" edits
# that layer by ||dW|| / ||W|| = 37 and others' accuracy falls from 0.87 to 0.04 (from layer 2: 0.75, 0.83).
PROTECTED_START = 2
# The protected form's rank cutoff: hard columns only while cond <= 10, and the soft fit truncated there.
# On shapes-sd (docs/RESULTS.md) 1e-4 held many near-collinear template columns exactly and moved other
# prompts (five characters at once: others' accuracy 0.81 -> 0.50, CLIP O 0.82); 0.1 gives 0.69 / 0.96.
PROTECTED_RCOND = 0.1
LARGE_CHANGE = 1.0  # relative change of one weight above which the report warns
DEFAULT_RIDGE = 1e-2
# Algorithm 2 presets: k (first paired tokens) and s (first edited text-encoder layer, 1-based, of 12).
IMPLICIT_PRESETS = {"weak": (5, 5), "strong": (8, 1)}
STAGES = ("all", "text_encoder", "unet")
REST = len(KINDS)  # group index of the compressed least-squares columns


RETAIN_BUCKET = 16  # retain prompts are padded to a multiple of this (masked rows)
COLUMN_BUCKET = 32  # column counts are padded to a multiple of this (masked columns; 77 -> 96)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad_rows(ids: np.ndarray) -> np.ndarray:
    """Token rows as they are up to 8, then padded with zero rows to a multiple of 4: each padded row costs a
    whole forward pass (5 templates padded to 8 took 10-15% of a 1-concept erase), a new shape a compile."""
    n = ids.shape[0]
    rows = n if n <= 8 else _round_up(n, 4)
    return np.pad(ids, ((0, rows - n), (0, 0)))


def _compress(fx: jax.Array, fy: jax.Array, n_cand: int) -> tuple[jax.Array, jax.Array]:
    """(N, d) row features -> (d, K) columns: the first ``n_cand`` kept, the rest mixed into <= 2d columns."""
    x, y = fx.T, fy.T
    if n_cand >= fx.shape[0]:
        return x, y
    rest = jnp.concatenate([fx[n_cand:], fy[n_cand:]], axis=1)  # (N - n_cand, 2d) = M^T
    r = jnp.linalg.qr(rest, mode="r")  # M = r^T Q^T, so ||A M||_F = ||A r^T||_F
    d = fx.shape[1]
    return jnp.concatenate([x[:, :n_cand], r[:, :d].T], 1), jnp.concatenate([y[:, :n_cand], r[:, d:].T], 1)


def _whitener(gram: jax.Array, ridge: float) -> jax.Array:
    """S = M^(-1/2) for M = G + ridge * mean(eig(G)) * I, G = R^T R / n the retain features' second moment.

    Minimising ||dW M^(1/2)||_F = ||dW||_F in the coordinates x' = S x puts the edit where retain features
    have little energy (the idea of SPEED's null-space projection, with a ridge instead of a hard cutoff).
    M is formed (d x d) rather than R decomposed: R has thousands of rows (every position of every retain
    prompt; an SVD of R took 5x the eigh on SD v1.4). The ridge keeps M's smallest eigenvalue at lam, so the
    squared condition number only blurs directions the ridge already dominates; the edit's hard columns
    stay exact either way (the whitener only weighs the minimum-norm part)."""
    lam = ridge * jnp.trace(gram) / gram.shape[0]
    energy, v = jnp.linalg.eigh(gram + lam * jnp.eye(gram.shape[0], dtype=gram.dtype))
    return (v * jnp.maximum(energy, lam) ** -0.5) @ v.T


def _second_moment(r: jax.Array) -> jax.Array:
    """R^T R / n of (n, d) rows, at full float32 precision."""
    return jnp.matmul(r.T, r, precision=jax.lax.Precision.HIGHEST) / r.shape[0]


def _factored(x: jax.Array) -> bool:
    """Whether the edit operator of columns ``x`` (d_in, K) is P (K < d_in) rather than G (see below)."""
    return x.shape[1] < x.shape[0]


def _edit_operator(
    x: jax.Array,
    y: jax.Array,
    requested: jax.Array,
    rcond: float,
    core: jax.Array | None = None,
    n_core: int | None = None,
    whiten: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The ErasePro edit of EVERY W_o reading these columns, as one operator: ``_apply`` makes W from it.

    The targets are t = W_o y, so the minimal edit is linear in the residuals W_o (Y - X) row by row:
    D = W_o (Y - X) P, with P (K, d_in) (hard columns admitted, rank cutoff, soft fit) depending on X
    alone. With K < d_in the operator is P itself (the solve with targets I_K); otherwise it is
    G = (Y - X) P (d_in, d_in; the solve with W_o = 0 and targets Y - X), whichever is smaller. One
    factorisation then serves q/k/v, or every U-Net bucket. When the requested columns are rank-deficient
    only ``core`` (not padding) may be hard (``constrained_solve``). With ``whiten`` (S, see ``_whitener``)
    the solve runs on S X and the operator is multiplied by S: the minimal ||dW M^(1/2)|| instead of
    ||dW||. Returns the operator, the hard mask (K,) and the rank held.
    """
    d, k = x.shape
    xs = x if whiten is None else whiten @ x
    n_cand = requested.shape[0]
    hard = jnp.concatenate([requested, jnp.zeros(k - n_cand, bool)])
    if _factored(x):
        zero, t = jnp.zeros((k, d), x.dtype), jnp.eye(k, dtype=x.dtype)
    else:
        zero, t = jnp.zeros((d, d), x.dtype), y - x
    op, rep = constrained_solve(
        zero, xs, t, hard=hard, rcond=rcond, candidates=n_cand, core=core, n_core=n_core
    )
    return (op if whiten is None else op @ whiten), rep.hard, rep.rank


def _apply(
    k_o: jax.Array,
    op: jax.Array,
    x: jax.Array,
    y: jax.Array,
    hard: jax.Array,
    rank: jax.Array,
    kind: jax.Array,
    feature_distance: jax.Array,
    retain: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The (B, d_in, d_out) Flax kernels ``k_o`` (W_o^T) edited by ``_edit_operator``'s operator, with
    metrics for the report; residuals are those of the stored W: ||W x_j - W_o y_j|| over ||W_o y_j||;
    ``retain_change`` is ||dW R|| / ||W_o R|| over the retain features R, from their second moment
    ``retain`` (d_in, d_in) = R^T R / n (zeros without any): ||dW R||^2 = n tr(dW G dW^T).

    Everything stays in kernel layout (products with transposed operands are GEMM flags, not copies), so
    no weight is ever transposed in memory."""
    before = jnp.einsum("dk,bde->bke", x - y, k_o)  # (B, K, d_out): (W_o x - W_o y)^T, before the edit
    if _factored(x):  # K^T = K_o^T - op^T before^T  <=>  W = W_o - before op
        k = k_o - jnp.einsum("kd,bke->bde", op, before)
    else:  # W = W_o + W_o G  <=>  K = K_o + G^T K_o
        k = k_o + jnp.einsum("cd,bce->bde", op, k_o)
    delta = k - k_o
    residual_sq = jnp.sum((jnp.einsum("dk,bde->bke", x, delta) + before) ** 2, -1)  # (B, K)
    target_sq = jnp.sum(jnp.einsum("dk,bde->bke", y, k_o) ** 2, -1)
    n_cand, n_cols = kind.shape[0], x.shape[1]
    groups = jnp.concatenate([kind, jnp.full(n_cols - n_cand, REST, kind.dtype)])

    def rel(num: jax.Array, mask: jax.Array) -> jax.Array:
        den = jnp.sum(jnp.where(mask, target_sq, 0), -1)
        return jnp.sqrt(jnp.sum(jnp.where(mask, num, 0), -1) / jnp.maximum(den, jnp.finfo(den.dtype).tiny))

    everything = jnp.ones(n_cols, bool)
    change_sq, base_sq = jnp.sum(delta**2, (-2, -1)), jnp.sum(k_o**2, (-2, -1))
    metrics = {
        "residual_before": rel(jnp.sum(before**2, -1), everything),
        "residual_after": rel(residual_sq, everything),
        "residual_hard": rel(residual_sq, hard),
        "residual_soft": rel(residual_sq, ~hard),
        "residual_groups": jnp.stack([rel(residual_sq, groups == g) for g in range(REST + 1)], -1),
        "relative_change": jnp.sqrt(change_sq / jnp.maximum(base_sq, jnp.finfo(base_sq.dtype).tiny)),
        "retain_change": jnp.sqrt(
            jnp.sum(jnp.einsum("cd,bde->bce", retain, delta) * delta, (-2, -1))
            / jnp.maximum(jnp.sum(jnp.einsum("cd,bde->bce", retain, k_o) * k_o, (-2, -1)), 1e-30)
        ),
        "n_hard": jnp.sum(hard),
        "rank": rank,
        "feature_distance": feature_distance,
        "finite": jnp.all(jnp.isfinite(x)) & jnp.all(jnp.isfinite(y)) & jnp.all(jnp.isfinite(k)),
    }
    return k, metrics


def _columns(hx: jax.Array, hy: jax.Array, cols: dict[str, jax.Array], n_cand: int) -> tuple:
    """Gathered, masked and compressed (d, K) columns of two hidden-state batches, and their distance."""
    real = cols["real"][:, None]
    fx = jnp.where(real, hx[cols["x_row"], cols["x_pos"]], 0)
    fy = jnp.where(real, hy[cols["y_row"], cols["y_pos"]], 0)
    target = ((cols["kind"] == CONCEPT) | (cols["kind"] == PADDING))[:, None]
    dist = jnp.sqrt(jnp.sum(jnp.where(target, (fx - fy) ** 2, 0)) / jnp.sum(jnp.where(target, fy**2, 0)))
    return *_compress(fx, fy, n_cand), dist


@partial(jax.jit, static_argnames="graphdef")
def _anchor_states(params: nnx.State, ids: jax.Array, *, graphdef: nnx.GraphDef) -> tuple[jax.Array, ...]:
    """The original encoder on the anchor rows: (L+1, R, T, d) hidden states and the final (R, T, d)."""
    last, states = nnx.merge(graphdef, params)(ids, output_hidden_states=True)
    return states, last


@partial(
    jax.jit,
    static_argnames=(
        "graphdef",
        "start",
        "n_cand",
        "n_core",
        "rcond",
        "edit_text",
        "edit_unet",
        "unroll",
        "n_retain",
        "ridge",
        "weigh",
    ),
)
def _progressive(
    params: nnx.State,
    unet_weights: tuple[jax.Array, ...],
    x_ids: jax.Array,
    y_states: jax.Array,
    y_last: jax.Array,
    cols: dict[str, jax.Array],
    *,
    graphdef: nnx.GraphDef,
    start: int,
    n_cand: int,
    n_core: int,
    rcond: float,
    edit_text: bool,
    edit_unet: bool,
    unroll: bool,
    n_retain: int,
    ridge: float,
    weigh: bool,
) -> tuple[jax.Array | None, tuple[jax.Array, ...], dict, list[dict]]:
    """Algorithm 1: text-encoder layers [start, L) edited in one scan, then the U-Net buckets.

    The last ``n_retain`` rows of ``x_ids`` are the retain prompts: with ``weigh`` each solve is whitened
    by their features at that layer, all positions (``_whitener``), in the model as edited so far; either
    way the report measures the change on them."""
    te = nnx.merge(graphdef, params)
    layer_def, stacked = nnx.split(te.encoder.layers)
    h = te.embeddings(x_ids)
    head = jax.tree.map(lambda a: a[:start], stacked)
    h, _ = jax.lax.scan(lambda h, p: (nnx.merge(layer_def, p)(h), None), h, head)
    kind, requested = cols["kind"][:n_cand], cols["requested"][:n_cand]
    core = kind != PADDING  # what stays hard when the rank runs out (n_core bounds its count)
    # layer 0 sees (token, position) only: target columns sharing one with a preserved column yield there
    first_soft = cols["embedding_conflict"][:n_cand] & (start == 0)

    def retained(features: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """The retain rows' second moment (d, d) at this layer, and the whitener from it."""
        d = features.shape[-1]
        if n_retain == 0:
            return jnp.zeros((d, d), features.dtype), None
        real = cols["retain_real"][:, None, None]  # padded rows are zeros: they change no sum
        gram = _second_moment(jnp.where(real, features[-n_retain:], 0).reshape(-1, d))
        return gram, _whitener(gram, ridge) if weigh else None

    def step(h: jax.Array, xs: tuple) -> tuple[jax.Array, tuple]:
        layer_params, hy, first = xs
        layer = nnx.merge(layer_def, layer_params)
        features = layer.attn_input(h)
        x, y, dist = _columns(features, layer.attn_input(hy), cols, n_cand)
        r, whiten = retained(features)
        projs = (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)
        k_o = jnp.stack([p.kernel[...] for p in projs])
        op, hard, rank = _edit_operator(x, y, requested & ~(first & first_soft), rcond, core, n_core, whiten)
        k, metrics = _apply(k_o, op, x, y, hard, rank, kind, dist, r)
        for p, ki in zip(projs, k, strict=True):
            p.kernel.value = ki
        return layer(h), (tuple(k), metrics)  # one stacked output per projection: no strided slicing

    qkv, text_metrics = None, {}
    n_tail = y_states.shape[0] - 1 - start
    if edit_text:
        tail = jax.tree.map(lambda a: a[start:], stacked)
        xs = (tail, y_states[start:-1], jnp.arange(n_tail) == 0)
        h, (qkv, text_metrics) = jax.lax.scan(step, h, xs, unroll=unroll)
    else:
        h, _ = jax.lax.scan(
            lambda h, p: (nnx.merge(layer_def, p)(h), None), h, jax.tree.map(lambda a: a[start:], stacked)
        )
    new_unet, unet_metrics = [], []
    if edit_unet:
        features = te.final_layer_norm(h)
        x, y, dist = _columns(features, y_last, cols, n_cand)  # shared by every bucket
        r, whiten = retained(features)
        op, hard, rank = _edit_operator(x, y, requested, rcond, core, n_core, whiten)  # so is the operator
        for kernels in unet_weights:  # one bucket: (n, d_in, d_out) kernels of the same shape
            k, metrics = _apply(kernels, op, x, y, hard, rank, kind, dist, r)
            new_unet.append(k)
            unet_metrics.append(metrics)
    return qkv, tuple(new_unet), text_metrics, unet_metrics


_COMPILED: collections.OrderedDict[Any, Any] = collections.OrderedDict()
COMPILED_MAX = 8  # programs kept (least recently used dropped): one SD v1.4 sweep holds ~100 MB of code


def _compiled(fn: Any, *args: Any, **statics: Any) -> Any:
    """``fn`` compiled for these argument shapes and statics, cached (LRU): equal shapes never recompile."""
    leaves, tree = jax.tree.flatten(args)
    key = (fn, tree, tuple((a.shape, str(a.dtype)) for a in leaves), tuple(sorted(statics.items(), key=str)))
    if key in _COMPILED:
        _COMPILED.move_to_end(key)
    else:
        _COMPILED[key] = fn.lower(*args, **statics).compile()
        while len(_COMPILED) > COMPILED_MAX:
            _COMPILED.popitem(last=False)
    return _COMPILED[key]


def _to_host(tree: Any) -> Any:
    return jax.tree.map(np.asarray, tree)


@dataclasses.dataclass(frozen=True)
class EraseProOptions:
    """Options of ErasePro (Algorithm 1, explicit concepts)."""

    form: str = option(
        "protected",
        "protected: hard columns to each prompt's EOS, every solve whitened by a "
        "retain set; paper: the plain minimum-norm edit over every position",
        choices=FORMS,
    )
    layers: str = option(
        "all",
        "which weights to edit: the text encoder's q/k/v, the U-Net's attn2 to_k/to_v, or both",
        choices=STAGES,
    )
    start_layer: int | None = option(
        None,
        "first edited text-encoder layer, 1-based (None: "
        f"{PROTECTED_START} in the protected form, 1 in the paper's)",
    )
    pad_tokens: int | None = option(
        None,
        "padding positions after EOS held as columns (None: 0 in the protected form, all in the paper's)",
    )
    first_tokens: int | None = option(None, "pair only the first k tokens of each prompt (Algorithm 2's k)")
    last_token_only: bool = option(True, "protected form: pair a multi-token concept by its last token only")
    retain: tuple[str, ...] | None = option(
        None,
        "protected form: prompts whose features the edit avoids "
        "(None: the empty prompt, generic captions, preserved concepts)",
    )
    ridge: float = option(
        DEFAULT_RIDGE,
        "weight of the directions the retain set does not use, relative to its mean energy (> 0)",
    )
    rcond: float | None = option(
        None,
        "rank cutoff of the solves, relative to the largest singular value: hard columns are held while "
        f"their condition number stays <= 1 / rcond (None: {PROTECTED_RCOND} in the protected form, "
        f"{DEFAULT_RCOND} in the paper's)",
    )
    unroll: bool = option(
        False, "unroll the layer sweep instead of a lax.scan (faster compile on few layers)"
    )

    def __post_init__(self) -> None:
        check_choices(self)
        for name in ("ridge", "rcond"):
            value = getattr(self, name)
            if name == "rcond" and value is None:
                continue
            if not (isinstance(value, (int, float)) and 0 < value < math.inf):
                raise EraseError(f"{name} must be a positive number, got {value!r}")
        for name in ("start_layer", "first_tokens"):
            if (value := getattr(self, name)) is not None and value < 1:
                raise EraseError(f"{name} must be >= 1, got {value}")
        if self.pad_tokens is not None and self.pad_tokens < 0:
            raise EraseError(f"pad_tokens must be >= 0, got {self.pad_tokens}")
        if self.retain is not None and (
            isinstance(self.retain, str) or not all(isinstance(r, str) for r in self.retain)
        ):
            raise EraseError("retain must be a list of prompts")


@dataclasses.dataclass(frozen=True)
class ImplicitOptions(EraseProOptions):
    """Options of ErasePro-implicit (Algorithm 2: the first k paired tokens from text-encoder layer s on)."""

    strength: str = option(
        "weak",
        "preset of (k, s): weak = (5, 5), strong = (8, 1); s of 12 layers, scaled "
        "to the encoder's depth; first_tokens / start_layer override it",
        choices=tuple(IMPLICIT_PRESETS),
    )


def run_explicit(
    sd: StableDiffusion, request: Request, options: EraseProOptions
) -> tuple[StableDiffusion, EraseReport]:
    """ErasePro (Algorithm 1) on ``sd``."""
    return erase_erasepro(sd, request, options, method="erasepro")


def run_implicit(
    sd: StableDiffusion, request: Request, options: ImplicitOptions
) -> tuple[StableDiffusion, EraseReport]:
    """ErasePro-implicit: Algorithm 1 with the strength preset's k and s (s scaled to the encoder's depth)."""
    k, s = IMPLICIT_PRESETS[options.strength]
    depth = sd.config.text_encoder.num_hidden_layers
    start_layer = options.start_layer
    if start_layer is None:
        start_layer = 1 + round((s - 1) * depth / 12)
        if options.form == "protected":  # see PROTECTED_START
            start_layer = max(start_layer, min(PROTECTED_START, depth))
    first_tokens = k if options.first_tokens is None else options.first_tokens
    resolved = dataclasses.replace(options, start_layer=start_layer, first_tokens=first_tokens)
    return erase_erasepro(sd, request, resolved, method="erasepro-implicit")


@dataclasses.dataclass(frozen=True)
class _Plan:
    """An ErasePro request as padded arrays: columns, prompt rows and the static sizes of the sweep."""

    cols: Columns
    templates: tuple[str, ...]
    retain: tuple[str, ...]
    start_layer: int  # 1-based
    pad_tokens: int | None
    rcond: float
    col_arrays: dict[str, jax.Array]
    x_ids: jax.Array  # target and preserved prompt rows, then the retain rows
    y_ids: jax.Array  # anchor prompt rows
    n_hard: int
    n_cand: int
    n_core: int
    n_retain: int


def erase_erasepro(
    sd: StableDiffusion, request: Request, options: EraseProOptions, *, method: str = "erasepro"
) -> tuple[StableDiffusion, EraseReport]:
    """ErasePro on ``sd``; ``start_layer`` is 1-based (1 = the first encoder layer), ``first_tokens`` is k.

    ``form="protected"`` (default): hard columns up to each prompt's EOS (``pad_tokens=0``), every solve
    whitened by a retain set (``retain``: prompts; None: ``retain.default_retain``;
    ``ridge``: the weight of directions the retain set does not use, relative to its mean energy), so the
    edit lands where other prompts have little energy. ``form="paper"``: the paper's plain minimum-norm
    edit over every position to the end (``pad_tokens=None``; the retain set is only measured). Explicit
    options win.
    ``start_layer`` None: ``PROTECTED_START`` in the protected form, 1 in the paper's.
    """
    t0 = time.perf_counter()
    plan = _plan(sd, request, options)
    buckets = unet_cross_attention(sd)
    t_prep = time.perf_counter()
    qkv, new_unet, text_metrics, unet_metrics, times = _sweep(sd, plan, options, buckets)
    erased, edited, entries = _put_in(sd, plan, options, buckets, qkv, new_unet, text_metrics, unet_metrics)
    timings = {"prepare": t_prep - t0, **times, "total": time.perf_counter() - t0}
    return erased, _report(sd, request, options, plan, method, entries, edited, timings)


def _plan(sd: StableDiffusion, request: Request, options: EraseProOptions) -> _Plan:
    """Resolve the form's defaults, build the feature columns and pad everything to shared buckets."""
    protected = options.form == "protected"
    n_layers = sd.config.text_encoder.num_hidden_layers
    templates = tuple(DEFAULT_PROMPTS if request.prompts is None else request.prompts)
    start_layer = options.start_layer
    if start_layer is None:
        start_layer = min(PROTECTED_START, n_layers) if protected else 1
    if not 1 <= start_layer <= n_layers:
        raise EraseError(f"start_layer={start_layer} is outside the text encoder's layers 1..{n_layers}")
    pad_tokens = options.pad_tokens
    if protected and pad_tokens is None and options.first_tokens is None:
        pad_tokens = 0
    rcond = options.rcond if options.rcond is not None else (PROTECTED_RCOND if protected else DEFAULT_RCOND)
    retain = options.retain
    if retain is None:
        retain = default_retain(sd, request.targets, request.preserve, templates)
    max_length = sd.config.text_encoder.max_position_embeddings
    cols = build_columns(
        sd.tokenizer,
        request.targets,
        request.anchors,
        request.preserve,
        templates,
        max_length=max_length,
        pad_tokens=pad_tokens,
        first_tokens=options.first_tokens,
        last_token_only=protected and options.last_token_only,
    )
    d_text = sd.config.text_encoder.hidden_size
    # N <= d_in: every column may be hard. Past d_in, only concept/EOS, preserved and prefix columns (padding
    # is fitted in least squares), the first d_in of them by priority.
    n_hard = cols.n if cols.n <= d_text else min(d_text, int(np.sum(cols.kind != PADDING)))
    # Shapes are padded to buckets (masked columns, zero rows) so erasures of similar size share a program.
    n_pad = _round_up(cols.n, COLUMN_BUCKET)
    n_cand = min(n_pad, d_text)
    n_core = min(n_cand, max(1, _round_up(int(np.sum(cols.kind[:n_hard] != PADDING)), COLUMN_BUCKET)))
    col_arrays = {
        "x_row": cols.x_row,
        "x_pos": cols.x_pos,
        "y_row": cols.y_row,
        "y_pos": cols.y_pos,
        "kind": cols.kind,
        "real": np.ones(cols.n, bool),
        "requested": np.arange(cols.n) < n_hard,
        "embedding_conflict": cols.embedding_conflict,
    }
    col_arrays = {
        k: jnp.asarray(np.pad(v, (0, n_pad - cols.n), constant_values=PADDING if k == "kind" else 0))
        for k, v in col_arrays.items()
    }
    x_rows = _pad_rows(cols.x_ids)
    n_retain = 0
    if retain:  # padded to a bucket with masked rows, so similar sets share a program
        retain_ids = tokenize(sd.tokenizer, list(retain), max_length=max_length)
        n_retain = _round_up(len(retain_ids), RETAIN_BUCKET)
        retain_ids = np.pad(retain_ids, ((0, n_retain - len(retain_ids)), (0, 0)))
        x_rows = np.concatenate([x_rows, retain_ids.astype(x_rows.dtype)])
    col_arrays["retain_real"] = jnp.arange(max(n_retain, 1)) < len(retain)
    return _Plan(
        cols=cols,
        templates=templates,
        retain=tuple(retain),
        start_layer=start_layer,
        pad_tokens=pad_tokens,
        rcond=float(rcond),
        col_arrays=col_arrays,
        x_ids=jnp.asarray(x_rows),
        y_ids=jnp.asarray(_pad_rows(cols.y_ids)),
        n_hard=n_hard,
        n_cand=n_cand,
        n_core=n_core,
        n_retain=n_retain,
    )


def _sweep(sd: StableDiffusion, plan: _Plan, options: EraseProOptions, buckets: list[Bucket]) -> tuple:
    """Compile (or reuse) and run the anchor pass and the progressive sweep: new kernels, metrics, seconds."""
    t0 = time.perf_counter()
    graphdef, params = nnx.split(sd.text_encoder)
    unet_weights = tuple(b.stack() for b in buckets)
    anchor_fn = _compiled(_anchor_states, params, plan.y_ids, graphdef=graphdef)
    statics = dict(
        start=plan.start_layer - 1,
        n_cand=plan.n_cand,
        n_core=plan.n_core,
        rcond=plan.rcond,
        edit_text=options.layers in ("all", "text_encoder"),
        edit_unet=options.layers in ("all", "unet"),
        unroll=options.unroll,
        graphdef=graphdef,
        n_retain=plan.n_retain,
        weigh=options.form == "protected",
        ridge=float(options.ridge),
    )
    states = (
        sd.config.text_encoder.num_hidden_layers + 1,
        *plan.y_ids.shape,
        sd.config.text_encoder.hidden_size,
    )
    y_shapes = (jax.ShapeDtypeStruct(states, jnp.float32), jax.ShapeDtypeStruct(states[1:], jnp.float32))
    sweep_fn = _compiled(
        _progressive, params, unet_weights, plan.x_ids, *y_shapes, plan.col_arrays, **statics
    )
    t_compile = time.perf_counter()
    y_states, y_last = jax.block_until_ready(anchor_fn(params, plan.y_ids))
    t_features = time.perf_counter()
    out = sweep_fn(params, unet_weights, plan.x_ids, y_states, y_last, plan.col_arrays)
    qkv, new_unet = out[0], out[1]
    text_metrics, unet_metrics = _to_host(jax.block_until_ready(out[2:]))
    t_solve = time.perf_counter()
    if not all(bool(np.all(m["finite"])) for m in [text_metrics, *unet_metrics] if m):
        raise EraseError("NaN or inf in the features or in a solution: the model was left unchanged")
    times = {"compile": t_compile - t0, "features": t_features - t_compile, "solve": t_solve - t_features}
    return qkv, new_unet, text_metrics, unet_metrics, times


def _put_in(
    sd, plan: _Plan, options, buckets: list[Bucket], qkv, new_unet, text_metrics, unet_metrics
) -> tuple:
    """The edited model, the keys it changed and one report entry per edited weight."""
    erased, edited, entries = sd, [], []
    start = plan.start_layer - 1
    if options.layers in ("all", "text_encoder"):
        erased, keys = replace_qkv(erased, start, qkv)
        edited += keys
        entries += _text_entries(qkv_keys(sd, start), text_metrics, start)
    if options.layers in ("all", "unet"):
        erased, keys = replace_buckets(erased, buckets, new_unet)
        edited += keys
        for b, metrics in zip(buckets, unet_metrics, strict=True):
            entries += _bucket_entries(b, metrics)
    return erased, edited, entries


def _report(
    sd, request: Request, options: EraseProOptions, plan: _Plan, method: str, entries, edited, timings
):
    """The EraseReport: the request, the resolved options, the columns, per-weight entries and notes."""
    protected = options.form == "protected"
    cols = plan.cols
    n_layers = sd.config.text_encoder.num_hidden_layers
    edit_text = options.layers in ("all", "text_encoder")
    notes = _notes(
        cols, plan.n_hard, sd.config.text_encoder.hidden_size, entries, plan.start_layer == 1 and edit_text
    )
    if options.first_tokens is not None:
        notes.append(
            f"implicit: first {options.first_tokens} paired tokens, text-encoder layers "
            f"{plan.start_layer}..{n_layers}"
        )
    return EraseReport(
        method=method,
        targets=list(request.targets),
        anchors=list(request.anchors),
        preserve=list(request.preserve),
        prompts=list(plan.templates),
        options={
            "layers": options.layers,
            "pad_tokens": plan.pad_tokens,
            "first_tokens": options.first_tokens,
            "start_layer": plan.start_layer,
            "rcond": plan.rcond,
            "form": options.form,
            "retain": list(plan.retain),
            "ridge": options.ridge,
            "last_token_only": protected and options.last_token_only,
        },
        columns={
            "total": cols.n,
            "hard_candidates": plan.n_hard,
            "duplicates_dropped": cols.duplicates,
            "conflicts_dropped": cols.conflicts,
            "embedding_conflicts": int(np.sum(cols.embedding_conflict)),
            **cols.counts(),
        },
        pairs=[dict(p) for p in cols.pairs],
        layers=entries,
        timings=timings,
        edited=sorted(edited),
        notes=notes,
    )


def _entry(key: str, stage: str, metrics: dict, i: tuple, **extra: Any) -> dict[str, Any]:
    groups = metrics["residual_groups"][i]
    return {
        "key": key,
        "stage": stage,
        **extra,
        "residual_before": float(metrics["residual_before"][i]),
        "residual_after": float(metrics["residual_after"][i]),
        "residual_hard": float(metrics["residual_hard"][i]),
        "residual_soft": float(metrics["residual_soft"][i]),
        "residual_groups": {name: float(groups[g]) for g, name in enumerate((*KINDS, "least_squares_rest"))},
        "relative_change": float(metrics["relative_change"][i]),
        "retain_change": float(metrics["retain_change"][i]),
        "n_hard": int(metrics["n_hard"][i[:-1]]),
        "rank": int(metrics["rank"][i[:-1]]),
        "feature_distance": float(metrics["feature_distance"][i[:-1]]),
    }


def _text_entries(keys: list[list[str]], metrics: dict, start: int) -> list[dict[str, Any]]:
    """Report entries of the edited q/k/v, layer by layer; ``keys`` per projection from ``qkv_keys``."""
    n = metrics["relative_change"].shape[0]
    return [
        _entry(keys[j][layer], "text_encoder", metrics, (layer, j), layer=start + layer)
        for layer in range(n)
        for j in range(len(keys))
    ]


def _bucket_entries(bucket: Any, metrics: dict) -> list[dict[str, Any]]:
    return [
        _entry(key, "unet", metrics, (j,), bucket=list(bucket.shape)) for j, key in enumerate(bucket.keys)
    ]


def _notes(cols: Columns, n_hard: int, d: int, entries: list[dict], layer0: bool) -> list[str]:
    notes = []
    if cols.conflicts:
        notes.append(
            f"{cols.conflicts} target columns share their token ids with a preserved prompt's (the same "
            "input at every layer): preservation wins, they were dropped"
        )
    clash = int(np.sum(cols.embedding_conflict[:n_hard]))
    if clash and layer0:
        notes.append(
            f"{clash} target columns have a preserved column's (token, position) and so its input at layer 0 "
            "(EOS = padding token): preservation wins there, they are fitted in least squares at layer 0"
        )
    if cols.n > d:
        notes.append(
            f"{cols.n} columns > d_in={d}: the first {n_hard} by priority (concept tokens and EOS first, no "
            f"padding) may be hard; the other {cols.n - n_hard} are fitted in least squares (residual_soft)"
        )
    big = max(entries, key=lambda e: e["relative_change"], default=None)
    if big is not None and big["relative_change"] > LARGE_CHANGE:
        notes.append(
            f"large edit: ||W - W_o|| / ||W_o|| reaches {big['relative_change']:.2f} ({big['key']}); prompts "
            "outside the retain set may move: check `jax-erasepro evaluate`"
        )
    expected = {e["key"]: n_hard - (clash if layer0 and e.get("layer") == 0 else 0) for e in entries}
    short = [e["key"] for e in entries if e["n_hard"] < expected[e["key"]]]
    if short:
        notes.append(
            f"rank-deficient features: {len(short)} edited weights hold fewer than {n_hard} columns exactly "
            f"(e.g. {short[0]}); there only concept/EOS, preserved and prefix columns may be hard (padding "
            "never is), and the columns not held are fitted in least squares"
        )
    return notes
