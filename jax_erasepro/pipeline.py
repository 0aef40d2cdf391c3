"""The Stable Diffusion pipeline: prompt encoding, the sampler's pieces and text-to-image sampling.

The sampler is built from pure functions that other code (training methods, attacks) calls inside its own
``jit``: ``guided_noise`` (classifier-free guidance), ``sample_step`` (one scheduler step) and
``denoise_loop`` (a ``lax.scan`` of steps ``start..stop``). ``generate`` runs the whole loop and the VAE
decode as one compiled XLA program; ``denoise`` runs a range of steps from given latents.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jax_erasepro import schedulers, sharding
from jax_erasepro.models.clip import CLIPTextModel
from jax_erasepro.models.unet import UNet2DConditionModel
from jax_erasepro.sd import SDConfig, SourceInfo, StableDiffusion
from jax_erasepro.tokenizer import tokenize


@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef: nnx.GraphDef, params: nnx.State, ids: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, params)(ids)


def encode_tokens(text_encoder: CLIPTextModel, ids: np.ndarray | jax.Array) -> jax.Array:
    """(B, 77) token ids -> (B, 77, d) final-layer-normed hidden states, jitted."""
    graphdef, params = nnx.split(text_encoder)
    return _encode(graphdef, params, jnp.asarray(ids, jnp.int32))


def encode_prompts(sd: StableDiffusion, prompts: Sequence[str] | str) -> jax.Array:
    """Prompts -> (B, 77, d): the text-encoder states SD feeds the UNet (over-long prompts are truncated
    with a warning, as diffusers does)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids = tokenize(sd.tokenizer, prompts, max_length=sd.config.text_encoder.max_position_embeddings)
    return encode_tokens(sd.text_encoder, ids)


Carry = tuple[jax.Array, schedulers.SchedulerState, jax.Array]  # latents (NHWC), scheduler state, key


def guided_noise(
    unet: UNet2DConditionModel,
    latents: jax.Array,
    t: jax.Array,
    context: jax.Array,
    guidance_scale: jax.Array | float | None,
) -> jax.Array:
    """The U-Net's noise prediction for (B, h, w, C) latents at timestep ``t``.

    With ``guidance_scale`` None, ``context`` is (B, T, d) and the prediction is unguided. Otherwise
    ``context`` is (2B, T, d) with rows interleaved (uncond_0, cond_0, uncond_1, ...), so a batch shard keeps
    its pairs local, and the result is eps_u + g (eps_c - eps_u), as diffusers guides.
    """
    if guidance_scale is None:
        return unet(latents, t, context)
    eps = unet(jnp.repeat(latents, 2, axis=0), t, context).reshape(latents.shape[0], 2, *latents.shape[1:])
    return eps[:, 0] + guidance_scale * (eps[:, 1] - eps[:, 0])


def sample_step(
    unet: UNet2DConditionModel,
    schedule: schedulers.Schedule,
    carry: Carry,
    i: jax.Array,
    context: jax.Array,
    guidance_scale: jax.Array | float | None,
) -> Carry:
    """Step ``i`` of the schedule: predict the noise at its timestep, then the scheduler's update."""
    x, state, key = carry
    eps = guided_noise(unet, x, schedule.timesteps[i], context, guidance_scale)
    key, sub = jax.random.split(key)
    x, state = schedulers.step(schedule, state, i, eps, x, sub)
    return x, state, key


def denoise_loop(
    unet_def: nnx.GraphDef,
    unet_params: nnx.State,
    schedule: schedulers.Schedule,
    latents: jax.Array,
    context: jax.Array,
    guidance_scale: jax.Array | float | None,
    key: jax.Array,
    start: int = 0,
    stop: int | None = None,
    batch_sharding: NamedSharding | None = None,
) -> jax.Array:
    """Steps ``start..stop`` (static) of ``schedule`` as one ``lax.scan``; traceable inside any ``jit``.

    A fresh scheduler state starts the range: exact for DDIM and DDPM from any step, and for PNDM from step
    0 (its multistep history restarts otherwise). On a mesh (``batch_sharding``) the latents stay split by
    batch and sharded weights are gathered whole where used (FSDP); left alone, XLA splits activations by
    channel, with all-reduces in every norm.
    """
    stop = schedule.timesteps.shape[0] if stop is None else stop

    def body(carry: Carry, i: jax.Array) -> tuple[Carry, None]:
        x, state, key = carry
        unet = nnx.merge(unet_def, _whole(unet_params, batch_sharding))
        return sample_step(
            unet, schedule, (_split(x, batch_sharding), state, key), i, context, guidance_scale
        ), None

    context = _split(context, batch_sharding)
    state = schedulers.init_state(schedule, latents.shape, latents.dtype)
    (latents, _, _), _ = jax.lax.scan(body, (latents, state, key), jnp.arange(start, stop))
    return latents


def _whole(tree: Any, batch_sharding: NamedSharding | None) -> Any:
    if batch_sharding is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, NamedSharding(batch_sharding.mesh, PartitionSpec()))


def _split(x: jax.Array, batch_sharding: NamedSharding | None) -> jax.Array:
    return x if batch_sharding is None else jax.lax.with_sharding_constraint(x, batch_sharding)


@functools.partial(jax.jit, static_argnums=(0, 1, 6, 11))
def _sample(
    unet_def: nnx.GraphDef,
    vae_def: nnx.GraphDef,
    unet_params: nnx.State,
    vae_params: nnx.State,
    schedule: schedulers.Schedule,
    latents: jax.Array,
    guided: bool,
    context: jax.Array,
    guidance_scale: jax.Array,
    key: jax.Array,
    scaling_factor: jax.Array,
    batch_sharding: NamedSharding | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Denoise ``latents`` (NHWC) over the whole schedule, then decode to images in [0, 1]."""
    scale = guidance_scale if guided else None
    latents = denoise_loop(
        unet_def, unet_params, schedule, latents, context, scale, key, batch_sharding=batch_sharding
    )
    images = nnx.merge(vae_def, _whole(vae_params, batch_sharding)).decode(
        _split(latents, batch_sharding) / scaling_factor
    )
    return latents, jnp.clip(images / 2 + 0.5, 0.0, 1.0)


@functools.partial(jax.jit, static_argnums=(0, 6, 7))
def _denoise(
    unet_def: nnx.GraphDef,
    unet_params: nnx.State,
    schedule: schedulers.Schedule,
    latents: jax.Array,
    context: jax.Array,
    guidance_scale: jax.Array | None,
    start: int,
    stop: int,
    key: jax.Array,
) -> jax.Array:
    return denoise_loop(unet_def, unet_params, schedule, latents, context, guidance_scale, key, start, stop)


def denoise(
    sd: StableDiffusion,
    latents: jax.Array,
    context: jax.Array,
    *,
    start: int = 0,
    stop: int | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    uncond_context: jax.Array | None = None,
    scheduler: str | None = None,
    seed: int = 0,
) -> jax.Array:
    """Run sampling steps ``start..stop`` of a ``num_inference_steps`` schedule from (B, h, w, C) latents.

    ``context`` is (B, T, d) from ``encode_prompts``; guidance (``guidance_scale > 1``) uses
    ``uncond_context`` (default: the empty prompt's). ESD-style training samples x_t this way (steps 0..t),
    then asks ``guided_noise`` at step t. Returns the latents after step ``stop - 1``.
    """
    schedule = schedulers.make_schedule(sd.scheduler_config, scheduler, num_inference_steps)
    n = schedule.timesteps.shape[0]
    stop = n if stop is None else stop
    if not 0 <= start <= stop <= n:
        raise ValueError(f"need 0 <= start <= stop <= {n}, got start={start}, stop={stop}")
    context = jnp.asarray(context, jnp.float32)
    scale = None
    if guidance_scale > 1.0:
        if uncond_context is None:
            uncond_context = encode_prompts(sd, [""])
        uncond = jnp.broadcast_to(uncond_context, context.shape)
        context = jnp.stack([uncond, context], axis=1).reshape(-1, *context.shape[1:])
        scale = jnp.float32(guidance_scale)
    unet_def, unet_params = nnx.split(sd.unet)
    return _denoise(
        unet_def,
        unet_params,
        schedule,
        jnp.asarray(latents, jnp.float32),
        context,
        scale,
        start,
        stop,
        jax.random.key(seed + 1),
    )


def to_uint8(images: jax.Array | np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8 the way diffusers' ``numpy_to_pil`` rounds."""
    return (np.asarray(images, np.float32) * 255).round().astype(np.uint8)


def initial_latents(sd: StableDiffusion, batch: int, height: int, width: int, seed: int) -> jax.Array:
    """Gaussian starting latents (B, h, w, C) (PNDM/DDIM/DDPM start at sigma 1, so no scaling)."""
    f = sd.config.vae_scale_factor
    shape = (batch, height // f, width // f, sd.config.unet.in_channels)
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def generate(
    sd: StableDiffusion,
    prompts: Sequence[str] | str,
    *,
    seed: int = 0,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    scheduler: str | None = None,
    latents: np.ndarray | jax.Array | None = None,
    negative_prompt: Sequence[str] | str | None = None,
    return_latents: bool = False,
    mesh: Mesh | None = None,
    rules: sharding.Rules = sharding.DEFAULT_RULES,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Text-to-image sampling -> uint8 (B, H, W, 3).

    ``scheduler`` ("pndm", "ddim", "ddpm") overrides the model's own sampler: the class its
    ``scheduler_config.json`` names, which diffusers' pipeline uses. ``latents`` takes (B, C, h, w) initial
    noise in diffusers' NCHW layout, so a run can be matched step for step against diffusers. Guidance
    follows diffusers: on when ``guidance_scale > 1``, with the unconditional batch built from
    ``negative_prompt`` (default ""). With a ``mesh`` the prompts are split over its batch axes (padded to a
    multiple, padding dropped after) and params placed by ``rules``; every host passes the same prompts and
    gets every image.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    batch = len(prompts)
    f = sd.config.vae_scale_factor
    height = height or sd.config.unet.sample_size * f
    width = width or sd.config.unet.sample_size * f
    if height % f or width % f:
        raise ValueError(f"height and width must be multiples of {f}, got {height}x{width}")
    if latents is None:
        x = initial_latents(sd, batch, height, width, seed)
    else:
        x = jnp.transpose(jnp.asarray(latents, jnp.float32), (0, 2, 3, 1))
        want = (batch, height // f, width // f, sd.config.unet.in_channels)
        if x.shape != want:
            raise ValueError(f"latents have shape {tuple(np.shape(latents))}, expected NCHW {want}")
    pad = 0 if mesh is None else -batch % sharding.batch_size_multiple(mesh, rules)
    if pad:  # padded rows: "" prompts and zero latents, dropped after sampling
        x = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)])
    texts = prompts + [""] * pad
    guided = guidance_scale > 1.0
    if guided:
        if negative_prompt is None:
            negative_prompt = [""] * batch
        elif isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * batch
        if len(negative_prompt) != batch:
            raise ValueError(f"{len(negative_prompt)} negative prompts for {batch} prompts")
        # interleaved (uncond_0, cond_0, uncond_1, ...), the row order _sample's guidance expects
        texts = [t for pair in zip([*negative_prompt, *[""] * pad], texts, strict=True) for t in pair]
    ids = tokenize(sd.tokenizer, texts, max_length=sd.config.text_encoder.max_position_embeddings)
    text_def, text_params = nnx.split(sd.text_encoder)
    unet_def, unet_params = nnx.split(sd.unet)
    vae_def, vae_params = nnx.split(sd.vae)
    if mesh is not None:
        ids, x = sharding.global_batch((ids, x), mesh, rules)
        params = sharding.place((text_params, unet_params, vae_params), mesh, rules)
        text_params, unet_params, vae_params = params
    context = _encode(text_def, text_params, jnp.asarray(ids, jnp.int32))
    schedule = schedulers.make_schedule(sd.scheduler_config, scheduler, num_inference_steps)
    out_latents, images = _sample(
        unet_def,
        vae_def,
        unet_params,
        vae_params,
        schedule,
        x,
        guided,
        context,
        jnp.float32(guidance_scale),
        jax.random.key(seed + 1),
        jnp.float32(sd.config.vae.scaling_factor),
        None if mesh is None else sharding.batch_sharding(mesh, rules),
    )
    if mesh is not None:  # global arrays -> every image on every host, padding dropped
        gathered = multihost_utils.process_allgather((out_latents, images), tiled=True)
        out_latents, images = (a[:batch] for a in gathered)
    images = to_uint8(images)
    if return_latents:
        return images, np.asarray(jnp.transpose(out_latents, (0, 3, 1, 2)))
    return images


__all__ = [
    "SDConfig",
    "SourceInfo",
    "StableDiffusion",
    "denoise",
    "denoise_loop",
    "encode_prompts",
    "encode_tokens",
    "generate",
    "guided_noise",
    "initial_latents",
    "sample_step",
    "to_uint8",
]
