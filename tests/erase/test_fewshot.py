"""Few-shot unlearning: loss and gradient against PyTorch, what trains, determinism, bad inputs, the CLI."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from jax_erasepro import surgery
from jax_erasepro.erase import EraseError, FewShotOptions, erase, get_method
from jax_erasepro.erase.fewshot import (
    OBJECT_TEMPLATES,
    batch_rows,
    concept_scenes,
    fewshot_loss,
    is_shapes_sd,
    trainable_predicate,
)
from jax_erasepro.erase.finetune import split_trainable
from jax_erasepro.erase.methods import Request
from jax_erasepro.tiny import tiny_random_sd
from jax_erasepro.tokenizer import tokenize

FAST = dict(steps=2, progress=False)


@pytest.fixture(scope="module")
def sd():
    return tiny_random_sd(seed=7)


@pytest.fixture(scope="module")
def images():
    """Three images of another size than the tiny model's 16 px."""
    return np.random.default_rng(0).integers(0, 256, (3, 20, 24, 3), dtype=np.uint8)


def test_loss_and_gradient_match_the_authors_torch_computation(sd):
    """train.py's step in PyTorch (transformers CLIP, diffusers U-Net, same weights, same x_t, t and noise):
    the loss -MSE and the gradient of every text-encoder tensor (the whole encoder trains)."""
    import torch

    from jax_erasepro.weights import to_hf_layout
    from tests.conftest import assert_close
    from tests.torch_bridge import torch_pipeline

    split = split_trainable(sd, "text_encoder", trainable_predicate("all", None))
    ids = tokenize(sd.tokenizer, [f.format("cat") for f in OBJECT_TEMPLATES[:2]], max_length=77)
    keys = jax.random.split(jax.random.key(5), 2)
    x_t, noise = (jax.random.normal(k, (2, 8, 8, 4)) for k in keys)
    t = jnp.asarray([10, 700])
    unet_def, unet_params = nnx.split(sd.unet)
    grad_fn = jax.jit(jax.value_and_grad(fewshot_loss, argnums=1), static_argnums=(0, 3))
    loss, grads = grad_fn(
        split.graphdef,
        split.trainable,
        split.rest,
        unet_def,
        unet_params,
        jnp.asarray(ids),
        x_t,
        t,
        noise,
        jnp.ones(2),
    )

    pipe = torch_pipeline(sd)
    text_encoder, unet = pipe.text_encoder, pipe.unet
    for p in unet.parameters():
        p.requires_grad_(False)
    to_torch = lambda a: torch.from_numpy(np.asarray(a).transpose(0, 3, 1, 2).copy())  # noqa: E731
    embedding = text_encoder(torch.from_numpy(np.asarray(ids, np.int64)))[0]
    model_pred = unet(to_torch(x_t), torch.from_numpy(np.array(t)), embedding).sample
    ref = -torch.nn.functional.mse_loss(model_pred.float(), to_torch(noise).float(), reduction="mean")
    ref.backward()
    assert_close(float(loss), ref.item())

    params = dict(text_encoder.named_parameters())
    table = surgery.entries(sd, ["text_encoder"])
    flat = dict(nnx.to_flat_state(grads))
    assert {f"text_encoder.{n}" for n in params} == set(split.keys)
    wants = {key: params[key.split(".", 1)[1]].grad.numpy() for key in split.keys}
    largest = max(float(np.abs(w).max()) for w in wants.values())
    for key, want in wants.items():
        e = table[key]
        g = np.asarray(flat[e.path][...])
        got = to_hf_layout(e.leaf, g if e.layer is None else g[e.layer])
        # relative to the tensor's largest gradient entry; k_proj's bias has none (softmax ignores a shift
        # common to a query's logits: both gradients are rounding noise), so relative to the largest overall
        zero = key.endswith("k_proj.bias")
        assert np.abs(got - want).max() <= 1e-4 * (largest if zero else np.abs(want).max()), key
        assert not zero or np.abs(want).max() <= 1e-6 * largest, key


def test_only_the_text_encoder_changes_one_seed_gives_identical_weights(sd, images):
    before = surgery.read(sd, surgery.select(sd, "*"))
    a, ra = erase(sd, "cat", "dog", method="fewshot", images=images, **FAST)
    b, rb = erase(sd, "cat", "dog", method="fewshot", images=images, **FAST)
    after_a = surgery.read(a, surgery.select(a, "*"))
    after_b = surgery.read(b, surgery.select(b, "*"))
    for key, w in before.items():
        np.testing.assert_array_equal(surgery.read(sd, [key])[key], w, err_msg=key)  # the source untouched
        np.testing.assert_array_equal(after_a[key], after_b[key], err_msg=key)
        if not key.startswith("text_encoder."):
            np.testing.assert_array_equal(after_a[key], w, err_msg=key)
    changed = {k for k in before if not np.array_equal(after_a[k], before[k])}
    assert changed == set(ra.edited) == set(surgery.select(sd, "text_encoder.*"))
    assert ra.training["loss"] == rb.training["loss"] and len(ra.training["loss"]) == 2
    assert all(x < 0 for x in ra.training["loss"])  # -MSE, the minimised objective
    assert any("anchors are not used (given: ['dog'])" in n for n in ra.notes)
    assert any("resized 3 image(s) from 24x20 to the model's 16x16" in n for n in ra.notes)
    assert ra.options["images"] is None and ra.options["images_n"] == 3
    ra.to_json("/dev/null")


def test_a_resumed_run_equals_an_unbroken_one_and_epochs_set_the_steps(sd, images, tmp_path):
    """Reuses the step compiled above: the default steps are 4 epochs x ceil(3 / 2) = 8; a run stopped at 3
    and resumed to 5 from its checkpoint ends on the weights of an unbroken 5-step run."""
    kw = dict(method="fewshot", images=images, progress=False)
    full, r_full = erase(sd, "cat", "", steps=5, **kw)
    erase(sd, "cat", "", steps=3, checkpoint_dir=str(tmp_path / "ck"), checkpoint_every=1, **kw)
    resumed, r_res = erase(sd, "cat", "", steps=5, checkpoint_dir=str(tmp_path / "ck"), **kw)
    assert r_res.training["loss"] == r_full.training["loss"]
    keys = surgery.select(sd, "text_encoder.*")
    want = surgery.read(full, keys)
    for k, v in surgery.read(resumed, keys).items():
        np.testing.assert_array_equal(v, want[k], err_msg=k)
    _, r_default = erase(sd, "cat", "", **kw)
    assert r_default.training["steps_run"] == 8 and r_default.options["steps"] == 8


def test_each_epoch_visits_every_image_once():
    for n, batch in ((4, 2), (5, 2), (1, 2), (3, 3)):
        per_epoch = -(-n // batch)
        for epoch in range(3):
            seen = []
            for pos in range(per_epoch):
                rows, weights = batch_rows(jax.random.key(0), jnp.int32(epoch * per_epoch + pos), n, batch)
                seen += [int(r) for r, w in zip(rows, weights, strict=True) if w == 1]
            assert sorted(seen) == list(range(n)), (n, batch, epoch)


def test_trainable_sets_and_patterns(sd):
    keys = surgery.select(sd, "text_encoder.*")
    pick = lambda train, pattern=None: {k for k in keys if trainable_predicate(train, pattern)(k)}  # noqa: E731
    assert pick("token-embedding") == {"text_encoder.embeddings.token_embedding.weight"}
    assert pick("mlp") and all(".mlp.fc" in k for k in pick("mlp"))
    assert pick("mlp-attention") == pick("mlp") | pick("attention")
    assert pick("all", "encoder.layers.*.mlp.*") == pick("mlp")
    assert pick("all", "text_encoder.final_layer_norm.*") == {
        "text_encoder.final_layer_norm.bias",
        "text_encoder.final_layer_norm.weight",
    }


@pytest.mark.parametrize(
    "values, message",
    [
        ({"steps": 0}, "steps must be >= 1, got 0"),
        ({"epochs": 0}, "epochs must be >= 1, got 0"),
        ({"batch_size": "0"}, "batch_size must be >= 1"),
        ({"lr": -1e-5}, "lr must be > 0"),
        ({"beta2": 1.0}, "beta2 must be in \\[0, 1\\)"),
        ({"train": "unet"}, "unknown train 'unet' \\(choose from all, token-embedding"),
        ({"captions": "random"}, "unknown captions 'random'"),
        ({"pattern": " "}, "pattern is empty"),
        ({"images": "{tmp}/missing"}, "images '{tmp}/missing': no such folder"),
        ({"images": "{tmp}/empty"}, "images '{tmp}/empty': the folder holds no .png, .jpg or .jpeg image"),
        ({"images": "{tmp}/notes.txt"}, "images '{tmp}/notes.txt': not a folder"),
        ({"images": np.zeros((2, 8, 8, 3), np.float32)}, "images must be uint8 \\(N, H, W, 3\\)"),
        ({"images": np.zeros((0, 8, 8, 3), np.uint8)}, "images must be uint8 \\(N, H, W, 3\\) with N >= 1"),
        ({"images": 3.5}, "option images: expected str \\| ndarray \\| none, got 3.5"),
    ],
)
def test_bad_options_are_one_line(values, message, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no image")
    (tmp_path / "notes.txt").write_text("no image")
    values = {k: v.replace("{tmp}", str(tmp_path)) if isinstance(v, str) else v for k, v in values.items()}
    with pytest.raises(EraseError, match=message.replace("{tmp}", str(tmp_path))) as info:
        get_method("fewshot").make_options(values)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "targets, options, message",
    [
        ("cat", {}, "fewshot needs images of the concept: give images="),
        ("cat", {"images": "ARRAY", "pattern": "encoder.layers.9.*"}, "no parameter of the text_encoder"),
        ("cat", {"images": "ARRAY", "pattern": "encoder.layers.0.*"}, "selects 1 of the 3 stacked layers"),
        (["cat", "dog"], {"images": "ARRAY"}, "fewshot erases one target per run when images are given"),
    ],
)
def test_bad_requests_are_one_line_before_any_work(sd, images, targets, options, message, monkeypatch):
    from jax_erasepro.erase import fewshot

    def no_work(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(fewshot.finetune, "train", no_work)
    options = {k: images if v == "ARRAY" else v for k, v in options.items()}
    with pytest.raises(EraseError, match=message) as info:
        erase(sd, targets, "", method="fewshot", progress=False, **options)
    assert "\n" not in str(info.value)


def test_a_folder_of_images_is_read_and_resized(sd, tmp_path, monkeypatch):
    from jax_erasepro.erase import fewshot

    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    Image.new("RGB", (16, 16), "blue").save(tmp_path / "b.JPG")
    (tmp_path / "c.txt").write_text("skipped")
    opts = {"images": str(tmp_path), "seed": 0, "n_images": 4}
    request = Request(("cat",), ("",))
    out, owner, notes = fewshot.source_images(sd, request, opts, 16)
    assert out.shape == (2, 16, 16, 3) and out.dtype == np.uint8 and list(owner) == [0, 0]
    assert tuple(out[0, 8, 8]) == (255, 0, 0)
    assert "resized 1 image(s) from 32x32 to the model's 16x16 (bicubic, no crop)" in notes


@pytest.mark.parametrize("concept", ["zorbly", "star", "Ilse Varnhold", "stripes", "blue"])
def test_shapes_sd_renders_scenes_of_the_concept(concept):
    from jax_erasepro.shapes.render import render

    scenes = concept_scenes(concept, 4, seed=0)
    assert len(scenes) == 4
    for s in scenes:
        (o,) = s.objects
        assert concept in (o.character, o.shape, o.colour, s.style, "stripes" if o.has_stripes else None)
        assert render(s).shape == (64, 64, 3)
    with pytest.raises(EraseError, match="'cat' is not a concept of shapes-sd's world"):
        concept_scenes("cat", 4, seed=0)


def test_only_shapes_sd_renders_its_own_images(sd):
    assert not is_shapes_sd(sd)
    assert FewShotOptions().images is None


def test_cli_lists_the_options_and_checks_the_images_before_loading(tmp_path, capsys, monkeypatch):
    from jax_erasepro import cli

    assert cli.main(["methods", "fewshot"]) == 0
    out = capsys.readouterr().out
    for row in get_method("fewshot").describe():
        assert f"  {row['name']} (" in out
    assert "Few-shot Unlearning" in out

    def load_model(path):
        raise AssertionError("loaded a model")

    monkeypatch.setattr(cli, "load_model", load_model)
    argv = ["erase", "--target", "zorbly", "--anchor", "", "--method", "fewshot"]
    argv += ["--option", f"images={tmp_path / 'missing'}", "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "no such folder" in err[-1]
    assert list(tmp_path.iterdir()) == []
