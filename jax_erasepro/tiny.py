"""A tiny random SD v1.x built on the spot: same architecture family, seconds to run, for tests and demos."""

from __future__ import annotations

from importlib import resources
from typing import Any

from jax_erasepro.models.clip import CLIPTextConfig, CLIPTextModel
from jax_erasepro.models.unet import UNet2DConditionConfig, UNet2DConditionModel
from jax_erasepro.models.vae import AutoencoderKL, AutoencoderKLConfig
from jax_erasepro.schedulers import SchedulerConfig
from jax_erasepro.sd import SDConfig, StableDiffusion
from jax_erasepro.tokenizer import load_tokenizer
from jax_erasepro.weights import random_model

TINY_TEXT: dict[str, Any] = {
    "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 3,
    "vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}
TINY_UNET: dict[str, Any] = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
    "block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 32,
    "attention_head_dim": 4, "norm_num_groups": 8,
}
TINY_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [16, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
    "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 16,
}
SD_SCHEDULER: dict[str, Any] = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False,
}
MODEL_INDEX: dict[str, Any] = {
    "_class_name": "StableDiffusionPipeline",
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def clip_tokenizer_path() -> str:
    """SD v1.4's CLIP tokenizer files, shipped inside the package."""
    return str(resources.files("jax_erasepro") / "assets" / "clip_tokenizer")


def tiny_random_sd(seed: int = 0) -> StableDiffusion:
    """A random-weight SD v1.x with tiny configs and SD v1.4's real tokenizer (``weights.random_model``)."""
    text = CLIPTextConfig.from_dict(TINY_TEXT)
    unet = UNet2DConditionConfig.from_dict(TINY_UNET)
    vae = AutoencoderKLConfig.from_dict(TINY_VAE)
    return StableDiffusion(
        text_encoder=random_model(CLIPTextModel, text, seed),
        unet=random_model(UNet2DConditionModel, unet, seed + 1),
        vae=random_model(AutoencoderKL, vae, seed + 2),
        tokenizer=load_tokenizer(clip_tokenizer_path()),
        scheduler_config=SchedulerConfig.from_dict(SD_SCHEDULER),
        config=SDConfig(text_encoder=text, unet=unet, vae=vae, model_index=dict(MODEL_INDEX)),
    )
