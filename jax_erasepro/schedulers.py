"""PNDM (PLMS), DDIM and DDPM samplers as pure functions, step-for-step equal to diffusers' schedulers.

The host computes a ``Schedule`` (timesteps and alphas) once; ``step`` is pure and jittable with a traced
step index, so a whole denoising loop is one ``lax.scan``. Formulas keep diffusers' operation order and
float32 arithmetic so that results agree to float rounding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, Self

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jax_erasepro.models.config import ConfigError, JsonConfig

KINDS = ("pndm", "ddim", "ddpm")
CLASS_KINDS = {"PNDMScheduler": "pndm", "DDIMScheduler": "ddim", "DDPMScheduler": "ddpm"}
DEFAULT_CLASS = "PNDMScheduler"  # SD v1's: what a config that names no class means, here and in saving
# diffusers' per-class defaults for keys whose default differs between the classes
_SET_ALPHA_TO_ONE_DEFAULT = {"pndm": False, "ddim": True}


@dataclasses.dataclass(frozen=True)
class SchedulerConfig(JsonConfig):
    """diffusers' ``scheduler_config.json``: the union of PNDM/DDIM/DDPM keys; ``_class_name`` sets the kind.

    ``set_alpha_to_one`` and ``clip_sample`` are None when the file omits them: their default depends on
    the scheduler class, exactly as in diffusers, and is resolved by ``make_schedule``.
    """

    ACCEPTED: ClassVar[Mapping[str, tuple[Any, ...]]] = {
        "trained_betas": (None,),
        "thresholding": (False,),
        "rescale_betas_zero_snr": (False,),
    }
    # only read by diffusers when thresholding is on, which we reject
    IGNORED: ClassVar[frozenset[str]] = frozenset({"dynamic_thresholding_ratio", "sample_max_value"})

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    skip_prk_steps: bool = False
    set_alpha_to_one: bool | None = None
    clip_sample: bool | None = None
    clip_sample_range: float = 1.0
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    variance_type: str = "fixed_small"
    class_name: str | None = None  # the file's ``_class_name``

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "config") -> Self:
        cfg = super().from_dict(d, source=source)
        return dataclasses.replace(cfg, class_name=d.get("_class_name"))

    def to_dict(self) -> dict[str, Any]:
        """diffusers-style dict: ``_class_name`` restored, class-default (None) keys left out."""
        d = {k: v for k, v in super().to_dict().items() if v is not None}
        if "class_name" in d:
            d["_class_name"] = d.pop("class_name")
        return d

    def validate(self, source: str) -> None:
        choices = {
            "beta_schedule": ("scaled_linear", "linear"),
            "prediction_type": ("epsilon", "v_prediction", "sample"),
            "timestep_spacing": ("leading", "trailing", "linspace"),
            "variance_type": ("fixed_small", "fixed_small_log", "fixed_large"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(
                    f"{source}: unsupported value {key}={getattr(self, key)!r} (supported: {allowed})"
                )
        if self.num_train_timesteps < 2:
            raise ConfigError(f"{source}: num_train_timesteps={self.num_train_timesteps} must be >= 2")


@struct.dataclass
class Schedule:
    """Per-run sampler constants: step timesteps and alphas as leaves, the method's switches static."""

    timesteps: jax.Array  # (S,) int32: the timestep given to the model at step i
    prev_timesteps: jax.Array  # (S,) int32: where step i lands (negative: past the end)
    alphas_cumprod: jax.Array  # (T,) float32
    final_alpha_cumprod: jax.Array  # () float32: alpha_prod for a negative previous timestep
    kind: str = struct.field(pytree_node=False)
    step_ratio: int = struct.field(pytree_node=False)  # num_train_timesteps // num_inference_steps
    prediction_type: str = struct.field(pytree_node=False)
    clip_sample_range: float | None = struct.field(pytree_node=False)  # None: no clipping
    variance_type: str = struct.field(pytree_node=False)
    eta: float = struct.field(pytree_node=False)

    @property
    def init_noise_sigma(self) -> float:
        """Scale of the initial Gaussian latents (1 for PNDM, DDIM and DDPM)."""
        return 1.0


@struct.dataclass
class SchedulerState:
    """Scan carry: PNDM's last three model outputs (oldest first), its first-step sample, and the number
    of calls so far (PLMS's warm-up branches on it, as diffusers' ``counter``)."""

    ets: jax.Array | None
    cur_sample: jax.Array | None
    counter: jax.Array


def alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
    """(T,) float32 cumulative alphas with diffusers' dtypes: float32 betas, float64-accumulated cumprod.

    diffusers takes a float32 ``torch.linspace``; we round a float64 linspace instead (torch's vectorised
    linspace rounding is CPU-specific), which leaves at most 1 ulp of difference.
    """
    t = config.num_train_timesteps
    if config.beta_schedule == "scaled_linear":
        root = np.linspace(config.beta_start**0.5, config.beta_end**0.5, t).astype(np.float32)
        betas = root * root
    else:
        betas = np.linspace(config.beta_start, config.beta_end, t).astype(np.float32)
    alphas = np.float32(1.0) - betas
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def _descending_timesteps(config: SchedulerConfig, n: int) -> np.ndarray:
    """DDIM/DDPM ``set_timesteps`` (PNDM uses the same set, reversed)."""
    t = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        return np.linspace(0, t - 1, n).round()[::-1].astype(np.int64)
    if config.timestep_spacing == "leading":
        return (np.arange(0, n) * (t // n)).round()[::-1].astype(np.int64) + config.steps_offset
    return np.round(np.arange(t, 0, -t / n)).astype(np.int64) - 1


def make_schedule(
    config: SchedulerConfig, kind: str | None, num_inference_steps: int, *, eta: float = 0.0
) -> Schedule:
    """Timesteps and alphas of a ``num_inference_steps`` run; ``kind`` None takes the config's class
    (PNDM, SD v1's scheduler, where the config names none, as ``saving`` writes it).

    ``eta`` is DDIM's stochasticity (0: deterministic DDIM); other kinds require 0.
    """
    if kind is None:
        name = config.class_name or DEFAULT_CLASS
        if name not in CLASS_KINDS:
            raise ConfigError(f"_class_name={name!r} names no supported scheduler; pass kind")
        kind = CLASS_KINDS[name]
    if kind not in KINDS:
        raise ValueError(f"unknown scheduler kind {kind!r} (supported: {KINDS})")
    n, t_train = num_inference_steps, config.num_train_timesteps
    if not 1 <= n <= t_train:
        raise ValueError(f"num_inference_steps={n} must be in [1, num_train_timesteps={t_train}]")
    if eta != 0.0 and kind != "ddim":
        raise ValueError(f"eta={eta} is a DDIM option; {kind} needs eta=0")
    if kind == "pndm":
        if not config.skip_prk_steps:
            raise ConfigError("skip_prk_steps=False (PNDM's Runge-Kutta warm-up) is not implemented")
        if config.prediction_type == "sample":
            raise ConfigError("prediction_type='sample' is not supported by PNDM")
    ac = alphas_cumprod(config)
    desc = _descending_timesteps(config, n)
    ratio = t_train // n
    if kind == "pndm":
        asc = desc[::-1]
        # diffusers' PLMS order: the second timestep repeats (its second call is a Heun-like correction)
        timesteps = np.concatenate([asc[:-1], asc[-2:-1], asc[-1:]])[::-1]
        prev = timesteps - ratio
    elif kind == "ddim":
        timesteps, prev = desc, desc - ratio
    else:  # DDPM steps to the next timestep of the run
        timesteps, prev = desc, np.append(desc[1:], -1)
    if kind == "ddpm":  # DDPM has no set_alpha_to_one: its last step always lands on alpha 1
        set_alpha_to_one = True
    elif config.set_alpha_to_one is None:
        set_alpha_to_one = _SET_ALPHA_TO_ONE_DEFAULT[kind]
    else:
        set_alpha_to_one = config.set_alpha_to_one
    # PNDM never clips; DDIM and DDPM default to clipping
    clip = kind != "pndm" and (config.clip_sample is None or config.clip_sample)
    return Schedule(
        timesteps=jnp.asarray(timesteps, jnp.int32),
        prev_timesteps=jnp.asarray(prev, jnp.int32),
        alphas_cumprod=jnp.asarray(ac),
        final_alpha_cumprod=jnp.asarray(np.float32(1.0) if set_alpha_to_one else ac[0]),
        kind=kind,
        step_ratio=ratio,
        prediction_type=config.prediction_type,
        clip_sample_range=config.clip_sample_range if clip else None,
        variance_type=config.variance_type,
        eta=float(eta),
    )


def init_state(schedule: Schedule, sample_shape: tuple[int, ...], dtype: Any = jnp.float32) -> SchedulerState:
    """A fresh sampler state (diffusers' state right after ``set_timesteps``)."""
    if schedule.kind == "pndm":
        return SchedulerState(
            ets=jnp.zeros((3, *sample_shape), dtype),
            cur_sample=jnp.zeros(sample_shape, dtype),
            counter=jnp.zeros((), jnp.int32),
        )
    return SchedulerState(ets=None, cur_sample=None, counter=jnp.zeros((), jnp.int32))


def _alpha(schedule: Schedule, t: jax.Array) -> jax.Array:
    """alphas_cumprod[t], or the final alpha for t < 0."""
    return jnp.where(t >= 0, schedule.alphas_cumprod[jnp.maximum(t, 0)], schedule.final_alpha_cumprod)


def _plms_output(counter: jax.Array, e: jax.Array, ets: jax.Array) -> jax.Array:
    """PLMS combination of the new output ``e`` with the history ``ets`` (oldest first), by call count."""
    branches = (
        lambda e, h: e,
        lambda e, h: (e + h[2]) / 2,
        lambda e, h: (3 * e - h[2]) / 2,
        lambda e, h: (23 * e - 16 * h[2] + 5 * h[1]) / 12,
        lambda e, h: (1 / 24) * (55 * e - 59 * h[2] + 37 * h[1] - 9 * h[0]),
    )
    return jax.lax.switch(jnp.minimum(counter, 4), branches, e, ets)


def _pndm_step(
    schedule: Schedule, state: SchedulerState, i: jax.Array, model_output: jax.Array, sample: jax.Array
) -> tuple[jax.Array, SchedulerState]:
    """diffusers' ``PNDMScheduler.step_plms`` (skip_prk_steps): Adams-Bashforth up to 4th order."""
    c = state.counter
    second = c == 1  # the repeated timestep: redo step 0 with the averaged output, from step 0's sample
    t = jnp.where(second, schedule.timesteps[i] + schedule.step_ratio, schedule.timesteps[i])
    t_prev = jnp.where(second, schedule.timesteps[i], schedule.prev_timesteps[i])
    eps = _plms_output(c, model_output, state.ets)
    appended = jnp.concatenate([state.ets[1:], model_output[None].astype(state.ets.dtype)])
    ets = jnp.where(second, state.ets, appended)
    x = jnp.where(second, state.cur_sample, sample)
    a_t, a_prev = _alpha(schedule, t), _alpha(schedule, t_prev)
    b_t, b_prev = 1 - a_t, 1 - a_prev
    if schedule.prediction_type == "v_prediction":
        eps = jnp.sqrt(a_t) * eps + jnp.sqrt(b_t) * x
    sample_coeff = jnp.sqrt(a_prev / a_t)
    denom = a_t * jnp.sqrt(b_prev) + jnp.sqrt(a_t * b_t * a_prev)
    prev = sample_coeff * x - (a_prev - a_t) * eps / denom
    cur_sample = jnp.where(c == 0, sample.astype(state.cur_sample.dtype), state.cur_sample)
    return prev, SchedulerState(ets=ets, cur_sample=cur_sample, counter=c + 1)


def _x0_and_eps(
    schedule: Schedule, a_t: jax.Array, model_output: jax.Array, sample: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Predicted clean sample and noise from the model output, by prediction type."""
    b_t = 1 - a_t
    if schedule.prediction_type == "epsilon":
        x0, eps = (sample - jnp.sqrt(b_t) * model_output) / jnp.sqrt(a_t), model_output
    elif schedule.prediction_type == "sample":
        x0 = model_output
        eps = (sample - jnp.sqrt(a_t) * x0) / jnp.sqrt(b_t)
    else:
        x0 = jnp.sqrt(a_t) * sample - jnp.sqrt(b_t) * model_output
        eps = jnp.sqrt(a_t) * model_output + jnp.sqrt(b_t) * sample
    if schedule.clip_sample_range is not None:
        x0 = jnp.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
    return x0, eps


def _ddim_step(
    schedule: Schedule, i: jax.Array, model_output: jax.Array, sample: jax.Array, key: jax.Array | None
) -> jax.Array:
    """diffusers' ``DDIMScheduler.step`` (use_clipped_model_output=False)."""
    a_t = schedule.alphas_cumprod[schedule.timesteps[i]]
    a_prev = _alpha(schedule, schedule.prev_timesteps[i])
    x0, eps = _x0_and_eps(schedule, a_t, model_output, sample)
    variance = ((1 - a_prev) / (1 - a_t)) * (1 - a_t / a_prev)
    std = schedule.eta * jnp.sqrt(variance)
    prev = jnp.sqrt(a_prev) * x0 + jnp.sqrt(1 - a_prev - jnp.square(std)) * eps
    if schedule.eta > 0:
        if key is None:
            raise ValueError("DDIM with eta > 0 needs a PRNG key")
        prev = prev + std * jax.random.normal(key, sample.shape, sample.dtype)
    return prev


def _ddpm_step(
    schedule: Schedule, i: jax.Array, model_output: jax.Array, sample: jax.Array, key: jax.Array | None
) -> jax.Array:
    """diffusers' ``DDPMScheduler.step``: posterior mean plus noise, none at t = 0."""
    if key is None:
        raise ValueError("DDPM sampling needs a PRNG key")
    t = schedule.timesteps[i]
    a_t = schedule.alphas_cumprod[t]
    a_prev = _alpha(schedule, schedule.prev_timesteps[i])
    b_t, b_prev = 1 - a_t, 1 - a_prev
    cur_alpha = a_t / a_prev
    cur_beta = 1 - cur_alpha
    x0, _ = _x0_and_eps(schedule, a_t, model_output, sample)
    mean = ((jnp.sqrt(a_prev) * cur_beta) / b_t) * x0 + (jnp.sqrt(cur_alpha) * b_prev / b_t) * sample
    variance = jnp.maximum((1 - a_prev) / (1 - a_t) * cur_beta, 1e-20)
    if schedule.variance_type == "fixed_small":
        std = jnp.sqrt(variance)
    elif schedule.variance_type == "fixed_small_log":
        std = jnp.exp(0.5 * jnp.log(variance))
    else:
        std = jnp.sqrt(cur_beta)
    noise = jax.random.normal(key, sample.shape, sample.dtype)
    return jnp.where(t > 0, mean + std * noise, mean)


def step(
    schedule: Schedule,
    state: SchedulerState,
    i: jax.Array | int,
    model_output: jax.Array,
    sample: jax.Array,
    key: jax.Array | None = None,
) -> tuple[jax.Array, SchedulerState]:
    """One sampler step at index ``i`` of ``schedule.timesteps`` -> (previous sample, new state).

    ``key`` draws DDPM's (and DDIM eta > 0's) noise as ``jax.random.normal(key, sample.shape)``.
    """
    if schedule.kind == "pndm":
        prev, state = _pndm_step(schedule, state, i, model_output, sample)
    else:
        step_fn = _ddim_step if schedule.kind == "ddim" else _ddpm_step
        prev = step_fn(schedule, i, model_output, sample, key)
        state = state.replace(counter=state.counter + 1)
    return prev.astype(sample.dtype), state


def add_noise(
    schedule_or_config: Schedule | SchedulerConfig, x0: jax.Array, noise: jax.Array, t: jax.Array | int
) -> jax.Array:
    """Forward diffusion q(x_t | x_0) as diffusers' ``add_noise``; ``t`` is a scalar or one per batch row."""
    if isinstance(schedule_or_config, Schedule):
        ac = schedule_or_config.alphas_cumprod
    else:
        ac = jnp.asarray(alphas_cumprod(schedule_or_config))
    a = ac.astype(x0.dtype)[jnp.asarray(t)].reshape(-1)
    a = a.reshape(a.shape + (1,) * (x0.ndim - 1))
    return jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise
