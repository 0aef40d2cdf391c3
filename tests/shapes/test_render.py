"""The shapes rasterizer: byte-exact seeded batches, true colours, visible styles, faces and stripes."""

import numpy as np
import pytest

from jax_erasepro.shapes import (
    BACKGROUNDS,
    CHARACTER_LOOK,
    COLOURS,
    SHAPES,
    STYLES,
    Labels,
    Obj,
    Scene,
    make_batch,
    make_scenes,
    render,
)
from jax_erasepro.shapes.world import BACKGROUND_RGB, COLOUR_RGB, SIZE_RADIUS, STYLE_MANNER


def _obj(shape="circle", colour="red", size="big", texture="plain", character=None, center=(0.5, 0.5)):
    return Obj(shape, colour, size, "center", texture, character, center=center, radius=SIZE_RADIUS[size])


def _object_pixels(img: np.ndarray, background: str) -> np.ndarray:
    """Pixels that differ from the background."""
    return np.abs(img.astype(int) - BACKGROUND_RGB[background]).max(-1) > 0


def _interior(mask: np.ndarray) -> np.ndarray:
    """The mask eroded by one pixel (4-neighbourhood): pixels wholly inside the object."""
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return inner


def test_batches_are_byte_identical_per_seed():
    a, caps_a, labels_a = make_batch(11, 48)
    b, caps_b, _ = make_batch(11, 48)
    assert a.dtype == np.uint8 and a.shape == (48, 64, 64, 3)
    assert a.tobytes() == b.tobytes() and caps_a == caps_b
    c, caps_c, _ = make_batch(12, 48)
    assert a.tobytes() != c.tobytes() and caps_a != caps_c
    assert make_batch(11, 48, "test")[0].tobytes() != a.tobytes()
    assert make_batch(11, 8)[0].tobytes() == a[:8].tobytes()  # a batch is a prefix of a longer one
    np.testing.assert_array_equal(labels_a.shape, Labels.from_scenes(make_scenes(11, 48)[0]).shape)
    assert len({img.tobytes() for img in a}) == len(a)


@pytest.mark.parametrize("shape", SHAPES)
def test_plain_objects_have_their_colour(shape):
    for colour in COLOURS:
        contrast = {b: np.abs(np.subtract(COLOUR_RGB[colour], BACKGROUND_RGB[b])).max() for b in BACKGROUNDS}
        background = max(contrast, key=contrast.get)
        img = render(Scene(background, (_obj(shape, colour),)))
        mask = _object_pixels(img, background)
        inner = _interior(mask)
        assert 150 < mask.sum() < 64 * 64 / 2, (shape, colour, mask.sum())
        assert inner.sum() > 30
        np.testing.assert_allclose(
            img[inner].mean(0), COLOUR_RGB[colour], atol=5, err_msg=f"{shape} {colour}"
        )
        np.testing.assert_allclose(np.median(img[inner], 0), COLOUR_RGB[colour], atol=1)
        ys, xs = np.nonzero(mask)  # centred where it was put
        assert abs(xs.mean() - 31.5) < 6 and abs(ys.mean() - 31.5) < 6, shape


def test_small_and_big_and_positions():
    small = _object_pixels(render(Scene("white", (_obj(size="small"),))), "white").sum()
    big = _object_pixels(render(Scene("white", (_obj(size="big"),))), "white").sum()
    assert 3 * small < big
    left = _object_pixels(render(Scene("white", (_obj(center=(0.27, 0.5)),))), "white")
    assert np.nonzero(left)[1].mean() < 24


def test_stripes_show_two_tones():
    for colour in COLOURS:
        plain = render(Scene("gray", (_obj("square", colour),)))
        striped = render(Scene("gray", (_obj("square", colour, texture="stripes"),)))
        inner = _interior(_object_pixels(plain, "gray"))
        assert plain[inner].astype(float).std(0).max() < 1
        assert striped[inner].astype(float).std(0).max() > 25, colour


def test_characters_have_faces():
    for name, (shape, colour, texture) in CHARACTER_LOOK.items():
        face = render(Scene("gray", (_obj(shape, colour, texture=texture, character=name),)))
        plain = render(Scene("gray", (_obj(shape, colour, texture=texture),)))
        white_eyes = (face.min(-1) > 240) & (plain.min(-1) <= 240)
        assert white_eyes.sum() >= 4, name


def test_every_style_is_distinct():
    scene = (_obj("heart", "blue"),)
    images = [render(Scene("white", scene, style)) for style in (None, *STYLES)]
    for i in range(len(images)):
        for j in range(i):
            diff = np.abs(images[i].astype(int) - images[j]).mean()
            assert diff > 2, (([None, *STYLES])[i], ([None, *STYLES])[j], diff)


@pytest.mark.parametrize(("background", "darker"), [("white", True), ("black", False)])
def test_shadow_falls_down_right_and_shows_on_black(background, darker):
    """The "shadow" painter adds a silhouette-shaped patch below and right of the object, dark (light on
    black), and leaves the object itself as it was."""
    painter = next(p for p, m in STYLE_MANNER.items() if m == "shadow")
    scene = (_obj("square", "blue", size="medium"),)
    plain = render(Scene(background, scene)).astype(int)
    shaded = render(Scene(background, scene, painter)).astype(int)
    obj = _object_pixels(plain, background)
    added = (np.abs(shaded - plain).max(-1) > 30) & ~obj
    assert added.sum() > 20
    (oy, ox), (ay, ax) = np.nonzero(obj), np.nonzero(added)
    assert ay.mean() > oy.mean() and ax.mean() > ox.mean()
    assert (shaded[added].mean() < plain[added].mean()) == darker
    inner = obj.copy()  # the object eroded by one pixel: away from its anti-aliased outline
    for axis in (0, 1):
        for shift in (1, -1):
            inner &= np.roll(obj, shift, axis)
    np.testing.assert_array_equal(shaded[inner], plain[inner])


def test_two_objects_do_not_overlap():
    scenes, _ = make_scenes(2, 400)
    pairs = [s for s in scenes if len(s.objects) == 2 and s.style is None]
    assert len(pairs) > 50
    for s in pairs:
        a, b = (_object_pixels(render(Scene(s.background, (o,))), s.background) for o in s.objects)
        assert not (a & b).any(), s
