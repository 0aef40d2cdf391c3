"""UCE against a numpy float64 reference written from the official scripts' formula and text building.

The reference takes the original encoder's states (``encode_tokens``; its PyTorch parity is tested elsewhere)
for the texts each script's ``__main__`` builds, selects positions as each script does and forms
W = mat1 @ inv(mat2) directly; our solver never forms mat2, so agreement checks the whole chain.
"""

import jax
import numpy as np
import pytest

from jax_erasepro.erase import EraseError, erase
from jax_erasepro.pipeline import encode_tokens
from jax_erasepro.tiny import tiny_random_sd
from jax_erasepro.weights import to_state_dict

LAMB = 0.5


@pytest.fixture(scope="module")
def sd():
    return tiny_random_sd(0)


def encode(sd, texts):
    """Each text's (77, d) states in float64 and the script's ``attention_mask.sum() - 2``."""
    tok = sd.tokenizer(list(texts), padding="max_length", max_length=77, truncation=True)
    states = np.asarray(encode_tokens(sd.text_encoder, np.asarray(tok["input_ids"])), np.float64)
    return states, [sum(m) - 2 for m in tok["attention_mask"]]


def closed_form(w, erased, retained, erase_scale, preserve_scale):
    """mat1 @ inv(mat2): mat1 = lamb W + s_e sum v* c^T + s_p sum W p p^T, mat2 = lamb I + s_e sum c c^T + ...

    ``erased`` holds (c, anchor state) row blocks (v* = W anchor), ``retained`` holds p row blocks.
    """
    mat1, mat2 = LAMB * w, LAMB * np.eye(w.shape[1])
    for c, g in erased:
        mat1 += erase_scale * (g @ w.T).T @ c
        mat2 += erase_scale * c.T @ c
    for p in retained:
        mat1 += preserve_scale * (p @ w.T).T @ p
        mat2 += preserve_scale * p.T @ p
    return mat1 @ np.linalg.inv(mat2)


def columns_2023(sd, old_texts, new_texts, retain_texts):
    """train_erase.py's edit_model: from each last concept token on, trimmed to a common length; all of
    every retained text."""
    erased = []
    for old, new in zip(old_texts, new_texts, strict=True):
        (e_old, e_new), (fi, fn) = encode(sd, [old, new or " "])
        far = max(fi, fn)
        erased.append((e_old[fi : 77 - max(0, far - fi)], e_new[fn : 77 - max(0, far - fn)]))
    return erased, list(encode(sd, retain_texts)[0])


def columns_2025(sd, edit_texts, guide_texts, preserve_texts):
    """uce_sd_erase.py: the state of each text's last concept token only."""

    def last(texts):
        states, idx = encode(sd, texts)
        return [s[i : i + 1] for s, i in zip(states, idx, strict=True)]

    return list(zip(last(edit_texts), last(guide_texts), strict=True)), last(
        preserve_texts
    ) if preserve_texts else []


def main_2023(targets, anchors, templates, preserve):
    """train_erase.py's __main__: concept then its templates, each to the raw anchor; '' and raw preserved."""
    old = [t.format(c) for c in targets for t in ["{}", *templates]]
    new = [a for a in anchors for _ in ["{}", *templates]]
    return old, new, ["", *preserve]


def main_2025(targets, anchors, templates, preserve):
    """uce_sd_erase.py's __main__ (expand_prompts): the anchor is filled into its target's template."""
    edit = [t.format(c) for c in targets for t in ["{}", *templates]]
    guide = [t.format(a) for a in anchors for t in ["{}", *templates]]
    return edit, guide, list(preserve)


def reference(sd, columns, erase_scale, preserve_scale):
    """Reference edited weight for every U-Net attn2 to_k/to_v key (PyTorch layout, float64)."""
    erased, retained = columns
    return {
        k: closed_form(w.astype(np.float64), erased, retained, erase_scale, preserve_scale)
        for k, w in to_state_dict(sd.unet).items()
        if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))
    }


def worst_update_error(sd, erased, ref):
    """max over edited weights of ||W - W_ref|| / ||W_ref - W_o|| (relative to the edit, not W)."""
    before, after = to_state_dict(sd.unet), to_state_dict(erased.unet)
    assert set(ref) == {k for k in after if not np.array_equal(after[k], before[k])}
    w_o = {k: before[k].astype(np.float64) for k in ref}
    return max(np.linalg.norm(after[k] - ref[k]) / np.linalg.norm(ref[k] - w_o[k]) for k in ref)


CASES_2023 = {
    "no-templates": (["cat"], ["dog"], None, []),
    "issue": (["cat"], ["dog"], ["a photo of a {}"], ["bird"]),
    "two-templates-to-empty": (["van gogh"], [""], ["painting by {}", "art by {}"], []),
    "several-targets-preserved": (
        ["van gogh", "picasso"],
        ["artist", "artist"],
        ["painting by {}", "style of {}"],
        ["monet", "bird"],
    ),
    "anchor-per-target": (["cat", "kelly mckernan"], ["grumpy cat", "art"], ["a photo of a {}"], ["dog"]),
}


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("case", list(CASES_2023))
def test_uce_2023_matches_script(sd, case, precision):
    targets, anchors, prompts, preserve = CASES_2023[case]
    old, new, retain = main_2023(targets, anchors, prompts or [], preserve)
    s_p = max(0.1, 1 / len(retain))
    ref = reference(sd, columns_2023(sd, old, new, retain), 1.0, s_p)
    with jax.enable_x64(precision == "float64"):
        erased, report = erase(
            sd, targets, anchors, method="uce", prompts=prompts, preserve=preserve, precision=precision
        )
    err = worst_update_error(sd, erased, ref)
    print(f"2023 {case} {precision}: {err:.2e}")
    assert err <= (1e-4 if precision == "float64" else 1e-3), err
    assert report.options["preserve_scale"] == s_p
    assert [(p["target"], p["anchor"]) for p in report.pairs] == list(zip(old, new, strict=True))


CASES_2025 = {
    "no-templates": (["van gogh", "cat"], ["art", ""], None, ["monet"]),
    "two-templates-preserved": (
        ["van gogh", "cat"],
        ["art", ""],
        ["painting by {}", "art by {}"],
        ["monet", "bird"],
    ),
}


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("case", list(CASES_2025))
def test_uce_2025_matches_script(sd, case, precision):
    targets, anchors, prompts, preserve = CASES_2025[case]
    edit, guide, keep = main_2025(targets, anchors, prompts or [], preserve)
    ref = reference(sd, columns_2025(sd, edit, guide, keep), 1.0, 1.0)
    with jax.enable_x64(precision == "float64"):
        erased, _ = erase(
            sd,
            targets,
            anchors,
            method="uce",
            prompts=prompts,
            preserve=preserve,
            variant="2025",
            precision=precision,
        )
    err = worst_update_error(sd, erased, ref)
    print(f"2025 {case} {precision}: {err:.2e}")
    assert err <= (1e-4 if precision == "float64" else 1e-3), err


def test_uce_template_pairing(sd):
    """pairing='template': each template filled with target, anchor and every retained concept alike."""
    templates, preserve = ["a photo of a {}", "art by {}"], ["bird"]
    old = [t.format(c) for t in templates for c in ["cat"]]
    new = [t.format(c) for t in templates for c in ["dog"]]
    retain = [t.format(c) for t in templates for c in ["", *preserve]]
    ref = reference(sd, columns_2023(sd, old, new, retain), 1.0, 0.5)
    with jax.enable_x64(True):
        erased, report = erase(
            sd,
            "cat",
            "dog",
            method="uce",
            prompts=templates,
            preserve=preserve,
            pairing="template",
            precision="float64",
        )
    err = worst_update_error(sd, erased, ref)
    script = reference(sd, columns_2023(sd, *main_2023(["cat"], ["dog"], templates, preserve)), 1.0, 0.5)
    apart = worst_update_error(sd, erased, script)
    print(f"2023 template-pairing float64: {err:.2e} (from the script's texts: {apart:.2e})")
    assert err <= 1e-4 < 0.05 < apart, (err, apart)
    assert report.options["pairing"] == "template"


def test_uce_plain_template_is_the_concept_itself(sd):
    """'{}' among the templates adds nothing under script pairing: the concept itself is always there."""
    a, _ = erase(sd, "cat", "dog", method="uce", prompts=["{}", "a photo of a {}"])
    b, _ = erase(sd, "cat", "dog", method="uce", prompts=["a photo of a {}"])
    c, _ = erase(sd, "cat", "dog", method="uce", prompts=["{}"])
    d, _ = erase(sd, "cat", "dog", method="uce")
    for x, y in ((a, b), (c, d)):
        sx, sy = to_state_dict(x.unet), to_state_dict(y.unet)
        assert all(np.array_equal(sx[k], sy[k]) for k in sx)
    with pytest.raises(EraseError, match="pairing"):
        erase(sd, "cat", "dog", method="uce", pairing="paired")


def test_uce_max_residual(sd):
    """max_residual works on a UCE report: its target-column residual by default, any field it has."""
    _, report = erase(sd, "cat", "dog", method="uce", preserve=["bird"])
    assert report.max_residual() == max(e["residual_after"] for e in report.layers) > 0
    assert report.max_residual(stage="unet", field="residual_preserve") == max(
        e["residual_preserve"] for e in report.layers
    )
    assert report.max_residual(stage="text_encoder") == 0.0
    with pytest.raises(KeyError, match="residual_hard"):
        report.max_residual(field="residual_hard")


def test_uce_leaves_other_weights_and_input(sd):
    before = {k: v.copy() for k, v in to_state_dict(sd.unet).items()}
    erased, report = erase(sd, ["van gogh"], "artist", method="uce")
    assert all(np.array_equal(v, before[k]) for k, v in to_state_dict(sd.unet).items())
    changed = {f"unet.{k}" for k, v in to_state_dict(erased.unet).items() if not np.array_equal(v, before[k])}
    assert changed == set(report.edited)
    assert all(k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in changed)
    assert erased.text_encoder is sd.text_encoder
