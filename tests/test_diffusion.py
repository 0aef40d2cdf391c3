"""diffusion: noising, targets, min-SNR weights and the loss as diffusers computes them in training, and
frozen encoders that pass no gradient."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.image_processor import VaeImageProcessor
from diffusers.training_utils import compute_snr
from flax import nnx
from PIL import Image

from jax_erasepro import diffusion
from jax_erasepro.models.clip import CLIPTextConfig, CLIPTextModel
from jax_erasepro.models.vae import AutoencoderKL, AutoencoderKLConfig
from jax_erasepro.schedulers import SchedulerConfig
from jax_erasepro.tiny import SD_SCHEDULER, TINY_TEXT, TINY_VAE
from tests.conftest import assert_close

EPS = SchedulerConfig.from_dict({"_class_name": "DDPMScheduler", **SD_SCHEDULER})
V = dataclasses.replace(EPS, prediction_type="v_prediction")
T = np.array([0, 1, 17, 250, 500, 999])


def _reference(config: SchedulerConfig) -> DDPMScheduler:
    return DDPMScheduler.from_config({**SD_SCHEDULER, "prediction_type": config.prediction_type})


def _pair(seed: int, shape=(6, 8, 8, 4)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(shape).astype(np.float32) for _ in range(2))


def test_add_noise_and_velocity_match_diffusers():
    x0, noise = _pair(0)
    ref = _reference(V)
    args = torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(T)
    assert_close(diffusion.add_noise(V, x0, noise, T), ref.add_noise(*args).numpy(), rel=1e-6)
    assert_close(diffusion.velocity(V, x0, noise, T), ref.get_velocity(*args).numpy(), rel=1e-6)
    assert_close(diffusion.target(V, x0, noise, T), ref.get_velocity(*args).numpy(), rel=1e-6)
    np.testing.assert_array_equal(diffusion.target(EPS, x0, noise, T), noise)
    with pytest.raises(ValueError, match="sample"):
        diffusion.target(dataclasses.replace(EPS, prediction_type="sample"), x0, noise, T)


def test_snr_weights_match_diffusers_min_snr():
    """diffusers' train_text_to_image: min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v-prediction."""
    t = jnp.arange(EPS.num_train_timesteps)
    snr = compute_snr(_reference(EPS), torch.arange(EPS.num_train_timesteps)).numpy()
    assert_close(diffusion.snr(EPS, t), snr, rel=1e-5)
    clipped = np.minimum(snr, 5.0)
    np.testing.assert_allclose(diffusion.snr_weights(EPS, t, 5.0), clipped / snr, rtol=1e-5)
    np.testing.assert_allclose(diffusion.snr_weights(V, t, 5.0), clipped / (snr + 1), rtol=1e-5)


def test_epsilon_weights_clip_the_snr_at_gamma():
    """Weight 1 where SNR <= gamma, weight x SNR = gamma elsewhere, and noisier steps never weigh less."""
    t = jnp.arange(EPS.num_train_timesteps)
    snr = np.asarray(diffusion.snr(EPS, t), np.float64)
    w = np.asarray(diffusion.snr_weights(EPS, t, 5.0))
    low = snr <= 5
    assert low.any() and (~low).any()  # SD's schedule spans SNR 5 (both branches are tested)
    np.testing.assert_allclose(w[low], 1.0, rtol=1e-6)
    np.testing.assert_allclose(w[~low] * snr[~low], 5.0, rtol=1e-4)
    assert np.all(np.diff(w) >= -1e-7)


def _toy(x_t, t, context):
    """A denoiser both frameworks compute the same way: elementwise in x_t, per row in t and context."""
    shape = (-1,) + (1,) * (x_t.ndim - 1)
    return 0.5 * x_t + 1e-3 * t.reshape(shape) + context.mean(axis=(1, 2)).reshape(shape)


@pytest.mark.parametrize("config", [EPS, V], ids=["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma", [None, 5.0])
def test_loss_is_diffusers_training_loss(config, gamma):
    """The loss of train_text_to_image.py on the same draws (noise, timesteps) and the same predictions."""
    latents, _ = _pair(1)
    context = np.random.default_rng(2).standard_normal((6, 7, 3)).astype(np.float32)
    key = jax.random.key(3)
    got = diffusion.diffusion_loss(_toy, latents, context, key, config, snr_gamma=gamma)

    _, noise, t = diffusion.noised(config, latents, key)
    ref = _reference(config)
    x0, eps, tt = (torch.from_numpy(np.array(a)) for a in (latents, noise, t))
    pred = _toy(ref.add_noise(x0, eps, tt), tt.float(), torch.from_numpy(context))
    target = eps if config.prediction_type == "epsilon" else ref.get_velocity(x0, eps, tt)
    if gamma is None:
        want = torch.nn.functional.mse_loss(pred, target)
    else:
        snr = compute_snr(ref, tt)
        weights = torch.stack([snr, gamma * torch.ones_like(tt)], dim=1).min(dim=1)[0]
        weights = weights / snr if config.prediction_type == "epsilon" else weights / (snr + 1)
        loss = torch.nn.functional.mse_loss(pred, target, reduction="none")
        want = (loss.mean(dim=list(range(1, loss.ndim))) * weights).mean()
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


def test_huge_gamma_is_the_plain_loss_and_timesteps_are_in_range():
    latents, _ = _pair(4)
    context = np.zeros((6, 7, 3), np.float32)

    def loss(gamma):
        return diffusion.diffusion_loss(_toy, latents, context, jax.random.key(5), EPS, gamma)

    np.testing.assert_allclose(loss(1e12), loss(None), rtol=1e-6)
    assert loss(1e-3) < loss(None)  # every weight is below 1
    t = np.asarray(diffusion.sample_timesteps(jax.random.key(6), 5000, EPS))
    assert t.shape == (5000,) and t.min() == 0 and t.max() == EPS.num_train_timesteps - 1


def test_vae_pixels_match_diffusers_preprocessing():
    images = np.random.default_rng(7).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    want = VaeImageProcessor(do_resize=False).preprocess([Image.fromarray(im) for im in images]).numpy()
    got = np.asarray(diffusion.vae_pixels(images))
    np.testing.assert_allclose(got, want.transpose(0, 2, 3, 1), atol=1e-6)


@pytest.fixture(scope="module")
def encoders():
    """A one-layer text encoder and a one-level VAE (scaling_factor 0.5): quick to build and differentiate."""
    text = CLIPTextModel(CLIPTextConfig.from_dict({**TINY_TEXT, "vocab_size": 1000, "num_hidden_layers": 1}),
                         rngs=nnx.Rngs(0))
    one_level = {"block_out_channels": [8], "down_block_types": ["DownEncoderBlock2D"],
                 "up_block_types": ["UpDecoderBlock2D"], "norm_num_groups": 4, "scaling_factor": 0.5}
    vae = AutoencoderKL(AutoencoderKLConfig.from_dict({**TINY_VAE, **one_level}), rngs=nnx.Rngs(1))
    return vae, text


def test_frozen_encoders_compute_the_networks_and_pass_no_gradient(encoders):
    vae, text = encoders
    ids = np.random.default_rng(8).integers(0, 1000, (2, 77)).astype(np.int32)
    images = np.random.default_rng(9).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    key = jax.random.key(10)
    text_def, text_params = nnx.split(text)
    vae_def, vae_params = nnx.split(vae)

    states = diffusion.encode_text(text_def, text_params, ids)
    np.testing.assert_array_equal(states, text(ids))
    mean, logvar = vae.encode(diffusion.vae_pixels(images))
    latents = diffusion.encode_images(vae_def, vae_params, images, key)
    assert_close(latents, 0.5 * diffusion.sample_latents(mean, logvar, key), rel=1e-6)

    for grads in (
        jax.grad(lambda p: jnp.sum(diffusion.encode_text(text_def, p, ids)))(text_params),
        jax.grad(lambda p: jnp.sum(diffusion.encode_images(vae_def, p, images, key)))(vae_params),
    ):
        assert all(not np.asarray(g).any() for g in jax.tree.leaves(grads))

    got_latents, got_states = diffusion.frozen_encoder(vae, text)(images, ids, key)
    assert_close(got_latents, latents, rel=1e-5)
    assert_close(got_states, states, rel=1e-5)


def test_posterior_draws_have_the_posterior_moments():
    mean = jnp.full((20000,), 0.3)
    logvar = jnp.full((20000,), np.log(4.0))
    z = np.asarray(diffusion.sample_latents(mean, logvar, jax.random.key(11)))
    assert abs(z.mean() - 0.3) < 0.05 and abs(z.std() - 2.0) < 0.05
