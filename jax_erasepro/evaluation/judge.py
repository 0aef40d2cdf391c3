"""The CLIP an evaluation sees images through: image and text embeddings, and on shapes-sd the world's
zero-shot labels. Any transformers-layout ``CLIPModel`` folder (config.json, model.safetensors, tokenizer)
works; shapes-clip, the shipped judge, is the default and the only one that gives ground-truth labels.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from transformers import CLIPTokenizer

from jax_erasepro.evaluation.prompts import EvaluationError
from jax_erasepro.models.clip import CLIPModel
from jax_erasepro.tokenizer import load_tokenizer, tokenize

# CLIPImageProcessor's normalisation (OpenAI CLIP's, shared by shapes-clip).
PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)
CHUNK = 64  # images per judge call


@partial(nnx.jit, static_argnames="size")
def _image_features(model: CLIPModel, images: jax.Array, size: int) -> jax.Array:
    x = jnp.asarray(images, jnp.float32) / 255.0
    if x.shape[1:3] != (size, size):
        x = jax.image.resize(x, (x.shape[0], size, size, 3), "bicubic")
    x = (x - jnp.asarray(PIXEL_MEAN)) / jnp.asarray(PIXEL_STD)
    f = model.get_image_features(x)
    return f / jnp.linalg.norm(f, axis=-1, keepdims=True)


@nnx.jit
def _text_features(model: CLIPModel, ids: jax.Array) -> jax.Array:
    f = model.get_text_features(ids)
    return f / jnp.linalg.norm(f, axis=-1, keepdims=True)


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
            np.asarray(_image_features(self.model, images[k : k + CHUNK], size))
            for k in range(0, len(images), CHUNK)
        ]
        return np.concatenate(parts).astype(np.float64)

    def text_features(self, texts: list[str]) -> np.ndarray:
        """Texts -> float64 (n, d) unit embeddings."""
        length = self.model.config.text_config.max_position_embeddings
        ids = tokenize(self.tokenizer, texts, max_length=length)
        return np.asarray(_text_features(self.model, jnp.asarray(ids, jnp.int32)), np.float64)

    def labels(self, images: np.ndarray, attribute: str) -> np.ndarray:
        """The world's zero-shot label of each image for ``attribute`` (shapes-clip only)."""
        from jax_erasepro.shapes.train_clip import zero_shot_predict

        return np.array(zero_shot_predict(self.model, self.tokenizer, attribute, np.asarray(images)))


def load_image_judge(path: str | Path | None = None) -> ImageJudge:
    """shapes-clip (``path`` None) or a transformers ``CLIPModel`` folder; one clear error otherwise."""
    from jax_erasepro.shapes.judge import judge_path, load_clip

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
