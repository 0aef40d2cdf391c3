"""The world's labels of a one-object image (shape, colour, painter, character) and a CLIP's zero-shot
reading of them: what the judge shapes-clip answers and what its own quality bar is measured on."""

from __future__ import annotations

import numpy as np
from transformers import CLIPTokenizer

from jax_erasepro.evaluation.judge import LABEL_CHUNK, zero_shot
from jax_erasepro.models.clip import CLIPModel
from jax_erasepro.shapes.render import make_scenes, render
from jax_erasepro.shapes.world import Scene, Split, judge_prompts

ATTRIBUTES = ("shape", "colour", "style", "character")  # what the judge's bar checks


def image_label(scene: Scene, attribute: str) -> str:
    """The judge class a one-object scene belongs to: its shape, colour, painter or character (or "none")."""
    obj = scene.objects[0]
    stripes = "stripes" if obj.has_stripes else "plain"
    return {
        "shape": obj.shape,
        "colour": obj.colour,
        "style": scene.style or "none",
        "character": obj.character or "none",
        "background": scene.background,
        "stripes": stripes,
        "implicit": stripes,
    }[attribute]


def single_object_scenes(seed: int, n: int, split: Split = "test") -> list[Scene]:
    """The first n one-object scenes of the world's stream ``seed``: their judge labels are unambiguous."""
    scenes = [s for s in make_scenes(seed, 3 * n, split)[0] if len(s.objects) == 1]
    if len(scenes) < n:
        raise ValueError(f"only {len(scenes)} one-object scenes among {3 * n}")
    return scenes[:n]


def zero_shot_predict(
    model: CLIPModel, tokenizer: CLIPTokenizer, attribute: str, images: np.ndarray, chunk: int = LABEL_CHUNK
) -> list[str]:
    """Classify uint8 (n, 64, 64, 3) images by ``attribute`` against the world's judge prompts."""
    return zero_shot(model, tokenizer, judge_prompts(attribute), images, chunk)


def zero_shot_accuracy(
    model: CLIPModel,
    tokenizer: CLIPTokenizer,
    attribute: str,
    n: int = 1000,
    seed: int = 0,
    split: Split = "test",
) -> float:
    """Zero-shot accuracy on ``attribute`` over n fresh one-object renders (the judge's quality bar)."""
    scenes = single_object_scenes(seed, n, split)
    images = np.stack([render(s) for s in scenes])
    predicted = zero_shot_predict(model, tokenizer, attribute, images)
    return float(np.mean([p == image_label(s, attribute) for p, s in zip(predicted, scenes, strict=True)]))
