"""Closed-form edits as a LoRA: each edited projection's dW = W_edit - W_base, factored by an SVD.

A closed-form edit's dW has rank at most its number of constraint columns, so a few singular vectors
reproduce it. The file uses diffusers' PEFT keys (``unet.<module>.lora_A.weight``, ``lora_B.weight``,
``text_encoder.text_model.<module>...``) under diffusers' default name, with no alphas (scale 1).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jax_erasepro import safefiles
from jax_erasepro.delta import COMPONENTS, base_record, iter_tensors, resolve_edited_keys
from jax_erasepro.errors import EraseProError
from jax_erasepro.sd import StableDiffusion
from jax_erasepro.weights import param_entries

LORA_FILE = "pytorch_lora_weights.safetensors"  # what diffusers' load_lora_weights(folder) looks for
LORA_MARKER = "lora.json"
F32_ROUNDING = 2.0**-24  # float32's unit roundoff: |fl(w) - w| <= 2^-24 |w|


class LoraError(EraseProError, ValueError):
    """An edit that a LoRA cannot express (a changed bias, conv or norm), naming the tensor."""


def lora_factors(dw: np.ndarray, atol: float) -> tuple[np.ndarray, np.ndarray, float]:
    """float32 (B (out, r), A (r, in)) with the smallest r such that ||dw - B A||_F <= atol (SVD, split
    as sqrt(s) on each side); also returns the achieved error."""
    u, s, vt = np.linalg.svd(dw.astype(np.float64), full_matrices=False)
    tail = np.append(np.sqrt(np.cumsum(s[::-1] ** 2)[::-1]), 0.0)  # tail[r] = ||s[r:]||
    for r in range(int(np.argmax(tail <= atol)), len(s) + 1):
        root = np.sqrt(s[:r])
        b, a = (u[:, :r] * root).astype(np.float32), (root[:, None] * vt[:r]).astype(np.float32)
        err = float(np.linalg.norm(dw - b.astype(np.float64) @ a.astype(np.float64)))
        if err <= atol or r == len(s):
            return b, a, err
    raise AssertionError("unreachable")


def _peft_module(key: str) -> str:
    """``<component>.<diffusers key>.weight`` -> the module name diffusers' LoRA loader expects."""
    comp, rest = key.removesuffix(".weight").split(".", 1)
    return f"text_encoder.text_model.{rest}" if comp == "text_encoder" else f"{comp}.{rest}"


def _check_linear(edited: StableDiffusion, keys: Iterable[str]) -> None:
    """A LoRA holds only Linear weights: raise LoraError naming any other edited tensor."""
    leaves = {f"{c}.{key}": leaf for c in COMPONENTS for _, key, _, leaf in param_entries(getattr(edited, c))}
    for key in keys:
        if key.endswith(".bias"):
            raise LoraError(f"bias {key!r} changed: a LoRA cannot carry it (save format='delta' instead)")
        if leaves[key] != "kernel":
            raise LoraError(
                f"{key!r} changed: a LoRA holds Linear weights only (save format='delta' instead)"
            )


def write_lora(
    edited: StableDiffusion,
    base: StableDiffusion,
    root: Path,
    *,
    edited_keys: Iterable[str] | None = None,
    metadata: Mapping[str, Any] | None = None,
    rtol: float = 1e-6,
) -> None:
    """Write ``pytorch_lora_weights.safetensors`` and ``lora.json`` (ranks, errors, base checksums).

    Per module the rank is the smallest with ||dW - B A||_F <= max(rtol ||dW||_F, 2^-24 ||W_edit||_F):
    the second term is float32's own rounding of W_edit, which no export can beat.
    """
    keys = resolve_edited_keys(edited, base, edited_keys)
    _check_linear(edited, keys)
    factors: dict[str, np.ndarray] = {}
    modules: dict[str, dict[str, Any]] = {}
    for (key, w_e), (_, w_b) in zip(iter_tensors(edited, keys), iter_tensors(base, keys), strict=True):
        if w_e.ndim != 2:
            raise LoraError(
                f"{key!r} changed: a LoRA holds Linear weights only (save format='delta' instead)"
            )
        dw = w_e.astype(np.float64) - w_b.astype(np.float64)
        norm = float(np.linalg.norm(dw))
        if norm == 0.0:
            continue
        atol = max(rtol * norm, F32_ROUNDING * float(np.linalg.norm(w_e.astype(np.float64))))
        b, a, err = lora_factors(dw, atol)
        module = _peft_module(key)
        factors[f"{module}.lora_A.weight"], factors[f"{module}.lora_B.weight"] = a, b
        modules[module] = {"rank": a.shape[0], "rel_error": err / norm, "tolerance": atol / norm}
    if not modules:
        raise LoraError("the edited model equals the base: nothing to write as a LoRA")
    header = [(k, v.shape, np.dtype(np.float32)) for k, v in factors.items()]
    safefiles.write_safetensors(root / LORA_FILE, header, lambda: iter(factors.items()))
    # a LoRA adds to the base's edited weights too, so every base tensor is pinned
    record = {
        "format": "jax_erasepro.lora",
        "version": 1,
        "modules": modules,
        **base_record(base, (), metadata),
    }
    record["edited"] = keys
    safefiles.write_json(root / LORA_MARKER, record)
