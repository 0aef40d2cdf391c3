"""All but One: the objective (bottlenecked guidance loss plus the Lagrangian penalty) against the same
computation written in PyTorch, the bottleneck, the multiplier's ascent, the set, determinism and options."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_erasepro import surgery
from jax_erasepro.erase import EraseError, erase, get_method
from jax_erasepro.erase.allbutone import allbutone_loss, bottleneck, frozen_predictions, trainable_predicate
from jax_erasepro.pipeline import encode_prompts
from jax_erasepro.tiny import tiny_random_sd

FAST = dict(steps=3, ddim_steps=4, progress=False)


@pytest.fixture(scope="module")
def sd():
    return tiny_random_sd(seed=7)


def test_the_bottleneck_keeps_each_examples_top_and_bottom_share():
    g = jnp.asarray(np.random.default_rng(0).normal(size=(2, 10, 10, 4)), jnp.float32)
    mask = np.asarray(bottleneck(g, 0.1))
    assert mask.shape == g.shape and set(np.unique(mask)) == {0.0, 1.0}
    for row, m in zip(np.asarray(g), mask, strict=True):
        kept = np.sort(row[m == 1])
        assert len(kept) == 80  # 40 of 400 at each end
        assert kept[39] <= np.quantile(row, 0.1) and kept[40] >= np.quantile(row, 0.9)


def test_loss_and_gradient_match_a_torch_computation_of_the_objective(sd):
    """The objective written in PyTorch on the diffusers twin (same weights, x_t, timesteps), a frozen
    original that differs from the trained copy so the penalty has a gradient: loss, parts, gradients."""
    import torch

    from tests.conftest import assert_close, assert_unet_grads_match
    from tests.torch_bridge import torch_pipeline

    pipe = torch_pipeline(sd)
    unet = pipe.unet
    names = {f"unet.{n}" for n, _ in unet.named_parameters() if "attn2" in n}
    assert set(surgery.select(sd, trainable_predicate("attn2"))) == names

    unet_def, trainable, rest = nnx.split(
        sd.unet, surgery.param_filter(sd, trainable_predicate("attn2")), ...
    )
    original = jax.tree.map(lambda w: w * 1.05, trainable)
    states = encode_prompts(sd, ["cat", "dog", ""])
    target, anchor, empty = states[0:1], states[1:2], states[2:3]
    x_t = jax.random.normal(jax.random.key(4), (1, 8, 8, 4))
    t = jnp.asarray([421])
    lam, pct, eps_ = jnp.float32(3.0), 0.1, jnp.float32(1e-4)
    frozen = frozen_predictions(unet_def, original, rest, x_t, t, target, anchor, empty)
    (loss, (erase_part, drift)), grads = jax.jit(
        jax.value_and_grad(allbutone_loss, argnums=1, has_aux=True), static_argnums=(0, 9)
    )(unet_def, trainable, rest, x_t, t, target, empty, frozen, lam, pct, eps_)

    frozen_unet = copy.deepcopy(unet)
    with torch.no_grad():
        for n, p in frozen_unet.named_parameters():
            if "attn2" in n:
                p.mul_(1.05)
    xt = torch.from_numpy(np.array(x_t).transpose(0, 3, 1, 2))
    step = torch.from_numpy(np.array(t)).long()
    c, a, u = (torch.from_numpy(np.array(s)) for s in (target, anchor, empty))
    with torch.no_grad():
        e_c0, e_a0, e_u0 = (frozen_unet(xt, step, s).sample for s in (c, a, u))
    params = dict(unet.named_parameters())
    for n, p in params.items():
        p.requires_grad_(f"unet.{n}" in names)
    e_c, e_u = unet(xt, step, c).sample, unet(xt, step, u).sample
    g0 = (e_c0 - e_u0).flatten(1)
    lo = torch.quantile(g0, 0.1, dim=1, keepdim=True)
    hi = torch.quantile(g0, 0.9, dim=1, keepdim=True)
    mask = ((g0 <= lo) | (g0 >= hi)).float().reshape(e_c.shape)
    err = ((e_c - e_u) - (e_a0 - e_u0)) ** 2
    ref_erase = (mask * err).sum() / mask.sum()
    ref_drift = torch.nn.functional.mse_loss(e_u, e_u0)
    ref = ref_erase + 3.0 * (ref_drift - 1e-4)
    ref.backward()
    assert_close(float(erase_part), ref_erase.item())
    assert_close(float(drift), ref_drift.item())
    assert_close(float(loss), ref.item())
    assert_unet_grads_match(sd, grads, params, names)


def test_only_the_set_changes_one_seed_gives_identical_weights_and_lambda_ascends(sd):
    keys = surgery.select(sd, "*")
    before = surgery.read(sd, keys)
    a, report = erase(sd, "cat", "dog", method="allbutone", **FAST, lambda_lr=1e6, epsilon=0.0)
    b, _ = erase(sd, "cat", "dog", method="allbutone", **FAST, lambda_lr=1e6, epsilon=0.0)
    after_a, after_b = surgery.read(a, keys), surgery.read(b, keys)
    trainable = set(surgery.select(sd, trainable_predicate("attn2")))
    for key in keys:
        np.testing.assert_array_equal(after_a[key], after_b[key], err_msg=key)
        if key not in trainable:
            np.testing.assert_array_equal(after_a[key], before[key], err_msg=key)
    assert set(report.edited) == trainable
    lam, drift = report.training["lambda"], report.training["drift"]
    assert lam[0] == 1.0 and drift[0] < 1e-9  # the first step starts at the original (batching aside)
    for i in range(1, len(lam)):  # lambda_{i} = max(0, lambda_{i-1} + rate (drift_{i-1} - epsilon))
        assert lam[i] == pytest.approx(max(0.0, lam[i - 1] + 1e6 * drift[i - 1]), rel=1e-5)
    report.to_json("/dev/null")


@pytest.mark.parametrize(
    "values, message",
    [
        ({"percentile": 0.0}, "percentile must be in \\(0, 0.5\\], got 0.0"),
        ({"percentile": 0.6}, "percentile must be in \\(0, 0.5\\], got 0.6"),
        ({"epsilon": -1.0}, "epsilon must be >= 0, got -1.0"),
        ({"steps": 0}, "steps must be >= 1, got 0"),
        ({"train": "unet"}, "unknown train 'unet' \\(choose from attn2, to_out, kv\\)"),
    ],
)
def test_bad_options_are_one_line(values, message):
    with pytest.raises(EraseError, match=message):
        get_method("allbutone").make_options(values)
