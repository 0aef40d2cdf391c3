"""UCE (Gandikota et al. 2023): the closed-form ridge edit of the U-Net's cross-attention to_k/to_v.

W = (lam W_o + s_e sum W_o y x^T + s_p sum W_o p p^T)(lam I + s_e sum x x^T + s_p sum p p^T)^-1 over columns
of the ORIGINAL text encoder's states; repeated columns are NOT deduplicated (the scripts sum them, and in a
ridge solve a repeat is a weight).

``variant`` picks the script whose columns and scales are reproduced:

- ``"2023"``: ``train-scripts/train_erase.py`` (``edit_model``, ``technique='replace'``). Per (target text,
  anchor text), each text's states from its last concept token (``attention_mask.sum() - 2``; BOS for an
  empty text) to the end, both cut to the length of the shorter slice (the script's ``farthest`` trim), as
  x and y; every position of each retained text as p; lam 0.5, erase scale 1, preserve scale
  ``max(0.1, 1 / (1 + len(preserve)))``.
- ``"2025"``: ``trainscripts/uce_sd_erase.py``: one column per text (its last concept token), no empty
  prompt among the retained texts, preserve scale 1.

``pairing`` says how the texts are built from the concepts and the templates in ``prompts``:

- ``"script"`` (default): as each script's ``__main__`` builds them. Target texts are the target itself, then
  each template filled with it (a template ``"{}"`` is skipped: the target itself is already there). 2023
  pairs every one of them with the raw anchor and retains ``""`` and the raw preserved concepts; 2025 fills
  the anchor into the same template as its target and retains the raw preserved concepts.
- ``"template"``: every template filled with target and anchor alike, and with each retained concept (``""``
  included for 2023); the concept alone only where ``"{}"`` is among the templates.

With ``prompts=None`` (the template ``"{}"``) both pairings give the same texts.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jax_erasepro.erase.columns import EraseError, prompt_tokens
from jax_erasepro.erase.layers import replace_buckets, unet_cross_attention
from jax_erasepro.erase.methods import Request, check_choices, option
from jax_erasepro.erase.report import EraseReport
from jax_erasepro.erase.solvers import uce_solve
from jax_erasepro.pipeline import encode_tokens
from jax_erasepro.sd import StableDiffusion

VARIANTS = ("2023", "2025")
PAIRINGS = ("script", "template")


Text = tuple[str, str]  # (template, concept): the prompt is the template filled with the concept


def uce_texts(
    targets: Sequence[str],
    anchors: Sequence[str],
    preserve: Sequence[str],
    templates: Sequence[str],
    variant: str,
    pairing: str,
) -> tuple[list[tuple[Text, Text]], list[Text]]:
    """(target text, anchor text) pairs and retained texts, as ``pairing`` builds them (module docstring)."""
    retain = ([""] if variant == "2023" else []) + list(preserve)
    concepts = list(zip(targets, anchors, strict=True))
    if pairing == "template":
        edits = [((f, t), (f, a)) for f in templates for t, a in concepts]
        return edits, [(f, c) for f in templates for c in retain]
    fills = ["{}"] + [f for f in templates if f != "{}"]
    edits = [((f, t), ("{}" if variant == "2023" else f, a)) for t, a in concepts for f in fills]
    return edits, [("{}", c) for c in retain]


def uce_columns(
    tokenizer,
    edits: Sequence[tuple[Text, Text]],
    retained: Sequence[Text],
    variant: str,
    max_length: int = 77,
) -> tuple[np.ndarray, list, list, list, list[dict]]:
    """Token rows and (row, position) lists for X, Y and P, selected as the chosen script selects them."""
    rows: dict[tuple[int, ...], int] = {}
    x, y, p, pairs = [], [], [], []

    def row(ids: tuple[int, ...]) -> int:
        return rows.setdefault(ids, len(rows))

    for target, anchor in edits:
        t = prompt_tokens(tokenizer, *target, max_length)
        a = prompt_tokens(tokenizer, *anchor, max_length)
        ft, fa = t.eos - 1, a.eos - 1  # the script's attention_mask.sum() - 2
        if variant == "2023":
            far = max(ft, fa)
            pos_t = range(ft, max_length - (far - ft))
            pos_a = range(fa, max_length - (far - fa))
        else:
            pos_t, pos_a = [ft], [fa]
        x += [(row(t.ids), q) for q in pos_t]
        y += [(row(a.ids), q) for q in pos_a]
        pairs.append({"target": t.text, "anchor": a.text, "positions": list(zip(pos_t, pos_a, strict=True))})
    for text in retained:
        r = prompt_tokens(tokenizer, *text, max_length)
        p += [(row(r.ids), q) for q in (range(max_length) if variant == "2023" else [r.eos - 1])]
    ids = np.zeros((len(rows), max_length), np.int32)
    for key, i in rows.items():
        ids[i] = key
    return ids, x, y, p, pairs


@partial(jax.jit, static_argnames=("precision",))
def _uce_buckets(kernels, feats, x, y, p, lam, s_e, s_p, precision):
    fx, fy, fp = (feats[idx[:, 0], idx[:, 1]].T for idx in (x, y, p))
    out, reports = [], []
    for k in kernels:
        w_o = jnp.swapaxes(k, -1, -2)
        w, rep = uce_solve(w_o, fx, fy, fp, lam=lam, erase_scale=s_e, preserve_scale=s_p, precision=precision)
        before = jnp.sqrt(jnp.sum((w_o @ (fx - fy)) ** 2, (-2, -1)) / jnp.sum((w_o @ fy) ** 2, (-2, -1)))
        dist = jnp.linalg.norm(fx - fy) / jnp.linalg.norm(fy)
        finite = jnp.all(jnp.isfinite(feats)) & jnp.all(jnp.isfinite(w))
        out.append(jnp.swapaxes(w, -1, -2))
        reports.append((rep, before, dist, finite))
    return out, reports


@dataclasses.dataclass(frozen=True)
class UCEOptions:
    """Options of UCE; defaults are the 2023 script's."""

    variant: str = option(
        "2023",
        "which authors' script to reproduce: 2023 (train_erase.py, every position "
        "from the concept's last token) or 2025 (uce_sd_erase.py, one column per text)",
        choices=VARIANTS,
    )
    pairing: str = option(
        "script",
        "how texts are built from concepts and templates: as the script's main "
        "does, or every template filled with target and anchor alike",
        choices=PAIRINGS,
    )
    lam: float = option(0.5, "ridge weight keeping W near W_o (> 0)")
    erase_scale: float = option(1.0, "weight of the erased columns (>= 0)")
    preserve_scale: float | None = option(
        None,
        "weight of the retained columns (None: the variant's rule, "
        "max(0.1, 1 / (1 + #preserved)) for 2023, 1 for 2025)",
    )
    layers: str = option("unet", "UCE edits the U-Net's attn2 to_k/to_v only", choices=("unet",))
    precision: str = option("float32", "dtype of the solve", choices=("float32", "float64"))

    def __post_init__(self) -> None:
        check_choices(self)
        if not self.lam > 0:
            raise EraseError(f"lam must be > 0, got {self.lam}")
        for name in ("erase_scale", "preserve_scale"):
            if (value := getattr(self, name)) is not None and not value >= 0:
                raise EraseError(f"{name} must be >= 0, got {value}")


def erase_uce(
    sd: StableDiffusion, request: Request, options: UCEOptions
) -> tuple[StableDiffusion, EraseReport]:
    """UCE on every U-Net attn2 to_k/to_v; ``prompts`` None means the concept alone (the scripts' default)."""
    t0 = time.perf_counter()
    targets, anchors, preserve, prompts = request.targets, request.anchors, request.preserve, request.prompts
    variant, pairing, lam, erase_scale = options.variant, options.pairing, options.lam, options.erase_scale
    preserve_scale, layers, precision = options.preserve_scale, options.layers, options.precision
    templates = ["{}"] if prompts is None else list(prompts)
    max_length = sd.config.text_encoder.max_position_embeddings
    edits, retained = uce_texts(targets, anchors, preserve, templates, variant, pairing)
    ids, x, y, p, pairs = uce_columns(sd.tokenizer, edits, retained, variant, max_length)
    if preserve_scale is None:
        preserve_scale = max(0.1, 1 / (1 + len(preserve))) if variant == "2023" else 1.0
    t_prep = time.perf_counter()
    feats = encode_tokens(sd.text_encoder, ids)
    t_features = time.perf_counter()
    buckets = unet_cross_attention(sd)
    idx = [jnp.asarray(np.asarray(v, np.int32).reshape(-1, 2)) for v in (x, y, p)]
    out, reps = _uce_buckets(
        tuple(b.stack() for b in buckets), feats, *idx, lam, erase_scale, preserve_scale, precision
    )
    out, reps = jax.tree.map(np.asarray, jax.block_until_ready((out, reps)))
    t_solve = time.perf_counter()
    if not all(bool(r[3]) for r in reps):
        raise EraseError("NaN or inf in the features or in a solution: the model was left unchanged")
    erased, edited = replace_buckets(sd, buckets, out)
    entries = []
    for b, (rep, before, dist, _) in zip(buckets, reps, strict=True):
        for j, key in enumerate(b.keys):
            entries.append(
                {
                    "key": key,
                    "stage": "unet",
                    "bucket": list(b.shape),
                    "residual_before": float(before[j]),
                    "residual_after": float(rep.residual_target[j]),
                    "residual_preserve": float(rep.residual_preserve[j]),
                    "objective": float(rep.objective[j]),
                    "relative_change": float(rep.relative_change[j]),
                    "feature_distance": float(dist),
                }
            )
    report = EraseReport(
        method="uce",
        targets=list(targets),
        anchors=list(anchors),
        preserve=list(preserve),
        prompts=templates,
        options={
            "variant": variant,
            "pairing": pairing,
            "lam": lam,
            "erase_scale": erase_scale,
            "preserve_scale": preserve_scale,
            "layers": layers,
            "precision": precision,
        },
        columns={"erase": len(x), "preserve": len(p)},
        pairs=pairs,
        layers=entries,
        timings={
            "prepare": t_prep - t0,
            "features": t_features - t_prep,
            "solve": t_solve - t_features,
            "total": time.perf_counter() - t0,
        },
        edited=sorted(edited),
        notes=["UCE is a ridge (soft) solve: residuals are not driven to zero by design"],
    )
    return erased, report


__all__ = ["PAIRINGS", "VARIANTS", "UCEOptions", "erase_uce", "uce_columns", "uce_texts"]
