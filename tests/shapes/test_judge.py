"""The judge's plumbing (probes, halves, scoring) with an oracle (the shipped judge: test_shipped.py)."""

import collections
import dataclasses

import numpy as np
from flax import nnx

from jax_erasepro.models.vae import AutoencoderKL, AutoencoderKLConfig
from jax_erasepro.shapes import judge as jd
from jax_erasepro.shapes.labels import image_label, single_object_scenes
from jax_erasepro.shapes.render import render
from jax_erasepro.shapes.world import BACKGROUND_RGB, Obj, Scene
from jax_erasepro.tiny import TINY_VAE


def test_probes_cover_each_part_of_the_bar_from_the_test_split():
    probes = jd.quality_probes(12, seed=3)
    assert collections.Counter(p.kind for p in probes) == dict.fromkeys(jd.QUALITY_BAR_KINDS, 12)
    assert probes == jd.quality_probes(12, seed=3)
    for p in probes:
        objs = p.scene.objects
        if p.kind == "two_objects":
            assert len(objs) == 2 and not any(o.character for o in objs) and p.scene.style is None
            assert {o.position for o in objs} in ({"left", "right"}, {"top", "bottom"})
        else:
            assert len(objs) == 1
            assert (p.kind == "character") == bool(objs[0].character)
            assert (p.kind == "style") == bool(p.scene.style)
        if p.says_colour:
            assert objs[0].colour in p.prompt
        if p.says_shape:
            assert all(o.shape in p.prompt.split() for o in objs)


def test_probes_know_when_a_caption_does_not_name_the_shape():
    """Captions sometimes say "shape" for the object (world.P_GENERIC_NOUN): such probes are marked."""
    probes = jd.quality_probes(50, seed=0)
    unnamed = [p for p in probes if not p.says_shape and p.kind in ("one_object", "two_objects")]
    assert unnamed and all("shape" in p.prompt.split() for p in unnamed)


def test_keep_half_paints_the_rest_with_the_background():
    scene = Scene("beige", (Obj("star", "red", "small", "left", center=(0.27, 0.5), radius=0.11),
                            Obj("circle", "blue", "small", "right", center=(0.73, 0.5), radius=0.11)))
    image = render(scene)
    left = jd.keep_half(image, "left")
    np.testing.assert_array_equal(left[:, :32], image[:, :32])
    assert (left[:, 32:] == BACKGROUND_RGB["beige"]).all()
    right_alone = render(Scene("beige", scene.objects[1:]))
    np.testing.assert_array_equal(jd.keep_half(image, "right"), jd.keep_half(right_alone, "right"))


class Oracle:
    """A judge that reads the true label of each rendered image (one-object scenes only)."""

    def __init__(self, scenes):
        self.truth = {}
        for s in scenes:
            self.truth[render(s).tobytes()] = s
            for o in s.objects:
                if len(s.objects) == 2 and o.position in jd.HALVES:
                    self.truth[jd.keep_half(render(s), o.position).tobytes()] = Scene(s.background, (o,))

    def classify(self, images, attribute):
        known = [self.truth.get(im.tobytes()) for im in images]
        return [image_label(s, attribute) if s else "unknown" for s in known]

    def classify_half(self, images, halves, attribute):
        halved = [jd.keep_half(im, h) for im, h in zip(images, halves, strict=True)]
        return self.classify(np.stack(halved), attribute)


def test_score_is_perfect_on_the_probes_own_renders():
    probes = jd.quality_probes(6)
    images = np.stack([render(p.scene) for p in probes])
    scores = jd.score(Oracle([p.scene for p in probes]), probes, images)
    assert scores == dict.fromkeys([*jd.QUALITY_BAR, "two_objects_placed"], 1.0)
    assert jd.meets_bar(scores) and not jd.meets_bar(scores | {"style": 0.5})
    # a wrong picture is caught: shuffled images
    shuffled = jd.score(Oracle([p.scene for p in probes]), probes, images[::-1])
    assert min(shuffled.values()) < 1.0


def _swapped(scene: Scene) -> Scene:
    a, b = scene.objects
    swap = lambda o, p: dataclasses.replace(o, position=p.position, center=p.center)  # noqa: E731
    return dataclasses.replace(scene, objects=(swap(a, b), swap(b, a)))


def test_two_objects_in_swapped_halves_are_present_but_not_placed():
    """The bar asks for both objects; where they sit is reported apart (captions may not say)."""
    probes = [p for p in jd.quality_probes(8, seed=1) if p.kind == "two_objects" and p.says_shape]
    swapped = [_swapped(p.scene) for p in probes]
    images = np.stack([render(s) for s in swapped])
    scores = jd.score(Oracle(swapped), probes, images)
    assert scores["two_objects_both"] == 1.0
    same = [a.shape == b.shape for a, b in (p.scene.objects for p in probes)]
    assert scores["two_objects_placed"] == np.mean(same)
    # one object drawn twice is not both objects
    twice = [dataclasses.replace(p.scene, objects=(p.scene.objects[0], dataclasses.replace(
        p.scene.objects[1], shape=p.scene.objects[0].shape))) for p in probes]
    scores = jd.score(Oracle(twice), probes, np.stack([render(s) for s in twice]))
    assert scores["two_objects_both"] == np.mean(same) and not all(same)


def test_unnamed_shapes_are_not_scored():
    """A probe whose caption says "shape" leaves the shape rates whatever its image shows."""
    probes = [p for p in jd.quality_probes(50, seed=0) if p.kind in ("one_object", "two_objects")]
    assert not all(p.says_shape for p in probes)
    images = np.stack([render(p.scene) for p in probes])
    wrong = images.copy()
    for i, p in enumerate(probes):
        if not p.says_shape:
            wrong[i] = 0  # nothing the oracle knows
    oracle = Oracle([p.scene for p in probes])
    keys = ("one_object_shape", "two_objects_both", "two_objects_placed")
    right, spoiled = jd.score(oracle, probes, images), jd.score(oracle, probes, wrong)
    assert all(right[k] == spoiled[k] == 1.0 for k in keys)


def test_breakdown_separates_held_out_pairs():
    """Each held-out pair is its own group beside the seen pairs; spoiling one pair's images lowers only
    its group (and its shapes' group)."""
    probes = [p for p in jd.quality_probes(60, seed=0) if p.kind == "one_object"]
    images = np.stack([render(p.scene) for p in probes])
    oracle = Oracle([p.scene for p in probes])
    parts = jd.one_object_breakdown(oracle, probes, images)
    named = [p for p in probes if p.says_shape]
    pairs = {k: v for k, v in parts.items() if not k.startswith("shape: ")}
    assert sum(v["n"] for v in pairs.values()) == len(named) == sum(
        v["n"] for k, v in parts.items() if k.startswith("shape: "))
    assert len(pairs) > 2 and all(v["shape"] == 1.0 and v.get("colour", 1.0) == 1.0 for v in parts.values())
    held = next(k for k in pairs if k.startswith("held out"))
    colour, shape = held.removeprefix("held out: ").split()
    spoiled = images.copy()
    for i, p in enumerate(probes):
        if (p.scene.objects[0].colour, p.scene.objects[0].shape) == (colour, shape):
            spoiled[i] = 0
    after = jd.one_object_breakdown(oracle, probes, spoiled)
    lower = {k for k in parts if after[k]["shape"] < 1.0}
    assert lower == {held, f"shape: {shape}"} and after[held]["shape"] == 0.0


def test_style_breakdown_names_each_painter_and_what_replaced_it():
    """Each painter gets its own rate; drawing one painter's probes in another's manner lowers only its
    rate, to 0, and names the other painter."""
    probes = [p for p in jd.quality_probes(40, seed=0) if p.kind == "style"]
    scenes = [p.scene for p in probes]
    painters = sorted({s.style for s in scenes})
    victim, thief = painters[0], painters[1]
    drawn = [dataclasses.replace(s, style=thief) if s.style == victim else s for s in scenes]
    oracle = Oracle(scenes + drawn)
    right = jd.style_breakdown(oracle, probes, np.stack([render(s) for s in scenes]))
    assert set(right) == {f"style: {p}" for p in painters}
    assert sum(v["n"] for v in right.values()) == len(probes)
    assert all(v["style"] == 1.0 and "mistaken for" not in v for v in right.values())
    after = jd.style_breakdown(oracle, probes, np.stack([render(s) for s in drawn]))
    key = f"style: {victim}"
    assert after[key] == {"n": right[key]["n"], "style": 0.0, "mistaken for": thief}
    assert all(after[k] == v for k, v in right.items() if k != key)
    assert jd.style_breakdown(oracle, [], np.zeros((0, 64, 64, 3))) == {}


def test_vae_ceiling_scores_renders_and_reconstructions_apart():
    """The oracle knows every render and no reconstruction of an untrained VAE: 1 and 0 on every rate."""
    scenes = single_object_scenes(0, 12)
    vae = AutoencoderKL(AutoencoderKLConfig.from_dict(TINY_VAE), rngs=nnx.Rngs(0))
    rates = jd.vae_ceiling(vae, Oracle(scenes), n=12)
    assert set(rates["renders"]) == set(rates["reconstructions"]) >= {"shape", "colour", "style", "character"}
    assert set(rates["renders"].values()) == {1.0}
    assert set(rates["reconstructions"].values()) == {0.0}
    sizes = {s.objects[0].size for s in scenes}
    assert {k for k in rates["renders"] if k.startswith("shape_")} == {f"shape_{z}" for z in sizes}
    painters = {s.style for s in scenes} - {None}
    assert painters  # 12 scenes at P_STYLE 0.35 hold some painter (seed 0)
    assert {k for k in rates["renders"] if k.startswith("style ")} == {f"style {p}" for p in painters}
