"""Ablating Concepts (Kumari et al. 2023), the model-based loss: the target prompt's noise prediction is
fine-tuned to the anchor prompt's, on images of the anchor.

As the authors' diffusers ``train.py`` runs it: the original model generates anchor images from anchor
prompts; each step takes a batch of them, noises their latents to uniformly drawn timesteps, and pulls
e_theta(x_t, target prompt) to e(x_t, anchor prompt) computed without gradient by the model being trained
(``anchor_from="original"`` asks the frozen original instead), by MSE; AdamW (weight decay 1e-2) after a
global-norm clip of 1, lr 2e-6 scaled by the batch (``--scale_lr``), 100 steps of batch 4, cross-attention
to_k/to_v. The target prompt is the anchor prompt with the target in the anchor's place (the script's
``caption_target`` "anchor+target"). Prior preservation (``prior=True``) adds the plain diffusion loss of
the anchor prompt on a second batch of anchor images, as the script's ``--with_prior_preservation``.

The loss is reduced as the script reduces it: summed over channels within a mask that leaves out a
one-latent border (its ``--noaug`` mask), divided by the mask's area, averaged over the batch.

Choices where we differ: anchor images stay latents (the script decodes generated images and encodes them
again with the VAE); its random-resize augmentation is not applied (``--noaug``, the style setting);
horizontal flips are, on the latents, each row with probability 1/2; each step draws its batch without
replacement from the whole set (the script's data loader shuffles once per epoch).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jax_erasepro import diffusion, schedulers
from jax_erasepro.erase import finetune
from jax_erasepro.erase.columns import EraseError, prompt_tokens
from jax_erasepro.erase.erasepro import DEFAULT_PROMPTS
from jax_erasepro.erase.methods import Request, check_choices, option
from jax_erasepro.erase.report import EraseReport
from jax_erasepro.pipeline import denoise, encode_tokens, initial_latents
from jax_erasepro.sd import StableDiffusion

# name -> (what it trains, predicate over ``unet.<key>``); the script's --parameter_group
TRAIN_SETS = {
    "kv": (
        "the U-Net's cross-attention to_k and to_v (the script's cross-attn)",
        ("attn2.to_k.", "attn2.to_v."),
    ),
    "attn2": ("every weight of the U-Net's cross-attention", ("attn2.",)),
    "full": ("every weight of the U-Net (the script's full-weight)", ("",)),
}


@dataclasses.dataclass(frozen=True)
class ACOptions(finetune.LoopOptions):
    """Options of Ablating Concepts (defaults: the authors' README commands for objects and styles)."""

    steps: int = option(100, "optimisation steps (the script's max_train_steps)")
    lr: float = option(2e-6, "base learning rate (> 0), multiplied by batch_size when scale_lr")
    scale_lr: bool = option(True, "multiply lr by batch_size, as the README's --scale_lr on one process")
    batch_size: int = option(4, "anchor images per step (>= 1)")
    train: str = option("kv", "trainable set: kv (attn2 to_k/to_v), attn2, full", choices=tuple(TRAIN_SETS))
    anchor_images: int = option(
        200, "anchor images the original model generates (the script's num_class_images)"
    )
    anchor_from: str = option(
        "trained",
        "which model predicts the anchor target: trained (the model being trained, without gradient, as the "
        "script), original (the frozen original)",
        choices=("trained", "original"),
    )
    loss: str = option(
        "model-based",
        "model-based (pull to the anchor's prediction) or noise-based (to the drawn noise)",
        choices=("model-based", "noise-based"),
    )
    prior: bool = option(False, "add the prior-preservation loss on anchor images with the anchor prompt")
    prior_weight: float = option(1.0, "weight of the prior-preservation loss")
    weight_decay: float = option(1e-2, "AdamW's decoupled weight decay (the script's adam_weight_decay)")
    max_grad_norm: float = option(1.0, "global gradient-norm clip (> 0)")
    hflip: bool = option(True, "flip each latent left-right with probability 1/2 (the README's --hflip)")
    generation_steps: int = option(50, "sampling steps when generating the anchor images")
    generation_guidance: float = option(
        6.0, "guidance scale when generating the anchor images (the authors' inference 6; their train.py 7.5)"
    )

    def __post_init__(self) -> None:
        check_choices(self)
        self.check_loop()
        for name in ("steps", "batch_size", "anchor_images", "generation_steps"):
            if getattr(self, name) < 1:
                raise EraseError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise EraseError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.weight_decay >= 0 or not self.prior_weight >= 0:
            raise EraseError("weight_decay and prior_weight must be >= 0")


def trainable_predicate(train: str) -> Callable[[str], bool]:
    """``unet.<key>`` -> in the ``train`` set."""
    return finetune.unet_parts(f"ac-{train}", TRAIN_SETS[train][1])


def ac_loss(
    unet_def: nnx.GraphDef,
    trainable: nnx.State,
    rest: nnx.State,
    x_t: jax.Array,
    t: jax.Array,
    target_context: jax.Array,
    goal: jax.Array,
    masked: bool = True,
) -> jax.Array:
    """The squared error of e_theta(x_t, t, target prompt) against ``goal`` as train.py reduces it: with
    its (B, 1, h, w) mask over a one-latent border (``masked``), summed over channels and mask and divided
    by the mask's sum, then the batch mean (C times the masked mean); a plain mean when not ``masked`` (its
    prior term)."""
    eps = nnx.merge(unet_def, trainable, rest)(x_t, t, target_context)
    sq = jnp.square(eps - goal)
    if not masked:
        return jnp.mean(sq)
    mask = jnp.zeros(sq.shape[1:3], sq.dtype).at[1:-1, 1:-1].set(1.0)[None, :, :, None]
    return jnp.mean(jnp.sum(sq * mask, axis=(1, 2, 3)) / jnp.sum(mask))


def anchor_goal(
    unet_def: nnx.GraphDef,
    params: nnx.State,
    rest: nnx.State,
    x_t: jax.Array,
    t: jax.Array,
    anchor: jax.Array,
) -> jax.Array:
    """e(x_t, t, anchor prompt) of the U-Net ``params`` + ``rest``, without gradient."""
    unet = nnx.merge(unet_def, jax.lax.stop_gradient(params), jax.lax.stop_gradient(rest))
    return jax.lax.stop_gradient(unet(x_t, t, anchor))


def _batch(key: jax.Array, x0: jax.Array, n: int, hflip: bool) -> tuple[jax.Array, jax.Array]:
    """``n`` rows of ``x0`` drawn without replacement (with, past its size) and their indices, half of them
    flipped left-right when ``hflip``."""
    k_idx, k_flip = jax.random.split(key)
    m = x0.shape[0]
    idx = jax.random.permutation(k_idx, m)[:n] if n <= m else jax.random.randint(k_idx, (n,), 0, m)
    x = x0[idx]
    if hflip:
        flip = jax.random.bernoulli(k_flip, 0.5, (n, 1, 1, 1))
        x = jnp.where(flip, x[:, :, ::-1], x)
    return x, idx


@functools.partial(
    jax.jit,
    static_argnames=(
        "unet_def",
        "config",
        "batch",
        "hflip",
        "from_original",
        "model_based",
        "prior",
        "tx",
        "sharding",
    ),
)
def ac_step(
    trainable: nnx.State,
    opt_state: Any,
    original: nnx.State,
    rest: nnx.State,
    x0: jax.Array,
    anchor_states: jax.Array,
    target_states: jax.Array,
    step: jax.Array,
    key: jax.Array,
    lr: jax.Array,
    weight_decay: jax.Array,
    prior_weight: jax.Array,
    *,
    unet_def: nnx.GraphDef,
    config: schedulers.SchedulerConfig,
    batch: int,
    hflip: bool,
    from_original: bool,
    model_based: bool,
    prior: bool,
    tx: Any,
    sharding: Any = None,
) -> tuple[nnx.State, Any, jax.Array]:
    """One AC step on a batch of anchor latents ``x0`` (rows of the generated set, each with the anchor and
    target prompt states of the prompt that made it); returns the new params, optimiser state and loss."""
    k_batch, k_noise, k_t, k_prior = jax.random.split(jax.random.fold_in(key, step), 4)
    x, idx = _batch(k_batch, x0, batch, hflip)
    noise = jax.random.normal(k_noise, x.shape, x.dtype)
    t = jax.random.randint(k_t, (batch,), 0, config.num_train_timesteps)
    x_t = finetune.constrain(schedulers.add_noise(config, x, noise, t), sharding)
    if model_based:
        goal = anchor_goal(
            unet_def, original if from_original else trainable, rest, x_t, t, anchor_states[idx]
        )
    else:
        goal = diffusion.target(config, x, noise, t)

    def loss_fn(params):
        loss = ac_loss(unet_def, params, rest, x_t, t, target_states[idx], goal)
        if prior:
            k_b, k_n, k_tt = jax.random.split(k_prior, 3)
            xp, pidx = _batch(k_b, x0, batch, hflip)
            np_ = jax.random.normal(k_n, xp.shape, xp.dtype)
            tp = jax.random.randint(k_tt, (batch,), 0, config.num_train_timesteps)
            xp_t = finetune.constrain(schedulers.add_noise(config, xp, np_, tp), sharding)
            goal_p = diffusion.target(config, xp, np_, tp)
            prior_loss = ac_loss(unet_def, params, rest, xp_t, tp, anchor_states[pidx], goal_p, masked=False)
            loss = loss + prior_weight * prior_loss
        return loss

    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    trainable, opt_state = finetune.apply(tx, trainable, grads, opt_state, lr, weight_decay)
    return trainable, opt_state, loss


def prompt_pairs(
    sd: StableDiffusion, request: Request
) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """(anchor texts, target texts, their token ids): every template filled with each anchor and, in the
    same place, its target."""
    max_length = sd.config.text_encoder.max_position_embeddings
    templates = list(DEFAULT_PROMPTS) if request.prompts is None else list(request.prompts)
    anchors, targets = [], []
    for target, anchor in zip(request.targets, request.anchors, strict=True):
        for f in templates:
            anchors.append(prompt_tokens(sd.tokenizer, f, anchor, max_length))
            targets.append(prompt_tokens(sd.tokenizer, f, target, max_length))
    ids = lambda ps: np.asarray([p.ids for p in ps], np.int32)  # noqa: E731
    return [p.text for p in anchors], [p.text for p in targets], ids(anchors), ids(targets)


def anchor_latents(
    sd: StableDiffusion, states: jax.Array, n: int, opts: dict[str, Any], chunk: int = 16
) -> tuple[jax.Array, np.ndarray]:
    """``n`` clean latents the original model generates, prompt ``i % P`` for image ``i``; (latents, the
    prompt row of each)."""
    rows = np.arange(n) % states.shape[0]
    side = sd.config.unet.sample_size * sd.config.vae_scale_factor
    out = []
    bar = tqdm(
        range(0, n, chunk), desc="anchor images", unit="batch", disable=not opts["progress"], leave=False
    )
    for start in bar:
        r = rows[start : start + chunk]
        noise = initial_latents(sd, len(r), side, side, seed=opts["seed"] * 1_000_003 + start)
        out.append(
            denoise(
                sd,
                noise,
                states[r],
                num_inference_steps=opts["generation_steps"],
                guidance_scale=opts["generation_guidance"],
                seed=opts["seed"] + start,
            )
        )
    return jnp.concatenate(out), rows


def erase_ac(
    sd: StableDiffusion, request: Request, options: ACOptions
) -> tuple[StableDiffusion, EraseReport]:
    """Ablating Concepts (model-based) on the U-Net set ``options.train``; preserve is not used."""
    t0 = time.perf_counter()
    opts = dataclasses.asdict(options)
    split = finetune.split_trainable(sd, "unet", trainable_predicate(opts["train"]))
    anchor_texts, target_texts, anchor_ids, target_ids = prompt_pairs(sd, request)
    states = encode_tokens(sd.text_encoder, jnp.asarray(np.concatenate([anchor_ids, target_ids])))
    anchor_states, target_states = jnp.split(states, 2)
    x0, rows = anchor_latents(sd, anchor_states, opts["anchor_images"], opts)
    anchor_states, target_states = anchor_states[rows], target_states[rows]  # one row per image

    # --scale_lr multiplies by the batch (one process), and by 2 more with prior preservation
    lr = opts["lr"] * (opts["batch_size"] * (2 if opts["prior"] else 1) if opts["scale_lr"] else 1)
    tx = finetune.optimizer(max_grad_norm=opts["max_grad_norm"])
    key = jax.random.key(opts["seed"])
    scalars = (jnp.float32(lr), jnp.float32(opts["weight_decay"]), jnp.float32(opts["prior_weight"]))
    static = dict(
        unet_def=split.graphdef,
        config=sd.scheduler_config,
        batch=opts["batch_size"],
        hflip=opts["hflip"],
        from_original=opts["anchor_from"] == "original",
        model_based=opts["loss"] == "model-based",
        prior=opts["prior"],
        tx=tx,
        sharding=(sharding := finetune.batch_sharding(opts["data_parallel"], opts["batch_size"])),
    )
    original, rest, x0, anchor_states, target_states = finetune.replicate(
        (split.trainable, split.rest, x0, anchor_states, target_states), sharding
    )

    def step(trainable, opt_state, i):
        args = (original, rest, x0, anchor_states, target_states, jnp.int32(i), key, *scalars)
        trainable, opt_state, loss = ac_step(trainable, opt_state, *args, **static)
        return trainable, opt_state, loss, {}

    texts = [f"{t} <- {a}" for t, a in zip(target_texts, anchor_texts, strict=True)]
    checkpoints = finetune.checkpoints_for(sd, opts, "ac", request, texts)
    t_prep = time.perf_counter()
    result = finetune.train(
        step,
        original,
        tx.init(original),
        steps=opts["steps"],
        name="ac",
        progress=opts["progress"],
        checkpoints=checkpoints,
    )
    erased = sd.replace(unet=split.merge(result.trainable))
    notes = [
        f"trained {len(split.keys)} tensors ({TRAIN_SETS[opts['train']][0]}) at lr {lr:.3g}"
        + (f" (= {opts['lr']:.3g} x batch {opts['batch_size']}" if opts["scale_lr"] else "")
        + (" x 2 for prior preservation" if opts["scale_lr"] and opts["prior"] else "")
        + (", scale_lr)" if opts["scale_lr"] else ""),
        f"{opts['anchor_images']} anchor images generated by the original model from {len(anchor_texts)} "
        f"anchor prompts ({opts['generation_steps']} steps, guidance {opts['generation_guidance']})",
    ]
    if request.preserve:
        notes.append(
            f"AC has no preservation term for named concepts: preserve {list(request.preserve)} is unused"
        )
    report = finetune.report(
        sd,
        method="ac",
        request=request,
        texts=texts,
        options={**opts, "effective_lr": lr},
        split=split,
        original=original,
        result=result,
        notes=notes,
        t0=t0,
        t_prep=t_prep,
        extra={"anchor_images": int(x0.shape[0]), "epochs": result_epochs(len(result.losses), opts)},
    )
    return erased, report


def result_epochs(steps: int, opts: dict[str, Any]) -> float:
    """Passes over the anchor images that ``steps`` batches make."""
    return math.floor(100 * steps * opts["batch_size"] / opts["anchor_images"]) / 100


__all__ = ["TRAIN_SETS", "ACOptions", "ac_loss", "ac_step", "anchor_goal", "erase_ac", "trainable_predicate"]
