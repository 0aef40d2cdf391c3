"""PNDM/DDIM/DDPM: timesteps and whole jitted lax.scan sampling loops against diffusers' schedulers."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler
from diffusers.schedulers import scheduling_ddpm

from jax_erasepro import schedulers
from jax_erasepro.models.config import ConfigError
from jax_erasepro.schedulers import SchedulerConfig, add_noise, init_state, make_schedule, step
from tests.conftest import SD14, assert_close

CLASSES = {"pndm": PNDMScheduler, "ddim": DDIMScheduler, "ddpm": DDPMScheduler}
SHAPE = (2, 4, 8, 8)


def sd14_dict(**overrides) -> dict:
    d = json.loads((SD14 / "scheduler" / "scheduler_config.json").read_text())
    d.update(overrides)
    return d


def fake_model_jax(x, t):
    return jnp.tanh(0.5 * x) + 0.01 * t / 1000


def fake_model_torch(x, t):
    return torch.tanh(0.5 * x) + 0.01 * t / 1000


@jax.jit
def jax_loop(schedule, x, keys):
    """All steps of ``schedule`` in one lax.scan from a fresh state; returns every step's sample."""
    state = init_state(schedule, x.shape, x.dtype)

    def body(carry, inp):
        x, state = carry
        i, k = inp
        x, state = step(schedule, state, i, fake_model_jax(x, schedule.timesteps[i]), x, k)
        return (x, state), x

    _, xs = jax.lax.scan(body, (x, state), (jnp.arange(schedule.timesteps.shape[0]), keys))
    return xs


def run_both(kind, d, n, *, eta=0.0, start=0, seed=0, monkeypatch=None):
    """Our scan loop and diffusers' Python loop on the same noise -> (ours, theirs), (steps, *SHAPE)."""
    schedule = make_schedule(SchedulerConfig.from_dict(d), kind, n, eta=eta)
    x = np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)
    keys = jax.random.split(jax.random.key(seed), schedule.timesteps.shape[0])
    if start:  # run the loop from step `start` by shifting it: step i of the tail is step start + i
        schedule = schedule.replace(
            timesteps=schedule.timesteps[start:], prev_timesteps=schedule.prev_timesteps[start:]
        )
        keys = keys[start:]
    ours = np.asarray(jax_loop(schedule, jnp.asarray(x), keys))

    ref = CLASSES[kind].from_config(d)
    ref.set_timesteps(n)
    noise = {}
    if monkeypatch is not None:
        monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, **k: noise["now"])
    sample, theirs = torch.from_numpy(x), []
    for j, t in enumerate(ref.timesteps[start:]):
        noise["now"] = torch.from_numpy(np.array(jax.random.normal(keys[j], SHAPE, jnp.float32)))
        eps = fake_model_torch(sample, t)
        kw = {"eta": eta, "variance_noise": noise["now"]} if kind == "ddim" else {}
        sample = ref.step(eps, t, sample, **kw).prev_sample
        theirs.append(sample.numpy())
    return ours, np.stack(theirs)


def check_loop(kind, d, n, **kw):
    ours, theirs = run_both(kind, d, n, **kw)
    assert ours.shape == theirs.shape
    for j in range(len(theirs)):
        assert_close(ours[j], theirs[j], rel=1e-5)
    return float(np.abs(ours - theirs).max())


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 20, 50, 999, 1000])
@pytest.mark.parametrize("kind", ["pndm", "ddim", "ddpm"])
def test_timesteps_equal_diffusers(kind, n, spacing):
    d = sd14_dict(timestep_spacing=spacing)
    ref = CLASSES[kind].from_config(d)
    ref.set_timesteps(n)
    schedule = make_schedule(SchedulerConfig.from_dict(d), kind, n)
    np.testing.assert_array_equal(np.asarray(schedule.timesteps), ref.timesteps.numpy())


@pytest.mark.parametrize("schedule", ["scaled_linear", "linear"])
def test_alphas_cumprod_match_diffusers(schedule):
    d = sd14_dict(beta_schedule=schedule)
    ours = schedulers.alphas_cumprod(SchedulerConfig.from_dict(d))
    ref = PNDMScheduler.from_config(d).alphas_cumprod.numpy()
    assert ours.dtype == np.float32
    # torch's float32 linspace rounds CPU-specifically: allow ~1 ulp of the cumulative product
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("n", [1, 2, 5, 20, 50])
@pytest.mark.parametrize("kind", ["pndm", "ddim", "ddpm"])
def test_sd14_sampling_loop_matches_diffusers(kind, n, monkeypatch):
    check_loop(kind, sd14_dict(), n, monkeypatch=monkeypatch)


@pytest.mark.parametrize(
    "kind, overrides",
    [
        ("pndm", {"prediction_type": "v_prediction"}),
        ("ddim", {"prediction_type": "v_prediction"}),
        ("ddpm", {"prediction_type": "v_prediction"}),
        ("ddim", {"prediction_type": "sample"}),
        ("ddpm", {"prediction_type": "sample"}),
        ("ddim", {"clip_sample": True, "clip_sample_range": 1.5}),
        ("ddpm", {"clip_sample": True}),
        ("pndm", {"set_alpha_to_one": True}),
        ("ddim", {"set_alpha_to_one": True}),
        ("ddpm", {"variance_type": "fixed_large"}),
        ("ddpm", {"variance_type": "fixed_small_log"}),
        ("pndm", {"timestep_spacing": "trailing"}),
        ("ddim", {"timestep_spacing": "trailing"}),
        ("ddpm", {"timestep_spacing": "trailing"}),
        ("pndm", {"timestep_spacing": "linspace"}),
        ("ddim", {"timestep_spacing": "linspace"}),
        ("ddpm", {"timestep_spacing": "linspace"}),
        ("pndm", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}),
    ],
)
def test_config_variants_match_diffusers(kind, overrides, monkeypatch):
    check_loop(kind, sd14_dict(**overrides), 7, monkeypatch=monkeypatch)


@pytest.mark.parametrize("kind", ["pndm", "ddim", "ddpm"])
def test_class_defaults_for_omitted_keys_match_diffusers(kind, monkeypatch):
    """set_alpha_to_one and clip_sample default per class (DDIM: True/True, PNDM: False, DDPM clips)."""
    d = sd14_dict()
    del d["set_alpha_to_one"], d["clip_sample"]
    check_loop(kind, d, 6, monkeypatch=monkeypatch)


def test_ddim_with_eta_matches_diffusers():
    check_loop("ddim", sd14_dict(), 10, eta=0.7)


@pytest.mark.parametrize("kind", ["pndm", "ddim"])
def test_loop_started_midway_matches_diffusers(kind):
    """img2img runs the tail of the timesteps from a fresh state; PLMS restarts its warm-up there."""
    check_loop(kind, sd14_dict(), 10, start=4)


@pytest.mark.parametrize("kind", ["pndm", "ddim", "ddpm"])
def test_bfloat16_loop_keeps_dtype(kind):
    """A low-precision sample keeps its dtype through the scan carry (float32 schedule arithmetic)."""
    schedule = make_schedule(SchedulerConfig.from_dict(sd14_dict()), kind, 5)
    x = jax.random.normal(jax.random.key(0), SHAPE, jnp.bfloat16)
    xs = jax_loop(schedule, x, jax.random.split(jax.random.key(1), 6 if kind == "pndm" else 5))
    assert xs.dtype == jnp.bfloat16 and bool(jnp.isfinite(xs).all())


def test_add_noise_matches_diffusers():
    cfg = SchedulerConfig.from_dict(sd14_dict())
    rng = np.random.default_rng(1)
    x0, noise = (rng.standard_normal((4, 4, 8, 8)).astype(np.float32) for _ in range(2))
    t = np.array([0, 1, 500, 999])
    ref = DDPMScheduler.from_config(sd14_dict())
    want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    assert_close(add_noise(cfg, x0, noise, t), want, rel=1e-6)
    assert_close(add_noise(make_schedule(cfg, "ddpm", 10), x0, noise, jnp.asarray(t)), want, rel=1e-6)
    want_one = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.tensor(321)).numpy()
    assert_close(jax.jit(lambda x, e, t: add_noise(cfg, x, e, t))(x0, noise, 321), want_one, rel=1e-6)


def test_sd14_config_round_trip_and_default_kind():
    cfg = SchedulerConfig.from_json(SD14 / "scheduler" / "scheduler_config.json")
    assert cfg.class_name == "PNDMScheduler"
    assert SchedulerConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["_class_name"] == "PNDMScheduler"
    assert "set_alpha_to_one" not in SchedulerConfig().to_dict()  # class default: left to diffusers
    schedule = make_schedule(cfg, None, 10)
    assert schedule.kind == "pndm" and schedule.init_noise_sigma == 1.0
    assert schedule.timesteps.shape == (11,) and schedule.timesteps.dtype == jnp.int32
    unnamed = dataclasses.replace(cfg, class_name=None)  # saving writes such a config as PNDMScheduler
    assert make_schedule(unnamed, None, 10).kind == "pndm"
    assert make_schedule(dataclasses.replace(cfg, class_name="DDIMScheduler"), None, 10).kind == "ddim"


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule"),
        ({"trained_betas": [0.1, 0.2]}, "trained_betas"),
        ({"thresholding": True}, "thresholding"),
        ({"prediction_type": "flow"}, "prediction_type"),
        ({"timestep_spacing": "karras"}, "timestep_spacing"),
        ({"variance_type": "learned"}, "variance_type"),
        ({"use_karras_sigmas": False}, "use_karras_sigmas"),
    ],
)
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        SchedulerConfig.from_dict(sd14_dict(**overrides))


def test_unsupported_schedules_raise():
    with pytest.raises(ConfigError, match="skip_prk_steps"):
        make_schedule(SchedulerConfig.from_dict(sd14_dict(skip_prk_steps=False)), "pndm", 10)
    with pytest.raises(ConfigError, match="prediction_type"):
        make_schedule(SchedulerConfig.from_dict(sd14_dict(prediction_type="sample")), "pndm", 10)
    with pytest.raises(ConfigError, match="_class_name"):
        make_schedule(SchedulerConfig.from_dict(sd14_dict(_class_name="EulerDiscreteScheduler")), None, 10)
    cfg = SchedulerConfig.from_dict(sd14_dict())
    with pytest.raises(ValueError, match="num_inference_steps"):
        make_schedule(cfg, "ddim", 1001)
    with pytest.raises(ValueError, match="eta"):
        make_schedule(cfg, "pndm", 10, eta=0.5)
    schedule = make_schedule(cfg, "ddpm", 10)
    with pytest.raises(ValueError, match="key"):
        step(schedule, init_state(schedule, SHAPE), 0, jnp.zeros(SHAPE), jnp.zeros(SHAPE))
