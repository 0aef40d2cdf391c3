"""The CLIP an evaluation sees images through: image and text embeddings, and on shapes-sd the world's
zero-shot labels. Any transformers-layout ``CLIPModel`` folder (config.json, model.safetensors, tokenizer)
works; shapes-clip, the shipped judge, is the default and the only one that gives ground-truth labels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from functools import partial
from importlib import resources
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from transformers import CLIPTokenizer

from jax_erasepro.evaluation.prompts import EvaluationError
from jax_erasepro.loading import SafetensorsReader
from jax_erasepro.models.clip import CLIPConfig, CLIPModel
from jax_erasepro.shapes.world import judge_prompts
from jax_erasepro.tokenizer import load_tokenizer, tokenize
from jax_erasepro.weights import abstract_model, load_state_dict

# OpenAI CLIP's pixel normalisation (CLIPImageProcessor's; shapes-clip was trained with it).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CHUNK = 64  # images per judge call
LABEL_CHUNK = 250  # images per zero-shot labelling call


def clip_pixels(images: np.ndarray | jax.Array, size: int | None = None) -> jax.Array:
    """uint8 (B, H, W, 3) -> float32 NHWC CLIP inputs: resized (bicubic) to ``size`` x ``size`` when given
    and different, normalised as CLIPImageProcessor does."""
    x = jnp.asarray(images, jnp.float32) / 255.0
    if size is not None and x.shape[1:3] != (size, size):
        x = jax.image.resize(x, (x.shape[0], size, size, 3), "bicubic")
    return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


@partial(nnx.jit, static_argnames="size")
def clip_image_features(model: CLIPModel, images: jax.Array, size: int | None = None) -> jax.Array:
    """uint8 (B, H, W, 3) -> (B, d) unit-norm CLIP image embeddings (``clip_pixels`` first), jitted."""
    f = model.get_image_features(clip_pixels(images, size))
    return f / jnp.linalg.norm(f, axis=-1, keepdims=True)


@nnx.jit
def clip_text_features(model: CLIPModel, ids: jax.Array) -> jax.Array:
    """(B, T) token ids -> (B, d) unit-norm CLIP text embeddings, jitted."""
    f = model.get_text_features(ids)
    return f / jnp.linalg.norm(f, axis=-1, keepdims=True)


def zero_shot(
    model: CLIPModel,
    tokenizer: CLIPTokenizer,
    classes: Mapping[str, str],
    images: np.ndarray,
    chunk: int = LABEL_CHUNK,
) -> list[str]:
    """Name each uint8 (n, H, W, 3) image by the class (name -> prompt) whose text embedding is closest."""
    text = clip_text_features(model, tokenize(tokenizer, list(classes.values()), on_overflow="error"))
    size = model.config.vision_config.image_size
    sims = np.concatenate([
        np.asarray(clip_image_features(model, images[k : k + chunk], size) @ text.T)
        for k in range(0, len(images), chunk)
    ])
    names = list(classes)
    return [names[j] for j in sims.argmax(-1)]


def judge_path() -> Path:
    """The shipped shapes-clip folder; raises FileNotFoundError while it is not shipped yet."""
    path = Path(str(resources.files("jax_erasepro") / "assets" / "shapes-clip"))
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"the shapes-clip judge is not installed ({path} is missing)")
    return path


def load_clip(folder: str | Path) -> CLIPModel:
    """A transformers ``CLIPModel`` folder (config.json + model.safetensors) -> our CLIPModel."""
    folder = Path(folder)
    reader = SafetensorsReader(folder / "model.safetensors")
    config = CLIPConfig.from_json(folder / "config.json")
    return load_state_dict(
        abstract_model(CLIPModel, config), reader.__getitem__, reader.keys, source=str(reader.path),
        ignore=lambda k: k.endswith("position_ids"),
    )


@dataclasses.dataclass(frozen=True)
class ImageJudge:
    """A CLIP and its tokenizer; ``world`` is True for shapes-clip, whose labels are the world's."""

    model: CLIPModel
    tokenizer: CLIPTokenizer
    world: bool
    name: str

    def image_features(self, images: np.ndarray) -> np.ndarray:
        """uint8 (n, H, W, 3) -> float64 (n, d) unit embeddings (resized to the CLIP's input size)."""
        size = self.model.config.vision_config.image_size
        parts = [
            np.asarray(clip_image_features(self.model, images[k : k + CHUNK], size))
            for k in range(0, len(images), CHUNK)
        ]
        return np.concatenate(parts).astype(np.float64)

    def text_features(self, texts: list[str]) -> np.ndarray:
        """Texts -> float64 (n, d) unit embeddings."""
        length = self.model.config.text_config.max_position_embeddings
        ids = tokenize(self.tokenizer, texts, max_length=length)
        return np.asarray(clip_text_features(self.model, jnp.asarray(ids, jnp.int32)), np.float64)

    def labels(self, images: np.ndarray, attribute: str) -> np.ndarray:
        """The world's zero-shot label of each image for ``attribute`` (shapes-clip only)."""
        return np.array(zero_shot(self.model, self.tokenizer, judge_prompts(attribute), np.asarray(images)))


def load_image_judge(path: str | Path | None = None) -> ImageJudge:
    """shapes-clip (``path`` None) or a transformers ``CLIPModel`` folder; one clear error otherwise."""
    world = path is None
    folder = judge_path() if world else Path(path)
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise EvaluationError(
            f"judge {folder} is not a CLIP folder (needs config.json and model.safetensors)"
        )
    try:
        model = load_clip(folder)
    except (KeyError, TypeError, ValueError) as err:
        raise EvaluationError(f"judge {folder} is not a transformers CLIPModel: {err}") from None
    return ImageJudge(model, load_tokenizer(folder), world, "shapes-clip" if world else str(folder))
