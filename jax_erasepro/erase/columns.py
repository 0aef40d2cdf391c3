"""Feature columns of a closed-form erasure: prompts from templates, target-anchor token pairing, dedup.

Pairing rule (target and anchor built from the same template, so they share the prefix before ``{}`` and
the suffix after it): BOS and the prefix (positions ``0..c-1``) are constrained to themselves, so they do
not move. Every target position ``p`` from the concept's first token ``c`` to the end (concept tokens,
suffix, EOS, padding) pairs with anchor position ``clip(p - (n_t - n_a), c, T - 1)``, where ``n_t``/``n_a``
count the concept tokens: aligned at the END of the concept, so suffix pairs with suffix, EOS with EOS,
padding with padding; a longer target's extra leading concept tokens all pair with the anchor's first
concept token, and a shorter target's last padding positions pair with the anchor's last one.
Columns are deduplicated exactly: the text encoder is causal, so a position's features depend only on the
token ids up to it, and two columns with the same (target ids, anchor ids) prefixes are the same column.
Preservation wins conflicts: a target column with the same ids prefix as a preserved prompt's position has
the same input at every layer but another output, so it is dropped (``conflicts``); one with the same
(token, position) has the same input at the first encoder layer only (token + position embedding; CLIP pads
with EOS, so a target's shifted EOS meets a preserved prompt's padding), so it is soft there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from jax_erasepro.errors import EraseError
from jax_erasepro.tokenizer import tokenize

# Column kinds, in decreasing priority for the hard constraints when the rank runs out.
CONCEPT, PRESERVE, PREFIX, PADDING = 0, 1, 2, 3
KINDS = ("concept", "preserve", "prefix", "padding")


@dataclasses.dataclass(frozen=True)
class PromptTokens:
    """One templated prompt: its ids, where the concept starts and how many tokens it has."""

    text: str
    ids: tuple[int, ...]  # (T,) padded ids
    start: int  # position of the concept's first token (BOS + prefix tokens)
    n_concept: int
    eos: int  # position of EOS


def check_template(template: str) -> None:
    if not isinstance(template, str) or template.count("{}") != 1:
        raise EraseError(f"prompt template {template!r} must contain '{{}}' exactly once")


def prompt_tokens(tokenizer: Any, template: str, concept: str, max_length: int) -> PromptTokens:
    """Tokenize ``template`` filled with ``concept`` and locate the concept's tokens in it."""
    check_template(template)
    prefix, suffix = template.split("{}")
    text = prefix + concept + suffix
    try:
        ids = tokenize(tokenizer, [text], max_length=max_length, on_overflow="error")[0]
    except ValueError as err:
        raise EraseError(str(err)) from None
    pieces = [tokenizer(s)["input_ids"][1:-1] if s.strip() else [] for s in (prefix, concept, suffix)]
    raw = tokenizer(text)["input_ids"]
    if raw[1:-1] != pieces[0] + pieces[1] + pieces[2]:
        raise EraseError(
            f"concept {concept!r} is not found as its own tokens in prompt {text!r} (template {template!r})"
        )
    start = 1 + len(pieces[0])
    return PromptTokens(text, tuple(int(i) for i in ids), start, len(pieces[1]), len(raw) - 1)


def paired_positions(target: PromptTokens, anchor: PromptTokens, pad_tokens: int | None = None) -> list:
    """[(target position, anchor position)] from the concept start on (module docstring's rule)."""
    total = len(target.ids)
    stop = total if pad_tokens is None else min(total, target.eos + 1 + pad_tokens)
    shift = target.n_concept - anchor.n_concept
    return [(p, min(max(p - shift, target.start), total - 1)) for p in range(target.start, stop)]


@dataclasses.dataclass(frozen=True)
class Columns:
    """Feature columns: column j is position ``x_pos[j]`` of row ``x_row[j]`` of ``x_ids`` (run through the
    edited model) paired with ``y_pos[j]`` of ``y_row[j]`` of ``y_ids`` (run through the original)."""

    x_ids: np.ndarray  # (Rx, T) int32
    y_ids: np.ndarray  # (Ry, T) int32
    x_row: np.ndarray  # (N,) int32, and likewise below; ordered by decreasing priority
    x_pos: np.ndarray
    y_row: np.ndarray
    y_pos: np.ndarray
    kind: np.ndarray  # (N,) one of CONCEPT, PRESERVE, PREFIX, PADDING
    embedding_conflict: np.ndarray  # (N,) bool: same layer-0 input as a preserved column, another output
    pairs: tuple[dict[str, Any], ...]  # per target prompt: texts and paired positions (for the report)
    duplicates: int  # columns dropped as exact duplicates
    conflicts: int  # target columns dropped for a preserved column with the same ids prefix

    @property
    def n(self) -> int:
        return int(self.x_row.shape[0])

    def counts(self) -> dict[str, int]:
        return {name: int(np.sum(self.kind == k)) for k, name in enumerate(KINDS)}


class _Rows:
    def __init__(self) -> None:
        self.index: dict[tuple[int, ...], int] = {}

    def add(self, ids: tuple[int, ...]) -> int:
        return self.index.setdefault(ids, len(self.index))

    def array(self, length: int) -> np.ndarray:
        out = np.zeros((max(len(self.index), 1), length), np.int32)
        for ids, i in self.index.items():
            out[i] = ids
        return out


def build_columns(
    tokenizer: Any,
    targets: Sequence[str],
    anchors: Sequence[str],
    preserve: Sequence[str],
    templates: Sequence[str],
    *,
    max_length: int = 77,
    pad_tokens: int | None = None,
    first_tokens: int | None = None,
    last_token_only: bool = False,
) -> Columns:
    """All columns for target -> anchor pairs and preserved concepts under each template.

    ``pad_tokens`` limits the paired padding positions after each target's EOS (None: all up to T);
    ``first_tokens`` keeps only the first that many paired positions (ErasePro implicit's k);
    ``last_token_only`` drops the target's concept tokens before its last (a multi-token name's leading
    sub-words, which other words share and a causal encoder has not yet told apart).
    Priority order: target concept/suffix/EOS positions and preserved prompts' tokens, interleaved over
    prompts (so a cut-off at the rank spreads over every concept); then prefixes; then padding.
    """
    x_rows, y_rows = _Rows(), _Rows()
    entries: dict[tuple, tuple[int, int, int, int, int, int]] = {}  # key -> (rank, x_row, x_pos, ...)
    pairs, offered = [], 0

    def offer(x_ids, xp, y_ids, yp, kind, order):
        nonlocal offered
        offered += 1
        key = (x_ids[: xp + 1], y_ids[: yp + 1])
        tier = {CONCEPT: 0, PRESERVE: 0, PREFIX: 1, PADDING: 2}[kind]
        rank = (tier, order)
        old = entries.get(key)
        if old is None or rank < old[0]:
            entries[key] = (rank, x_rows.add(x_ids), xp, y_rows.add(y_ids), yp, kind)

    for template in templates:
        check_template(template)
        for target, anchor in zip(targets, anchors, strict=True):
            t = prompt_tokens(tokenizer, template, target, max_length)
            a = prompt_tokens(tokenizer, template, anchor, max_length)
            if t.ids == a.ids:
                raise EraseError(f"target {target!r} and anchor {anchor!r} tokenize to the same prompt")
            positions = paired_positions(t, a, pad_tokens)
            if last_token_only:
                positions = [(p, q) for p, q in positions if p >= t.start + t.n_concept - 1]
            if first_tokens is not None:
                positions = positions[:first_tokens]
            pairs.append({"target": t.text, "anchor": a.text, "positions": positions})
            for p in range(t.start):
                offer(t.ids, p, a.ids, p, PREFIX, p)
            for i, (p, q) in enumerate(positions):
                offer(t.ids, p, a.ids, q, CONCEPT if p <= t.eos else PADDING, i)
        for concept in preserve:
            pr = prompt_tokens(tokenizer, template, concept, max_length)
            stop = len(pr.ids) if pad_tokens is None else min(len(pr.ids), pr.eos + 1 + pad_tokens)
            for p in range(stop):
                kind = PREFIX if p < pr.start else PRESERVE if p <= pr.eos else PADDING
                offer(pr.ids, p, pr.ids, p, kind, p)
    preserved = {k[0] for k, e in entries.items() if k[0] == k[1]}  # x = y: a position held in place
    first_layer = {(ids[-1], len(ids)) for ids in preserved}
    conflicts = [k for k in entries if k[0] != k[1] and k[0] in preserved]
    for k in conflicts:
        del entries[k]
    ordered = sorted(entries.items(), key=lambda e: e[1][0])
    clash = np.array([k[0] != k[1] and (k[0][-1], len(k[0])) in first_layer for k, _ in ordered], bool)
    cols = np.array([e[1:] for _, e in ordered], np.int32).reshape(-1, 5)
    return Columns(
        x_ids=x_rows.array(max_length),
        y_ids=y_rows.array(max_length),
        x_row=cols[:, 0],
        x_pos=cols[:, 1],
        y_row=cols[:, 2],
        y_pos=cols[:, 3],
        kind=cols[:, 4],
        embedding_conflict=clash,
        pairs=tuple(pairs),
        duplicates=offered - len(ordered) - len(conflicts),
        conflicts=len(conflicts),
    )
