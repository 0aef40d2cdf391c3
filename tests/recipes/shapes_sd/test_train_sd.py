"""shapes-sd end to end on tiny configs: train the VAE, then the UNet on it, build the folder, and check
that our pipeline and diffusers load it and draw the same image."""

import dataclasses
import json

import jax
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from flax import nnx
from safetensors import safe_open

from jax_erasepro.diffusion import frozen_encoder, sample_latents, vae_pixels
from jax_erasepro.loading import load_pretrained
from jax_erasepro.models.clip import CLIPModel
from jax_erasepro.pipeline import generate
from jax_erasepro.shapes.judge import load_vae
from jax_erasepro.tokenizer import load_tokenizer, tokenize
from jax_erasepro.weights import num_params, to_state_dict
from recipes.shapes_sd import build as sb
from recipes.shapes_sd import train_clip as tc
from recipes.shapes_sd import train_unet as tu
from recipes.shapes_sd import train_vae as tv
from recipes.shapes_sd.training import TrainConfig, train

PROMPT = "a big green heart"
LATENTS = np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype(np.float32)
SAMPLING = dict(num_inference_steps=4, guidance_scale=5.0, height=64, width=64)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A few steps of each tiny model, exported the way the CLIs do, and the built shapes-sd folder."""
    root = tmp_path_factory.mktemp("shapes-sd")
    vae = tv.AutoencoderKL(tv.vae_config("tiny"), rngs=nnx.Rngs(0))
    logs = []
    train(vae, tv.vae_loss, tv.vae_batches(4, 0), TrainConfig(steps=2, log_every=1),
          on_log=lambda s, m: logs.append(m))
    assert all(np.isfinite(m["loss"]) and m["kl"] >= 0 for m in logs)
    vae.config = dataclasses.replace(vae.config, scaling_factor=tv.latent_scaling_factor(vae, n=64, chunk=32))
    tv.export(vae, root / "vae")
    tc.export(CLIPModel(tc.clip_config("tiny"), rngs=nnx.Rngs(1)), root / "clip")

    text_encoder = tu.load_text_encoder(root / "clip")
    unet = tu.UNet2DConditionModel(tu.unet_config("tiny", text_encoder.config.hidden_size), rngs=nnx.Rngs(2))
    encode = frozen_encoder(load_vae(root / "vae"), text_encoder)
    batches = tu.unet_batches(encode, load_tokenizer(tc.TOKENIZER_DIR), 4, 0, reuse=2)
    train(unet, tu.unet_loss, batches, TrainConfig(steps=2, log_every=1, ema_decay=0.9))
    tu.export(unet, root / "unet")
    sb.build(root / "vae", root / "unet", root / "clip", root / "sd")
    return root


@pytest.mark.parametrize(
    "size, unet_size, factor",
    [("small", "small", 8), ("f4", "f4", 4), ("f4w", "f4", 4), ("f4w", "f4a", 4), ("f4w", "f4t", 4)],
)
def test_small_models_fit_the_budget(size, unet_size, factor):
    """shapes-sd's VAE and UNet in fp16 take at most the ~28 MB the two CLIPs leave of 60 MB, and the UNet's
    sample size is the VAE's latent size for 64 px."""
    vae = nnx.eval_shape(lambda: tv.AutoencoderKL(tv.vae_config(size), rngs=nnx.Rngs(0)))
    unet = nnx.eval_shape(lambda: tu.UNet2DConditionModel(tu.unet_config(unet_size), rngs=nnx.Rngs(0)))
    assert 2 * (num_params(vae) + num_params(unet)) <= 28e6
    assert 2 ** (len(vae.config.block_out_channels) - 1) == factor
    assert unet.config.sample_size * factor == vae.config.sample_size == 64
    assert unet.config.cross_attention_dim == tc.clip_config("small").text_config.hidden_size


def test_init_from_refuses_a_unet_of_another_size(folders, tmp_path):
    """The tiny test UNet is not an f4 one: the CLI says so instead of training the wrong config."""
    with pytest.raises(SystemExit):
        tu.main([
            "--out", str(tmp_path / "run"), "--vae", str(folders / "vae"), "--size", "f4",
            "--text-encoder", str(folders / "clip"), "--init-from", str(folders / "unet"),
        ])


def test_scaling_factor_gives_unit_variance_latents(folders):
    vae = load_vae(folders / "vae")
    assert vae.config.scaling_factor != tv.AutoencoderKLConfig().scaling_factor  # computed, not SD's
    images = tv.make_batch(123, 32, "train")[0]  # renders the factor was not computed on
    mean, logvar = tv._posterior(vae, images)
    z = vae.config.scaling_factor * sample_latents(mean, logvar, jax.random.key(5))
    assert 0.7 < float(np.std(z)) < 1.4


def test_exports_round_trip(folders):
    vae, unet = load_vae(folders / "vae"), tu.load_unet(folders / "unet")
    again = load_vae(tv.export(vae, folders / "vae-again"))
    for a, b in zip(to_state_dict(vae).values(), to_state_dict(again).values(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert again.config == vae.config
    assert tu.load_unet(tu.export(unet, folders / "unet-again")).config == unet.config


def test_a_built_folder_rebuilds_byte_identical(folders):
    """build's own vae/, unet/ and text_encoder/ are valid build inputs and come back byte for byte, so a
    shipped shapes-sd can be rebuilt around a retrained UNet without touching its frozen files."""
    sd = folders / "sd"
    again = sb.build(sd / "vae", sd / "unet", sd / "text_encoder", folders / "sd-again")
    for comp in ("vae", "unet", "text_encoder"):
        for f in sorted((sd / comp).iterdir()):
            assert (again / comp / f.name).read_bytes() == f.read_bytes(), f"{comp}/{f.name}"


def test_psnr_of_a_perfect_and_a_constant_reconstruction():
    images = tv.make_batch(0, 8, "test")[0]
    assert tv.psnr_of(images, images) == np.inf
    grey = np.full_like(images, 128)
    expected = 10 * np.log10(255.0**2 / np.mean((images.astype(float) - 128) ** 2))
    assert tv.psnr_of(grey, images) == pytest.approx(expected)


def test_decoder_fine_tuning_keeps_the_latent_space():
    """``--decoder-from``: the decoder learns, the encoder (so every latent) is untouched."""
    model = tv.AutoencoderKL(tv.vae_config("tiny"), rngs=nnx.Rngs(0))
    images = tv.vae_batches(4, 0)(0)["images"]
    before = np.asarray(tv._posterior(model, images)[0])
    decoder = [np.array(x) for x in jax.tree.leaves(nnx.state(model.decoder))]
    cfg = TrainConfig(steps=2, batch_size=4, lr=1e-3, log_every=1)
    train(model, tv.decoder_loss, tv.vae_batches(4, 0), cfg, wrt=tv.DECODER)
    np.testing.assert_array_equal(np.asarray(tv._posterior(model, images)[0]), before)
    after = jax.tree.leaves(nnx.state(model.decoder))
    assert any(not np.array_equal(a, b) for a, b in zip(decoder, after, strict=True))
    edges = np.asarray(tv._edges(vae_pixels(images)))
    assert 0 < edges.mean() < 0.5  # shapes' outlines, not the flat background


def test_edge_loss_is_the_decoder_loss_plus_kl():
    """``--edge-loss``: the full VAE's objective is decoder_loss's on the same posterior draw, plus the KL."""
    model = tv.AutoencoderKL(tv.vae_config("tiny"), rngs=nnx.Rngs(0))
    batch, key = tv.vae_batches(4, 0)(0), jax.random.key(3)
    loss, metrics = tv.vae_loss(model, batch, key, edges=True)
    dec, _ = tv.decoder_loss(model, batch, key)
    np.testing.assert_allclose(float(loss), float(dec) + tv.KL_WEIGHT * float(metrics["kl"]), rtol=1e-6)
    plain, _ = tv.vae_loss(model, batch, key)
    assert float(plain) != float(loss)


def test_restyle_redraws_its_share_of_scenes_in_painters_manners():
    """``--restyle P``: the same scenes, about P of them redrawn by a painter; 0 is the world's own mix."""
    plain = tv.vae_batches(64, 0)(2)["images"]
    np.testing.assert_array_equal(tv.vae_batches(64, 0, 0.0)(2)["images"], plain)
    restyled = tv.vae_batches(64, 0, 0.6)(2)["images"]
    np.testing.assert_array_equal(tv.vae_batches(64, 0, 0.6)(2)["images"], restyled)
    changed = (restyled != plain).any(axis=(1, 2, 3)).mean()
    assert 0.3 < changed < 0.7  # 0.6 redrawn, of which a sixth or more already had that painter


def test_vae_init_from_refuses_another_size_and_decoder_from(folders, tmp_path):
    """The tiny test VAE is not an f4w one; --init-from and --decoder-from exclude each other."""
    vae = str(folders / "vae")
    for extra in (["--size", "f4w"], ["--size", "tiny", "--decoder-from", vae], ["--restyle", "2"]):
        with pytest.raises(SystemExit):
            tv.main(["--out", str(tmp_path / "run"), "--steps", "1", "--init-from", vae, *extra])


def test_vae_init_from_fine_tunes_the_whole_vae(folders, tmp_path):
    """--init-from starts from the trained weights and moves encoder and decoder; the source is untouched."""
    source = to_state_dict(load_vae(folders / "vae"))
    tv.main(["--out", str(tmp_path / "run"), "--size", "tiny", "--steps", "2", "--batch-size", "4",
             "--eval-n", "8", "--restyle", "0.5", "--init-from", str(folders / "vae")])
    tuned = to_state_dict(load_vae(tmp_path / "run" / "vae"))
    again = to_state_dict(load_vae(folders / "vae"))
    assert again.keys() == source.keys() == tuned.keys()
    assert all(np.array_equal(again[k], source[k]) for k in source)
    moved = {k.split(".")[0] for k in source if not np.array_equal(source[k], tuned[k])}
    assert {"encoder", "decoder"} <= moved


def test_caption_dropout_and_batch_determinism():
    """About P_UNCOND of the captions become "" (BOS, EOS, padding), and a step's batch is reproducible."""
    tokenizer = load_tokenizer(tc.TOKENIZER_DIR)
    empty = tokenize(tokenizer, [""], max_length=tu.TEXT_TOKENS)[0]
    batches = tu.unet_batches(lambda images, ids, key: (images, ids), tokenizer, 100, 0, reuse=1)
    ids = np.concatenate([batches(s)["context"] for s in range(10)])
    assert ids.shape[1] == tu.TEXT_TOKENS
    dropped = np.all(ids == empty, axis=1).mean()
    assert 0.05 < dropped < 0.15
    np.testing.assert_array_equal(batches(3)["latents"], batches(3)["latents"])


def test_blocks_are_reused_across_consecutive_steps():
    """With reuse r, step s+1's batch is step s's without its first block, plus one new block."""
    tokenizer = load_tokenizer(tc.TOKENIZER_DIR)
    calls = []

    def encode(images, ids, key):
        calls.append(len(images))
        return images, ids

    batches = tu.unet_batches(encode, tokenizer, 8, 0, reuse=4)
    a, b = batches(5)["latents"], batches(6)["latents"]
    assert calls == [2] * 5  # blocks 5..8 for step 5, then only block 9
    np.testing.assert_array_equal(a[2:], b[:6])
    fresh = tu.unet_batches(encode, tokenizer, 8, 0, reuse=4)
    np.testing.assert_array_equal(fresh(6)["latents"], b)  # a resumed run sees the same batches
    with pytest.raises(ValueError, match="multiple"):
        tu.unet_batches(encode, tokenizer, 10, 0, reuse=4)


@pytest.fixture(scope="module")
def ours(folders):
    """Our pipeline on the built folder: the model and one guided few-step image from fixed latents."""
    sd = load_pretrained(folders / "sd")
    return sd, generate(sd, PROMPT, latents=LATENTS, **SAMPLING)


def test_built_folder_is_fp16_and_loads_in_our_pipeline(folders, ours):
    sd, image = ours
    index = json.loads((folders / "sd" / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]  # build's default sampler
    with safe_open(folders / "sd" / "unet" / "diffusion_pytorch_model.safetensors", "np") as f:
        keys = f.keys()
        assert {str(f.get_slice(k).get_dtype()) for k in keys} == {"F16"}
    assert sd.config.vae.scaling_factor == load_vae(folders / "vae").config.scaling_factor
    assert image.shape == (1, 64, 64, 3) and image.dtype == np.uint8


def test_generate_samples_with_the_folders_scheduler(folders, ours):
    """generate's default sampler is the folder's, as in diffusers; build --scheduler pndm writes PNDM."""
    sd, image = ours
    np.testing.assert_array_equal(generate(sd, PROMPT, latents=LATENTS, scheduler="ddim", **SAMPLING), image)
    pndm = load_pretrained(sb.build(folders / "vae", folders / "unet", folders / "clip", folders / "sd-pndm",
                                    scheduler="pndm"))
    assert pndm.scheduler_config.class_name == "PNDMScheduler"
    np.testing.assert_array_equal(
        generate(pndm, PROMPT, latents=LATENTS, **SAMPLING),
        generate(sd, PROMPT, latents=LATENTS, scheduler="pndm", **SAMPLING),
    )
    with pytest.raises(ValueError, match="unknown scheduler"):
        sb.assemble(folders / "vae", folders / "unet", folders / "clip", scheduler="euler")


def test_diffusers_draws_the_same_image(folders, ours):
    """diffusers loads the folder with its own (DDIM) scheduler and draws what our pipeline draws."""
    pipe = StableDiffusionPipeline.from_pretrained(folders / "sd", safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.text_encoder.dtype == pipe.unet.dtype == torch.float32  # default dtype: fp16 files upcast
    with torch.no_grad():
        ref = pipe(PROMPT, latents=torch.from_numpy(LATENTS), output_type="np", **SAMPLING).images
    ref = (ref * 255).round().astype(np.uint8)
    assert np.abs(ours[1].astype(int) - ref.astype(int)).max() <= 2
