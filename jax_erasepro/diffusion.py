"""What diffusion fine-tuning shares: noising latents, the training target and loss, and frozen encoders.

SD's training objective as diffusers' ``train_text_to_image.py`` computes it (epsilon or v-prediction,
optional min-SNR weighting), as pure functions over arrays, so every method that fine-tunes a UNet and the
shapes-sd recipe use one copy. Frozen networks go in as (graphdef, params) arguments under
``stop_gradient``: no gradient reaches them and jit does not bake their weights in as constants.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_erasepro.models.clip import CLIPTextModel
from jax_erasepro.models.vae import AutoencoderKL
from jax_erasepro.schedulers import SchedulerConfig, add_noise, alphas_cumprod

__all__ = [
    "add_noise",
    "diffusion_loss",
    "encode_images",
    "encode_text",
    "frozen_encoder",
    "noised",
    "sample_latents",
    "sample_timesteps",
    "snr",
    "snr_weights",
    "target",
    "vae_pixels",
    "velocity",
]

Denoiser = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # (x_t, t, context) -> prediction


def vae_pixels(images: np.ndarray | jax.Array) -> jax.Array:
    """uint8 (B, H, W, 3) -> float32 in [-1, 1], the VAE's input range."""
    return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


def sample_latents(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
    """A draw from the VAE's diagonal Gaussian posterior (diffusers' ``latent_dist.sample()``)."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


def sample_timesteps(key: jax.Array, n: int, config: SchedulerConfig) -> jax.Array:
    """(n,) training timesteps drawn uniformly from [0, num_train_timesteps)."""
    return jax.random.randint(key, (n,), 0, config.num_train_timesteps)


def noised(
    config: SchedulerConfig, x0: jax.Array, key: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(x_t, noise, t): clean latents noised to uniformly drawn timesteps, one per batch row."""
    t_key, n_key = jax.random.split(key)
    t = sample_timesteps(t_key, x0.shape[0], config)
    noise = jax.random.normal(n_key, x0.shape, x0.dtype)
    return add_noise(config, x0, noise, t), noise, t


def _per_row(values: jax.Array, like: jax.Array) -> jax.Array:
    return values.astype(like.dtype).reshape((-1,) + (1,) * (like.ndim - 1))


def velocity(config: SchedulerConfig, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """The v-prediction target sqrt(alpha_bar_t) noise - sqrt(1 - alpha_bar_t) x0 (diffusers'
    ``get_velocity``)."""
    a = _per_row(jnp.asarray(alphas_cumprod(config))[jnp.asarray(t)], x0)
    return jnp.sqrt(a) * noise - jnp.sqrt(1 - a) * x0


def target(config: SchedulerConfig, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """What the UNet learns to predict under ``config.prediction_type``: the noise or the velocity."""
    if config.prediction_type == "epsilon":
        return noise
    if config.prediction_type == "v_prediction":
        return velocity(config, x0, noise, t)
    raise ValueError(f"training predicts epsilon or v_prediction, not {config.prediction_type!r}")


def snr(config: SchedulerConfig, t: jax.Array) -> jax.Array:
    """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) at timesteps ``t``."""
    ac = jnp.asarray(alphas_cumprod(config))[t]
    return ac / (1 - ac)


def snr_weights(config: SchedulerConfig, t: jax.Array, gamma: float) -> jax.Array:
    """Min-SNR-gamma loss weights (Hang et al. 2023; diffusers' ``--snr_gamma``): min(SNR, gamma) / SNR for
    epsilon, / (SNR + 1) for v-prediction. Low-noise steps, whose fine detail dominates the plain loss, are
    weighted down; for epsilon, steps with SNR <= gamma keep weight 1."""
    s = snr(config, t)
    clipped = jnp.minimum(s, gamma)
    return clipped / (s + 1) if config.prediction_type == "v_prediction" else clipped / s


def diffusion_loss(
    model: Denoiser,
    latents: jax.Array,
    context: jax.Array,
    key: jax.Array,
    config: SchedulerConfig,
    snr_gamma: float | None = None,
) -> jax.Array:
    """SD's objective: the MSE between ``model``'s prediction and ``target`` at uniformly drawn timesteps,
    each example's error weighted by ``snr_weights`` when ``snr_gamma`` is given.

    ``latents`` are clean scaled latents (B, h, w, 4), ``context`` the text states (B, T, d)."""
    x_t, noise, t = noised(config, latents, key)
    err = jnp.square(model(x_t, t, context) - target(config, latents, noise, t))
    err = jnp.mean(err, axis=tuple(range(1, latents.ndim)))
    return jnp.mean(err if snr_gamma is None else snr_weights(config, t, snr_gamma) * err)


def encode_text(graphdef: nnx.GraphDef, params: nnx.State, ids: jax.Array) -> jax.Array:
    """(B, T) token ids -> (B, T, d) text-encoder states with its params held fixed (no gradient)."""
    return nnx.merge(graphdef, jax.lax.stop_gradient(params))(ids)


def encode_images(graphdef: nnx.GraphDef, params: nnx.State, images: jax.Array, key: jax.Array) -> jax.Array:
    """uint8 (B, H, W, 3) -> posterior-sampled latents x scaling_factor, the VAE held fixed (no gradient)."""
    vae = nnx.merge(graphdef, jax.lax.stop_gradient(params))
    mean, logvar = vae.encode(vae_pixels(images))
    return vae.config.scaling_factor * sample_latents(mean, logvar, key)


def frozen_encoder(
    vae: AutoencoderKL, text_encoder: CLIPTextModel
) -> Callable[[np.ndarray, np.ndarray, jax.Array], tuple[jax.Array, jax.Array]]:
    """(uint8 images, token ids, key) -> (latents x scaling_factor, text states), one jitted call that takes
    both frozen networks' params as arguments."""
    vae_def, vae_params = nnx.split(vae)
    text_def, text_params = nnx.split(text_encoder)

    @jax.jit
    def encode(vae_params, text_params, images, ids, key):
        return encode_images(vae_def, vae_params, images, key), encode_text(text_def, text_params, ids)

    return lambda images, ids, key: encode(vae_params, text_params, images, ids, key)
