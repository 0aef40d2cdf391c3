"""The shapes world: vocabulary, seeded sampling, captions that tell the truth, the held-out split."""

import re
from pathlib import Path

import numpy as np
import pytest
from transformers import CLIPTokenizer

from jax_erasepro.shapes import (
    ANCHORS,
    BACKGROUNDS,
    CHARACTER_LOOK,
    CHARACTERS,
    COLOURS,
    CONCEPTS,
    HELD_OUT_PAIRS,
    HELD_OUT_TEMPLATES,
    POSITIONS,
    SHAPES,
    SIZES,
    STYLES,
    TEMPLATES,
    Labels,
    caption,
    is_held_out,
    judge_prompts,
    make_scenes,
    sample_scene,
)
from jax_erasepro.shapes.world import POSITION_WORDS, RELATION_WORDS

TOKENIZER = Path(__file__).parents[1] / "data" / "sd-v1-4" / "tokenizer"
N = 3000

_OBJECT = re.compile(
    r"\b(?:(?P<character>{chars})|an? (?:(?P<size>small|big) )?(?P<striped>striped )?"
    r"(?:(?P<colour>{colours}) )?(?P<shape>{shapes}|shape))\b".format(
        chars="|".join(CHARACTERS), colours="|".join(COLOURS), shapes="|".join(SHAPES)
    )
)


@pytest.fixture(scope="module")
def train():
    return make_scenes(0, N, "train")


@pytest.fixture(scope="module")
def test():
    return make_scenes(0, N // 3, "test")


def _template_regex(name: str) -> re.Pattern:
    """A template as a regex: fixed words literal, slots wildcards."""
    parts = re.split(r"\{\w+\}", TEMPLATES[name])
    return re.compile("^" + "(.+)".join(map(re.escape, parts)) + "$")


def test_vocabulary():
    assert len(SHAPES) >= 8 and len(COLOURS) >= 8 and len(STYLES) >= 4 and len(CHARACTERS) >= 4
    assert CONCEPTS["implicit"] == ("stripes",)
    vocab_words = set(SHAPES) | set(COLOURS) | set(BACKGROUNDS) | set(SIZES) | {"striped", "shape"}
    for painter in STYLES:  # painter names must not be mistaken for other concept words
        assert not {w.lower() for w in painter.split()} & vocab_words
    for name, (shape, colour, texture) in CHARACTER_LOOK.items():
        assert shape in SHAPES and colour in COLOURS and texture in ("plain", "stripes")
        assert not is_held_out(shape, colour), name
        assert ANCHORS[name] == shape
    assert any(t == "stripes" for _, _, t in CHARACTER_LOOK.values())
    assert all(ANCHORS[p] == "" for p in STYLES) and ANCHORS["stripes"] == ""


def test_sampling_is_deterministic():
    a = [sample_scene(np.random.default_rng(5)) for _ in range(2)]
    assert a[0] == a[1]
    assert caption(a[0], np.random.default_rng(1)) == caption(a[1], np.random.default_rng(1))
    assert make_scenes(3, 50) == make_scenes(3, 50)
    assert make_scenes(3, 50) != make_scenes(4, 50)
    assert make_scenes(3, 20)[1] == make_scenes(3, 50)[1][:20]


def test_bad_split_raises():
    with pytest.raises(ValueError, match="split"):
        sample_scene(np.random.default_rng(0), "val")


@pytest.mark.parametrize("split", ["train", "test"])
def test_captions_match_scenes(split, train, test):
    scenes, captions = train if split == "train" else test
    for scene, text in zip(scenes, captions, strict=True):
        found = list(_OBJECT.finditer(text))
        assert len(found) == len(scene.objects), text
        for m, o in zip(found, scene.objects, strict=True):
            if o.character:
                assert m["character"] == o.character, text
                continue
            assert m["shape"] in (o.shape, "shape"), text
            assert m["colour"] in (None, o.colour), text
            assert m["size"] in (None, o.size), text
            assert bool(m["striped"]) == o.has_stripes, text
        said = re.findall("|".join(POSITION_WORDS.values()), text)
        assert said == [POSITION_WORDS[o.position] for o in scene.objects][: len(said)], text
        for position, words in RELATION_WORDS.items():
            if f" {words} " in text:
                assert scene.objects[0].position == position, text
        for name in re.findall(r"on an? (\w+) background", text):
            assert name == scene.background, text
        painters = [p for p in STYLES if p in text]
        assert painters == ([scene.style] if scene.style else []), text
        if scene.style:
            assert text.endswith(f"in the style of {scene.style}") or text.endswith(f"by {scene.style}"), text
        assert any(_template_regex(name).match(text) for name in TEMPLATES), text


def test_every_concept_appears(train):
    scenes, captions = train
    labels = Labels.from_scenes(scenes)
    for key, vocab in [
        ("shape", SHAPES),
        ("colour", COLOURS),
        ("size", SIZES),
        ("position", POSITIONS),
        ("character", CHARACTERS),
        ("style", STYLES),
        ("background", BACKGROUNDS),
    ]:
        assert set(np.unique(getattr(labels, key))) >= set(range(len(vocab))), key
    assert labels.stripes.any() and (labels.n_objects == 2).any() and (labels.n_objects == 1).any()
    text = " ".join(captions)
    for word in SHAPES + COLOURS + STYLES + CHARACTERS + ("striped",):
        assert re.search(rf"\b{word}\b", text), word


def test_labels_match_scenes(train):
    scenes = train[0][:200]
    labels = Labels.from_scenes(scenes)
    for i, scene in enumerate(scenes):
        assert labels.n_objects[i] == len(scene.objects)
        assert labels.style[i] == (STYLES.index(scene.style) if scene.style else -1)
        assert BACKGROUNDS[labels.background[i]] == scene.background
        for j, o in enumerate(scene.objects):
            assert (SHAPES[labels.shape[i, j]], COLOURS[labels.colour[i, j]]) == (o.shape, o.colour)
            assert labels.stripes[i, j] == o.has_stripes
            assert labels.character[i, j] == (CHARACTERS.index(o.character) if o.character else -1)
        assert (labels.shape[i, len(scene.objects) :] == -1).all()


def test_implicit_stripes_are_never_named(train):
    implied = 0
    for scene, text in zip(*train, strict=True):
        striped_plain = [o for o in scene.objects if o.has_stripes and not o.character]
        assert ("striped" in text) == bool(striped_plain), text
        if any(o.has_stripes for o in scene.objects) and "stripe" not in text:
            implied += 1
    assert implied > 50  # prompts that imply stripes without the word: the implicit-erasure test set


def test_held_out_split(train, test):
    held_templates = [_template_regex(n) for n in HELD_OUT_TEMPLATES]
    for scene, text in zip(*train, strict=True):
        assert not any(is_held_out(o.shape, o.colour) for o in scene.objects), text
        assert not any(t.match(text) for t in held_templates), text
    scenes, captions = test
    pairs = {(o.shape, o.colour) for s in scenes for o in s.objects}
    assert pairs >= HELD_OUT_PAIRS
    for t in held_templates:
        assert any(t.match(text) for text in captions)


def test_captions_fit_the_clip_context():
    tok = CLIPTokenizer.from_pretrained(TOKENIZER)
    captions = make_scenes(1, 1500, "train")[1] + make_scenes(1, 500, "test")[1]
    prompts = [
        p
        for a in ("shape", "colour", "background", "style", "character", "stripes")
        for p in judge_prompts(a).values()
    ]
    lengths = [len(ids) for ids in tok(captions + prompts)["input_ids"]]  # with start and end tokens
    assert max(lengths) <= 77
    for word in SHAPES + COLOURS:  # plain English words: one token each
        assert len(tok.tokenize(word)) == 1, word
    for name in CHARACTERS:  # invented names: several tokens each, like real proper names
        assert len(tok.tokenize(name)) >= 2, name


def test_judge_prompts():
    assert list(judge_prompts("shape")) == list(SHAPES)
    assert list(judge_prompts("colour")) == list(COLOURS)
    assert list(judge_prompts("background")) == list(BACKGROUNDS)
    assert list(judge_prompts("style")) == ["none", *STYLES]
    assert list(judge_prompts("character")) == ["none", *CHARACTERS]
    assert judge_prompts("implicit") == judge_prompts("stripes")
    assert set(judge_prompts("stripes")) == {"plain", "stripes"}
    with pytest.raises(ValueError, match="unknown attribute"):
        judge_prompts("texture")


def test_the_model_card_lists_the_whole_vocabulary():
    """A user finds every concept of the world in MODEL_CARD.md's vocabulary table, not only in world.py."""
    from pathlib import Path

    import jax_erasepro.shapes as shapes_pkg
    from jax_erasepro.shapes import world as w

    card = (Path(shapes_pkg.__file__).parent / "MODEL_CARD.md").read_text()
    table = card.split("## Vocabulary", 1)[1].split("\n## ", 1)[0]
    for word in (*w.SHAPES, *w.COLOURS, *w.CHARACTERS, *w.STYLES, *w.IMPLICIT, *w.STYLE_MANNER.values()):
        assert word in table, word
