"""CLIP tokenization as diffusers' SD pipeline does it: pad to ``max_length``, truncate over-long prompts.

Generation truncates with a warning (diffusers' behaviour); erasure asks for an error instead, since a
concept silently cut off the end of a prompt would be erased wrongly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np

# transformers warns on import that PyTorch is missing; we use only its tokenizers, which need no torch
logging.getLogger("transformers").addFilter(lambda record: "PyTorch was not found" not in record.getMessage())
from transformers import CLIPTokenizer  # noqa: E402

from jax_erasepro.errors import LoadError  # noqa: E402
from jax_erasepro.models.config import read_json_object  # noqa: E402

# The JSON files a tokenizer folder may hold; each is checked first, so a broken one is named.
JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json")


def clip_tokenizer_path() -> Path:
    """SD v1.x's tokenizer (openai/clip-vit-large-patch14's CLIP BPE), shipped inside the package."""
    return Path(str(resources.files("jax_erasepro") / "assets" / "clip_tokenizer"))


def load_tokenizer(path: str | Path) -> CLIPTokenizer:
    """A CLIP tokenizer from SD's ``tokenizer/`` folder: ``vocab.json`` + ``merges.txt`` (the files SD
    ships), or the ``tokenizer.json`` that transformers 5 writes. A broken file is one LoadError naming it."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        for name in ("vocab.json", "merges.txt"):
            if not (path / name).is_file():
                raise FileNotFoundError(f"missing tokenizer file: {path / name}")
    for name in JSON_FILES:
        if (path / name).is_file():
            read_json_object(path / name)
    if (path / "merges.txt").is_file():
        try:
            (path / "merges.txt").read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise LoadError(f"{path / 'merges.txt'}: not UTF-8 text (byte {e.start})") from None
    try:
        return CLIPTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers and tokenizers raise many types on a bad file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoadError(f"{path}: cannot read the tokenizer ({first})") from None


def tokenizer_fingerprint(tokenizer: CLIPTokenizer) -> str:
    """A hash of what decides a tokenizer's ids (vocabulary and special tokens), so a file can say which
    tokenizer its model needs without carrying it."""
    names = ("bos_token", "eos_token", "pad_token", "unk_token")
    special = {k: str(getattr(tokenizer, k, None)) for k in names}
    blob = {"vocab": sorted(tokenizer.get_vocab().items()), "special": special}
    return hashlib.sha256(json.dumps(blob, separators=(",", ":")).encode()).hexdigest()


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
