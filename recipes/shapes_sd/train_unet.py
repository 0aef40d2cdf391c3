"""shapes-sd's denoiser: a small SD v1-style ``UNet2DConditionModel`` on 8x8x4 latents of fresh renders.

Epsilon prediction under SD's scaled-linear schedule, conditioned on the frozen text tower of our shapes
CLIP; 10% of captions are dropped to "" so that classifier-free guidance works. The frozen VAE and text
encoder run in the batch function (one jitted call, on the loop's prefetch thread), so the training step
differentiates the UNet alone.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from transformers import CLIPTokenizer

from jax_erasepro import diffusion
from jax_erasepro.compile_cache import use_compilation_cache
from jax_erasepro.loading import TEXT_PREFIX, SafetensorsReader
from jax_erasepro.models.clip import CLIPConfig, CLIPTextConfig, CLIPTextModel
from jax_erasepro.models.unet import UNet2DConditionConfig, UNet2DConditionModel
from jax_erasepro.schedulers import SchedulerConfig
from jax_erasepro.shapes.judge import load_vae
from jax_erasepro.shapes.render import make_batch
from jax_erasepro.tiny import SD_SCHEDULER
from jax_erasepro.tokenizer import clip_tokenizer_path, load_tokenizer, tokenize
from jax_erasepro.weights import abstract_model, load_state_dict, num_params, to_state_dict
from recipes.shapes_sd.allocator import use_jemalloc
from recipes.shapes_sd.prefetch import prefetched
from recipes.shapes_sd.runs import export_component, load_component, log_line, prepare_run, run_parser
from recipes.shapes_sd.training import TrainConfig, train
from recipes.shapes_sd.xla_flags import use_training_flags

SCHEDULER = SchedulerConfig.from_dict({"_class_name": "PNDMScheduler", **SD_SCHEDULER})
P_UNCOND = 0.1  # captions replaced by "" (the unconditional prompt of classifier-free guidance)
# The pipelines always feed all 77 token states (padding included), so training sees the same.
TEXT_TOKENS = 77
REUSE = 4  # steps each rendered and encoded image is trained on (see unet_batches)


def unet_config(size: str = "small", cross_attention_dim: int = 128) -> UNet2DConditionConfig:
    """SD v1's block layout: ``small`` on 8x8 latents (8 -> 4 -> 2, ~8.8M params), ``f4`` on the factor-4
    VAE's 16x16 latents (a narrow 16x16 level in front, 16 -> 8 -> 4 -> 2, without attention there: 256-token
    attention at width 32 doubled the step time on the CPU), ``f4a`` (wider, attention at 16x16 too, ~11.4M
    params: for GPU training), ``f4t`` (``f4`` with cross-attention at 16x16 as well, so the text reaches the
    level where textures are drawn; grown from an ``f4`` UNet by ``grow_unet``) or ``tiny`` (laid out as
    ``f4``) for tests.

    ``cross_attention_dim`` is the text encoder's width (128 for train_clip's small CLIP).
    """
    chans, heads, groups, sample, top_attn = {
        "small": ((64, 128, 192), 4, 32, 8, True),
        "f4": ((32, 64, 128, 192), 4, 16, 16, False),
        "f4a": ((48, 96, 160, 192), 4, 16, 16, True),
        "f4t": ((32, 64, 128, 192), 4, 16, 16, True),
        "tiny": ((8, 16, 32), 2, 8, 16, False),
    }[size]
    attn = (top_attn,) + (True,) * (len(chans) - 2) + (False,)  # cross-attention per level, top first
    return UNet2DConditionConfig(
        sample_size=sample,
        block_out_channels=chans,
        layers_per_block=1,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=heads,  # the number of heads (diffusers' name)
        norm_num_groups=groups,
    )


def train_config(out: str | Path, steps: int = 12_000, seed: int = 0) -> TrainConfig:
    """The recipe, after train_vae and train_clip (seed 0) have exported their folders (the factor-8
    ``small`` UNet ran 4750 steps):

    python -m recipes.shapes_sd.train_unet --out runs/shapes-unet6 --size f4 --steps 12000 \
        --vae runs/shapes-vae4w-2000/vae --text-encoder runs/shapes-clip-text2
    """
    return TrainConfig(
        steps=steps, batch_size=64, lr=4e-4, warmup_steps=min(500, steps // 10), end_lr_ratio=0.1,
        weight_decay=0.01, grad_clip=1.0, seed=seed, log_every=50, ckpt_every=250,
        ckpt_dir=str(Path(out) / "ckpt"), ema_decay=0.999,
    )


def load_text_encoder(clip_dir: str | Path) -> CLIPTextModel:
    """The text tower of a folder ``train_clip.export`` wrote (a transformers CLIPModel), or a diffusers
    ``text_encoder/`` folder (a CLIPTextModel, keys with or without ``text_model.``) such as shapes-sd's."""
    clip_dir = Path(clip_dir)
    path = clip_dir / "config.json"
    raw = json.loads(path.read_text())
    if "text_config" in raw:
        config = CLIPConfig.from_dict(raw, source=str(path)).text_config
    else:
        config = CLIPTextConfig.from_dict(raw, source=str(path))
    reader = SafetensorsReader(clip_dir / "model.safetensors")
    prefix = TEXT_PREFIX if any(k.startswith(TEXT_PREFIX) for k in reader.keys) else ""
    keys = {k[len(prefix) :] for k in reader.keys if k.startswith(prefix)}
    abstract = abstract_model(CLIPTextModel, config)
    # position_ids: a buffer some transformers versions write
    return load_state_dict(
        abstract, lambda k: reader[prefix + k], keys, source=str(reader.path),
        ignore=lambda k: k == "embeddings.position_ids",
    )


class TrainBlocks:
    """block index -> (uint8 renders, token ids) of ``size`` train scenes, ``P_UNCOND`` of the captions set
    to "". A picklable callable, so ``prefetched`` workers can render blocks ahead."""

    def __init__(self, tokenizer: CLIPTokenizer, size: int, seed: int):
        self.tokenizer, self.size, self.seed = tokenizer, size, seed

    def __call__(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        images, captions, _ = make_batch(self.seed * 1_000_000 + b, self.size, "train")
        drop = np.random.default_rng((self.seed, b)).random(self.size) < P_UNCOND
        captions = ["" if d else c for c, d in zip(captions, drop, strict=True)]
        return images, tokenize(self.tokenizer, captions, max_length=TEXT_TOKENS)


def unet_batches(
    encode: Callable[[np.ndarray, np.ndarray, jax.Array], tuple[jax.Array, jax.Array]],
    tokenizer: CLIPTokenizer,
    batch_size: int,
    seed: int,
    reuse: int = REUSE,
    workers: int = 0,
) -> Callable[[int], dict[str, jax.Array]]:
    """step -> latents and text states of train renders (``TrainBlocks``).

    Renders come in blocks of ``batch_size // reuse``; step s takes blocks s, s+1, ..., s+reuse-1, so each
    block is rendered and encoded once and seen in ``reuse`` consecutive steps, each time beside other
    blocks and under fresh noise and timesteps. This cuts the frozen encoders' share of a step by ``reuse``.
    ``workers`` processes render blocks ahead (the same batches for any number). Calls must come in
    increasing step order to hit the caches (any order gives the same batches).
    """
    if batch_size % reuse:
        raise ValueError(f"batch_size {batch_size} is not a multiple of reuse {reuse}")
    blocks = prefetched(TrainBlocks(tokenizer, batch_size // reuse, seed), workers)
    cache: dict[int, tuple[jax.Array, jax.Array]] = {}

    def block(b: int) -> tuple[jax.Array, jax.Array]:
        if b not in cache:
            key = jax.random.fold_in(jax.random.key(seed + 1), b)  # not the step's own key stream
            cache[b] = encode(*blocks(b), key)
        return cache[b]

    def batch(step: int) -> dict[str, jax.Array]:
        parts = [block(step + k) for k in range(reuse)]
        for b in [b for b in cache if b < step]:
            del cache[b]
        return {
            "latents": jnp.concatenate([latents for latents, _ in parts]),
            "context": jnp.concatenate([context for _, context in parts]),
        }

    return batch


def unet_loss(
    unet: UNet2DConditionModel,
    batch: dict[str, jax.Array],
    key: jax.Array,
    snr_gamma: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``diffusion.diffusion_loss`` on a batch of latents and text states under ``SCHEDULER`` (epsilon
    prediction), min-SNR weighted when ``snr_gamma`` is given."""
    loss = diffusion.diffusion_loss(unet, batch["latents"], batch["context"], key, SCHEDULER, snr_gamma)
    return loss, {"latent_std": jnp.std(batch["latents"])}


def grow_unet(
    small: UNet2DConditionModel, config: UNet2DConditionConfig, seed: int = 0
) -> UNet2DConditionModel:
    """``small``'s weights in a UNet of ``config`` that has the same blocks plus new cross-attention ones.

    The new transformer blocks are freshly initialised but start with ``proj_out`` zeroed: each adds a
    zero residual, so the grown UNet computes ``small``'s function exactly and training starts from it
    (ControlNet's zero-init). Raises ValueError when ``small`` is not a part of ``config``'s layout.
    """
    old = to_state_dict(small)
    new = to_state_dict(UNet2DConditionModel(config, rngs=nnx.Rngs(seed)))
    if missing := sorted(old.keys() - new.keys()):
        raise ValueError(f"cannot grow: {missing[0]} ({len(missing)} keys) has no place in the new UNet")
    if bad := [k for k in old if old[k].shape != new[k].shape]:
        raise ValueError(f"cannot grow: {bad[0]} is {old[bad[0]].shape}, the new UNet's {new[bad[0]].shape}")
    added = new.keys() - old.keys()
    if outside := sorted(k for k in added if ".attentions." not in k):
        raise ValueError(f"cannot grow: {outside[0]} is new but not part of a new attention block")
    zeroed = {k: np.zeros_like(new[k]) for k in added if ".proj_out." in k}
    return load_state_dict(abstract_model(UNet2DConditionModel, config), {**new, **zeroed, **old})


def export(unet: UNet2DConditionModel, out: str | Path) -> Path:
    """Write a diffusers ``unet/`` folder (config.json, fp32 safetensors)."""
    return export_component(unet, out, "UNet2DConditionModel")


def load_unet(folder: str | Path) -> UNet2DConditionModel:
    """A ``unet/`` folder that ``export`` wrote -> our module."""
    return load_component(UNet2DConditionModel, UNet2DConditionConfig, folder)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: train (or resume) the shapes UNet on the frozen VAE and text encoder, export it to OUT/unet."""
    sizes = ("f4", "f4a", "f4t", "small", "tiny")
    parser = run_parser(main.__doc__, steps=12_000, batch_size=64, sizes=sizes)
    parser.add_argument("--vae", required=True, help="the trained VAE's folder (train_vae's OUT/vae)")
    parser.add_argument("--text-encoder", required=True, help="the exported shapes CLIP (train_clip's OUT)")
    parser.add_argument(
        "--init-from",
        help="start from this exported unet/ folder instead of random weights (an f4 UNet grows into f4t)",
    )
    parser.add_argument(
        "--snr-gamma", type=float,
        help="weight the loss by min(SNR, gamma) / SNR (min-SNR, e.g. 5; default: the plain MSE)",
    )
    args = parser.parse_args(argv)
    use_training_flags()  # before JAX starts its backend: see xla_flags
    config = prepare_run(parser, args, train_config(args.out, args.steps, args.seed))
    vae, text_encoder = load_vae(args.vae), load_text_encoder(args.text_encoder)
    model_config = unet_config(args.size, text_encoder.config.hidden_size)
    if args.init_from:  # a fresh optimizer from these weights (a checkpoint in OUT/ckpt still wins)
        unet = load_unet(args.init_from)
        if unet.config != model_config:
            try:
                unet = grow_unet(unet, model_config, args.seed)
            except ValueError as e:
                parser.error(f"--init-from {args.init_from} is not a UNet of --size {args.size}: {e}")
    else:
        unet = UNet2DConditionModel(model_config, rngs=nnx.Rngs(args.seed))
    print(f"UNet {args.size}: {num_params(unet) / 1e6:.2f}M params; {config}")
    encode = diffusion.frozen_encoder(vae, text_encoder)
    batches = unet_batches(
        encode, load_tokenizer(clip_tokenizer_path()), config.batch_size, args.seed, workers=args.workers
    )
    with open(Path(args.out) / "log.jsonl", "a") as log:
        loss = functools.partial(unet_loss, snr_gamma=args.snr_gamma)
        train(unet, loss, batches, config, on_log=functools.partial(log_line, log))
    export(unet, Path(args.out) / "unet")


if __name__ == "__main__":
    use_jemalloc()  # re-executes once under jemalloc where installed: see allocator
    use_compilation_cache()  # a resumed run does not compile its step again: see compile_cache
    main()
