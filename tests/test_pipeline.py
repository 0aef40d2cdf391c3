"""Whole-pipeline parity with diffusers: prompt encoding and full sampling runs, same weights and latents."""

import jax
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler
from flax import nnx

from jax_erasepro.pipeline import encode_prompts, generate
from jax_erasepro.tiny import tiny_random_sd
from tests.conftest import assert_close
from tests.torch_bridge import torch_pipeline

PROMPTS = ["a red star on the left", "a photo of a cat"]


@pytest.fixture(scope="module")
def models():
    sd = tiny_random_sd(seed=3)
    return sd, torch_pipeline(sd)


def test_encode_prompts_matches_diffusers(models):
    sd, pipe = models
    ours = encode_prompts(sd, PROMPTS)
    with torch.no_grad():
        ref, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
    assert_close(ours, ref.numpy())


@pytest.mark.parametrize("kind, cls", [("pndm", PNDMScheduler), ("ddim", DDIMScheduler)])
@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_sampling_matches_diffusers(models, kind, cls, guidance):
    sd, pipe = models
    pipe.scheduler = cls.from_config(sd.scheduler_config.to_dict())
    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    kw = dict(num_inference_steps=6, guidance_scale=guidance, height=16, width=16)
    images, out_latents = generate(sd, PROMPTS, latents=latents, scheduler=kind, return_latents=True, **kw)
    with torch.no_grad():
        ref_latents = pipe(PROMPTS, latents=torch.from_numpy(latents), output_type="latent", **kw).images
        ref_images = pipe(PROMPTS, latents=torch.from_numpy(latents), output_type="np", **kw).images
    assert_close(out_latents, ref_latents.numpy())
    ref_u8 = (ref_images * 255).round().astype(np.uint8)
    assert images.dtype == np.uint8 and images.shape == (2, 16, 16, 3)
    assert np.abs(images.astype(int) - ref_u8.astype(int)).max() <= 2


def test_negative_prompt_changes_the_unconditional_branch(models):
    sd, _ = models
    kw = dict(num_inference_steps=3, height=16, width=16, seed=1)
    a = generate(sd, PROMPTS[:1], **kw)
    b = generate(sd, PROMPTS[:1], negative_prompt="blue", **kw)
    assert a.shape == b.shape == (1, 16, 16, 3)
    assert not np.array_equal(a, b)


def test_generate_is_deterministic_in_seed(models):
    sd, _ = models
    kw = dict(num_inference_steps=2, height=16, width=16)
    np.testing.assert_array_equal(generate(sd, "a", seed=5, **kw), generate(sd, "a", seed=5, **kw))


def test_sd_is_not_mutated_by_generate(models):
    sd, _ = models
    before = nnx.state(sd.unet, nnx.Param)
    generate(sd, "x", num_inference_steps=2, height=16, width=16)
    after = nnx.state(sd.unet, nnx.Param)
    assert all(a is b for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True))


def test_denoise_over_the_whole_schedule_is_generate(models):
    """The public step range reproduces the fused sampler's latents (same noise, same guidance)."""
    from jax_erasepro.pipeline import denoise

    sd, _ = models
    latents = np.random.default_rng(1).standard_normal((2, 4, 8, 8)).astype(np.float32)
    _, want = generate(
        sd,
        PROMPTS,
        latents=latents,
        scheduler="ddim",
        num_inference_steps=5,
        height=16,
        width=16,
        return_latents=True,
    )
    nhwc = np.transpose(latents, (0, 2, 3, 1))
    got = denoise(sd, nhwc, encode_prompts(sd, PROMPTS), num_inference_steps=5, scheduler="ddim")
    assert_close(np.transpose(got, (0, 3, 1, 2)), want, rel=1e-5)


def test_denoise_in_two_ranges_equals_one_range(models):
    """DDIM is stateless between steps, so steps 0..2 then 2..5 land where 0..5 does."""
    from jax_erasepro.pipeline import denoise

    sd, _ = models
    x = jax.random.normal(jax.random.key(0), (1, 8, 8, 4))
    ctx = encode_prompts(sd, PROMPTS[:1])
    kw = dict(num_inference_steps=5, scheduler="ddim")
    whole = denoise(sd, x, ctx, **kw)
    parts = denoise(sd, denoise(sd, x, ctx, stop=2, **kw), ctx, start=2, **kw)
    assert_close(parts, whole, rel=1e-5)
    assert np.array_equal(denoise(sd, x, ctx, start=3, stop=3, **kw), x)  # an empty range changes nothing
    with pytest.raises(ValueError, match="start <= stop"):
        denoise(sd, x, ctx, start=4, stop=2, **kw)


def test_guided_noise_is_the_guidance_formula(models):
    from jax_erasepro.pipeline import guided_noise

    sd, _ = models
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
    uncond, cond = encode_prompts(sd, ["", ""]), encode_prompts(sd, PROMPTS)
    t = np.int32(500)
    interleaved = np.stack([uncond, cond], axis=1).reshape(4, *cond.shape[1:])
    eps_u, eps_c = sd.unet(x, t, uncond), sd.unet(x, t, cond)
    assert_close(guided_noise(sd.unet, x, t, interleaved, 3.0), eps_u + 3.0 * (eps_c - eps_u), rel=1e-5)
    assert_close(guided_noise(sd.unet, x, t, cond, None), eps_c, rel=1e-6)
