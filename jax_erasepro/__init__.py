"""jax-erasepro: concept erasure for Stable-Diffusion-family models in pure JAX."""

from jax_erasepro.delta import apply_delta
from jax_erasepro.erase import erase
from jax_erasepro.errors import ConfigError, EraseError, EraseProError, EvaluationError, LoadError, SaveError
from jax_erasepro.loading import load_pretrained
from jax_erasepro.pipeline import StableDiffusion, encode_prompts, generate
from jax_erasepro.saving import save_pretrained

__all__ = [
    "ConfigError",
    "EraseError",
    "EraseProError",
    "EvaluationError",
    "LoadError",
    "SaveError",
    "StableDiffusion",
    "apply_delta",
    "encode_prompts",
    "erase",
    "generate",
    "load_pretrained",
    "save_pretrained",
]
