"""Whole sampling runs on SD v1.4's real configs (random weights, 16x16 latents) against diffusers."""

import json

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from jax_erasepro.pipeline import encode_prompts, generate
from tests.conftest import SD14, assert_close
from tests.torch_bridge import sd_from_torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_config(json.loads((SD14 / "vae" / "config.json").read_text())).eval(),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(SD14 / "text_encoder")).eval(),
        tokenizer=CLIPTokenizer.from_pretrained(SD14 / "tokenizer"),
        unet=UNet2DConditionModel.from_config(json.loads((SD14 / "unet" / "config.json").read_text())).eval(),
        scheduler=PNDMScheduler.from_pretrained(SD14 / "scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return sd_from_torch(pipe), pipe


@pytest.mark.parametrize("kind, cls", [("pndm", PNDMScheduler), ("ddim", DDIMScheduler)])
def test_sd14_sampling_matches_diffusers(models, kind, cls):
    sd, pipe = models
    pipe.scheduler = cls.from_pretrained(SD14 / "scheduler")
    prompts = ["a photograph of an astronaut riding a horse"]
    latents = np.random.default_rng(1).standard_normal((1, 4, 16, 16)).astype(np.float32)
    kw = dict(num_inference_steps=3, guidance_scale=7.5, height=128, width=128)
    images, out_latents = generate(sd, prompts, latents=latents, scheduler=kind, return_latents=True, **kw)
    with torch.no_grad():
        ref = pipe(prompts, latents=torch.from_numpy(latents), output_type="latent", **kw).images.numpy()
        ref_images = pipe(prompts, latents=torch.from_numpy(latents), output_type="np", **kw).images
    assert_close(out_latents, ref)
    ref_u8 = (ref_images * 255).round().astype(np.int64)
    assert np.abs(images.astype(np.int64) - ref_u8).max() <= 2


def test_sd14_encode_prompts_matches_diffusers(models):
    sd, pipe = models
    prompts = ["a photo of a cat", "van gogh starry night"]
    with torch.no_grad():
        ref, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    assert_close(encode_prompts(sd, prompts), ref.numpy())
