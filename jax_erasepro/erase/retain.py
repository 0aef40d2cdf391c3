"""The retain set of protected ErasePro: prompts whose text features an edit should leave where they are.

By default: the empty prompt (the unconditional branch of classifier-free guidance), generic captions of
objects, colours, shapes, places and manners, the preserved concepts under every template, and, for the
embedded shapes-sd, 200 captions of its own training distribution (the "captions of the model's world";
for another model, pass the captions its users write, e.g. a caption data set). Captions naming a target
are left out: a retained target could not move.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

GENERIC_CAPTIONS = (
    "", "a picture", "a photo", "an image", "a painting", "a drawing", "art",
    "a red circle", "a blue square", "a green triangle", "a yellow star", "a purple heart", "a white cross",
    "a black moon", "a pink cloud", "an orange arrow", "a brown diamond",
    "a big red square on the left", "a small blue circle at the top", "a green shape in the center",
    "a yellow triangle on a gray background", "a picture of a white star on a black background",
    "a drawing of a pink heart at the bottom", "an image showing a blue moon on the right",
    "a circle and a square", "a red cross next to a green cloud", "a striped orange square",
    "a photo of a dog", "a photo of a cat", "a car on a street", "a house with a garden",
    "a portrait of a woman", "a mountain landscape", "a bowl of fruit on a table", "a city at night",
    "a painting of flowers", "a sketch of a tree", "a bird in the sky", "a boat on the sea",
    "a cup of coffee", "a person walking in the park",
)  # fmt: skip
WORLD_CAPTIONS = 200
WORLD_SEED = 20_261_207  # a stream apart from the evaluation's prompts


def world_captions(n: int = WORLD_CAPTIONS, seed: int = WORLD_SEED) -> list[str]:
    """n captions of shapes-sd's training distribution (train split, seeded)."""
    from jax_erasepro.shapes.world import caption, sample_scene

    rng = np.random.default_rng(seed)
    return [caption(sample_scene(rng, "train"), rng, "train") for _ in range(n)]


def is_embedded_default(sd: Any) -> bool:
    """Whether ``sd`` was loaded from the embedded shapes-sd folder."""
    from jax_erasepro.default_model import default_model_path

    path = getattr(getattr(sd, "source", None), "path", None)
    try:
        return path is not None and Path(path).resolve() == Path(default_model_path()).resolve()
    except (OSError, FileNotFoundError):
        return False


def _contains(caption: list[int], part: list[int]) -> bool:
    return any(caption[i : i + len(part)] == part for i in range(len(caption) - len(part) + 1))


def default_retain(
    sd: Any, targets: Sequence[str], preserve: Sequence[str], templates: Sequence[str]
) -> tuple[str, ...]:
    """The module docstring's retain set for ``sd``, without captions whose tokens contain a target's."""
    captions = list(GENERIC_CAPTIONS)
    if is_embedded_default(sd):
        captions += world_captions()
    captions += [t.replace("{}", p) for p in preserve for t in templates]

    def ids(text: str) -> list[int]:
        return sd.tokenizer(text)["input_ids"][1:-1]

    banned = [b for b in (ids(t) for t in targets) if b]
    kept = [c for c in dict.fromkeys(captions) if not any(_contains(ids(c), b) for b in banned)]
    return tuple(kept)
