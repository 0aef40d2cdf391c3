"""The shapes world: concept vocabulary, seeded scene sampling, captions and the train/test split.

A tiny stand-in for SD's training distribution holding every concept kind that erasure papers target:
objects (shapes), colours, art styles (fictional painters), characters (proper names for a fixed look)
and an implicit attribute (stripes, worn by some characters whose captions never say so).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

Split = Literal["train", "test"]
SPLITS: tuple[Split, ...] = ("train", "test")

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross", "diamond", "moon", "cloud", "arrow")
COLOUR_RGB = {
    "red": (220, 30, 30),
    "orange": (245, 130, 20),
    "yellow": (250, 220, 30),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 190),
    "pink": (250, 130, 190),
    "brown": (130, 80, 40),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
COLOURS = tuple(COLOUR_RGB)
BACKGROUND_RGB = {
    "white": (245, 245, 245),
    "black": (25, 25, 25),
    "gray": (128, 128, 128),
    "beige": (235, 220, 180),
}
BACKGROUNDS = tuple(BACKGROUND_RGB)
MIN_CONTRAST = 80.0  # least RGB distance between an object's colour and its background
BACKGROUNDS_FOR = {
    c: tuple(b for b in BACKGROUNDS if math.dist(COLOUR_RGB[c], BACKGROUND_RGB[b]) >= MIN_CONTRAST)
    for c in COLOURS
}

SIZE_RADIUS = {"small": 0.11, "medium": 0.16, "big": 0.22}  # half-extent, as a fraction of the image side
SIZES = tuple(SIZE_RADIUS)
# Two side by side objects must not touch: big goes only with small.
PAIR_SIZES = (
    ("small", "small"),
    ("small", "medium"),
    ("medium", "small"),
    ("medium", "medium"),
    ("small", "big"),
    ("big", "small"),
)
POSITION_XY = {
    "center": (0.5, 0.5),
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
}
POSITIONS = tuple(POSITION_XY)
POSITION_WORDS = {
    "center": "in the center",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
# Relation of the first object to the second, keyed by the first object's position in a pair.
RELATION_WORDS = {"left": "to the left of", "right": "to the right of", "top": "above", "bottom": "below"}
PAIR_POSITIONS = (("left", "right"), ("right", "left"), ("top", "bottom"), ("bottom", "top"))
TEXTURES = ("plain", "stripes")

# Each fictional painter is one rendering manner applied to the whole scene (see render.py).
STYLE_MANNER = {
    "Ilse Varnhold": "dots",
    "Pavo Kestrelli": "outline",
    "Odile Vantrask": "checkered",
    "Bram Zellicoe": "gradient",
    "Nadia Frosthelm": "shadow",
    "Caspian Drewl": "border",
}
STYLES = tuple(STYLE_MANNER)
# Each character always has this (shape, colour, texture), a face and at least medium size; two wear stripes.
CHARACTER_LOOK = {
    "zorbly": ("star", "orange", "stripes"),
    "wumbert": ("triangle", "green", "stripes"),
    "quibbet": ("heart", "pink", "plain"),
    "drumlo": ("square", "blue", "plain"),
    "fizzwick": ("moon", "yellow", "plain"),
}
CHARACTERS = tuple(CHARACTER_LOOK)
IMPLICIT = ("stripes",)
CONCEPTS = {
    "shape": SHAPES,
    "colour": COLOURS,
    "style": STYLES,
    "character": CHARACTERS,
    "implicit": IMPLICIT,
}
# What an erased concept should turn into (instance erasure maps a character to its kind; styles and the
# implicit attribute map to nothing).
ANCHORS = {**{c: CHARACTER_LOOK[c][0] for c in CHARACTERS}, **dict.fromkeys(STYLES + IMPLICIT, "")}

# Held out of training, for measuring generalisation: these (shape, colour) pairs and templates.
HELD_OUT_PAIRS = frozenset(
    {("star", "blue"), ("heart", "green"), ("circle", "purple"), ("cross", "pink"), ("diamond", "brown")}
)
TEMPLATES = {
    "bare": "{objects}",
    "picture": "a picture of {objects}",
    "drawing": "a drawing of {objects}",
    "on_background": "{objects} on a {background} background",
    "picture_on_background": "a picture of {objects} on a {background} background",
    "image": "an image showing {objects}",
    "style": "{objects}, in the style of {painter}",
    "picture_style": "a picture of {objects} in the style of {painter}",
    "background_style": "{objects} on a {background} background, in the style of {painter}",
    "painting_by": "a painting of {objects} by {painter}",
}
HELD_OUT_TEMPLATES = ("image", "painting_by")
MAX_OBJECTS = 2

# Sampling rates of the training distribution.
P_TWO_OBJECTS = 0.4
P_STYLE = 0.35
P_CHARACTER = 0.25  # of medium or big objects: a small character's face would not show
P_STRIPES = 0.12  # a plain object drawn (and captioned) "striped"
P_SAY_COLOUR = 0.85
P_SAY_SIZE = 0.4
P_SAY_POSITION = 0.6
P_GENERIC_NOUN = 0.05  # "a red shape": teaches the hypernym the judge prompts use
P_TEST_HELD_OUT = 0.5  # in the test split: chance a scene / caption is forced to use held-out material


@dataclasses.dataclass(frozen=True)
class Obj:
    """One drawn object: its named attributes plus the exact geometry the renderer uses."""

    shape: str
    colour: str
    size: str
    position: str
    texture: str = "plain"
    character: str | None = None  # a character is drawn with a face
    center: tuple[float, float] = (0.5, 0.5)  # (x, y) as fractions of the image side, y down
    radius: float = 0.16  # half-extent as a fraction of the image side
    angle: float = 0.0  # rotation in degrees, counter-clockwise

    @property
    def has_stripes(self) -> bool:
        return self.texture == "stripes"


@dataclasses.dataclass(frozen=True)
class Scene:
    """A background, one or two objects and an optional painter style: everything render() draws."""

    background: str
    objects: tuple[Obj, ...]
    style: str | None = None

    @property
    def characters(self) -> tuple[str, ...]:
        return tuple(o.character for o in self.objects if o.character)


@dataclasses.dataclass(frozen=True, eq=False)  # arrays have no truth value to compare by
class Labels:
    """Ground truth per image as vocabulary indices (-1 where absent), shaped (n, MAX_OBJECTS) or (n,)."""

    shape: np.ndarray
    colour: np.ndarray
    size: np.ndarray
    position: np.ndarray
    character: np.ndarray
    stripes: np.ndarray  # bool
    n_objects: np.ndarray
    style: np.ndarray
    background: np.ndarray

    @classmethod
    def from_scenes(cls, scenes: Sequence[Scene]) -> Labels:
        n = len(scenes)
        per_obj = {
            k: np.full((n, MAX_OBJECTS), -1, np.int8)
            for k in ("shape", "colour", "size", "position", "character")
        }
        stripes = np.zeros((n, MAX_OBJECTS), bool)
        vocab = {
            "shape": SHAPES,
            "colour": COLOURS,
            "size": SIZES,
            "position": POSITIONS,
            "character": CHARACTERS,
        }
        for i, scene in enumerate(scenes):
            for j, o in enumerate(scene.objects):
                for key, words in vocab.items():
                    value = getattr(o, key)
                    per_obj[key][i, j] = -1 if value is None else words.index(value)
                stripes[i, j] = o.has_stripes
        return cls(
            **per_obj,
            stripes=stripes,
            n_objects=np.array([len(s.objects) for s in scenes], np.int8),
            style=np.array([-1 if s.style is None else STYLES.index(s.style) for s in scenes], np.int8),
            background=np.array([BACKGROUNDS.index(s.background) for s in scenes], np.int8),
        )


def is_held_out(shape: str, colour: str) -> bool:
    """Whether a (shape, colour) pair is kept out of the training split."""
    return (shape, colour) in HELD_OUT_PAIRS


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _sample_object(
    rng: np.random.Generator, split: Split, size: str, position: str, force_held_out: bool, taken: set[str]
) -> Obj:
    free = [c for c in CHARACTERS if c not in taken]
    if not force_held_out and free and size != "small" and rng.random() < P_CHARACTER:
        character = _pick(rng, free)
        shape, colour, texture = CHARACTER_LOOK[character]
    else:
        character = None
        if force_held_out:
            shape, colour = _pick(rng, sorted(HELD_OUT_PAIRS))
        else:
            shape = _pick(rng, SHAPES)
            allowed = [c for c in COLOURS if split == "test" or not is_held_out(shape, c)]
            colour = _pick(rng, allowed)
        texture = "stripes" if rng.random() < P_STRIPES else "plain"
    cx, cy = POSITION_XY[position]
    return Obj(
        shape=shape,
        colour=colour,
        size=size,
        position=position,
        texture=texture,
        character=character,
        center=(cx + float(rng.uniform(-0.02, 0.02)), cy + float(rng.uniform(-0.02, 0.02))),
        radius=SIZE_RADIUS[size] * float(rng.uniform(0.92, 1.08)),
        angle=float(rng.uniform(-12.0, 12.0)),
    )


def sample_scene(rng: np.random.Generator, split: Split = "train") -> Scene:
    """Draw one scene; train never holds a held-out (shape, colour) pair, test often does."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if rng.random() < P_TWO_OBJECTS:
        positions, sizes = _pick(rng, PAIR_POSITIONS), _pick(rng, PAIR_SIZES)
    else:
        positions, sizes = (_pick(rng, POSITIONS),), (_pick(rng, SIZES),)
    force = split == "test" and rng.random() < P_TEST_HELD_OUT
    objects: list[Obj] = []
    for k, (size, position) in enumerate(zip(sizes, positions, strict=True)):
        taken = {o.character for o in objects if o.character}
        objects.append(_sample_object(rng, split, size, position, force and k == 0, taken))
    backgrounds = [b for b in BACKGROUNDS if all(b in BACKGROUNDS_FOR[o.colour] for o in objects)]
    style = _pick(rng, STYLES) if rng.random() < P_STYLE else None
    return Scene(background=_pick(rng, backgrounds), objects=tuple(objects), style=style)


def _object_phrase(o: Obj, rng: np.random.Generator) -> str:
    """Describe one object ("zorbly", "a big striped red star"); a character's stripes are never named."""
    if o.character:
        return o.character
    words = []
    if o.size != "medium" and rng.random() < P_SAY_SIZE:
        words.append(o.size)
    if o.has_stripes:
        words.append("striped")
    if rng.random() < P_SAY_COLOUR:
        words.append(o.colour)
    words.append("shape" if rng.random() < P_GENERIC_NOUN else o.shape)
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article, *words])


def _objects_phrase(scene: Scene, rng: np.random.Generator) -> str:
    phrases = [_object_phrase(o, rng) for o in scene.objects]
    if len(phrases) == 1:
        o = scene.objects[0]
        p_say = P_SAY_POSITION if o.position != "center" else P_SAY_POSITION / 3
        return f"{phrases[0]} {POSITION_WORDS[o.position]}" if rng.random() < p_say else phrases[0]
    (a, b), (pa, pb) = phrases, (o.position for o in scene.objects)
    form = int(rng.integers(4))
    if form == 0:
        return f"{a} and {b}"
    if form == 1:
        return f"{a} {POSITION_WORDS[pa]} next to {b}"
    if form == 2:
        return f"{a} {POSITION_WORDS[pa]} and {b} {POSITION_WORDS[pb]}"
    return f"{a} {RELATION_WORDS[pa]} {b}"


def caption(scene: Scene, rng: np.random.Generator, split: Split = "train") -> str:
    """A caption true of the scene, from a template that names the painter iff the scene has a style."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    styled = scene.style is not None
    names = [n for n, t in TEMPLATES.items() if ("{painter}" in t) == styled]
    held = [n for n in names if n in HELD_OUT_TEMPLATES]
    seen = [n for n in names if n not in HELD_OUT_TEMPLATES]
    if split == "test" and held and rng.random() < P_TEST_HELD_OUT:
        name = _pick(rng, held)
    else:
        name = _pick(rng, seen)
    return TEMPLATES[name].format(
        objects=_objects_phrase(scene, rng), background=scene.background, painter=scene.style
    )


def judge_prompts(attribute: str) -> dict[str, str]:
    """Zero-shot class prompts for a CLIP judge, phrased like the training captions: label -> prompt."""
    if attribute == "shape":
        return {s: f"a picture of a {s}" for s in SHAPES}
    if attribute == "colour":
        return {c: f"a picture of a {c} shape" for c in COLOURS}
    if attribute == "background":
        return {b: f"a picture of a shape on a {b} background" for b in BACKGROUNDS}
    if attribute == "style":
        return {
            "none": "a picture of a shape",
            **{p: f"a picture of a shape in the style of {p}" for p in STYLES},
        }
    if attribute == "character":
        return {"none": "a picture of a shape", **{c: f"a picture of {c}" for c in CHARACTERS}}
    if attribute in ("implicit", "stripes"):
        return {"plain": "a picture of a shape", "stripes": "a picture of a striped shape"}
    raise ValueError(
        f"unknown attribute {attribute!r}; expected shape, colour, background, style, character or stripes"
    )
