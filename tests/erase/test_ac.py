"""Ablating Concepts: the model-based loss and gradient as the authors' train.py computes them, the
trainable set, determinism, options and the command line."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_erasepro import surgery
from jax_erasepro.erase import EraseError, erase, get_method
from jax_erasepro.erase.ac import ac_loss, anchor_goal, prompt_pairs, trainable_predicate
from jax_erasepro.erase.methods import Request
from jax_erasepro.pipeline import encode_prompts
from jax_erasepro.tiny import tiny_random_sd

FAST = dict(steps=2, anchor_images=3, batch_size=2, generation_steps=2, progress=False)


@pytest.fixture(scope="module")
def sd():
    return tiny_random_sd(seed=7)


def test_loss_and_gradient_match_the_scripts_torch_computation(sd):
    """train.py's model-based step in PyTorch (diffusers U-Net, same weights, same x_t and timesteps): the
    target prompt's prediction pulled to the anchor prompt's, computed by the same U-Net without gradient;
    the trainable set by create_custom_diffusion's cross-attn rule; loss and every gradient."""
    import torch

    from tests.conftest import assert_close, assert_unet_grads_match
    from tests.torch_bridge import torch_pipeline

    pipe = torch_pipeline(sd)
    unet = pipe.unet
    script = {f"unet.{n}" for n, _ in unet.named_parameters() if "attn2.to_k" in n or "attn2.to_v" in n}
    assert set(surgery.select(sd, trainable_predicate("kv"))) == script

    unet_def, trainable, rest = nnx.split(sd.unet, surgery.param_filter(sd, trainable_predicate("kv")), ...)
    states = encode_prompts(
        sd, ["a photo of cat", "a photo of dog", "a painting by cat", "a painting by dog"]
    )
    target, anchor = states[0::2], states[1::2]
    x_t = jax.random.normal(jax.random.key(3), (2, 8, 8, 4))
    t = jnp.asarray([17, 640])
    goal = anchor_goal(unet_def, trainable, rest, x_t, t, anchor)
    loss, grads = jax.jit(jax.value_and_grad(ac_loss, argnums=1), static_argnums=0)(
        unet_def, trainable, rest, x_t, t, target, goal
    )

    xt = torch.from_numpy(np.asarray(x_t).transpose(0, 3, 1, 2).copy())
    steps = torch.from_numpy(np.array(t)).long()
    params = dict(unet.named_parameters())
    for name, p in params.items():
        p.requires_grad_(f"unet.{name}" in script)
    pred = unet(xt, steps, torch.from_numpy(np.array(target))).sample
    with torch.no_grad():
        pred_anchor = unet(xt, steps, torch.from_numpy(np.array(anchor))).sample
    # train.py: mask (B, 1, h, w) of ones inside a one-latent border (its --noaug mask), then
    # ((mse(reduction="none") * mask).sum([1, 2, 3]) / mask.sum([1, 2, 3])).mean()
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 1:-1, 1:-1] = 1.0
    sq = torch.nn.functional.mse_loss(pred.float(), pred_anchor.float(), reduction="none")
    ref = ((sq * mask).sum([1, 2, 3]) / mask.sum([1, 2, 3])).mean()
    ref.backward()
    assert_close(float(loss), ref.item())
    assert_unet_grads_match(sd, grads, params, script)


def test_only_the_set_changes_one_seed_gives_identical_weights_and_the_source_is_untouched(sd):
    before = surgery.read(sd, surgery.select(sd, "*"))
    a, report = erase(sd, "cat", "dog", method="ac", **FAST)
    b, _ = erase(sd, "cat", "dog", method="ac", **FAST)
    trainable = set(surgery.select(sd, trainable_predicate("kv")))
    after_a, after_b = surgery.read(a, list(before)), surgery.read(b, list(before))
    for key, w in before.items():
        np.testing.assert_array_equal(after_a[key], after_b[key], err_msg=key)
        if key not in trainable:
            np.testing.assert_array_equal(after_a[key], w, err_msg=key)
    np.testing.assert_array_equal(surgery.read(sd, list(before))[key], before[key])
    assert set(report.edited) == trainable and report.method == "ac"
    assert report.training["steps_run"] == 2 and report.options["effective_lr"] == pytest.approx(4e-6)
    report.to_json("/dev/null")


def test_target_prompts_put_the_target_where_the_anchor_was(sd):
    anchors, targets, _, _ = prompt_pairs(
        sd, Request(("cat",), ("dog",), prompts=("a photo of {}", "{} art"))
    )
    assert anchors == ["a photo of dog", "dog art"] and targets == ["a photo of cat", "cat art"]


@pytest.mark.parametrize(
    "values, message",
    [
        ({"steps": 0}, "steps must be >= 1, got 0"),
        ({"lr": 0.0}, "lr must be > 0, got 0.0"),
        ({"train": "all"}, "unknown train 'all' \\(choose from kv, attn2, full\\)"),
        ({"anchor_images": 0}, "anchor_images must be >= 1, got 0"),
        ({"checkpoint_every": 0}, "checkpoint_every must be >= 1, got 0"),
    ],
)
def test_bad_options_are_one_line(values, message):
    with pytest.raises(EraseError, match=message):
        get_method("ac").make_options(values)
