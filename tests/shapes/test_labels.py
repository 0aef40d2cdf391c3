"""The world's labels of one-object scenes, and zero-shot labels read by transformers' CLIP the same way."""

import numpy as np
import pytest
import torch
from transformers import CLIPModel as TorchCLIPModel
from transformers import CLIPProcessor

from jax_erasepro.evaluation.judge import judge_path
from jax_erasepro.shapes import judge_prompts, render
from jax_erasepro.shapes.judge import load_judge
from jax_erasepro.shapes.labels import (
    ATTRIBUTES,
    image_label,
    single_object_scenes,
    zero_shot_accuracy,
    zero_shot_predict,
)


def _shipped() -> bool:
    try:
        return judge_path() is not None
    except FileNotFoundError:
        return False


def test_single_object_scenes_have_one_label_per_attribute():
    scenes = single_object_scenes(seed=0, n=12)
    assert len(scenes) == 12 and all(len(s.objects) == 1 for s in scenes)
    assert scenes == single_object_scenes(seed=0, n=12)
    for attribute in ATTRIBUTES:
        assert {image_label(s, attribute) for s in scenes} <= set(judge_prompts(attribute))


@pytest.mark.skipif(not _shipped(), reason="shapes-clip not shipped yet")
def test_zero_shot_labels_are_transformers_clips(tmp_path):
    """The judge's labels are transformers' CLIPModel's argmax over the judge prompts, with
    CLIPProcessor's preprocessing; the accuracy is the share of labels that are right."""
    judge = load_judge()
    ref = TorchCLIPModel.from_pretrained(judge_path()).eval()
    processor = CLIPProcessor.from_pretrained(judge_path())
    scenes = single_object_scenes(seed=5, n=24)
    images = np.stack([render(s) for s in scenes])
    for attribute in ("shape", "style"):
        prompts = judge_prompts(attribute)
        inputs = processor(text=list(prompts.values()), images=list(images), return_tensors="pt",
                           padding="max_length", max_length=77)
        with torch.no_grad():
            logits = ref(**inputs).logits_per_image.numpy()
        names = list(prompts)
        want = [names[j] for j in logits.argmax(-1)]
        got = zero_shot_predict(judge.model, judge.tokenizer, attribute, images)
        assert np.mean([g == w for g, w in zip(got, want, strict=True)]) >= 23 / 24  # near-ties may flip
        truth = [image_label(s, attribute) for s in scenes]
        accuracy = zero_shot_accuracy(judge.model, judge.tokenizer, attribute, n=24, seed=5)
        assert accuracy == np.mean([g == t for g, t in zip(got, truth, strict=True)])
