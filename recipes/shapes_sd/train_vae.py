"""shapes-sd's image autoencoder: a small factor-8 ``AutoencoderKL`` trained on fresh 64 px renders.

Loss: L1 + L2 reconstruction plus a small KL, no LPIPS or GAN: the scenes are flat-coloured shapes with
sharp edges and simple textures that a pixel loss reconstructs well, LPIPS needs pretrained VGG weights
we do not have, and a GAN would double the step cost and add instability to a CPU-budget run.
After training, ``scaling_factor`` is set to 1/std of the latents over a sample (SD's convention).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_erasepro.compile_cache import use_compilation_cache
from jax_erasepro.diffusion import sample_latents, vae_pixels
from jax_erasepro.models.vae import AutoencoderKL, AutoencoderKLConfig
from jax_erasepro.shapes.judge import load_vae, reconstruct
from jax_erasepro.shapes.render import make_batch, make_scenes, render
from jax_erasepro.shapes.world import STYLES
from jax_erasepro.weights import num_params
from recipes.shapes_sd.allocator import use_jemalloc
from recipes.shapes_sd.prefetch import prefetched
from recipes.shapes_sd.runs import export_component, log_line, prepare_run, run_parser
from recipes.shapes_sd.training import TrainConfig, train
from recipes.shapes_sd.xla_flags import use_training_flags

KL_WEIGHT = 1e-6  # per latent element, relative to a per-pixel reconstruction loss (SD uses 1e-6 too)


def vae_config(size: str = "small") -> AutoencoderKLConfig:
    """``small``: four blocks, factor 8 (64 px -> 8x8x4 latents, 2.7M params); ``f4``: three blocks,
    factor 4 (64 px -> 16x16x4), which keeps star points and cross arms that 8x8x4 loses; ``f4w``: the same,
    1.5x wider (1.52M params, for the small objects whose shape ``f4`` blurs); ``tiny`` (factor 4) for tests.

    Narrow at full resolution: 64 px convs cost most of the FLOPs (32 channels there was 4x slower)."""
    chans, groups = {
        "small": ((16, 32, 64, 128), 8), "f4": ((16, 32, 64), 8), "f4w": ((24, 48, 96), 8),
        "tiny": ((8, 8, 16), 4),
    }[size]
    return AutoencoderKLConfig(
        block_out_channels=chans,
        down_block_types=("DownEncoderBlock2D",) * len(chans),
        up_block_types=("UpDecoderBlock2D",) * len(chans),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=groups,
        sample_size=64,
    )


def train_config(out: str | Path, steps: int = 2_000, seed: int = 0) -> TrainConfig:
    """The recipe (factor 4; the factor-8 ``small`` VAE ran 4250 steps and a 1000-step decoder fine-tune):

    python -m recipes.shapes_sd.train_vae --out runs/shapes-vae4 --size f4 --steps 2000
    python -m recipes.shapes_sd.train_vae --out runs/shapes-vae4-dec --steps 1500 --seed 2 \
        --decoder-from runs/shapes-vae4/vae  # sharper edges, same latent space

    Then (session 6) the wider VAE with the edge terms from the start, which needs no decoder fine-tune;
    stopped at step 2000 of this schedule and exported with --export-only (its encoder is the next UNet's):
    python -m recipes.shapes_sd.train_vae --out runs/shapes-vae4w --size f4w --steps 3000 --edge-loss
    """
    return TrainConfig(
        steps=steps, batch_size=32, lr=4e-4, warmup_steps=min(500, steps // 10), end_lr_ratio=0.05,
        weight_decay=0.0, grad_clip=1.0, seed=seed, log_every=50, ckpt_every=250,
        ckpt_dir=str(Path(out) / "ckpt"),
    )


def _vae_batch(batch_size: int, seed: int, restyle: float, step: int) -> dict[str, np.ndarray]:
    scenes = make_scenes(seed * 1_000_000 + step, batch_size, "train")[0]
    if restyle:
        rng = np.random.default_rng((seed, step, 1))
        painters = rng.choice(len(STYLES), batch_size)
        scenes = [dataclasses.replace(s, style=STYLES[k]) if rng.random() < restyle else s
                  for s, k in zip(scenes, painters, strict=True)]
    return {"images": np.stack([render(s) for s in scenes])}


def vae_batches(batch_size: int, seed: int, restyle: float = 0.0) -> Callable[[int], dict[str, np.ndarray]]:
    """step -> a fresh batch of train-split renders (captions unused); picklable, for ``prefetched``.

    ``restyle`` redraws that share of the scenes in a painter's manner picked uniformly (the world draws
    35% in one): more of the fine manners, dots above all, which a small VAE otherwise blurs to a wash.
    """
    return functools.partial(_vae_batch, batch_size, seed, restyle)


def vae_loss(
    model: AutoencoderKL, batch: dict[str, jax.Array], key: jax.Array, *, edges: bool = False
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L1 + L2 reconstruction of a posterior sample (``edge_terms`` with ``edges``), plus ``KL_WEIGHT`` x KL
    per latent element."""
    x = vae_pixels(batch["images"])
    mean, logvar = model.encode(x)
    recon = model.decode(sample_latents(mean, logvar, key))
    if edges:
        rec, metrics = edge_terms(recon, x)
    else:
        l1, l2 = jnp.mean(jnp.abs(recon - x)), jnp.mean(jnp.square(recon - x))
        rec, metrics = l1 + l2, {"l1": l1, "l2": l2}
    kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return rec + KL_WEIGHT * kl, {**metrics, "kl": kl}


EDGE_WEIGHT = 9.0  # decoder fine-tuning: extra weight on pixels near an edge of the target
# The decoder and what feeds it: fine-tuning these leaves the latent space (and any UNet on it) unchanged.
DECODER = nnx.All(nnx.Param, nnx.Any(nnx.PathContains("decoder"), nnx.PathContains("post_quant_conv")))


def _edges(x: jax.Array) -> jax.Array:
    """(B, H, W, 1) mask of pixels within one pixel of a colour edge of ``x`` (NHWC in [-1, 1])."""
    dx = jnp.abs(jnp.diff(x, axis=2, append=x[:, :, -1:]))
    dy = jnp.abs(jnp.diff(x, axis=1, append=x[:, -1:]))
    edge = (jnp.sum(dx + dy, -1, keepdims=True) > 0.1).astype(x.dtype)
    return jax.lax.reduce_window(edge, 0.0, jax.lax.max, (1, 3, 3, 1), (1, 1, 1, 1), "SAME")


def edge_terms(recon: jax.Array, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Edge-weighted L1 + L2 plus L1 between the image gradients of ``recon`` and ``x``. The flat background
    is most of each image, so a plain pixel loss lets a decoder round off star points and cross arms."""
    w = 1.0 + EDGE_WEIGHT * _edges(x)
    err = recon - x
    l1 = jnp.mean(w * jnp.abs(err)) / jnp.mean(w)
    l2 = jnp.mean(w * jnp.square(err)) / jnp.mean(w)
    grad = jnp.mean(jnp.abs(jnp.diff(err, axis=1))) + jnp.mean(jnp.abs(jnp.diff(err, axis=2)))
    return l1 + l2 + grad, {"l1": jnp.mean(jnp.abs(err)), "l2": jnp.mean(jnp.square(err)), "grad": grad}


def decoder_loss(
    model: AutoencoderKL, batch: dict[str, jax.Array], key: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Decoder fine-tuning (SD's ft-MSE VAE precedent: new decoder, same latents): ``edge_terms`` of the
    decoded posterior sample, the encoder held fixed."""
    x = vae_pixels(batch["images"])
    mean, logvar = jax.lax.stop_gradient(model.encode(x))
    return edge_terms(model.decode(sample_latents(mean, logvar, key)), x)


@nnx.jit
def _posterior(model: AutoencoderKL, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    return model.encode(vae_pixels(images))


def latent_scaling_factor(model: AutoencoderKL, n: int = 2048, seed: int = 7, chunk: int = 256) -> float:
    """1 / std of posterior samples over n train renders: SD's ``scaling_factor`` (unit-variance latents)."""
    key, draws = jax.random.key(seed), []
    for k in range(0, n, chunk):
        images = make_batch(seed * 1_000_000 + k, min(chunk, n - k), "train")[0]
        mean, logvar = _posterior(model, images)
        draws.append(np.asarray(sample_latents(mean, logvar, jax.random.fold_in(key, k))))
    return float(1.0 / np.std(np.concatenate(draws)))


def psnr(model: AutoencoderKL, n: int = 1000, seed: int = 0, chunk: int = 250) -> float:
    """Reconstruction PSNR (dB, uint8 scale) over n held-out test-split renders."""
    images = make_batch(seed, n, "test")[0]
    return psnr_of(reconstruct(model, images, chunk), images)


def psnr_of(recon: np.ndarray, images: np.ndarray) -> float:
    """PSNR in dB of uint8 ``recon`` against uint8 ``images`` (inf when equal)."""
    mse = np.mean(np.square(recon.astype(np.float64) - images.astype(np.float64)))
    return float(10 * np.log10(255.0**2 / mse)) if mse else float("inf")


def export(model: AutoencoderKL, out: str | Path) -> Path:
    """Write a diffusers ``vae/`` folder (config.json with the model's scaling_factor, fp32 safetensors)."""
    return export_component(model, out, "AutoencoderKL")


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: train (or resume) the shapes VAE, set its scaling_factor, export it to --out, print its PSNR."""
    parser = run_parser(main.__doc__, steps=2_000, batch_size=32, sizes=("f4", "f4w", "small", "tiny"))
    parser.add_argument("--eval-n", type=int, default=1000, help="held-out renders for the PSNR")
    parser.add_argument(
        "--decoder-from", metavar="VAE_DIR",
        help="fine-tune only the decoder of this trained VAE (decoder_loss; same latents and scaling_factor)",
    )
    parser.add_argument(
        "--edge-loss", action="store_true", help="train with edge_terms (decoder_loss's) from the start"
    )
    parser.add_argument(
        "--init-from", metavar="VAE_DIR",
        help="fine-tune this trained VAE whole (fresh optimizer; new latents and scaling_factor)",
    )
    parser.add_argument(
        "--restyle", type=float, default=0.0, metavar="P",
        help="redraw this share of the training scenes in a painter's manner (default 0: the world's mix)",
    )
    args = parser.parse_args(argv)
    if args.decoder_from and args.init_from:
        parser.error("--decoder-from and --init-from exclude each other")
    if not 0.0 <= args.restyle <= 1.0:
        parser.error(f"--restyle must lie in [0, 1], got {args.restyle}")
    use_training_flags()  # before JAX starts its backend: see xla_flags
    config = train_config(args.out, args.steps, args.seed)
    if args.decoder_from or args.init_from:
        config = dataclasses.replace(config, lr=2e-4, warmup_steps=min(100, args.steps // 10))
    config = prepare_run(parser, args, config)  # refuses an existing run before anything is loaded
    if args.decoder_from:
        model, loss, wrt = load_vae(args.decoder_from), decoder_loss, DECODER
    else:
        want, wrt = vae_config(args.size), nnx.Param
        if args.init_from:
            model = load_vae(args.init_from)
            if dataclasses.replace(model.config, scaling_factor=want.scaling_factor) != want:
                parser.error(f"--init-from {args.init_from} is not a VAE of --size {args.size}")
        else:
            model = AutoencoderKL(want, rngs=nnx.Rngs(args.seed))
        loss = functools.partial(vae_loss, edges=args.edge_loss)
    print(f"VAE: {num_params(model) / 1e6:.2f}M params; {config}")
    with open(Path(args.out) / "log.jsonl", "a") as log:
        batches = prefetched(vae_batches(config.batch_size, args.seed, args.restyle), args.workers)
        train(model, loss, batches, config, wrt=wrt, on_log=functools.partial(log_line, log))
    if not args.decoder_from:
        model.config = dataclasses.replace(model.config, scaling_factor=latent_scaling_factor(model))
    export(model, Path(args.out) / "vae")
    scores = {"psnr_db": psnr(model, args.eval_n), "scaling_factor": model.config.scaling_factor}
    (Path(args.out) / "eval.json").write_text(json.dumps(scores, indent=2) + "\n")
    print("held-out reconstruction:", json.dumps(scores))


if __name__ == "__main__":
    use_jemalloc()  # re-executes once under jemalloc where installed: see allocator
    use_compilation_cache()  # a resumed run does not compile its step again: see compile_cache
    main()
