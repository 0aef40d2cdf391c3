"""Min-SNR-gamma weighting of the UNet loss: the formula's properties, and the plain loss as its limit."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_erasepro.schedulers import alphas_cumprod
from jax_erasepro.shapes import train_unet as tu


def test_weights_clip_the_snr_at_gamma():
    t = jnp.arange(tu.SCHEDULER.num_train_timesteps)
    ac = alphas_cumprod(tu.SCHEDULER).astype(np.float64)
    snr = ac / (1 - ac)
    w = np.asarray(tu.snr_weights(t, 5.0))
    low = snr <= 5
    assert low.any() and (~low).any()  # SD's schedule spans SNR 5 (both branches are tested)
    np.testing.assert_allclose(w[low], 1.0, rtol=1e-6)
    np.testing.assert_allclose(w[~low] * snr[~low], 5.0, rtol=1e-4)  # weight x SNR = gamma
    assert np.all(np.diff(w) >= -1e-7)  # noisier steps never weigh less


def test_loss_with_a_huge_gamma_is_the_plain_loss():
    unet = tu.UNet2DConditionModel(tu.unet_config("tiny", 32), rngs=nnx.Rngs(0))
    k1, k2 = jax.random.split(jax.random.key(0))
    batch = {"latents": jax.random.normal(k1, (3, 16, 16, 4)), "context": jax.random.normal(k2, (3, 77, 32))}
    key = jax.random.key(1)
    plain, _ = tu.diffusion_loss(unet, batch, key)
    same, _ = tu.diffusion_loss(unet, batch, key, snr_gamma=1e12)
    less, _ = tu.diffusion_loss(unet, batch, key, snr_gamma=1e-3)
    np.testing.assert_allclose(same, plain, rtol=1e-5)
    assert less < plain  # every weight is below 1 at gamma 1e-3
