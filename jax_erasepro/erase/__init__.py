"""Concept erasure: closed-form weight edits and the plumbing that applies them to a model.

``erase(sd, targets, anchors, method=...)`` returns a new StableDiffusion (``sd`` is untouched) and an
EraseReport. Methods register in ``METHODS`` (name -> function) so later ones plug into the same call.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from jax_erasepro.erase.blas import single_threaded_blas
from jax_erasepro.erase.columns import EraseError
from jax_erasepro.erase.erasepro import DEFAULT_PROMPTS, IMPLICIT_PRESETS, PROTECTED_START, erase_erasepro
from jax_erasepro.erase.report import EraseReport
from jax_erasepro.erase.uce import erase_uce
from jax_erasepro.pipeline import StableDiffusion


def _implicit(
    sd: StableDiffusion,
    targets,
    anchors,
    preserve,
    prompts,
    *,
    strength: str = "weak",
    first_tokens: int | None = None,
    start_layer: int | None = None,
    **options: Any,
):
    """Algorithm 2: the first k paired tokens from layer s on; s is scaled to the encoder's depth (of 12)."""
    if strength not in IMPLICIT_PRESETS:
        raise EraseError(f"unknown strength {strength!r} (choose from {', '.join(IMPLICIT_PRESETS)})")
    k, s = IMPLICIT_PRESETS[strength]
    depth = sd.config.text_encoder.num_hidden_layers
    if start_layer is None:
        start_layer = 1 + round((s - 1) * depth / 12)
        if options.get("form", "protected") == "protected":  # see erasepro.PROTECTED_START
            start_layer = max(start_layer, min(PROTECTED_START, depth))
    return erase_erasepro(
        sd,
        targets,
        anchors,
        preserve,
        prompts,
        method="erasepro-implicit",
        first_tokens=k if first_tokens is None else first_tokens,
        start_layer=start_layer,
        **options,
    )


def _explicit(sd: StableDiffusion, targets, anchors, preserve, prompts, **options: Any):
    return erase_erasepro(sd, targets, anchors, preserve, prompts, method="erasepro", **options)


_explicit.forwards_to = _implicit.forwards_to = erase_erasepro
Method = Callable[..., tuple[StableDiffusion, EraseReport]]
METHODS: dict[str, Method] = {"erasepro": _explicit, "erasepro-implicit": _implicit, "uce": erase_uce}


def _accepted(fn: Callable) -> set[str]:
    """Keyword options ``fn`` takes, following ``**options`` into the function it forwards them to."""
    params = inspect.signature(fn).parameters
    names = {k for k, p in params.items() if p.kind is p.KEYWORD_ONLY}
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        names |= _accepted(fn.forwards_to) - {"method"}
    return names


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
    if method not in METHODS:
        raise EraseError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
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
    fn = METHODS[method]
    unknown = sorted(set(options) - _accepted(fn))
    if unknown:
        raise EraseError(f"unknown option(s) for method {method!r}: {', '.join(unknown)}")
    with single_threaded_blas():  # jaxlib's CPU LAPACK: see blas.py
        return fn(sd, targets, anchors, preserve, prompts, **options)


__all__ = ["DEFAULT_PROMPTS", "METHODS", "EraseError", "EraseReport", "erase"]
