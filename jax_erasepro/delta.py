"""Delta checkpoints: only the tensors an edit changed, plus checksums that pin the base they apply to.

A delta folder holds ``delta.safetensors`` (changed tensors, ``<component>.<diffusers key>``, in memory
dtype) and ``delta.json`` (base model, method, the edited keys, and a SHA-256 of every untouched base tensor).
``apply_delta`` refuses a base whose untouched tensors do not hash to the recorded values.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from jax_erasepro import safefiles, surgery
from jax_erasepro.errors import LoadError
from jax_erasepro.loading import DELTA_MARKER, SafetensorsReader
from jax_erasepro.models.config import ConfigError, read_json_object
from jax_erasepro.sd import StableDiffusion
from jax_erasepro.weights import (
    WeightsError,
    iter_state_dict,
    param_entries,
    state_dict_shapes,
)

COMPONENTS = ("text_encoder", "unet", "vae")
DELTA_FILE = "delta.safetensors"
CHECKSUM = "sha256 of the float32 little-endian C-order bytes in PyTorch layout, shape-prefixed"


class DeltaError(LoadError):
    """A delta does not fit the model it is applied to (names the key)."""


def tensor_checksum(arr: np.ndarray) -> str:
    """A dtype-independent hash of a tensor's values: fp16 and fp32 copies of the same values agree."""
    arr = np.ascontiguousarray(np.asarray(arr), dtype="<f4")
    h = hashlib.sha256(repr(arr.shape).encode())
    h.update(memoryview(arr.reshape(-1)).cast("B"))
    return h.hexdigest()


def iter_tensors(sd: StableDiffusion, keys: Iterable[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (``<component>.<key>``, PyTorch-layout array) for every param of ``sd`` (or only ``keys``)."""
    wanted = None if keys is None else set(keys)
    for comp in COMPONENTS:
        sub = None if wanted is None else {k.split(".", 1)[1] for k in wanted if k.startswith(comp + ".")}
        if sub == set():
            continue
        for key, arr in iter_state_dict(getattr(sd, comp), keys=sub):
            yield f"{comp}.{key}", arr


def _check_same_architecture(a: StableDiffusion, b: StableDiffusion) -> None:
    for comp in COMPONENTS:
        if getattr(a.config, comp) != getattr(b.config, comp):
            raise DeltaError(f"the edited model and the base differ in their {comp} config")


def changed_keys(edited: StableDiffusion, base: StableDiffusion) -> list[str]:
    """``<component>.<key>`` of every tensor whose values differ between ``edited`` and ``base`` (exactly)."""
    _check_same_architecture(edited, base)
    out = []
    for comp in COMPONENTS:
        ma, mb = getattr(edited, comp), getattr(base, comp)
        fa = dict(nnx.to_flat_state(nnx.state(ma, nnx.Param)))
        fb = dict(nnx.to_flat_state(nnx.state(mb, nnx.Param)))
        for path, key, i, _ in param_entries(ma):
            a, b = np.asarray(fa[path][...]), np.asarray(fb[path][...])
            if i is not None:
                a, b = a[i], b[i]
            if not np.array_equal(a, b):
                out.append(f"{comp}.{key}")
    return out


def resolve_edited_keys(
    edited: StableDiffusion, base: StableDiffusion, keys: Iterable[str] | None
) -> list[str]:
    """The explicit ``keys`` (checked to exist) or, when None, the exactly-changed tensors."""
    if keys is None:
        return changed_keys(edited, base)
    _check_same_architecture(edited, base)
    keys = sorted(set(keys))
    known = {f"{comp}.{k}" for comp in COMPONENTS for k in state_dict_shapes(getattr(edited, comp))}
    for key in keys:
        if key not in known:
            raise DeltaError(
                f"edited key {key!r} is not a tensor of the model (expected '<component>.<key>')"
            )
    return keys


def base_record(base: StableDiffusion, edited: Iterable[str], metadata: Mapping[str, Any] | None) -> dict:
    """The JSON that names the base (its source and the checksum of every untouched tensor)."""
    edited = set(edited)
    checksums = {k: tensor_checksum(a) for k, a in iter_tensors(base) if k not in edited}
    return {
        "base": {"path": base.source.path, "format": base.source.format},
        "metadata": dict(metadata or {}),
        "edited": sorted(edited),
        "checksum": CHECKSUM,
        "base_checksums": checksums,
    }


def write_delta(
    edited: StableDiffusion,
    base: StableDiffusion,
    root: Path,
    *,
    edited_keys: Iterable[str] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write ``delta.safetensors`` (the edited tensors) and ``delta.json`` into the folder ``root``."""
    keys = resolve_edited_keys(edited, base, edited_keys)
    shapes = {f"{c}.{k}": s for c in COMPONENTS for k, s in state_dict_shapes(getattr(edited, c)).items()}
    header = [(key, shapes[key], np.dtype(np.float32)) for key in keys]  # exact for fp32/fp16/bf16 params
    safefiles.write_safetensors(root / DELTA_FILE, header, lambda: iter_tensors(edited, keys))
    record = {"format": "jax_erasepro.delta", "version": 1, **base_record(base, keys, metadata)}
    safefiles.write_json(root / DELTA_MARKER, record)


def read_record(marker: Path, kind: str) -> dict[str, Any]:
    """A delta's or LoRA's JSON record, checked to hold what ``verify_base`` reads; DeltaError naming the
    file otherwise (invalid JSON or UTF-8, another format, a missing or mistyped field)."""
    try:
        record = read_json_object(marker)
    except ConfigError as e:
        raise DeltaError(str(e)) from None
    if record.get("format") != kind:
        raise DeltaError(f"{marker}: not a {kind.replace('.', ' ')} record (format={record.get('format')!r})")
    edited, sums, base = record.get("edited"), record.get("base_checksums"), record.get("base")
    if not isinstance(edited, list) or not all(isinstance(k, str) for k in edited):
        raise DeltaError(f"{marker}: 'edited' must be a list of tensor names")
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        raise DeltaError(f"{marker}: 'base_checksums' must map tensor names to checksums")
    if not isinstance(base, dict):
        raise DeltaError(f"{marker}: 'base' must be an object naming the base model")
    return record


def verify_base(sd: StableDiffusion, record: Mapping[str, Any], source: str) -> None:
    """Raise DeltaError naming the first untouched tensor of ``sd`` that does not match ``record``."""
    expected = record["base_checksums"]
    edited = set(record["edited"])
    seen = 0
    for key, arr in iter_tensors(sd):
        if key in edited:
            continue
        if key not in expected:
            raise DeltaError(f"{source}: the model has tensor {key!r} that the delta's base did not have")
        if tensor_checksum(arr) != expected[key]:
            raise DeltaError(
                f"{source}: tensor {key!r} differs from the base the delta was made for "
                f"({record['base'].get('path')}); refusing to apply"
            )
        seen += 1
    if seen != len(expected):
        raise DeltaError(f"{source}: the model lacks tensors that the delta's base had")


def apply_delta(sd: StableDiffusion, delta_dir: str | Path) -> StableDiffusion:
    """``sd`` with a delta's tensors put in, after checking ``sd`` is the base the delta was made for."""
    root = Path(delta_dir)
    marker = root / DELTA_MARKER
    if not marker.is_file():
        raise FileNotFoundError(f"missing {marker} (not a delta folder)")
    record = read_record(marker, "jax_erasepro.delta")
    reader = SafetensorsReader(root / DELTA_FILE)
    if reader.keys != set(record["edited"]):
        extra = sorted(reader.keys ^ set(record["edited"]))
        raise DeltaError(f"{root / DELTA_FILE}: its keys do not match delta.json (first: {extra[0]!r})")
    verify_base(sd, record, str(root))
    changes: dict[str, np.ndarray] = {}
    for key in sorted(reader.keys):
        if key.split(".", 1)[0] not in COMPONENTS:
            raise DeltaError(f"{root / DELTA_FILE}: key {key!r} names no component")
        arr = reader[key]
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise WeightsError(f"{root / DELTA_FILE}: key {key!r} holds NaN or inf values")
        changes[key] = arr
    try:
        return surgery.replace(sd, changes, source=str(root / DELTA_FILE))
    except surgery.SurgeryError as e:
        raise DeltaError(str(e)) from None
