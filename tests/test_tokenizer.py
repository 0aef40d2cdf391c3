"""Tokenization with SD v1.4's real CLIP tokenizer: ids, padding, and the two overflow policies."""

import warnings

import numpy as np
import pytest

from jax_erasepro.tokenizer import load_tokenizer, tokenize
from tests.conftest import SD14

BOS, EOS = 49406, 49407


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(SD14 / "tokenizer")


def test_cat_prompt_ids_and_padding(tok):
    ids = tokenize(tok, ["a photo of a cat", "a dog"])
    assert ids.dtype == np.int32 and ids.shape == (2, 77)
    assert tok.pad_token_id == EOS  # SD v1.4's tokenizer pads with <|endoftext|>
    np.testing.assert_array_equal(ids[0], [BOS, 320, 1125, 539, 320, 2368] + [EOS] * 71)
    np.testing.assert_array_equal(ids[1, :3], [BOS, 320, 1929])
    assert (ids[1, 3:] == EOS).all()


def test_custom_max_length_and_empty_batch(tok):
    assert tokenize(tok, ["a cat"], max_length=8).tolist() == [[BOS, 320, 2368] + [EOS] * 5]
    assert tokenize(tok, []).shape == (0, 77)


def test_exactly_max_length_is_not_an_overflow(tok):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = tokenize(tok, ["cat " * 75], on_overflow="error")
    np.testing.assert_array_equal(ids[0], [BOS] + [2368] * 75 + [EOS])


def test_overflow_warns_and_truncates(tok):
    prompt = "cat " * 80
    with pytest.warns(UserWarning, match="'cat cat.*' has 82 tokens"):
        ids = tokenize(tok, ["a cat", prompt])
    np.testing.assert_array_equal(ids[1], [BOS] + [2368] * 75 + [EOS])
    assert ids[0, :3].tolist() == [BOS, 320, 2368]


def test_overflow_error_names_the_prompt(tok):
    with pytest.raises(ValueError, match="'dog dog.*' has 102 tokens"):
        tokenize(tok, ["a cat", "dog " * 100], on_overflow="error")


def test_bad_arguments(tok, tmp_path):
    with pytest.raises(ValueError, match="on_overflow"):
        tokenize(tok, ["a cat"], on_overflow="ignore")
    with pytest.raises(TypeError, match="sequence of strings"):
        tokenize(tok, "a cat")
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        load_tokenizer(tmp_path)
