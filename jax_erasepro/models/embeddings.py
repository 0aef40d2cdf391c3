"""Timestep embeddings of the SD UNet (diffusers ``embeddings.py``): sinusoids, then a two-layer MLP."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def timestep_embedding(
    timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool, freq_shift: float, max_period: int = 10000
) -> jax.Array:
    """Sinusoidal embedding (B,) -> (B, dim), as diffusers' ``get_timestep_embedding`` in float32."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    """``linear_2(silu(linear_1(x)))``: lifts the sinusoidal embedding to the resnets' time width."""

    def __init__(self, in_channels: int, time_embed_dim: int, *, rngs: nnx.Rngs):
        self.linear_1 = nnx.Linear(in_channels, time_embed_dim, rngs=rngs)
        self.linear_2 = nnx.Linear(time_embed_dim, time_embed_dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))
