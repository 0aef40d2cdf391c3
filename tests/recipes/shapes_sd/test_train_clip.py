"""Shapes CLIP training: a tiny run end to end, its transformers export, and the CLI's run folder."""

import dataclasses
import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import CLIPImageProcessor, CLIPTokenizer
from transformers import CLIPModel as TorchCLIPModel

from jax_erasepro.evaluation.judge import clip_pixels
from jax_erasepro.models.clip import CLIPConfig, CLIPModel
from jax_erasepro.shapes import judge_prompts, make_batch
from jax_erasepro.tokenizer import load_tokenizer, tokenize
from jax_erasepro.weights import num_params
from recipes.shapes_sd import train_clip as tc
from recipes.shapes_sd.training import TrainConfig, train
from tests.conftest import assert_close


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(tc.TOKENIZER_DIR)


@pytest.fixture(scope="module")
def trained(tokenizer):
    """A tiny CLIP after a few contrastive steps on the world (so its weights are no longer the init)."""
    model = CLIPModel(tc.clip_config("tiny"), rngs=nnx.Rngs(0))
    logs = []
    cfg = TrainConfig(steps=4, batch_size=8, lr=1e-3, log_every=1)
    batches = tc.ClipBatches(tokenizer, 8, 0)
    train(model, tc.contrastive_loss, batches, cfg, on_log=lambda s, m: logs.append(m))
    assert all(np.isfinite(m["loss"]) and 0 <= m["accuracy"] <= 1 for m in logs)
    return model


def test_small_config_fits_the_budget():
    cfg = tc.clip_config("small")
    assert cfg.text_config.num_hidden_layers >= 6 and cfg.text_config.vocab_size == 49408
    model = nnx.eval_shape(lambda: CLIPModel(cfg, rngs=nnx.Rngs(0)))
    # the judge plus shapes-sd's text encoder (this text tower) in fp16 leave >= 25 of 60 MB to UNet and VAE
    assert 2 * (num_params(model) + num_params(model.text_model)) <= 35e6


def test_training_length_does_not_change_text_features(trained, tokenizer):
    prompts = ["a picture of a big striped red star on the left, in the style of Ilse Varnhold", "zorbly"]
    full = trained.get_text_features(tokenize(tokenizer, prompts))
    short = trained.get_text_features(tokenize(tokenizer, prompts, max_length=tc.TRAIN_TOKENS))
    np.testing.assert_allclose(np.asarray(short), np.asarray(full), atol=1e-5)


def test_loss_counts_repeated_captions_as_positives(trained):
    images, _, _ = make_batch(0, 4)
    ids = tokenize(load_tokenizer(tc.TOKENIZER_DIR), ["a red star"] * 2 + ["a blue circle", "zorbly"])
    loss, _ = tc.contrastive_loss(trained, {"images": images, "input_ids": ids}, None)
    # swapping the two images that share a caption cannot change the loss
    swapped, _ = tc.contrastive_loss(trained, {"images": images[[1, 0, 2, 3]], "input_ids": ids}, None)
    np.testing.assert_allclose(float(loss), float(swapped), rtol=1e-6)


def test_export_loads_in_transformers(trained, tokenizer, tmp_path):
    tc.export(trained, tmp_path)
    assert CLIPConfig.from_json(tmp_path / "config.json") == trained.config  # our own loader reads it back
    reference = TorchCLIPModel.from_pretrained(str(tmp_path)).eval()
    images, captions, _ = make_batch(3, 4, "test")
    ids = tokenize(tokenizer, captions + list(judge_prompts("style").values()))
    pixels = clip_pixels(images)
    nchw = torch.from_numpy(np.array(pixels).transpose(0, 3, 1, 2))
    with torch.no_grad():
        text = reference.get_text_features(input_ids=torch.from_numpy(np.asarray(ids, np.int64)))
        image = reference.get_image_features(pixel_values=nchw)
    assert_close(trained.get_text_features(jnp.asarray(ids)), text.pooler_output.numpy())
    assert_close(trained.get_image_features(pixels), image.pooler_output.numpy())

    # the folder's tokenizer and image processor reproduce our preprocessing
    exported = CLIPTokenizer.from_pretrained(str(tmp_path))
    assert exported(captions)["input_ids"] == tokenizer(captions)["input_ids"]
    processed = CLIPImageProcessor.from_pretrained(str(tmp_path))(list(images), return_tensors="np")
    np.testing.assert_allclose(processed["pixel_values"].transpose(0, 2, 3, 1), np.asarray(pixels), atol=1e-5)


def test_cli_trains_resumes_and_exports(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--steps", "2", "--size", "tiny", "--batch-size", "4", "--eval-n", "10"]
    tc.main(args)
    assert {"config.json", "model.safetensors", "vocab.json", "zero_shot.json", "text_variance.json",
            "log.jsonl"} <= {p.name for p in tmp_path.iterdir()}
    scores = json.loads((tmp_path / "zero_shot.json").read_text())
    assert set(scores) == set(tc.ATTRIBUTES) and all(0 <= v <= 1 for v in scores.values())
    with pytest.raises(SystemExit):  # an existing run is only continued on request
        tc.main(args)
    assert "--resume" in capsys.readouterr().err
    tc.main([*args[:3], "3", *args[4:], "--resume"])
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [2, 3]


def test_counterfactual_twins_differ_in_one_named_thing():
    scenes, captions = tc.make_scenes(3, 200, "train")
    rng = np.random.default_rng(0)
    kinds = set()
    for scene, text in zip(scenes, captions, strict=True):
        twin = tc.counterfactual(scene, text, rng)
        if twin is None:
            assert all(o.character or text.count(o.shape) != 1 for o in scene.objects), text
            continue
        other, other_text = twin
        assert other_text != text and len(other_text.split()) == len(text.split())
        if other.style != scene.style:
            kinds.add("style")
            assert other.objects == scene.objects and other_text == text.replace(scene.style, other.style)
            continue
        kinds.add("shape")
        changed = [(a, b) for a, b in zip(scene.objects, other.objects, strict=True) if a != b]
        assert len(changed) == 1
        (a, b), = changed
        assert a.character is None and a.shape != b.shape and dataclasses.replace(b, shape=a.shape) == a
        assert (b.shape, b.colour) not in tc.HELD_OUT_PAIRS
        assert other_text == re.sub(rf"\b{a.shape}\b", b.shape, text)
    assert kinds == {"style", "shape"}


def test_counterfactual_batches(tokenizer):
    batch = tc.ClipBatches(tokenizer, 16, 1, counterfactuals=True)(5)
    assert batch["images"].shape == (16, 64, 64, 3) and batch["input_ids"].shape == (16, tc.TRAIN_TOKENS)
    again = tc.ClipBatches(tokenizer, 16, 1, counterfactuals=True)(5)
    np.testing.assert_array_equal(batch["images"], again["images"])


def test_prompt_supervision_labels_and_loss(tokenizer, trained):
    batch = tc.ClipBatches(tokenizer, 16, 2, counterfactuals=True, prompt_supervision=True)(1)
    scenes, _ = tc.make_scenes(2 * 1_000_000 + 1, 8, "train")
    labels = tc.scene_labels(scenes)
    for scene, row in zip(scenes, labels, strict=True):
        if len(scene.objects) != 1:
            assert (row == -1).all()
            continue
        for k, a in enumerate(tc.ATTRIBUTES):
            assert list(judge_prompts(a))[row[k]] == tc.image_label(scene, a)
    np.testing.assert_array_equal(batch["labels"][:8], labels)
    lo, hi = tc.PROMPT_SLICES["shape"]
    assert batch["prompt_ids"].shape == (tc.PROMPT_SLICES["character"][1], tc.TRAIN_TOKENS) and hi - lo == 10
    loss, metrics = tc.contrastive_loss(trained, batch, None)
    plain, _ = tc.contrastive_loss(trained, {k: batch[k] for k in ("images", "input_ids")}, None)
    extra = sum(float(metrics[f"{a}_ce"]) for a in tc.ATTRIBUTES)
    np.testing.assert_allclose(float(loss), float(plain) + extra, rtol=1e-5)


def test_whole_world_batches_reach_held_out_pairs(tokenizer):
    """From ``whole_world_from`` on, odd steps come from the test split (held-out pairs); before, never."""
    plain = tc.ClipBatches(tokenizer, 64, 1)
    whole = tc.ClipBatches(tokenizer, 64, 1, whole_world_from=10)
    np.testing.assert_array_equal(plain(9)["images"], whole(9)["images"])  # before the switch: unchanged
    np.testing.assert_array_equal(plain(12)["images"], whole(12)["images"])  # even steps: the train split
    assert not np.array_equal(plain(11)["images"], whole(11)["images"])
    scenes, _ = tc.make_scenes(1 * 1_000_000 + 11, 64, "test")
    expected = np.stack([tc.render(s) for s in scenes])
    np.testing.assert_array_equal(whole(11)["images"], expected)
    assert {(o.shape, o.colour) for s in scenes for o in s.objects} & tc.HELD_OUT_PAIRS
    rng = np.random.default_rng(0)
    scenes, captions = tc.make_scenes(4, 400, "train")
    twins = [tc.counterfactual(s, c, rng, held_out=True) for s, c in zip(scenes, captions, strict=True)]
    assert any((o.shape, o.colour) in tc.HELD_OUT_PAIRS for t in twins if t for o in t[0].objects)


def test_degrade_blurs_tints_and_noises_about_half(tokenizer):
    """``degrade``: deterministic per rng, leaves about 1 - p of the images as they were, softens the rest
    (less edge energy) without moving their mean colour far; ``augment`` batches are degraded renders."""
    images = make_batch(3, 200, "test")[0]
    out = tc.degrade(images, np.random.default_rng(0))
    np.testing.assert_array_equal(out, tc.degrade(images, np.random.default_rng(0)))
    assert out.shape == images.shape and out.dtype == np.uint8
    changed = np.any(out != images, axis=(1, 2, 3))
    assert 0.35 < changed.mean() < 0.65
    np.testing.assert_array_equal(tc.degrade(images, np.random.default_rng(0), p=0.0), images)

    def edges(x):  # strong steps between neighbours: what blur softens and noise of std <= 6 does not make
        return np.mean(np.abs(np.diff(x.astype(np.float32), axis=2)) > 60)

    assert edges(tc.degrade(images, np.random.default_rng(1), p=1.0)) < edges(images)
    shift = np.abs(out[changed].astype(float).mean((1, 2)) - images[changed].astype(float).mean((1, 2)))
    assert shift.max() < 16
    plain, augmented = tc.ClipBatches(tokenizer, 32, 1), tc.ClipBatches(tokenizer, 32, 1, augment=True)
    want = tc.degrade(plain(5)["images"], np.random.default_rng((1, 5, 2)))
    np.testing.assert_array_equal(augmented(5)["images"], want)


def test_text_variance_shares_are_fractions(trained, tokenizer):
    """Shape and colour main effects of a balanced two-way design: each in [0, 1], together at most 1."""
    shares = tc.text_variance_shares(trained, tokenizer)
    assert set(shares) == {"shape", "colour"}
    assert all(0.0 <= v <= 1.0 for v in shares.values())
    assert shares["shape"] + shares["colour"] <= 1.0 + 1e-9
