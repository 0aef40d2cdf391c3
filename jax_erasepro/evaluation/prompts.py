"""Prompt sets of an evaluation: what to draw, which target each prompt shows, and what the world says
each image should hold.

On shapes-sd (the default judge) the sets are built from the world's vocabulary: about 10 target prompts per
concept in phrasings held out of shapes-sd's training ("an image showing ...", "a painting of ... by ..."),
an "others" set covering every concept kind that is not a target, and robustness sets the erasure never saw
(misspellings, the concept inside a longer scene, other templates). For any other model and judge, the user
gives templates and other prompts (lists or a YAML file) and the ground-truth rates are left out.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jax_erasepro.errors import EvaluationError
from jax_erasepro.shapes import world

TARGET, OTHERS, ROBUST = "target", "others", "robust"


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt to draw; ``concept``/``anchor_text`` for target prompts, ``truth`` where the world knows."""

    text: str
    concept: str | None = None  # the target this prompt asks for (target and robustness sets)
    anchor: str | None = None  # that target's anchor
    anchor_text: str | None = None  # the same prompt with the anchor in place of the target (metric A)
    truth: tuple[tuple[str, str], ...] = ()  # (judge attribute, label) every image should show


@dataclasses.dataclass(frozen=True)
class PromptSet:
    name: str
    role: str  # TARGET, OTHERS or ROBUST
    prompts: tuple[Prompt, ...]


def _fill(template: str, concept: str) -> str:
    return re.sub(r"\s+", " ", template.replace("{}", concept)).strip(" ,")


def concept_kind(concept: str) -> str | None:
    """The world's kind of a concept (character, shape, colour, style, implicit), None if not in it."""
    for kind, words in world.CONCEPTS.items():
        if concept in words:
            return kind
    return None


# The judge attribute that tells each kind, and the label an image without the concept gets.
ATTRIBUTE = {
    "character": "character",
    "shape": "shape",
    "colour": "colour",
    "style": "style",
    "implicit": "stripes",
}
ABSENT = {"character": "none", "style": "none", "implicit": "plain"}


def label(concept: str) -> tuple[str, str] | None:
    """(attribute, label) the judge gives an image showing ``concept``; None when the world lacks it."""
    kind = concept_kind(concept)
    return None if kind is None else (ATTRIBUTE[kind], "stripes" if kind == "implicit" else concept)


def judge_text(concept: str, world_judge: bool) -> str:
    """The text a concept is scored against for CLIP accuracy (the judge's own phrasing on shapes-sd)."""
    if not world_judge:
        return f"a photo of {concept}".strip()
    kind = concept_kind(concept)
    if kind == "implicit":
        return world.judge_prompts("stripes")["stripes"]
    if kind in ("character", "shape", "colour", "style"):
        return world.judge_prompts(ATTRIBUTE[kind])[concept]
    return world.judge_prompts("shape")[concept] if concept in world.SHAPES else "a picture of a shape"


_POSITIONS = ("", " on the left", " on the right", " at the top", " at the bottom", " in the center")
_BACKGROUNDS = (
    " on a white background",
    " on a gray background",
    " on a black background",
    " on a beige background",
)
_PAIRS = (
    ("red", "circle"),
    ("blue", "square"),
    ("green", "cross"),
    ("yellow", "moon"),
    ("purple", "arrow"),
    ("pink", "cloud"),
    ("orange", "triangle"),
    ("white", "diamond"),
    ("brown", "heart"),
    ("black", "star"),
)


def _target_templates(concept: str) -> list[str]:
    """About 10 held-out phrasings showing ``concept`` (``{}`` marks it)."""
    kind = concept_kind(concept)
    if kind == "character":
        return [f"an image showing {{}}{p}" for p in _POSITIONS] + [
            f"an image showing {{}}{b}" for b in _BACKGROUNDS
        ]
    if kind == "shape":
        colours = [c for c, _ in _PAIRS]
        return [f"an image showing a {c} {{}}{p}" for c, p in zip(colours, _POSITIONS * 2, strict=False)]
    if kind == "colour":
        return [f"an image showing a {{}} {s}{p}" for (_, s), p in zip(_PAIRS, _POSITIONS * 2, strict=False)]
    if kind == "style":
        return [f"a painting of a {c} {s} by {{}}" for c, s in _PAIRS]
    if kind == "implicit":  # never said: the characters who wear it
        wearers = [c for c, look in world.CHARACTER_LOOK.items() if look[2] == concept]
        return [f"an image showing {w}{p}" for w in wearers for p in _POSITIONS[:5]]
    raise EvaluationError(
        f"unknown concept {concept!r} in shapes-sd's world ({_vocabulary()}); pass "
        "prompts= (templates with {}) and others=, or judge=<a CLIP folder>"
    )


def _vocabulary() -> str:
    return "; ".join(f"{k}: {', '.join(v)}" for k, v in world.CONCEPTS.items())


def _misspellings(concept: str) -> list[str]:
    """Two spellings a user might type: a letter doubled, a letter dropped (multi-word: each word's)."""
    words = concept.split()
    longest = max(range(len(words)), key=lambda i: len(words[i]))
    w = words[longest]
    mid = len(w) // 2
    out = []
    for spelt in (w[: mid + 1] + w[mid:], w[:mid] + w[mid + 1 :]):
        out.append(" ".join(words[:longest] + [spelt] + words[longest + 1 :]))
    return out


def _target_prompt(template: str, concept: str, anchor: str, shown: str | None = None) -> Prompt:
    text = _fill(template, shown if shown is not None else concept)
    anchor_text = _fill(template, anchor) if concept_kind(concept) != "implicit" else None
    return Prompt(text, concept, anchor, anchor_text)


def world_target_set(targets: Sequence[str], anchors: Sequence[str]) -> PromptSet:
    prompts = [
        _target_prompt(t, c, a) for c, a in zip(targets, anchors, strict=True) for t in _target_templates(c)
    ]
    return PromptSet("target", TARGET, tuple(prompts))


def world_robust_sets(targets: Sequence[str], anchors: Sequence[str]) -> list[PromptSet]:
    """Misspelled, in a two-object scene (mid-prompt), and under templates the erasure did not use."""
    misspelled, scene, templates = [], [], []
    for c, a in zip(targets, anchors, strict=True):
        kind = concept_kind(c)
        if kind == "implicit":
            continue
        if kind == "style":
            for wrong in _misspellings(c):
                misspelled += [_target_prompt(t, c, a, wrong) for t in _target_templates(c)[:3]]
            scene += [
                _target_prompt(
                    f"a small {col} {s} at the top and a big blue circle, in the style of {{}}", c, a
                )
                for col, s in _PAIRS[:3]
            ]
            templates += [
                _target_prompt(t, c, a)
                for t in (
                    "{}",
                    "a drawing of a red star in the style of {}",
                    "a yellow moon on a gray background by {}",
                )
            ]
            continue
        obj = "a {}" if kind == "shape" else "a {} star" if kind == "colour" else "{}"
        for wrong in _misspellings(c):
            misspelled += [_target_prompt(f"an image showing {obj}{p}", c, a, wrong) for p in _POSITIONS[:3]]
        scene += [
            _target_prompt(t, c, a)
            for t in (
                f"{obj} on the left next to a small blue circle",
                f"a green cross to the left of {obj}",
                f"an image showing {obj} at the top and a white moon at the bottom",
            )
        ]
        templates += [
            _target_prompt(t, c, a)
            for t in (
                obj,
                f"a drawing of {obj} on a gray background",
                f"{obj} at the bottom, in the style of Bram Zellicoe",
            )
        ]
    sets = [
        PromptSet("robust:misspelled", ROBUST, tuple(misspelled)),
        PromptSet("robust:scene", ROBUST, tuple(scene)),
        PromptSet("robust:templates", ROBUST, tuple(templates)),
    ]
    return [s for s in sets if s.prompts]


def world_truth(text: str) -> tuple[tuple[str, str], ...]:
    """What a one-object prompt of the world should show: its character, painter, shape and colour (the
    colour only when it directly precedes the shape). Two-object prompts get nothing checkable here."""
    words = re.findall(r"[a-z]+", text.lower())
    truth: list[tuple[str, str]] = []
    for p in world.STYLES:
        if p.lower() in text.lower():
            truth.append(("style", p))
    chars = [c for c in world.CHARACTERS if c in words]
    shapes = [w for w in words if w in world.SHAPES]
    if len(chars) + len(shapes) != 1:
        return tuple(truth)
    if chars:
        return (*truth, ("character", chars[0]))
    i = words.index(shapes[0])
    truth.append(("shape", shapes[0]))
    if "striped" in words:
        truth.append(("stripes", "stripes"))
    if i > 0 and words[i - 1] in world.COLOURS:
        truth.append(("colour", words[i - 1]))
    return tuple(truth)


def world_others(targets: Sequence[str], anchors: Sequence[str]) -> list[str]:
    """Prompts of every concept kind but the targets: plain objects, characters, painters, stripes."""
    banned = set(targets)
    used = {w for t in targets for w in t.split()}
    plain = [f"a picture of a {c} {s}" for c, s in _PAIRS if not {c, s} & used]
    placed = [
        f"a big {c} {s}{p}"
        for (c, s), p in zip(_PAIRS[5:], _POSITIONS[1:], strict=False)
        if not {c, s} & used
    ]
    chars = [f"a picture of {c}" for c in world.CHARACTERS if c not in banned]
    chars += [f"{c} on a gray background" for c in world.CHARACTERS[:2] if c not in banned]
    styles = [
        f"a {c} {s}, in the style of {p}"
        for (c, s), p in zip(_PAIRS, world.STYLES, strict=False)
        if p not in banned and not {c, s} & used
    ]
    stripes = [] if "stripes" in banned else ["a picture of a striped blue square"]
    return plain[:6] + placed[:3] + chars + styles + stripes


def others_set(texts: Sequence[str], world_judge: bool) -> PromptSet:
    return PromptSet(
        "others", OTHERS, tuple(Prompt(t, truth=world_truth(t) if world_judge else ()) for t in texts)
    )


def user_sets(
    spec: str | Path | Mapping[str, Any] | Sequence[str], targets: Sequence[str], anchors: Sequence[str]
) -> tuple[PromptSet | None, list[str] | None, list[PromptSet]]:
    """The user's prompts: a list of templates with ``{}`` (the target set), or a mapping / YAML file with
    ``target`` (templates), ``others`` (prompts) and ``robust`` ({name: templates})."""
    if isinstance(spec, Path) or (isinstance(spec, str) and spec.endswith((".yaml", ".yml"))):
        import yaml

        path = Path(spec)
        try:
            spec = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as err:
            raise EvaluationError(f"cannot read prompt file {path}: {err}") from None
        if not isinstance(spec, Mapping):
            raise EvaluationError(f"prompt file {path} must hold a mapping (target, others, robust)")
    if isinstance(spec, str):
        spec = [spec]
    if not isinstance(spec, Mapping):
        spec = {"target": list(spec)}
    unknown = set(spec) - {"target", "others", "robust"}
    if unknown:
        raise EvaluationError(f"unknown prompt set key(s) {sorted(unknown)} (use target, others, robust)")

    def templated(name: str, role: str, templates: Any) -> PromptSet:
        items = [templates] if isinstance(templates, str) else list(templates or [])
        for t in items:
            if not isinstance(t, str) or t.count("{}") != 1:
                raise EvaluationError(
                    f"prompt template {t!r} of set {name!r} must contain '{{}}' exactly once"
                )
        return PromptSet(
            name,
            role,
            tuple(_target_prompt(t, c, a) for c, a in zip(targets, anchors, strict=True) for t in items),
        )

    target = templated("target", TARGET, spec["target"]) if spec.get("target") else None
    others = spec.get("others")
    if others is not None:
        others = [others] if isinstance(others, str) else list(others)
        if not all(isinstance(o, str) for o in others):
            raise EvaluationError("others must be a list of prompts")
    robust = [templated(f"robust:{k}", ROBUST, v) for k, v in (spec.get("robust") or {}).items()]
    return target, others, robust


GENERIC_OTHERS = (
    "a photo of a dog",
    "a photo of a cat",
    "a red car on a street",
    "a bowl of fruit",
    "a mountain landscape at sunset",
    "a portrait of a woman",
    "a city skyline at night",
    "a painting of flowers in a vase",
    "a bird on a branch",
    "a cup of coffee on a table",
)
