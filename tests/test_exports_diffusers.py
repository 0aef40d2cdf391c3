"""Every export format runs in diffusers with default arguments, holding exactly the model we exported.

For the tiny random config and the embedded shapes-sd, an edited model is saved as a diffusers folder, a
single file, a LoRA and a delta; diffusers loads each the way docs/formats.md tells a user to, generates two
steps, and its weights are compared with ours.
"""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

import jax_erasepro as jep
from jax_erasepro import surgery
from jax_erasepro.saving import source_dtype
from jax_erasepro.tiny import SD_SCHEDULER, TINY_TEXT, TINY_UNET, TINY_VAE
from jax_erasepro.weights import to_state_dict
from tests.torch_bridge import TOKENIZER, sd_from_torch

ATTN2_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"


def _tiny_in_memory():
    """A model of the tiny config built in memory (no source files, so no source configs to keep), its
    random weights drawn by torch: the same kind of model as ``tiny_random_sd``, without its compile time."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(3)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_config(TINY_VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**TINY_TEXT)),
        tokenizer=CLIPTokenizer.from_pretrained(str(TOKENIZER)),
        unet=UNet2DConditionModel.from_config(TINY_UNET),
        scheduler=PNDMScheduler.from_config(SD_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return sd_from_torch(pipe)


def _edited(sd):
    """``sd`` with a rank-1 change to one cross-attention key projection (what a LoRA can hold exactly)."""
    w = to_state_dict(sd.unet)[ATTN2_K]
    rng = np.random.default_rng(0)
    dw = np.outer(rng.standard_normal(w.shape[0]), rng.standard_normal(w.shape[1])).astype(np.float32)
    dw *= 0.1 * np.linalg.norm(w) / np.linalg.norm(dw)
    return surgery.replace(sd, {f"unet.{ATTN2_K}": w + dw})


@pytest.fixture(scope="module", params=["tiny", "shapes-sd"])
def exports(request, tmp_path_factory):
    """(edited model, base folder, {format: path}) for one model."""
    tmp = tmp_path_factory.mktemp(request.param)
    base = _tiny_in_memory() if request.param == "tiny" else jep.load_pretrained()
    edited = _edited(base)
    base_dir = jep.save_pretrained(base, tmp / "base")
    paths = {
        "diffusers": jep.save_pretrained(edited, tmp / "model"),
        "single_file": jep.save_pretrained(edited, tmp / "model.safetensors", format="single_file"),
        "lora": jep.save_pretrained(edited, tmp / "lora", format="lora", base=base),
        "delta": jep.save_pretrained(edited, tmp / "delta", format="delta", base=base),
    }
    return edited, base, base_dir, paths


def _generate(pipe: StableDiffusionPipeline) -> np.ndarray:
    """Two denoising steps on an 8x8 latent: diffusers runs the whole model, as a user would."""
    pipe.set_progress_bar_config(disable=True)
    size = 8 * pipe.vae_scale_factor
    with torch.no_grad():
        out = pipe("a red star", num_inference_steps=2, height=size, width=size, output_type="np")
    images = out.images
    assert images.shape == (1, size, size, 3) and np.isfinite(images).all()
    return images


def _assert_holds(pipe: StableDiffusionPipeline, sd) -> None:
    """diffusers' components are float32 (the default a user gets) and hold exactly ``sd``'s weights, as
    rounded to the dtype each tensor had in the source files (shapes-sd ships float16)."""
    for name in ("text_encoder", "unet", "vae"):
        module = getattr(pipe, name)
        assert module.dtype == torch.float32, name
        got = {k.removeprefix("text_model."): v for k, v in module.state_dict().items()}
        for key, want in to_state_dict(getattr(sd, name)).items():
            stored = want.astype(source_dtype(sd, name, key)).astype(np.float32)
            np.testing.assert_array_equal(got[key].numpy(), stored, err_msg=f"{name}.{key}")


def test_diffusers_folder(exports):
    edited, _, _, paths = exports
    pipe = StableDiffusionPipeline.from_pretrained(paths["diffusers"])
    _generate(pipe)
    _assert_holds(pipe, edited)


def test_single_file(exports):
    edited, _, base_dir, paths = exports
    pipe = StableDiffusionPipeline.from_single_file(paths["single_file"], config=str(base_dir))
    _generate(pipe)
    _assert_holds(pipe, edited)


def test_lora_on_the_base(exports):
    edited, base, base_dir, paths = exports
    pipe = StableDiffusionPipeline.from_pretrained(base_dir)
    pipe.load_lora_weights(paths["lora"])
    _generate(pipe)
    pipe.fuse_lora()
    got = pipe.unet.get_submodule(ATTN2_K.removesuffix(".weight")).base_layer.weight.detach().numpy()
    want, old = to_state_dict(edited.unet)[ATTN2_K], to_state_dict(base.unet)[ATTN2_K]
    old_stored = old.astype(source_dtype(base, "unet", ATTN2_K)).astype(np.float32)  # in the base folder
    assert np.linalg.norm(got - (want - old + old_stored)) <= 1e-5 * np.linalg.norm(want - old)


def test_delta_applied_back(exports, tmp_path):
    edited, base, _, paths = exports
    model = jep.save_pretrained(jep.apply_delta(base, paths["delta"]), tmp_path / "model")
    pipe = StableDiffusionPipeline.from_pretrained(model)
    _generate(pipe)
    _assert_holds(pipe, edited)
