"""ErasePro through ``erase``: hard residuals, exact preservation, edited paths, pairing, and torch parity."""

import json

import numpy as np
import pytest
import torch

from jax_erasepro import encode_prompts, erase
from jax_erasepro.erase import EraseError
from jax_erasepro.erase.columns import build_columns, paired_positions, prompt_tokens
from jax_erasepro.tiny import tiny_random_sd
from jax_erasepro.weights import to_state_dict
from tests.conftest import assert_close
from tests.torch_bridge import torch_pipeline

TEMPLATE = "a painting by {}"
QKV = ("q_proj.weight", "k_proj.weight", "v_proj.weight")


@pytest.fixture(scope="module")
def sd():
    return tiny_random_sd(0)


@pytest.fixture(scope="module")
def longer(sd):
    """Target (2 tokens) longer than anchor (1), one preserved concept, N <= d_in = 32."""
    return erase(
        sd, ["van gogh"], "artist", preserve=["monet"], prompts=[TEMPLATE], pad_tokens=2, form="paper"
    )


@pytest.fixture(scope="module")
def shorter(sd):
    return erase(sd, ["picasso"], "pablo picasso", prompts=[TEMPLATE], pad_tokens=2, form="paper")


def flat(sd):
    return {
        **{f"text_encoder.{k}": v for k, v in to_state_dict(sd.text_encoder).items()},
        **{f"unet.{k}": v for k, v in to_state_dict(sd.unet).items()},
        **{f"vae.{k}": v for k, v in to_state_dict(sd.vae).items()},
    }


def test_pairing_rule(sd):
    tok = sd.tokenizer
    t, a = (prompt_tokens(tok, TEMPLATE, c, 77) for c in ("van gogh", "artist"))
    pairs = paired_positions(t, a)
    assert (t.start, t.n_concept, t.eos, a.eos) == (4, 2, 6, 5)
    assert pairs[:3] == [(4, 4), (5, 4), (6, 5)]  # concept end to concept end, EOS to EOS
    assert pairs[-1] == (76, 75) and len(pairs) == 73  # padding to padding, every position to the end
    back = paired_positions(a, t)  # shorter target: EOS still pairs with EOS, the tail clamps to 76
    assert back[:2] == [(4, 5), (5, 6)] and back[-2:] == [(75, 76), (76, 76)]
    empty = prompt_tokens(tok, "{}", "", 77)
    assert paired_positions(prompt_tokens(tok, "{}", "nudity", 77), empty)[:2] == [(1, 1), (2, 1)]


def test_columns_dedup_shared_prefix(sd):
    cols = build_columns(sd.tokenizer, ["van gogh", "monet"], ["artist"] * 2, [], [TEMPLATE], pad_tokens=0)
    counts = cols.counts()
    assert counts["prefix"] == 4  # BOS, a, painting, by: once for both concepts
    assert counts["concept"] == 3 + 2 and cols.duplicates == 4
    assert cols.kind[0] == 0 and np.all(np.diff(cols.kind[cols.kind != 1]) >= 0)


def test_columns_preservation_wins_conflicts(sd):
    """A target column with a preserved column's ids prefix is dropped; one with its (token, position) only
    (the target's EOS against the preserved prompt's padding, both EOS ids) is flagged for layer 0."""
    cols = build_columns(sd.tokenizer, ["van gogh"], ["artist"], ["van"], [TEMPLATE], pad_tokens=1)
    assert cols.conflicts == 1  # "a painting by van": the same ids in the target and the preserved prompt
    x_ids = cols.x_ids[cols.x_row, cols.x_pos]
    flagged = np.flatnonzero(cols.embedding_conflict)
    assert (
        flagged.size == 1 and cols.x_pos[flagged[0]] == 6 and x_ids[flagged[0]] == sd.tokenizer.eos_token_id
    )
    assert cols.kind[flagged[0]] == 0  # the target's EOS (a concept-tier column), not a preserved one


def test_hard_residual_and_report(longer, shorter, tmp_path):
    for _, report in (longer, shorter):
        n = report.columns["total"]
        assert n <= 32
        clash = report.columns["embedding_conflicts"]
        for e in report.layers:
            # layer 0 sees only (token, position): the target's shifted EOS/padding has the preserved prompt's
            # padding input there; preservation wins, so those target columns are soft at layer 0 only
            if e.get("layer") == 0 and clash:
                assert e["n_hard"] == n - clash and e["residual_hard"] <= 1e-5
                assert e["residual_groups"]["preserve"] <= 1e-5 and e["residual_groups"]["padding"] > 1e-3
                continue
            assert e["n_hard"] == n
            assert e["residual_after"] <= 1e-5, e
            assert e["residual_before"] > 1e-2
        assert {e["key"] for e in report.layers} == set(report.edited)
    notes = {
        name: [n for n in r.notes if not n.startswith("large edit")]
        for name, (_, r) in (("shorter", shorter), ("longer", longer))
    }
    assert not notes["shorter"] and "preservation wins there" in notes["longer"][0]
    assert longer[1].columns["embedding_conflicts"] == 2 and len(notes["longer"]) == 1
    report = longer[1]
    assert report.pairs[0]["positions"][:3] == [(4, 4), (5, 4), (6, 5)]
    assert set(report.timings) == {"prepare", "compile", "features", "solve", "total"}
    report.to_json(tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["pairs"][0]["positions"][0] == [4, 4]
    report.plot(tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_only_qkv_and_cross_attention_changed(sd, longer):
    before = flat(sd)
    erased, report = longer
    after = flat(erased)
    assert all(np.array_equal(v, before[k]) for k, v in flat(sd).items())  # input untouched
    changed = {k for k in after if not np.array_equal(after[k], before[k])}
    assert changed == set(report.edited)
    n_layers = sd.config.text_encoder.num_hidden_layers
    assert sum(k.startswith("text_encoder.") for k in changed) == 3 * n_layers
    assert all(k.endswith(QKV) or k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in changed)
    assert sum(k.startswith("unet.") for k in changed) == 2 * 4  # tiny U-Net: 4 cross-attention layers


def test_preserved_features_exactly_preserved(sd, longer):
    """The preserved prompt keeps its encoder output at every constrained position (through EOS + pad_tokens),
    though its padding shares layer-0 inputs with the target's shifted EOS and padding."""
    erased, report = longer
    prompt = [TEMPLATE.format("monet")]
    keep = len(sd.tokenizer(prompt[0])["input_ids"]) + report.options["pad_tokens"]
    orig = np.asarray(encode_prompts(sd, prompt))[0, :keep]
    new = np.asarray(encode_prompts(erased, prompt))[0, :keep]
    assert np.linalg.norm(new - orig) / np.linalg.norm(orig) <= 1e-5
    target = [TEMPLATE.format("van gogh")]
    moved = np.asarray(encode_prompts(erased, target)) - np.asarray(encode_prompts(sd, target))
    assert np.linalg.norm(moved) > 1e-2


@pytest.mark.parametrize("case", ["longer", "shorter"])
def test_torch_parity_cross_attention(sd, case, request):
    """diffusers/transformers with the erased weights: k/v on the target == the original's on the anchor."""
    erased, report = request.getfixturevalue(case)
    pair = report.pairs[0]
    new_pipe, old_pipe = torch_pipeline(erased), torch_pipeline(sd)
    with torch.no_grad():
        ctx_t, _ = new_pipe.encode_prompt([pair["target"]], "cpu", 1, False)
        ctx_a, _ = old_pipe.encode_prompt([pair["anchor"]], "cpu", 1, False)
        pt, pa = (np.array(i) for i in zip(*pair["positions"], strict=True))
        new_mods = dict(new_pipe.unet.named_modules())
        n = 0
        for name, mod in old_pipe.unet.named_modules():
            if name.endswith("attn2"):
                for proj in ("to_k", "to_v"):
                    ours = getattr(new_mods[name], proj)(ctx_t)[0, pt].numpy()
                    ref = getattr(mod, proj)(ctx_a)[0, pa].numpy()
                    assert_close(ours, ref, rel=1e-4)
                    n += 1
    assert n == 8


@pytest.mark.parametrize("n_concepts", [1, 10, 100])
def test_many_concepts(sd, n_concepts):
    words = [
        f"{a} {b}"
        for a in ("red", "blue", "old", "tiny", "wild")
        for b in (
            "cat",
            "dog",
            "car",
            "tree",
            "house",
            "bird",
            "ship",
            "lamp",
            "road",
            "moon",
            "fish",
            "cake",
            "rock",
            "coat",
            "door",
            "lake",
            "fire",
            "rain",
            "king",
            "bell",
        )
    ]
    erased, report = erase(sd, words[:n_concepts], "thing", prompts=["{}"], form="paper")
    n = report.columns["total"]
    counts = {k: report.columns[k] for k in ("concept", "preserve", "prefix", "padding")}
    # each prompt offers BOS + 76 paired positions; BOS and a shared first word ("red ...") dedup exactly
    first_words = len({w.split()[0] for w in words[:n_concepts]})
    assert n == sum(counts.values()) == 77 * n_concepts - report.columns["duplicates_dropped"]
    assert counts["concept"] == 2 * n_concepts + first_words and counts["prefix"] == 1
    assert all(np.isfinite(e["residual_after"]) for e in report.layers)
    assert report.notes and "least squares" in report.notes[0]  # 77+ columns > d_in = 32
    for e in report.layers:
        assert e["residual_hard"] <= 1e-4, e  # the columns held exactly are held
        assert e["n_hard"] >= 1


def test_implicit_presets(sd):
    erased, report = erase(
        sd, ["nudity"], "", method="erasepro-implicit", strength="strong", prompts=["{}"], form="paper"
    )
    assert report.options["first_tokens"] == 8 and report.options["start_layer"] == 1
    _, protected = erase(sd, ["nudity"], "", method="erasepro-implicit", strength="strong", prompts=["{}"])
    assert protected.options["start_layer"] == 2  # the protected form starts at the second layer
    assert all(len(p["positions"]) == 8 for p in report.pairs)
    _, weak = erase(sd, ["nudity"], "", method="erasepro-implicit", prompts=["{}"])
    assert weak.options["start_layer"] == 2  # s=5 of 12 scaled to the tiny encoder's 3 layers
    assert not any(".layers.0." in k for k in weak.edited)
    assert weak.max_residual(field="residual_after") <= 1e-5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(targets=["cat"], anchors="cat"), "equals its anchor"),
        (dict(targets=[" "], anchors="dog"), "empty target"),
        (dict(targets=["cat " * 80], anchors="dog"), "more than max_length"),
        (dict(targets=["cat"], anchors="dog", prompts=["a photo of"]), "exactly once"),
        (dict(targets=["cat"], anchors="dog", prompts=["a photo of {}s"]), "not found"),
        (dict(targets=["cat"], anchors="dog", layers="vae"), "unknown layers 'vae'"),
        (dict(targets=["cat"], anchors="dog", method="no-such-method"), "unknown method"),
        (dict(targets=["cat"], anchors="dog", bogus=1), "unknown option"),
        (dict(targets=["cat"], anchors="dog", preserve=["cat"]), "both a target and preserved"),
    ],
)
def test_errors(sd, kwargs, message):
    with pytest.raises(EraseError, match=message):
        erase(sd, **kwargs)


def test_non_finite_raises(sd):
    bad = tiny_random_sd(0)
    layer = bad.text_encoder.encoder.layers.layer_norm1.scale
    layer.value = layer[...].at[0, 0].set(np.nan)
    with pytest.raises(EraseError, match="NaN or inf"):
        erase(bad, ["cat"], "dog", prompts=["{}"], pad_tokens=1)


def test_equal_buckets_reuse_the_compiled_program(sd):
    """Column counts pad to a multiple of ``COLUMN_BUCKET``, so these two-row erasures share one program."""
    from jax_erasepro.erase import erasepro

    _, first = erase(
        sd, ["red cat", "old tree"], "thing", prompts=["{}"], pad_tokens=3, last_token_only=False
    )
    programs = len(erasepro._COMPILED)
    _, second = erase(
        sd, ["blue", "wild horse"], "thing", prompts=["{}"], pad_tokens=3, last_token_only=False
    )
    assert first.columns["total"] != second.columns["total"]
    assert len(erasepro._COMPILED) == programs
    assert second.max_residual() <= 1e-5
