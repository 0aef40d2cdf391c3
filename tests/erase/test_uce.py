"""UCE against a float64 PyTorch re-implementation of the official scripts' update on the same weights."""

import numpy as np
import pytest
import torch

from jax_erasepro.erase import erase
from jax_erasepro.tiny import tiny_random_sd
from jax_erasepro.weights import to_state_dict
from tests.torch_bridge import torch_pipeline


@pytest.fixture(scope="module")
def sd():
    return tiny_random_sd(0)


@pytest.fixture(scope="module")
def pipe64(sd):
    pipe = torch_pipeline(sd)
    pipe.text_encoder.double()
    pipe.unet.double()
    return pipe


def embed(pipe, texts):
    """train_erase.py's encoding: padded ids, final states, and ``attention_mask.sum() - 2`` per prompt."""
    tok = pipe.tokenizer(
        texts,
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        emb = pipe.text_encoder(tok.input_ids)[0]
    return emb, (tok.attention_mask.sum(1) - 2).tolist()


def script_2023(pipe, old_texts, new_texts, retain_texts, lamb=0.5, erase_scale=1.0, preserve_scale=0.1):
    """edit_model(..., technique='replace', with_to_k=True) of train-scripts/train_erase.py, in float64."""
    new_texts = [" " if t == "" else t for t in new_texts]
    out = {}
    for name, layer in [
        (f"{n}.{p}", getattr(m, p))
        for n, m in pipe.unet.named_modules()
        if n.endswith("attn2")
        for p in ("to_v", "to_k")
    ]:
        w = layer.weight.detach()
        mat1 = lamb * w
        mat2 = lamb * torch.eye(w.shape[1], dtype=w.dtype)
        for old, new in zip(old_texts, new_texts, strict=True):
            emb, (fi, fn) = embed(pipe, [old, new])
            far = max(fi, fn)
            old_emb = emb[0][fi : len(emb[0]) - max(0, far - fi)]
            new_emb = emb[1][fn : len(emb[1]) - max(0, far - fn)]
            values = new_emb @ w.T
            mat1 = mat1 + erase_scale * (values[:, :, None] @ old_emb[:, None, :]).sum(0)
            mat2 = mat2 + erase_scale * (old_emb[:, :, None] @ old_emb[:, None, :]).sum(0)
        for text in retain_texts:
            emb, _ = embed(pipe, [text, text])
            ctx, values = emb[0], emb[1] @ w.T
            mat1 = mat1 + preserve_scale * (values[:, :, None] @ ctx[:, None, :]).sum(0)
            mat2 = mat2 + preserve_scale * (ctx[:, :, None] @ ctx[:, None, :]).sum(0)
        out[name + ".weight"] = (mat1 @ torch.inverse(mat2)).numpy()
    return out


def script_2025(
    pipe, erase_concepts, guide_concepts, preserve_concepts, lamb=0.5, erase_scale=1.0, preserve_scale=1.0
):
    """UCE() of trainscripts/uce_sd_erase.py (one token per prompt: the last concept token), in float64."""

    def last(text):
        emb, (i,) = embed(pipe, [text])
        return emb[0, i]

    out = {}
    for name, layer in [
        (f"{n}.{p}", getattr(m, p))
        for n, m in pipe.unet.named_modules()
        if n.endswith("attn2")
        for p in ("to_v", "to_k")
    ]:
        w = layer.weight.detach()
        mat1 = lamb * w
        mat2 = lamb * torch.eye(w.shape[1], dtype=w.dtype)
        for e, g in zip(erase_concepts, guide_concepts, strict=True):
            c, v = last(e)[:, None], (w @ last(g))[:, None]
            mat1, mat2 = mat1 + erase_scale * v @ c.T, mat2 + erase_scale * c @ c.T
        for p in preserve_concepts:
            c = last(p)[:, None]
            mat1, mat2 = mat1 + preserve_scale * (w @ c) @ c.T, mat2 + preserve_scale * c @ c.T
        out[name + ".weight"] = (mat1 @ torch.inverse(mat2)).numpy()
    return out


def check_update(sd, erased, reference, rel=1e-4):
    """Every edited weight's update W - W_o equals the reference's to ``rel`` of the update's size."""
    before, after = to_state_dict(sd.unet), to_state_dict(erased.unet)
    assert set(reference) == {k for k in after if not np.array_equal(after[k], before[k])}
    worst = 0.0
    for key, ref in reference.items():
        d_ref = ref - before[key].astype(np.float64)
        d = after[key].astype(np.float64) - before[key]
        worst = max(worst, np.linalg.norm(d - d_ref) / np.linalg.norm(d_ref))
    assert worst <= rel, worst
    return worst


@pytest.mark.parametrize(
    "targets, anchor, preserve",
    [
        (["van gogh"], "", ()),  # anchor '' (the script's ' '): slices of different starts
        (["van gogh", "picasso"], "artist", ("monet",)),  # target longer and shorter than the anchor
        (["cat"], "grumpy cat", ("dog", "bird")),
    ],
)
def test_uce_2023_matches_script(sd, pipe64, targets, anchor, preserve):
    erased, report = erase(sd, targets, anchor, method="uce", preserve=preserve)
    ref = script_2023(
        pipe64,
        targets,
        [anchor] * len(targets),
        [""] + list(preserve),
        preserve_scale=max(0.1, 1 / (1 + len(preserve))),
    )
    check_update(sd, erased, ref)
    assert report.options["preserve_scale"] == max(0.1, 1 / (1 + len(preserve)))


def test_uce_2025_matches_script(sd, pipe64):
    targets, anchors, preserve = ["van gogh", "cat"], ["art", ""], ["monet"]
    erased, _ = erase(sd, targets, anchors, method="uce", preserve=preserve, variant="2025")
    check_update(sd, erased, script_2025(pipe64, targets, anchors, preserve))


def test_uce_leaves_other_weights_and_input(sd):
    before = {k: v.copy() for k, v in to_state_dict(sd.unet).items()}
    erased, report = erase(sd, ["van gogh"], "artist", method="uce")
    assert all(np.array_equal(v, before[k]) for k, v in to_state_dict(sd.unet).items())
    changed = {f"unet.{k}" for k, v in to_state_dict(erased.unet).items() if not np.array_equal(v, before[k])}
    assert changed == set(report.edited)
    assert all(k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in changed)
    assert erased.text_encoder is sd.text_encoder
