"""Test helpers: the same random weights in our JAX models and in diffusers/transformers PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from jax_erasepro.pipeline import StableDiffusion
from jax_erasepro.weights import to_state_dict

TOKENIZER = Path(__file__).parent / "data" / "sd-v1-4" / "tokenizer"


def load_torch(module: torch.nn.Module, state: dict[str, np.ndarray], prefix: str = "") -> None:
    """Copy a numpy state dict into a torch module, strictly."""
    tensors = {prefix + k: torch.from_numpy(np.array(v)) for k, v in state.items()}
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    assert not missing and not unexpected, (missing[:3], unexpected[:3])


def torch_pipeline(sd: StableDiffusion) -> StableDiffusionPipeline:
    """A diffusers StableDiffusionPipeline holding exactly ``sd``'s weights (float32, CPU)."""
    text = CLIPTextModel(CLIPTextConfig(**sd.config.text_encoder.to_dict()))
    load_torch(text, to_state_dict(sd.text_encoder))
    unet = UNet2DConditionModel.from_config(sd.config.unet.to_dict())
    load_torch(unet, to_state_dict(sd.unet))
    vae = AutoencoderKL.from_config(sd.config.vae.to_dict())
    load_torch(vae, to_state_dict(sd.vae))
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text.eval(),
        tokenizer=CLIPTokenizer.from_pretrained(str(TOKENIZER)),
        unet=unet.eval(),
        scheduler=PNDMScheduler.from_config(sd.scheduler_config.to_dict()),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
