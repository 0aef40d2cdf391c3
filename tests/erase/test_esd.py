"""ESD: the trainable set, the loss as the authors' script writes it, sampling to t_enc, options, the CLI."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_erasepro import schedulers, surgery
from jax_erasepro.erase import EraseError, ESDOptions, erase, get_method
from jax_erasepro.erase.esd import (
    _ADAM,
    draws,
    esd_loss,
    esd_step,
    esd_target,
    frozen_target,
    sample_xt,
    trainable_predicate,
)
from jax_erasepro.pipeline import denoise_loop, encode_prompts, guided_noise
from jax_erasepro.tiny import tiny_random_sd

FAST = dict(steps=2, ddim_steps=4, progress=False)


@pytest.fixture(scope="module")
def sd():
    return tiny_random_sd(seed=7)


@pytest.fixture(scope="module")
def parts(sd):
    """The esd-x split of the tiny U-Net, the prompt states and a 4-step DDIM schedule."""
    predicate = trainable_predicate(sd, "esd-x")
    unet_def, trainable, rest = nnx.split(sd.unet, surgery.param_filter(sd, predicate), ...)
    states = encode_prompts(sd, ["a cat", ""])
    schedule = schedulers.make_schedule(sd.scheduler_config, "ddim", 4)
    return unet_def, trainable, rest, states[:1], states[1:], schedule


@pytest.mark.parametrize("method", ["esd-x", "esd-u"])
def test_only_the_trainable_set_changes(sd, method):
    erased, report = erase(sd, "cat", "", method=method, **FAST)
    before = surgery.read(sd, surgery.select(sd, "*"))
    after = surgery.read(erased, surgery.select(erased, "*"))
    trainable = set(surgery.select(sd, trainable_predicate(sd, method)))
    for key in before:
        if key not in trainable:
            np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    changed = {k for k in trainable if not np.array_equal(after[k], before[k])}
    assert changed and set(report.edited) == changed
    assert set(report.training["relative_change"]) == trainable
    if method == "esd-x":
        assert all(".attn2." in k for k in trainable)
    else:  # outside attn2, Linear and Conv2d only (norm layers stay, as in the scripts)
        assert not any(".attn2." in k or ".norm" in k for k in trainable)
        assert "unet.time_embedding.linear_1.weight" in trainable
    assert len(report.training["loss"]) == FAST["steps"] and report.method == method
    report.to_json("/dev/null")


def test_one_seed_gives_identical_weights_and_the_source_is_untouched(sd):
    original = surgery.read(sd, surgery.select(sd, "unet.*"))
    a, ra = erase(sd, "cat", "", method="esd-x", **FAST)  # the step compiled above is reused
    b, rb = erase(sd, "cat", "", method="esd-x", **FAST)
    keys = surgery.select(sd, "unet.*")
    weights_b = surgery.read(b, keys)
    for k, v in surgery.read(a, keys).items():
        np.testing.assert_array_equal(v, weights_b[k], err_msg=k)
    for k, v in surgery.read(sd, keys).items():
        np.testing.assert_array_equal(v, original[k], err_msg=k)
    assert ra.training["loss"] == rb.training["loss"]
    strict = surgery.select(sd, trainable_predicate(sd, "esd-x-strict"))
    assert strict and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in strict)


def test_sampling_to_t_enc_equals_the_pipelines_loop(sd, parts):
    unet_def, trainable, rest, cond, uncond, schedule = parts
    full_def, full = nnx.split(sd.unet)
    noise = jax.random.normal(jax.random.key(1), (1, 8, 8, 4))
    guided = jnp.concatenate([uncond, cond])
    for t_enc in (0, 3):
        ours = sample_xt(
            unet_def, (trainable, rest), schedule, noise, guided, 3.0, jnp.int32(t_enc), jax.random.key(2)
        )
        ref = denoise_loop(full_def, full, schedule, noise, guided, 3.0, jax.random.key(2), 0, t_enc)
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_the_step_loss_is_the_scripts_formula(sd, parts):
    """One jitted step's loss equals the MSE of e_theta(x_t, c) against e_0(x_t, b) - eta (e_0(x_t, c) -
    e_0(x_t, "")), rebuilt here from the U-Net and guided_noise on the same x_t at timesteps[t_enc]."""
    unet_def, trainable, rest, cond, uncond, schedule = parts
    key, step, eta, shape = jax.random.key(3), 5, 2.0, (1, 8, 8, 4)
    _, _, loss, t_enc = esd_step(
        trainable,
        _ADAM.init(trainable),
        trainable,
        rest,
        schedule,
        cond,
        uncond,
        jnp.int32(step),
        key,
        jnp.float32(1e-3),
        jnp.float32(eta),
        jnp.float32(3.0),
        unet_def=unet_def,
        shape=shape,
        base="target",
        sample_trained=True,
    )
    t_draw, noise, k_sample = draws(key, jnp.int32(step), 4, shape)
    assert int(t_enc) == int(t_draw)
    full_def, full = nnx.split(sd.unet)
    x_t = denoise_loop(
        full_def, full, schedule, noise, jnp.concatenate([uncond, cond]), 3.0, k_sample, 0, int(t_enc)
    )
    t = schedule.timesteps[int(t_enc)]
    unet = sd.unet
    e_c = guided_noise(unet, x_t, t, cond, None)
    e_u = guided_noise(unet, x_t, t, uncond, None)
    # esd_sd.py: e_theta(x_t, c) against e_0(x_t, c) - eta (e_0(x_t, c) - e_0(x_t, "")); e_theta = e_0 before
    # the first update
    want = jnp.mean(jnp.square(e_c - (e_c - eta * (e_c - e_u))))
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-4)
    # the CompVis script subtracts from e_0(x_t, "") instead
    for base, b in (("target", e_c), ("empty", e_u)):
        target = frozen_target(unet_def, trainable, rest, x_t, t, cond, uncond, eta, base)
        np.testing.assert_allclose(target, b - eta * (e_c - e_u), rtol=1e-4, atol=2e-5)
    zero = esd_loss(unet_def, trainable, rest, x_t, t, cond, esd_target(e_c, e_u, 0.0, "target"))
    assert float(zero) < 1e-10


def test_a_gradient_step_lowers_the_loss_on_a_fixed_batch(parts):
    unet_def, trainable, rest, cond, uncond, schedule = parts
    x_t = jax.random.normal(jax.random.key(4), (1, 8, 8, 4))
    t = schedule.timesteps[1]
    target = frozen_target(unet_def, trainable, rest, x_t, t, cond, uncond, 2.0, "target")
    loss_fn = jax.jit(esd_loss, static_argnums=0)
    loss, grads = jax.jit(jax.value_and_grad(esd_loss, argnums=1), static_argnums=0)(
        unet_def, trainable, rest, x_t, t, cond, target
    )
    updates, _ = _ADAM.update(grads, _ADAM.init(trainable))
    stepped = jax.tree.map(lambda p, u: p - 1e-4 * u, trainable, updates)
    assert float(loss_fn(unet_def, stepped, rest, x_t, t, cond, target)) < float(loss)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"preset": "diffusers"}, "unknown preset 'diffusers' \\(choose from esd_sd, compvis\\)"),
        ({"lr": 0}, "lr must be > 0, got 0"),
        ({"lr": "-1e-5"}, "lr must be > 0"),
        ({"steps": 0}, "steps must be >= 1, got 0"),
        ({"steps": "1.5"}, "option steps: expected int \\| none"),
        ({"negative_guidance": -1}, "negative_guidance must be >= 0"),
        ({"ddim_steps": 0}, "ddim_steps must be >= 1"),
        ({"base": "anchor"}, "unknown base 'anchor'"),
        ({"sample_with": "both"}, "unknown sample_with 'both'"),
    ],
)
def test_bad_options_are_one_line(values, message):
    with pytest.raises(EraseError, match=message):
        get_method("esd-x").make_options(values)


def test_presets_resolve_and_explicit_values_win():
    d = ESDOptions().resolved()
    assert (d["steps"], d["lr"], d["negative_guidance"], d["base"]) == (200, 5e-5, 2.0, "target")
    assert (d["start_guidance"], d["ddim_steps"], d["sample_with"]) == (3.0, 50, "trained")
    c = get_method("esd-u").make_options({"preset": "compvis", "steps": "7"}).resolved()
    assert (c["steps"], c["lr"], c["negative_guidance"], c["base"]) == (7, 1e-5, 1.0, "empty")


def test_cli_lists_the_options(capsys):
    from jax_erasepro import cli

    assert cli.main(["methods", "esd-x"]) == 0
    out = capsys.readouterr().out
    for row in get_method("esd-x").describe():
        assert f"  {row['name']} (" in out
    assert "Erasing Concepts from Diffusion Models" in out


def _script_trainable(unet, train: str) -> set[str]:
    """The trainable keys as esd_sd.py's get_esd_trainable_parameters picks them from a diffusers U-Net."""
    picks = {
        "esd-x": lambda name: "attn2" in name,
        "esd-u": lambda name: "attn2" not in name,
        "esd-all": lambda name: True,
        "esd-x-strict": lambda name: "attn2.to_k" in name or "attn2.to_v" in name,
    }
    return {
        f"unet.{name}.{n}"
        for name, module in unet.named_modules()
        if type(module).__name__ in ("Linear", "Conv2d", "LoRACompatibleLinear", "LoRACompatibleConv")
        and picks[train](name)
        for n, _ in module.named_parameters()
    }


def test_trainable_sets_loss_and_gradient_match_the_scripts_torch_computation(sd, parts):
    """esd_sd.py's computation in PyTorch (diffusers U-Net, same weights, same x_t): trainable sets by the
    script's module rule, the loss, and the gradient of every esd-x parameter."""
    import torch

    from tests.conftest import assert_close, assert_unet_grads_match
    from tests.torch_bridge import torch_pipeline

    pipe = torch_pipeline(sd)
    for train in ("esd-x", "esd-u", "esd-all", "esd-x-strict"):
        assert set(surgery.select(sd, trainable_predicate(sd, train))) == _script_trainable(pipe.unet, train)

    unet_def, trainable, rest, cond, uncond, schedule = parts
    x_t = jax.random.normal(jax.random.key(5), (1, 8, 8, 4))
    t, eta = schedule.timesteps[2], 2.0
    target = frozen_target(unet_def, trainable, rest, x_t, t, cond, uncond, eta, "target")
    loss, grads = jax.jit(jax.value_and_grad(esd_loss, argnums=1), static_argnums=0)(
        unet_def, trainable, rest, x_t, t, cond, target
    )

    unet = pipe.unet
    xt = torch.from_numpy(np.asarray(x_t).transpose(0, 3, 1, 2).copy())
    erase_embeds, null_embeds = (torch.from_numpy(np.array(s)) for s in (cond, uncond))
    step = int(t)
    with torch.no_grad():
        noise_pred_erase = unet(xt, step, encoder_hidden_states=erase_embeds).sample
        noise_pred_null = unet(xt, step, encoder_hidden_states=null_embeds).sample
    names = _script_trainable(unet, "esd-x")
    params = dict(unet.named_parameters())
    for name, p in params.items():
        p.requires_grad_(f"unet.{name}" in names)
    noise_pred_esd = unet(xt, step, encoder_hidden_states=erase_embeds).sample
    esd_target_ = noise_pred_erase - eta * (noise_pred_erase - noise_pred_null)  # esd_sd.py, erase_from None
    ref = torch.nn.functional.mse_loss(noise_pred_esd, esd_target_)
    ref.backward()
    assert_close(float(loss), ref.item())
    assert_unet_grads_match(sd, grads, params, names)


def test_more_ddim_steps_than_training_timesteps_is_one_line(sd):
    message = "ddim_steps must be <= the model's 1000 training timesteps, got 1001"
    with pytest.raises(EraseError, match=message):
        erase(sd, "cat", "", method="esd-x", ddim_steps=1001, progress=False)


def test_the_report_shows_the_training(tmp_path, capsys):
    """report.png and `jax-erasepro report` show a fine-tuning run: its loss and the trained weights."""
    from jax_erasepro.cli import main
    from jax_erasepro.erase.report import EraseReport

    report = EraseReport(
        method="esd-x",
        targets=["cat"],
        anchors=[""],
        preserve=[],
        prompts=["{}"],
        options={},
        columns={},
        pairs=[],
        layers=[],
        timings={},
        edited=["unet.a.weight"],
        training={
            "steps_run": 20,
            "loss": [1.0 / (i + 1) for i in range(20)],
            "relative_change": {"unet.a.weight": 0.1, "unet.b.weight": 0.0},
        },
    )
    report.plot(tmp_path / "report.png")
    assert (tmp_path / "report.png").stat().st_size > 1000
    report.to_json(tmp_path / "report.json")
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    last = (1 / 19 + 1 / 20) / 2
    assert f"trained 20 steps; mean loss of the first 2: 0.75, of the last 2: {last:.4g}" in out
    assert "unet.a.weight" in out
