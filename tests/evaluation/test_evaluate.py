"""evaluate() on shapes-sd in quick settings: known cases (the model against itself, a broken model) and
bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_erasepro.evaluation import EvaluationError, evaluate
from jax_erasepro.loading import load_pretrained
from jax_erasepro.tiny import tiny_random_sd

QUICK = dict(images_per_prompt=1, num_inference_steps=10, robustness=False, reference=False)


@pytest.fixture(scope="module")
def sd():
    return load_pretrained()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("eval-cache")


def _noisy_cross_attention(sd):
    """shapes-sd with every U-Net cross-attention to_k/to_v replaced by Gaussian noise of its scale."""
    graphdef, state = nnx.split(sd.unet)
    flat = dict(nnx.to_flat_state(state))
    key = jax.random.key(0)
    for path, var in flat.items():
        if "attn2" in map(str, path) and str(path[-2]) in ("to_k", "to_v"):
            key, sub = jax.random.split(key)
            w = jnp.asarray(var[...])
            flat[path] = var.replace(jax.random.normal(sub, w.shape, w.dtype) * jnp.std(w))
    return sd.replace(unet=nnx.merge(graphdef, nnx.from_flat_state(flat)))


def test_the_model_against_itself(sd, cache, tmp_path):
    report = evaluate(sd, sd, ["zorbly"], ["star"], cache=cache, **QUICK)
    s = report.to_dict()
    assert s["clip_score"]["T"]["value"] == pytest.approx(1.0, abs=1e-6)
    assert s["clip_score"]["O"]["value"] == pytest.approx(1.0, abs=1e-6)
    assert (
        s["kid"]["T"]["value"] == pytest.approx(0.0, abs=1e-9) and max(map(abs, s["kid"]["O"]["ci"])) < 1e-9
    )
    assert s["clip_accuracy"]["before"] >= 0.9  # the judge knows the original's zorbly from a star
    assert s["target_rate"]["before"] == s["target_rate"]["after"] >= 0.8
    assert s["others_accuracy"]["drop"] == 0.0 and s["others_accuracy"]["before"] >= 0.6
    report.to_json(tmp_path / "r.json")
    folder = report.save(tmp_path / "eval")
    assert (folder / "grid_target.png").is_file() and "CLIP score A" in (folder / "evaluation.md").read_text()


def test_a_broken_model_is_caught(sd, cache):
    report = evaluate(sd, _noisy_cross_attention(sd), ["zorbly"], ["star"], cache=cache, **QUICK)
    others = report.summary["others_accuracy"]
    assert others["before"] >= 0.6 and others["after"] <= 0.2
    assert report.summary["clip_score"]["O"]["value"] < 0.8


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(targets=["blorp"], anchors=["star"]), "unknown concept 'blorp'"),
        (dict(targets=["zorbly"], anchors=["star", "moon"]), "1 targets but 2 anchors"),
        (dict(targets=["zorbly"], anchors=["star"], judge="."), "not a CLIP folder"),
        (dict(targets=["zorbly"], anchors=["star"], images_per_prompt=0), "must be >= 1"),
    ],
)
def test_bad_input_is_one_clear_error(sd, kwargs, message):
    with pytest.raises(EvaluationError, match=message):
        evaluate(sd, sd, **kwargs)


def test_another_architecture_is_refused(sd):
    with pytest.raises(EvaluationError, match="config differs"):
        evaluate(sd, tiny_random_sd(0), ["zorbly"], ["star"], **QUICK)


def test_world_prompts_know_what_they_show():
    from jax_erasepro.evaluation.prompts import world_others, world_target_set, world_truth

    assert world_truth("a picture of a red circle") == (("shape", "circle"), ("colour", "red"))
    assert world_truth("a picture of quibbet") == (("character", "quibbet"),)
    assert ("style", "Ilse Varnhold") in world_truth("a red circle, in the style of Ilse Varnhold")
    assert world_truth("a red circle and a blue square") == ()
    others = world_others(["zorbly"], ["star"])
    assert not any("zorbly" in o for o in others) and any("quibbet" in o for o in others)
    target = world_target_set(["Ilse Varnhold"], [""])
    assert len(target.prompts) == 10 and all(p.text.endswith("by Ilse Varnhold") for p in target.prompts)
    assert np.all([p.anchor_text and "Ilse" not in p.anchor_text for p in target.prompts])


def test_any_clip_folder_judges_without_ground_truth(sd, cache):
    """A judge given as a folder is any transformers CLIPModel: CLIP metrics only, from the user's prompts."""
    from jax_erasepro.shapes.judge import judge_path

    report = evaluate(
        sd,
        sd,
        ["zorbly"],
        ["star"],
        judge=str(judge_path()),
        prompts=["a picture of {}"],
        others=["a red circle", "a blue square"],
        cache=cache,
        **QUICK,
    )
    s = report.to_dict()
    assert s["target_rate"] is None and s["others_accuracy"] is None
    assert s["clip_score"]["O"]["value"] == pytest.approx(1.0, abs=1e-6)
    assert s["sets"]["target"]["prompts"] == ["a picture of zorbly"]
    with pytest.raises(EvaluationError, match="give prompts="):
        evaluate(sd, sd, ["zorbly"], ["star"], judge=str(judge_path()), **QUICK)
