"""Test helpers: the same random weights in our JAX models and in diffusers/transformers PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from jax_erasepro.pipeline import StableDiffusion
from jax_erasepro.weights import to_state_dict

TOKENIZER = Path(__file__).parent / "data" / "sd-v1-4" / "tokenizer"


def perturbed_state_dict(module: torch.nn.Module, seed: int = 0) -> dict[str, np.ndarray]:
    """Perturb norm scales and all biases in place (they init to 1/0); return the numpy state dict."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


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



def sd_from_torch(pipe: StableDiffusionPipeline) -> StableDiffusion:
    """Our StableDiffusion holding exactly a diffusers pipeline's weights, configs as saved on disk."""
    from flax import nnx

    from jax_erasepro.models import clip, unet, vae
    from jax_erasepro.pipeline import SDConfig
    from jax_erasepro.schedulers import SchedulerConfig
    from jax_erasepro.tokenizer import load_tokenizer
    from jax_erasepro.weights import load_state_dict

    def convert(cls, cfg_cls, cfg: dict, module: torch.nn.Module):
        config = cfg_cls.from_dict(cfg)
        state = {k: v.detach().numpy() for k, v in module.state_dict().items()}
        model = load_state_dict(
            nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0))), state, ignore=lambda k: "position_ids" in k
        )
        return model, config

    te, te_cfg = convert(
        clip.CLIPTextModel, clip.CLIPTextConfig, json.loads(pipe.text_encoder.config.to_json_string()),
        pipe.text_encoder,
    )
    un, un_cfg = convert(
        unet.UNet2DConditionModel, unet.UNet2DConditionConfig, dict(pipe.unet.config), pipe.unet
    )
    va, va_cfg = convert(vae.AutoencoderKL, vae.AutoencoderKLConfig, dict(pipe.vae.config), pipe.vae)
    return StableDiffusion(
        text_encoder=te, unet=un, vae=va, tokenizer=load_tokenizer(TOKENIZER),
        scheduler_config=SchedulerConfig.from_dict(dict(pipe.scheduler.config)),
        config=SDConfig(text_encoder=te_cfg, unet=un_cfg, vae=va_cfg, model_index={}),
    )
