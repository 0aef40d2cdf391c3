"""Concept erasure: closed-form weight edits and the plumbing that applies them to a model.

``erase(sd, targets, anchors, method=...)`` returns a new StableDiffusion (``sd`` is untouched) and an
EraseReport. Methods register in ``methods.REGISTRY`` (a name, a frozen options dataclass and
``run(sd, request, options)``), so later ones plug into the same call, command line and docs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jax_erasepro.erase.ac import ACOptions, erase_ac
from jax_erasepro.erase.allbutone import AllButOneOptions, erase_allbutone
from jax_erasepro.erase.blas import single_threaded_blas
from jax_erasepro.erase.columns import EraseError
from jax_erasepro.erase.erasepro import (
    DEFAULT_PROMPTS,
    EraseProOptions,
    ImplicitOptions,
    run_explicit,
    run_implicit,
)
from jax_erasepro.erase.esd import TRAIN_SETS, ESDOptions, runner
from jax_erasepro.erase.fewshot import FewShotOptions, erase_fewshot
from jax_erasepro.erase.methods import REGISTRY, Method, Request, get_method, register
from jax_erasepro.erase.report import EraseReport
from jax_erasepro.erase.uce import UCEOptions, erase_uce
from jax_erasepro.sd import StableDiffusion

register(
    Method(
        "erasepro",
        "closed-form progressive edit of the text encoder's q/k/v, then the U-Net's attn2 to_k/to_v, so the "
        "target's features equal the anchor's (explicit concepts)",
        "ErasePro, Algorithm 1",
        EraseProOptions,
        run_explicit,
    )
)
register(
    Method(
        "erasepro-implicit",
        "ErasePro on the first k tokens from a later encoder layer: for concepts a prompt implies (a style, "
        'nudity); the anchor is usually ""',
        "ErasePro, Algorithm 2",
        ImplicitOptions,
        run_implicit,
    )
)
register(
    Method(
        "uce",
        "Unified Concept Editing: a closed-form ridge edit of the U-Net's attn2 to_k/to_v over the original "
        "encoder's features, as the authors' scripts compute it",
        "Gandikota et al., Unified Concept Editing in Diffusion Models, WACV 2024 (arXiv 2308.14761)",
        UCEOptions,
        erase_uce,
    )
)
for _name, (_what, _) in TRAIN_SETS.items():
    register(
        Method(
            _name,
            f"ESD: fine-tunes {_what} so the target prompt's noise prediction is the original's guided away "
            "from the concept (Adam, partial sampling to a random step); anchors and preserve are not used",
            "Gandikota et al., Erasing Concepts from Diffusion Models, ICCV 2023 (arXiv 2303.07345)",
            ESDOptions,
            runner(_name),
        )
    )
register(
    Method(
        "ac",
        "Ablating Concepts (model-based): fine-tunes the U-Net's cross-attention to_k/to_v so the target "
        "prompt's noise prediction on anchor images is the anchor prompt's",
        "Kumari et al., Ablating Concepts in Text-to-Image Diffusion Models, ICCV 2023 (arXiv 2303.13516)",
        ACOptions,
        erase_ac,
    )
)
register(
    Method(
        "fewshot",
        "few-shot unlearning: gradient ascent of the diffusion loss on a few images of the target, captioned "
        "with it, updating only the text encoder (Adam); anchors and preserve are not used",
        "Fuchi & Takagi, Erasing Concepts from Text-to-Image Diffusion Models with Few-shot Unlearning, "
        "BMVC 2024 (arXiv 2405.07288)",
        FewShotOptions,
        erase_fewshot,
    )
)
register(
    Method(
        "allbutone",
        "All but One: fine-tunes the U-Net's cross-attention so only the target's guidance term moves to the "
        "anchor's (on its strongest elements), the unconditional prediction held by a Lagrangian penalty",
        "Hong, Lee and Woo, All but One: Surgical Concept Erasing with Model Preservation in Text-to-Image "
        "Diffusion Models, AAAI 2024 (arXiv 2312.12807); no official code, our implementation of the paper",
        AllButOneOptions,
        erase_allbutone,
    )
)
METHODS = REGISTRY  # name -> Method


def _token_ids(sd: StableDiffusion, concept: str) -> tuple[int, ...]:
    return tuple(sd.tokenizer(concept)["input_ids"])


def _concepts(name: str, value: Sequence[str] | str) -> list[str]:
    items = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(v, str) for v in items):
        raise EraseError(f"{name} must be strings, got {items!r}")
    return [v.strip() for v in items]


def erase(
    sd: StableDiffusion,
    targets: Sequence[str] | str,
    anchors: Sequence[str] | str,
    *,
    method: str = "erasepro",
    preserve: Sequence[str] = (),
    prompts: Sequence[str] | None = None,
    **options: Any,
) -> tuple[StableDiffusion, EraseReport]:
    """Erase each target concept towards its anchor (one anchor string serves all targets).

    ``prompts`` are templates with ``{}`` building the feature columns (None: the method's default set,
    ["{}"]: the concept alone). Raises EraseError (a ValueError) before anything is computed or returned.
    """
    spec = get_method(method)
    targets, preserve = _concepts("targets", targets), _concepts("preserve", preserve)
    anchors = _concepts("anchors", anchors)
    if len(anchors) == 1:
        anchors = anchors * len(targets)
    if not targets:
        raise EraseError("no targets given")
    if len(anchors) != len(targets):
        raise EraseError(f"{len(targets)} targets but {len(anchors)} anchors (give one or one per target)")
    for t, a in zip(targets, anchors, strict=True):
        if not t:
            raise EraseError("empty target concept")
        if t == a:
            raise EraseError(f"target {t!r} equals its anchor")
    target_ids = {_token_ids(sd, t): t for t in targets}
    for p in preserve:
        if (t := target_ids.get(_token_ids(sd, p))) is not None:  # "CAT" and "cat" are one prompt to CLIP
            same = "" if p == t else f" (it tokenizes as the target {t!r})"
            raise EraseError(f"concept {p!r} is both a target and preserved{same}")
    if prompts is not None:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise EraseError("prompts is empty (use None for the default set)")
    opts = spec.make_options(options)
    request = Request(
        tuple(targets), tuple(anchors), tuple(preserve), None if prompts is None else tuple(prompts)
    )
    with single_threaded_blas():  # jaxlib's CPU LAPACK: see blas.py
        return spec.run(sd, request, opts)


__all__ = [
    "ACOptions",
    "AllButOneOptions",
    "DEFAULT_PROMPTS",
    "METHODS",
    "REGISTRY",
    "EraseError",
    "EraseProOptions",
    "ESDOptions",
    "EraseReport",
    "FewShotOptions",
    "ImplicitOptions",
    "Method",
    "Request",
    "UCEOptions",
    "erase",
    "get_method",
    "register",
]
