"""All but One (Hong, Lee and Woo, AAAI 2024, arXiv 2312.12807): erase by moving only the guidance term
e(x_t, c) - e(x_t, "") of the target to the anchor's, while a Lagrangian penalty holds the unconditional
prediction e(x_t, "") where the original had it, so everything sampled without the target stays.

There is no official code; this is the paper's objective as we implement it (every choice below is an
option and is written into the report):

- x_t is drawn as ESD draws it (``esd.sample_xt``): fresh noise denoised with the target prompt at
  ``start_guidance`` by the model being trained, to a step drawn uniformly from a ``ddim_steps`` schedule.
- The erasing signal: g_theta = e_theta(x_t, c) - e_theta(x_t, "") pulled to the anchor's guidance of the
  frozen original, g_a = e_0(x_t, a) - e_0(x_t, ""), by a mean square over a bottleneck: only the elements
  where the original's target guidance g_0 = e_0(x_t, c) - e_0(x_t, "") is in its top or bottom
  ``percentile`` (per example) carry the loss; elsewhere the guidance is left alone.
- The preservation constraint: d = mean (e_theta(x_t, "") - e_0(x_t, ""))^2 <= epsilon, enforced by the
  penalty lambda (d - epsilon) with lambda raised by dual ascent, lambda <- max(0, lambda + lambda_lr
  (d - epsilon)), after each step.
- The trainable set: the U-Net's cross-attention (``attn2``), or only its ``to_out`` (or to_k/to_v).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_erasepro import schedulers
from jax_erasepro.erase import finetune
from jax_erasepro.erase.ac import prompt_pairs
from jax_erasepro.erase.columns import EraseError
from jax_erasepro.erase.esd import draws, sample_xt
from jax_erasepro.erase.methods import Request, check_choices, option
from jax_erasepro.erase.report import EraseReport
from jax_erasepro.pipeline import encode_tokens
from jax_erasepro.sd import StableDiffusion
from jax_erasepro.tokenizer import tokenize

TRAIN_SETS = {
    "attn2": ("every weight of the U-Net's cross-attention", ("attn2.",)),
    "to_out": ("the U-Net's cross-attention output projections", ("attn2.to_out.",)),
    "kv": ("the U-Net's cross-attention to_k and to_v", ("attn2.to_k.", "attn2.to_v.")),
}


@dataclasses.dataclass(frozen=True)
class AllButOneOptions(finetune.LoopOptions):
    """Options of All but One (our defaults: the paper publishes no code; see the module docstring)."""

    steps: int = option(200, "optimisation steps (>= 1)")
    lr: float = option(1e-5, "Adam learning rate (> 0)")
    train: str = option("attn2", "trainable set: attn2, to_out, kv", choices=tuple(TRAIN_SETS))
    percentile: float = option(
        0.1,
        "share of guidance elements at each end (top and bottom) that carry the erasing loss, in (0, 0.5]",
    )
    epsilon: float = option(1e-4, "allowed mean-square drift of the unconditional prediction (>= 0)")
    lambda_init: float = option(1.0, "starting Lagrange multiplier of the preservation constraint (>= 0)")
    lambda_lr: float = option(100.0, "dual-ascent step of the multiplier (>= 0; 0 keeps it fixed)")
    start_guidance: float = option(3.0, "guidance scale of the partial sampling that draws x_t")
    ddim_steps: int = option(50, "steps of the sampling schedule the step is drawn from (>= 1)")
    batch_size: int = option(1, "latents per step (>= 1)")

    def __post_init__(self) -> None:
        check_choices(self)
        self.check_loop()
        for name in ("steps", "ddim_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise EraseError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise EraseError(f"lr must be > 0, got {self.lr}")
        if not 0 < self.percentile <= 0.5:
            raise EraseError(f"percentile must be in (0, 0.5], got {self.percentile}")
        for name in ("epsilon", "lambda_init", "lambda_lr"):
            if not getattr(self, name) >= 0:
                raise EraseError(f"{name} must be >= 0, got {getattr(self, name)}")


def trainable_predicate(train: str) -> Callable[[str], bool]:
    """``unet.<key>`` -> in the ``train`` set."""
    return finetune.unet_parts(f"allbutone-{train}", TRAIN_SETS[train][1])


def bottleneck(guidance: jax.Array, percentile: float) -> jax.Array:
    """1.0 where an element of each example's ``guidance`` is in its top or bottom ``percentile``, else 0."""
    flat = guidance.reshape(guidance.shape[0], -1)
    lo = jnp.quantile(flat, percentile, axis=1, keepdims=True)
    hi = jnp.quantile(flat, 1 - percentile, axis=1, keepdims=True)
    return ((flat <= lo) | (flat >= hi)).astype(guidance.dtype).reshape(guidance.shape)


def frozen_predictions(
    unet_def: nnx.GraphDef,
    original: nnx.State,
    rest: nnx.State,
    x_t: jax.Array,
    t: jax.Array,
    target: jax.Array,
    anchor: jax.Array,
    empty: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """e_0(x_t, c), e_0(x_t, a), e_0(x_t, "") of the frozen original, in one batch, without gradient."""
    unet = nnx.merge(unet_def, jax.lax.stop_gradient(original), jax.lax.stop_gradient(rest))
    eps = unet(jnp.concatenate([x_t] * 3), jnp.concatenate([t] * 3), jnp.concatenate([target, anchor, empty]))
    return tuple(jax.lax.stop_gradient(e) for e in jnp.split(eps, 3))


def allbutone_loss(
    unet_def: nnx.GraphDef,
    trainable: nnx.State,
    rest: nnx.State,
    x_t: jax.Array,
    t: jax.Array,
    target: jax.Array,
    empty: jax.Array,
    frozen: tuple[jax.Array, jax.Array, jax.Array],
    lam: jax.Array,
    percentile: float,
    epsilon: jax.Array,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """(erase + lam (drift - epsilon), (erase, drift)): the bottlenecked guidance loss and the penalty on
    the unconditional prediction's drift (module docstring)."""
    e_c0, e_a0, e_u0 = frozen
    unet = nnx.merge(unet_def, trainable, rest)
    eps = unet(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]), jnp.concatenate([target, empty]))
    e_c, e_u = jnp.split(eps, 2)
    mask = bottleneck(e_c0 - e_u0, percentile)
    err = jnp.square((e_c - e_u) - (e_a0 - e_u0))
    erase = jnp.sum(mask * err) / jnp.maximum(jnp.sum(mask), 1.0)
    drift = jnp.mean(jnp.square(e_u - e_u0))
    return erase + lam * (drift - epsilon), (erase, drift)


@functools.partial(jax.jit, static_argnames=("unet_def", "shape", "percentile", "tx", "sharding"))
def allbutone_step(
    trainable: nnx.State,
    opt_state: tuple[Any, jax.Array],
    original: nnx.State,
    rest: nnx.State,
    schedule: schedulers.Schedule,
    targets: jax.Array,
    anchors: jax.Array,
    empty: jax.Array,
    step: jax.Array,
    key: jax.Array,
    lr: jax.Array,
    start_guidance: jax.Array,
    epsilon: jax.Array,
    lambda_lr: jax.Array,
    *,
    unet_def: nnx.GraphDef,
    shape: tuple[int, ...],
    percentile: float,
    tx: Any,
    sharding: Any = None,
) -> tuple[nnx.State, tuple[Any, jax.Array], jax.Array, dict[str, jax.Array]]:
    """One step: draw x_t, the frozen predictions, the loss and gradient, Adam, then the dual ascent of
    lambda. ``targets``/``anchors`` (P, T, d) are the prompt pairs, cycled by ``step``."""
    adam_state, lam = opt_state
    batch = shape[0]
    row = step % targets.shape[0]
    target = jnp.repeat(targets[row][None], batch, axis=0)
    anchor = jnp.repeat(anchors[row][None], batch, axis=0)
    uncond = jnp.repeat(empty, batch, axis=0)
    t_enc, noise, k_sample = draws(key, step, schedule.timesteps.shape[0], shape)
    noise = finetune.constrain(noise, sharding)
    guided = jnp.stack([uncond, target], axis=1).reshape(-1, *target.shape[1:])
    x_t = sample_xt(unet_def, (trainable, rest), schedule, noise, guided, start_guidance, t_enc, k_sample)
    t = jnp.full((batch,), schedule.timesteps[t_enc])
    frozen = frozen_predictions(unet_def, original, rest, x_t, t, target, anchor, uncond)
    (loss, (erase, drift)), grads = jax.value_and_grad(allbutone_loss, argnums=1, has_aux=True)(
        unet_def, trainable, rest, x_t, t, target, uncond, frozen, lam, percentile, epsilon
    )
    trainable, adam_state = finetune.apply(tx, trainable, grads, adam_state, lr)
    lam_next = jnp.maximum(0.0, lam + lambda_lr * (drift - epsilon))
    return (
        trainable,
        (adam_state, lam_next),
        loss,
        {"erase": erase, "drift": drift, "lambda": lam, "t_enc": t_enc},
    )


def erase_allbutone(
    sd: StableDiffusion, request: Request, options: AllButOneOptions
) -> tuple[StableDiffusion, EraseReport]:
    """All but One on the U-Net set ``options.train``; preserve is not used (the constraint keeps the
    unconditional prediction instead)."""
    t0 = time.perf_counter()
    opts = dataclasses.asdict(options)
    split = finetune.split_trainable(sd, "unet", trainable_predicate(opts["train"]))
    n_train = sd.scheduler_config.num_train_timesteps
    if opts["ddim_steps"] > n_train:
        raise EraseError(
            f"ddim_steps must be <= the model's {n_train} training timesteps, got {opts['ddim_steps']}"
        )
    anchor_texts, target_texts, anchor_ids, target_ids = prompt_pairs(
        sd, Request(request.targets, request.anchors, prompts=request.prompts or ("{}",))
    )
    empty_ids = np.asarray(tokenize(sd.tokenizer, [""], max_length=target_ids.shape[1]), np.int32)
    states = encode_tokens(sd.text_encoder, jnp.asarray(np.concatenate([target_ids, anchor_ids, empty_ids])))
    p = len(target_texts)
    targets, anchors, empty = states[:p], states[p : 2 * p], states[2 * p :]
    schedule = schedulers.make_schedule(sd.scheduler_config, "ddim", opts["ddim_steps"])
    side = sd.config.unet.sample_size
    shape = (opts["batch_size"], side, side, sd.config.unet.in_channels)
    tx = finetune.optimizer()
    key = jax.random.key(opts["seed"])
    scalars = tuple(jnp.float32(opts[k]) for k in ("lr", "start_guidance", "epsilon", "lambda_lr"))
    sharding = finetune.batch_sharding(opts["data_parallel"], opts["batch_size"])
    static = dict(
        unet_def=split.graphdef, shape=shape, percentile=float(opts["percentile"]), tx=tx, sharding=sharding
    )
    original, rest, targets, anchors, empty = finetune.replicate(
        (split.trainable, split.rest, targets, anchors, empty), sharding
    )

    def step(trainable, opt_state, i):
        args = (original, rest, schedule, targets, anchors, empty, jnp.int32(i), key, *scalars)
        return allbutone_step(trainable, opt_state, *args, **static)

    texts = [f"{t} -> {a}" for t, a in zip(target_texts, anchor_texts, strict=True)]
    checkpoints = finetune.checkpoints_for(sd, opts, "allbutone", request, texts)
    t_prep = time.perf_counter()
    result = finetune.train(
        step,
        original,
        (tx.init(original), jnp.float32(opts["lambda_init"])),
        steps=opts["steps"],
        name="allbutone",
        progress=opts["progress"],
        checkpoints=checkpoints,
    )
    erased = sd.replace(unet=split.merge(result.trainable))
    notes = [
        f"trained {len(split.keys)} tensors ({TRAIN_SETS[opts['train']][0]})",
        "no official code: the objective as docs/methods.md states it (x_t drawn as ESD; guidance pulled to "
        f"the anchor's on the top/bottom {opts['percentile']:.0%} of the target's guidance; unconditional "
        f"drift held under {opts['epsilon']:g} by a multiplier raised by dual ascent)",
    ]
    if request.preserve:
        notes.append(
            f"All but One keeps the unconditional prediction, not named concepts: preserve "
            f"{list(request.preserve)} is not used"
        )
    report = finetune.report(
        sd,
        method="allbutone",
        request=request,
        texts=texts,
        options=opts,
        split=split,
        original=original,
        result=result,
        notes=notes,
        t0=t0,
        t_prep=t_prep,
    )
    return erased, report


__all__ = [
    "TRAIN_SETS",
    "AllButOneOptions",
    "allbutone_loss",
    "allbutone_step",
    "bottleneck",
    "erase_allbutone",
    "frozen_predictions",
    "trainable_predicate",
]
