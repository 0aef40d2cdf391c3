"""``evaluate``: what an erasure did to the images, the target and everything else.

Metrics (ErasePro's Tables 1-3, Ablating Concepts' CLIP accuracy), all in the judge's image space and on
images drawn from the same noise before and after:

- CLIP score A: cosine of erased(target prompt) and original(the same prompt with the anchor), per image;
  T: erased(target prompt) vs original(target prompt); O: erased(other prompt) vs original(other prompt).
  High A and O and low T mean the target became the anchor and the rest stayed.
- CLIP accuracy: the share of images of target prompts that the judge puts closer to the target's text than
  to the anchor's (``before`` on the original, ``after`` on the erased model; low after means erased).
- KID A, T, O: kernel inception distance (polynomial kernel, unbiased) between the same image sets.
- The reference row: the original against itself with other seeds (T, O, KID T, KID O), the noise floor
  each number is to be read against; its A is original(target) vs original(anchor).
- Ground truth on shapes-sd (shapes-clip judge only): target rate (the judge finds the target), anchor rate
  (it finds the anchor, for anchors of the world), others' accuracy (an other prompt's image shows all the
  prompt names that the judge can check), before and after, with the drop.
Every figure has a seeded bootstrap 95% interval over images.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from jax.sharding import Mesh

from jax_erasepro.evaluation import metrics
from jax_erasepro.evaluation.judge import ImageJudge, load_image_judge
from jax_erasepro.evaluation.prompts import (
    GENERIC_OTHERS,
    OTHERS,
    ROBUST,
    TARGET,
    EvaluationError,
    PromptSet,
    judge_text,
    label,
    others_set,
    user_sets,
    world_others,
    world_robust_sets,
    world_target_set,
)
from jax_erasepro.evaluation.report import EvalReport
from jax_erasepro.evaluation.sampling import ImageCache, Sampling, default_cache_dir, draw, fingerprint
from jax_erasepro.sd import StableDiffusion

REFERENCE_SEED_OFFSET = 1_000_003  # the reference row's other seeds


def _concepts(targets: Sequence[str] | str, anchors: Sequence[str] | str) -> tuple[list[str], list[str]]:
    targets = [targets] if isinstance(targets, str) else list(targets)
    anchors = [anchors] if isinstance(anchors, str) else list(anchors)
    if not targets or not all(isinstance(t, str) and t.strip() for t in targets):
        raise EvaluationError(f"targets must be non-empty strings, got {targets!r}")
    if len(anchors) == 1:
        anchors = anchors * len(targets)
    if len(anchors) != len(targets):
        raise EvaluationError(
            f"{len(targets)} targets but {len(anchors)} anchors (give one or one per target)"
        )
    return [t.strip() for t in targets], [a.strip() for a in anchors]


def _check_models(original: StableDiffusion, erased: StableDiffusion) -> None:
    for part in ("text_encoder", "unet", "vae"):
        if getattr(original.config, part) != getattr(erased.config, part):
            raise EvaluationError(
                f"the erased model's {part} config differs from the original's: "
                "evaluate an erasure of this model"
            )


def _prompt_sets(
    judge: ImageJudge,
    targets: list[str],
    anchors: list[str],
    prompts: Any,
    others: Sequence[str] | None,
    robustness: bool,
) -> list[PromptSet]:
    target, user_others, robust = (None, None, [])
    if prompts is not None:
        target, user_others, robust = user_sets(prompts, targets, anchors)
    if target is None:
        if not judge.world:
            raise EvaluationError("with a judge other than shapes-clip, give prompts= (templates with {})")
        target = world_target_set(targets, anchors)
    if robustness and not robust and judge.world and prompts is None:
        robust = world_robust_sets(targets, anchors)
    others = list(others) if others is not None else user_others
    if others is None:
        others = (
            world_others(targets, anchors)
            if judge.world
            else [o for o in GENERIC_OTHERS if not any(t.lower() in o for t in targets)]
        )
    if isinstance(others, str) or not all(isinstance(o, str) for o in others):
        raise EvaluationError("others must be a list of prompts")
    return [target, *robust, others_set(others, judge.world)]


def evaluate(
    original: StableDiffusion,
    erased: StableDiffusion,
    targets: Sequence[str] | str,
    anchors: Sequence[str] | str,
    *,
    others: Sequence[str] | None = None,
    judge: ImageJudge | str | Path | None = None,
    prompts: Sequence[str] | Mapping[str, Any] | str | Path | None = None,
    images_per_prompt: int = 4,
    seed: int = 0,
    mesh: Mesh | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    scheduler: str | None = None,
    robustness: bool = True,
    reference: bool = True,
    cache: str | Path | bool = True,
    batch_size: int = 32,
) -> EvalReport:
    """Draw the prompt sets with both models (same noise) and measure them (module docstring).

    ``judge``: shapes-clip (None), a CLIP folder or an ImageJudge. ``prompts``: target templates with
    ``{}`` or a mapping / YAML file of sets (``target``, ``others``, ``robust``); None builds shapes-sd's
    sets. ``others``: prompts of everything that should not change. ``cache``: where the original's images
    are kept (True: ``~/.cache/jax-erasepro/eval-images``, False: nowhere).
    """
    t0 = time.perf_counter()
    targets, anchors = _concepts(targets, anchors)
    if images_per_prompt < 1 or num_inference_steps < 1 or batch_size < 1:
        raise EvaluationError("images_per_prompt, num_inference_steps and batch_size must be >= 1")
    if not np.isfinite(guidance_scale):
        raise EvaluationError(f"guidance_scale must be finite, got {guidance_scale}")
    _check_models(original, erased)
    if not isinstance(judge, ImageJudge):
        judge = load_image_judge(judge)
    sets = _prompt_sets(judge, targets, anchors, prompts, others, robustness)
    sampling = Sampling(num_inference_steps, guidance_scale, scheduler, images_per_prompt, seed, batch_size)
    store = None
    if cache is not False:
        store = ImageCache(default_cache_dir() if cache is True else cache, fingerprint(original))

    def feats(x: np.ndarray) -> np.ndarray:
        return judge.image_features(x.reshape(-1, *x.shape[2:]))

    # Every image of a model in one pass (one compile per batch shape): (text, seed) -> images.
    want_orig, want_erased = {}, {}
    for s in sets:
        for p in s.prompts:
            want_orig[(p.text, seed)] = want_erased[(p.text, seed)] = None
            if s.role == TARGET and p.anchor_text is not None:
                want_orig[(p.anchor_text, seed)] = None
            if reference and s.role != ROBUST:
                want_orig[(p.text, seed + REFERENCE_SEED_OFFSET)] = None
    drawn = {}
    for sd, want, desc, kept in (
        (original, want_orig, "original", store),
        (erased, want_erased, "erased", None),
    ):
        jobs = list(want)
        out = draw(
            sd, [t for t, _ in jobs], sampling, seeds=[s for _, s in jobs], cache=kept, mesh=mesh, desc=desc
        )
        drawn[desc] = dict(zip(jobs, out, strict=True))

    def images(model: str, texts: list[str], offset: int = 0) -> np.ndarray:
        return np.stack([drawn[model][(t, seed + offset)] for t in texts])

    per_set, shown = {}, {}
    for s in sets:
        texts = [p.text for p in s.prompts]
        before, after = images("original", texts), images("erased", texts)
        fb, fa = feats(before), feats(after)
        entry: dict[str, Any] = {"role": s.role, "prompts": texts, "n_images": len(texts) * images_per_prompt}
        if s.role == OTHERS:
            entry["clip_score"] = {"O": metrics.estimate(metrics.cosines(fa, fb), seed)}
            entry["kid"] = {"O": metrics.kid(fa, fb, seed)}
            if judge.world:
                entry["others_accuracy"] = _others_accuracy(judge, s, before, after, seed)
        else:
            anchor = None
            if s.role == TARGET and any(p.anchor_text is not None for p in s.prompts):
                anchor = images("original", [p.anchor_text or p.text for p in s.prompts])
            entry.update(
                _target_metrics(
                    judge, s, before, after, fb, fa, None if anchor is None else feats(anchor), seed
                )
            )
        if reference and s.role != ROBUST:
            other = images("original", texts, REFERENCE_SEED_OFFSET)
            fo, m = feats(other), "O" if s.role == OTHERS else "T"
            entry["reference"] = {
                "clip_score": {m: metrics.estimate(metrics.cosines(fo, fb), seed)},
                "kid": {m: metrics.kid(fo, fb, seed)},
            }
        per_set[s.name] = entry
        shown[s.name] = (texts, before[:, 0], after[:, 0])
    summary_ref: dict[str, Any] = {"clip_score": {}, "kid": {}}
    for name in ("target", "others"):
        for key, vals in per_set[name].get("reference", {}).items():
            summary_ref[key].update(vals)
    for key in ("clip_score", "kid"):
        if "A_before" in per_set["target"][key]:
            summary_ref[key]["A"] = per_set["target"][key]["A_before"]
    summary_ref["clip_accuracy"] = per_set["target"]["clip_accuracy"]["before"]
    tgt, oth = per_set["target"], per_set["others"]
    for key in ("clip_score", "kid"):
        tgt[key].pop("A_before", None)
    summary = {
        "targets": targets,
        "anchors": anchors,
        "target_rate": tgt.get("target_rate"),
        "anchor_rate": tgt.get("anchor_rate"),
        "others_accuracy": oth.get("others_accuracy"),
        "clip_score": {**tgt["clip_score"], **oth["clip_score"]},
        "clip_accuracy": tgt["clip_accuracy"],
        "kid": {**tgt["kid"], **oth["kid"]},
        "reference": summary_ref,
    }
    settings = {
        "judge": judge.name,
        "images_per_prompt": images_per_prompt,
        "seed": seed,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "scheduler": scheduler,
        "reference_seed_offset": REFERENCE_SEED_OFFSET,
        "bootstrap_rounds": metrics.ROUNDS,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return EvalReport(summary, per_set, settings, shown)


def _target_metrics(
    judge: ImageJudge,
    s: PromptSet,
    before: np.ndarray,
    after: np.ndarray,
    fb: np.ndarray,
    fa: np.ndarray,
    fy: np.ndarray | None,
    seed: int,
) -> dict[str, Any]:
    """T, A (when anchor images ``fy`` are given), CLIP accuracy, target and anchor rates of target prompts.

    ``A_before`` (original(target) vs original(anchor)) goes to the reference row."""
    k = before.shape[1]
    out: dict[str, Any] = {
        "clip_score": {"T": metrics.estimate(metrics.cosines(fa, fb), seed)},
        "kid": {"T": metrics.kid(fa, fb, seed)},
    }
    if fy is not None:
        rows = np.repeat([p.anchor_text is not None for p in s.prompts], k)
        for name, f in (("A", fa), ("A_before", fb)):
            out["clip_score"][name] = metrics.estimate(metrics.cosines(f[rows], fy[rows]), seed)
            out["kid"][name] = metrics.kid(f[rows], fy[rows], seed)
    concept_t = judge.text_features([judge_text(p.concept, judge.world) for p in s.prompts])
    anchor_t = judge.text_features([judge_text(p.anchor, judge.world) for p in s.prompts])
    ct, at = np.repeat(concept_t, k, 0), np.repeat(anchor_t, k, 0)
    out["clip_accuracy"] = metrics.paired(metrics.closer_to(fb, ct, at), metrics.closer_to(fa, ct, at), seed)
    if judge.world:
        out["target_rate"] = _paired_rate(judge, before, after, [label(p.concept) for p in s.prompts], seed)
        anchors = [label(p.anchor) if p.anchor else None for p in s.prompts]
        if any(anchors):
            out["anchor_rate"] = _paired_rate(judge, before, after, anchors, seed)
    return out


def _hits(judge: ImageJudge, images: np.ndarray, wanted: list[tuple[str, str] | None]) -> np.ndarray:
    """Per image (prompt-major, k each), whether the judge's label equals the wanted one (nan: none)."""
    k = images.shape[1]
    flat = images.reshape(-1, *images.shape[2:])
    out = np.full(len(flat), np.nan)
    for attribute in sorted({w[0] for w in wanted if w}):
        got = judge.labels(flat, attribute)
        for i, w in enumerate(wanted):
            if w and w[0] == attribute:
                out[i * k : (i + 1) * k] = got[i * k : (i + 1) * k] == w[1]
    return out


def _paired_rate(judge, before, after, wanted, seed) -> dict[str, Any] | None:
    b, a = _hits(judge, before, wanted), _hits(judge, after, wanted)
    keep = ~np.isnan(b)
    return metrics.paired(b[keep], a[keep], seed) if keep.any() else None


def _others_accuracy(judge, s: PromptSet, before, after, seed) -> dict[str, Any] | None:
    """Share of other prompts' images in which every checkable thing the prompt names is found."""
    k = before.shape[1]
    checks = {}
    for attribute in sorted({a for p in s.prompts for a, _ in p.truth}):
        checks[attribute] = (
            judge.labels(before.reshape(-1, *before.shape[2:]), attribute),
            judge.labels(after.reshape(-1, *after.shape[2:]), attribute),
        )
    b, a, keep = [], [], []
    for i, p in enumerate(s.prompts):
        for j in range(i * k, (i + 1) * k):
            keep.append(bool(p.truth))
            b.append(all(checks[attr][0][j] == lab for attr, lab in p.truth))
            a.append(all(checks[attr][1][j] == lab for attr, lab in p.truth))
    keep = np.array(keep)
    if not keep.any():
        return None
    return metrics.paired(np.array(b)[keep], np.array(a)[keep], seed)


__all__ = ["EvalReport", "EvaluationError", "ImageJudge", "Sampling", "evaluate", "load_image_judge"]
