"""CLIP tokenization as diffusers' SD pipeline does it: pad to ``max_length``, truncate over-long prompts.

Generation truncates with a warning (diffusers' behaviour); erasure asks for an error instead, since a
concept silently cut off the end of a prompt would be erased wrongly.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# transformers warns on import that PyTorch is missing; we use only its tokenizers, which need no torch
logging.getLogger("transformers").addFilter(lambda record: "PyTorch was not found" not in record.getMessage())
from transformers import CLIPTokenizer  # noqa: E402


def load_tokenizer(path: str | Path) -> CLIPTokenizer:
    """A CLIP tokenizer from SD's ``tokenizer/`` folder: ``vocab.json`` + ``merges.txt`` (the files SD
    ships), or the ``tokenizer.json`` that transformers 5 writes."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        for name in ("vocab.json", "merges.txt"):
            if not (path / name).is_file():
                raise FileNotFoundError(f"missing tokenizer file: {path / name}")
    return CLIPTokenizer.from_pretrained(str(path))


def tokenize(
    tokenizer: CLIPTokenizer,
    prompts: Sequence[str],
    *,
    max_length: int = 77,
    on_overflow: str = "warn",
) -> np.ndarray:
    """Prompts -> (B, max_length) int32 ids: BOS, tokens, EOS, then the tokenizer's pad id.

    A prompt longer than ``max_length`` tokens (BOS/EOS included) is truncated with a warning
    (``on_overflow="warn"``) or raises ValueError (``"error"``); either way the message names it.
    """
    if on_overflow not in ("warn", "error"):
        raise ValueError(f"on_overflow must be 'warn' or 'error', not {on_overflow!r}")
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, not one string")
    prompts = list(prompts)
    if not prompts:
        return np.zeros((0, max_length), np.int32)
    for prompt, ids in zip(prompts, tokenizer(prompts, verbose=False)["input_ids"], strict=True):
        if len(ids) > max_length:
            msg = f"prompt {prompt!r} has {len(ids)} tokens, more than max_length={max_length}"
            if on_overflow == "error":
                raise ValueError(msg)
            warnings.warn(f"{msg}; truncated", stacklevel=2)
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True)["input_ids"]
    return np.asarray(ids, np.int32).reshape(len(prompts), max_length)
