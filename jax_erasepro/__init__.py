"""jax-erasepro: concept erasure for Stable-Diffusion-family models in pure JAX."""

from jax_erasepro.loading import load_pretrained
from jax_erasepro.pipeline import StableDiffusion, encode_prompts, generate

__all__ = ["StableDiffusion", "encode_prompts", "generate", "load_pretrained"]
