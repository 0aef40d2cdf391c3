"""Atomic, streaming writes: every export goes to a temporary sibling, is fsynced, then renamed into place.

A failure at any point (a full disk included) removes the temporary and leaves the destination as it was.
Safetensors files are streamed one tensor at a time, so writing never holds a second copy of a model.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "U8": np.dtype(np.uint8),
}
SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


class SaveError(OSError):
    """An export failed; nothing was left at the destination and the source is untouched."""


def numpy_dtype(name: str) -> np.dtype:
    """A safetensors dtype name (``F16``) as numpy's dtype."""
    if name not in SAFETENSORS_DTYPES:
        raise ValueError(f"unsupported safetensors dtype {name!r}")
    return SAFETENSORS_DTYPES[name]


def write_safetensors(
    path: Path,
    header: Iterable[tuple[str, tuple[int, ...], np.dtype]],
    tensors: Callable[[], Iterator[tuple[str, np.ndarray]]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Stream a safetensors file: ``header`` gives every (key, shape, dtype) up front, ``tensors()`` then
    yields the arrays; each is cast, checked against its header entry and written straight to disk."""
    entries = sorted(header, key=lambda e: -np.dtype(e[2]).itemsize)  # keeps every tensor aligned
    head: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset, order = 0, {}
    for key, shape, dtype in entries:
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        name = SAFETENSORS_NAMES[np.dtype(dtype)]
        head[key] = {"dtype": name, "shape": list(shape), "data_offsets": [offset, offset + size]}
        order[key] = (offset, tuple(shape), np.dtype(dtype))
        offset += size
    blob = json.dumps(head, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        start = f.tell()
        for key, arr in tensors():
            off, shape, dtype = order.pop(key)
            arr = np.ascontiguousarray(np.asarray(arr).astype(dtype, copy=False))
            if arr.shape != shape:
                raise ValueError(f"{path}: tensor {key!r} has shape {arr.shape}, its header says {shape}")
            f.seek(start + off)
            f.write(memoryview(arr.reshape(-1)).cast("B"))
        if order:
            raise ValueError(f"{path}: no data for tensor {next(iter(order))!r}")
        f.flush()
        os.fsync(f.fileno())


def write_text(path: Path, text: str) -> None:
    """Write a small text file and fsync it."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_json(path: Path, obj: object) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (files written by other libraries, e.g. orbax)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_destination(out: Path, protected: str | None, overwrite: bool) -> Path:
    """Refuse a destination that is, holds or lies inside ``protected`` (the source model) or, without
    ``overwrite``, already exists non-empty. Returns the resolved path."""
    out = out.expanduser().resolve()
    if protected is not None:
        src = Path(protected).resolve()
        if out == src or src in out.parents or out in src.parents:
            raise ValueError(f"refusing to write to {out}: it would overwrite the source model {src}")
    if out.exists() and not overwrite and (out.is_file() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True to replace it)")
    return out


@contextlib.contextmanager
def atomic_output(out: Path, *, is_dir: bool) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to write into; on success fsync it and rename it onto ``out``
    (replacing what was there), on any error delete it and raise SaveError naming ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    try:
        if is_dir:
            tmp.mkdir()
        yield tmp
        if is_dir:
            _fsync_tree(tmp)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        _fsync_dir(out.parent)
    except BaseException as e:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if old.exists() and not out.exists():
            old.rename(out)
        if isinstance(e, OSError):
            raise SaveError(f"writing {out} failed ({e}); nothing was written there") from e
        raise
    finally:
        if old.is_dir() and out.exists():
            shutil.rmtree(old)
        elif old.exists() and out.exists():
            old.unlink()
