"""ESD (Gandikota et al. 2023, "Erasing Concepts from Diffusion Models"): fine-tune the U-Net so the target
prompt's noise prediction is the frozen original's, guided away from the target.

Each step, as the authors' ``esd_sd.py`` runs it: draw a step index ``t_enc`` uniformly from a
``ddim_steps`` schedule; denoise fresh noise through steps ``0..t_enc-1`` with the target prompt at
``start_guidance`` (no gradient); at the timestep of step ``t_enc`` ask the frozen original e_0 for
e_0(x_t, c) and e_0(x_t, ""); pull the trained e_theta(x_t, c) to

    e_0(x_t, b) - eta (e_0(x_t, c) - e_0(x_t, ""))      b = c (esd_sd.py) or "" (the CompVis script)

by MSE, one Adam step on the trainable set. The registered name picks that set (``TRAIN_SETS``); as in
both scripts only Linear and Conv2d weights and biases train (``norms=True`` adds the norm layers).
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
import optax
from flax import nnx

from jax_erasepro import schedulers, surgery
from jax_erasepro.erase import finetune
from jax_erasepro.erase.columns import EraseError, prompt_tokens
from jax_erasepro.erase.methods import Request, check_choices, option
from jax_erasepro.erase.report import EraseReport
from jax_erasepro.pipeline import encode_tokens, sample_step
from jax_erasepro.sd import StableDiffusion
from jax_erasepro.tokenizer import tokenize

PRESETS: dict[str, dict[str, Any]] = {
    # rohitgandikota/erasing esd_sd.py, the settings ErasePro's paper compares against
    "esd_sd": {"steps": 200, "lr": 5e-5, "negative_guidance": 2.0, "base": "target"},
    # the older CompVis train-scripts/train-esd.py
    "compvis": {"steps": 1000, "lr": 1e-5, "negative_guidance": 1.0, "base": "empty"},
}
BASES = ("target", "empty")
SAMPLERS = ("trained", "original")

# name -> (what it trains, predicate over U-Net keys); esd_sd.py's get_esd_trainable_parameters
TRAIN_SETS: dict[str, tuple[str, Callable[[str], bool]]] = {
    "esd-x": ("every weight inside the U-Net's cross-attention (attn2)", lambda k: ".attn2." in k),
    "esd-u": ("every weight outside the U-Net's cross-attention", lambda k: ".attn2." not in k),
    "esd-all": ("every weight of the U-Net", lambda k: True),
    "esd-x-strict": (
        "the U-Net's cross-attention to_k and to_v",
        lambda k: ".attn2.to_k." in k or ".attn2.to_v." in k,
    ),
}


@dataclasses.dataclass(frozen=True)
class ESDOptions(finetune.LoopOptions):
    """Options of ESD; None takes the preset's value (``PRESETS``)."""

    preset: str = option(
        "esd_sd",
        "esd_sd: the authors' current esd_sd.py (200 steps, lr 5e-5, negative guidance 2, base target); "
        "compvis: the older train-esd.py (1000 steps, lr 1e-5, negative guidance 1, base empty)",
        choices=tuple(PRESETS),
    )
    steps: int | None = option(None, "optimisation steps, the scripts' iterations (None: the preset's)")
    lr: float | None = option(None, "Adam learning rate (> 0; None: the preset's)")
    negative_guidance: float | None = option(
        None, "eta, how far the target prediction is pushed away from the concept (>= 0; None: the preset's)"
    )
    base: str | None = option(
        None,
        "the prediction eta's guidance is subtracted from: target, e_0(x_t, c) as esd_sd.py; empty, "
        'e_0(x_t, "") as the CompVis script (None: the preset\'s)',
        choices=(None, *BASES),
    )
    start_guidance: float = option(3.0, "guidance scale of the partial sampling that draws x_t")
    ddim_steps: int = option(50, "steps of the sampling schedule that t_enc is drawn from (>= 1)")
    scheduler: str = option(
        "ddim",
        "sampler of the partial sampling: DDIM (eta 0) as the CompVis script; esd_sd.py takes the pipeline's "
        "own (PNDM for SD v1.4)",
        choices=("ddim", "pndm", "ddpm"),
    )
    sample_with: str = option(
        "trained",
        "which U-Net draws x_t: trained (the model being trained, as the paper and the CompVis script), "
        "original (the frozen one, as esd_sd.py)",
        choices=SAMPLERS,
    )
    norms: bool = option(
        False, "also train the normalisation layers in the set (the scripts train Linear and Conv2d only)"
    )
    batch_size: int = option(1, "latents per step (both scripts: 1)")
    resolution: int | None = option(
        None, "image side in pixels of x_t (None: the U-Net's sample_size x the VAE's factor)"
    )

    def __post_init__(self) -> None:
        check_choices(self)
        self.check_loop()
        if self.steps is not None and self.steps < 1:
            raise EraseError(f"steps must be >= 1, got {self.steps}")
        if self.lr is not None and not self.lr > 0:
            raise EraseError(f"lr must be > 0, got {self.lr}")
        if self.negative_guidance is not None and not self.negative_guidance >= 0:
            raise EraseError(f"negative_guidance must be >= 0, got {self.negative_guidance}")
        if self.ddim_steps < 1:
            raise EraseError(f"ddim_steps must be >= 1, got {self.ddim_steps}")
        if self.batch_size < 1:
            raise EraseError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.resolution is not None and self.resolution < 1:
            raise EraseError(f"resolution must be >= 1, got {self.resolution}")

    def resolved(self) -> dict[str, Any]:
        """Every option with the preset's values filled in for the ones left None."""
        out = dataclasses.asdict(self)
        for name, value in PRESETS[self.preset].items():
            if out[name] is None:
                out[name] = value
        return out


def trainable_predicate(sd: StableDiffusion, train: str, norms: bool = False) -> Callable[[str], bool]:
    """The keys ``train`` fine-tunes: its U-Net set, less normalisation layers unless ``norms``."""
    in_set = TRAIN_SETS[train][1]
    # a norm layer is a module with a ``scale`` leaf (GroupNorm, LayerNorm); Linear and Conv2d have kernels
    norm_modules = {
        k.rsplit(".", 1)[0] for k, e in surgery.entries(sd, ["unet"]).items() if e.leaf == "scale"
    }

    def predicate(key: str) -> bool:
        return (
            key.startswith("unet.") and in_set(key) and (norms or key.rsplit(".", 1)[0] not in norm_modules)
        )

    predicate.__name__ = train
    return predicate


def sample_xt(
    unet_def: nnx.GraphDef,
    params: tuple[nnx.State, ...],
    schedule: schedulers.Schedule,
    noise: jax.Array,
    context: jax.Array,
    guidance_scale: jax.Array | float,
    t_enc: jax.Array,
    key: jax.Array,
) -> jax.Array:
    """Steps ``0..t_enc-1`` of ``schedule`` from ``noise`` with guided ``context`` (rows uncond, cond, ...)
    by the U-Net ``nnx.merge(unet_def, *params)``.

    A ``lax.while_loop`` with the dynamic trip count ``t_enc``: it runs only the steps it needs (on average
    half of a masked scan over every step), and nothing differentiates through it (x_t is sampled under
    stop_gradient), so the loop need not be reverse-differentiable. Equals ``pipeline.denoise_loop`` with
    ``stop=t_enc``, which needs a static range.
    """
    params = jax.lax.stop_gradient(params)
    state = schedulers.init_state(schedule, noise.shape, noise.dtype)

    def body(loop: tuple[jax.Array, Any]) -> tuple[jax.Array, Any]:
        i, carry = loop
        return i + 1, sample_step(nnx.merge(unet_def, *params), schedule, carry, i, context, guidance_scale)

    _, (x, _, _) = jax.lax.while_loop(lambda loop: loop[0] < t_enc, body, (jnp.int32(0), (noise, state, key)))
    return x


def esd_target(e_cond: jax.Array, e_uncond: jax.Array, eta: jax.Array | float, base: str) -> jax.Array:
    """e_0(x_t, b) - eta (e_0(x_t, c) - e_0(x_t, "")), with b = c for base "target" and "" for "empty"."""
    b = e_cond if base == "target" else e_uncond
    return b - eta * (e_cond - e_uncond)


def esd_loss(
    unet_def: nnx.GraphDef,
    trainable: nnx.State,
    rest: nnx.State,
    x_t: jax.Array,
    t: jax.Array,
    context: jax.Array,
    target: jax.Array,
) -> jax.Array:
    """MSE (mean over every element, torch's MSELoss) between e_theta(x_t, t, context) and ``target``."""
    eps = nnx.merge(unet_def, trainable, rest)(x_t, t, context)
    return jnp.mean(jnp.square(eps - target))


def frozen_target(
    unet_def: nnx.GraphDef,
    original: nnx.State,
    rest: nnx.State,
    x_t: jax.Array,
    t: jax.Array,
    context: jax.Array,
    uncond: jax.Array,
    eta: jax.Array | float,
    base: str,
) -> jax.Array:
    """The ESD target from the frozen original (its trainable params ``original`` plus the shared ``rest``);
    e_0(x_t, c) and e_0(x_t, "") in one batch."""
    unet = nnx.merge(unet_def, jax.lax.stop_gradient(original), jax.lax.stop_gradient(rest))
    both = jnp.concatenate([context, uncond])
    eps = unet(jnp.concatenate([x_t, x_t]), t, both)
    e_cond, e_uncond = jnp.split(eps, 2)
    return jax.lax.stop_gradient(esd_target(e_cond, e_uncond, eta, base))


def draws(key: jax.Array, step: jax.Array, n_steps: int, shape: tuple[int, ...]) -> tuple[jax.Array, ...]:
    """Step ``step``'s t_enc in [0, n_steps), its starting noise and its sampler key, from one seed key."""
    k_t, k_noise, k_sample = jax.random.split(jax.random.fold_in(key, step), 3)
    t_enc = jax.random.randint(k_t, (), 0, n_steps)
    return t_enc, jax.random.normal(k_noise, shape, jnp.float32), k_sample


_ADAM = finetune.optimizer()  # torch.optim.Adam's defaults; lr applied in the step


@functools.partial(jax.jit, static_argnames=("unet_def", "shape", "base", "sample_trained", "sharding"))
def esd_step(
    trainable: nnx.State,
    opt_state: optax.OptState,
    original: nnx.State,
    rest: nnx.State,
    schedule: schedulers.Schedule,
    contexts: jax.Array,
    uncond: jax.Array,
    step: jax.Array,
    key: jax.Array,
    lr: jax.Array,
    eta: jax.Array,
    start_guidance: jax.Array,
    *,
    unet_def: nnx.GraphDef,
    shape: tuple[int, ...],
    base: str,
    sample_trained: bool,
    sharding: Any = None,
) -> tuple[nnx.State, optax.OptState, jax.Array, jax.Array]:
    """One ESD iteration: sample x_t to a drawn step, the frozen target, loss, gradient, an Adam update.

    ``contexts`` (P, T, d) are the training prompts, cycled by ``step``; ``original`` (the frozen trainable
    params) goes in as an argument, so it is not baked into the program. Returns the new trainable params,
    the optimiser state, the loss (before the update) and t_enc.
    """
    batch = shape[0]
    context = jnp.repeat(contexts[step % contexts.shape[0]][None], batch, axis=0)
    empty = jnp.repeat(uncond, batch, axis=0)
    t_enc, noise, k_sample = draws(key, step, schedule.timesteps.shape[0], shape)
    noise = finetune.constrain(noise, sharding)
    guided = jnp.stack([empty, context], axis=1).reshape(-1, *context.shape[1:])  # (u_0, c_0, u_1, ...)
    sampler = trainable if sample_trained else original
    x_t = sample_xt(unet_def, (sampler, rest), schedule, noise, guided, start_guidance, t_enc, k_sample)
    t = schedule.timesteps[t_enc]
    target = frozen_target(unet_def, original, rest, x_t, t, context, empty, eta, base)
    loss, grads = jax.value_and_grad(esd_loss, argnums=1)(unet_def, trainable, rest, x_t, t, context, target)
    trainable, opt_state = finetune.apply(_ADAM, trainable, grads, opt_state, lr)
    return trainable, opt_state, loss, t_enc


def _prompt_ids(sd: StableDiffusion, request: Request) -> tuple[np.ndarray, list[str]]:
    """Token ids of the training prompts: every template filled with every target (the concept alone by
    default), target-major, so cycling visits each target in turn."""
    max_length = sd.config.text_encoder.max_position_embeddings
    templates = ["{}"] if request.prompts is None else list(request.prompts)
    tokens = [prompt_tokens(sd.tokenizer, f, t, max_length) for t in request.targets for f in templates]
    return np.asarray([p.ids for p in tokens], np.int32), [p.text for p in tokens]


def erase_esd(
    sd: StableDiffusion, request: Request, options: ESDOptions, *, train: str = "esd-x"
) -> tuple[StableDiffusion, EraseReport]:
    """ESD with the trainable set ``train`` (a name in ``TRAIN_SETS``); anchors and preserve are not used."""
    t0 = time.perf_counter()
    opts = options.resolved()
    if train not in TRAIN_SETS:
        raise EraseError(f"unknown ESD train set {train!r} (choose from {', '.join(TRAIN_SETS)})")
    ids, texts = _prompt_ids(sd, request)
    empty_ids = tokenize(sd.tokenizer, [""], max_length=ids.shape[1])
    n_train, n_steps = sd.scheduler_config.num_train_timesteps, opts["ddim_steps"]
    if n_steps > n_train:
        raise EraseError(f"ddim_steps must be <= the model's {n_train} training timesteps, got {n_steps}")
    schedule = schedulers.make_schedule(sd.scheduler_config, opts["scheduler"], opts["ddim_steps"])
    f = sd.config.vae_scale_factor
    side = opts["resolution"] or sd.config.unet.sample_size * f
    if side % f:
        raise EraseError(f"resolution must be a multiple of {f}, got {side}")
    shape = (opts["batch_size"], side // f, side // f, sd.config.unet.in_channels)

    predicate = trainable_predicate(sd, train, opts["norms"])
    split = finetune.split_trainable(sd, "unet", predicate)
    unet_def, original, rest = split.graphdef, split.trainable, split.rest
    text = jnp.asarray(np.concatenate([ids, np.asarray(empty_ids, np.int32)]))
    states = encode_tokens(sd.text_encoder, text)
    contexts, uncond = states[:-1], states[-1:]
    key = jax.random.key(opts["seed"])
    lr, eta, start_guidance = (jnp.float32(opts[k]) for k in ("lr", "negative_guidance", "start_guidance"))
    trained = opts["sample_with"] == "trained"
    sharding = finetune.batch_sharding(opts["data_parallel"], opts["batch_size"])
    static = dict(
        unet_def=unet_def, shape=shape, base=opts["base"], sample_trained=trained, sharding=sharding
    )

    original, rest, contexts, uncond = finetune.replicate((original, rest, contexts, uncond), sharding)

    def step(trainable, opt_state, i):
        args = (original, rest, schedule, contexts, uncond, jnp.int32(i), key, lr, eta, start_guidance)
        trainable, opt_state, loss, t_enc = esd_step(trainable, opt_state, *args, **static)
        return trainable, opt_state, loss, {"t_enc": t_enc}

    checkpoints = finetune.checkpoints_for(sd, opts, train, request, texts)
    t_prep = time.perf_counter()
    result = finetune.train(
        step,
        original,
        _ADAM.init(original),
        steps=opts["steps"],
        name=train,
        progress=opts["progress"],
        checkpoints=checkpoints,
    )
    erased = sd.replace(unet=split.merge(result.trainable))
    notes = [
        "ESD erases towards the unconditional prediction: anchors are not used"
        + (f" (given: {sorted(set(request.anchors))})" if any(request.anchors) else ""),
        f"trained {len(split.keys)} tensors ({TRAIN_SETS[train][0]}"
        + ("" if opts["norms"] else ", Linear and Conv2d only, as the scripts")
        + ")",
    ]
    if request.preserve:
        notes.append(f"ESD has no preservation term: preserve {list(request.preserve)} is not used")
    report = finetune.report(
        sd,
        method=train,
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


def runner(
    train: str,
) -> Callable[[StableDiffusion, Request, ESDOptions], tuple[StableDiffusion, EraseReport]]:
    """``erase_esd`` for one trainable set, as a registry's ``run``."""
    return functools.partial(erase_esd, train=train)


__all__ = [
    "PRESETS",
    "TRAIN_SETS",
    "ESDOptions",
    "draws",
    "erase_esd",
    "esd_loss",
    "esd_step",
    "esd_target",
    "frozen_target",
    "runner",
    "sample_xt",
    "trainable_predicate",
]
