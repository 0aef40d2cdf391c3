"""Atomic, streaming writes that never delete what they did not write, and strict safetensors headers.

Every export goes to a fresh temporary sibling (``.NAME.tmp-XXXXXXXX``, locked while its writer lives), is
fsynced, then put in place in one step: a rename that refuses an existing destination, or, to overwrite, an
atomic exchange with the old copy (Linux ``renameat2``), so ``NAME`` is always the old or the new output.
Overwrite replaces only what the caller recognises as its own output (``replaceable``). A failure removes the
temporary; a killed writer's temporaries are removed by the next save to the same place. Safetensors files
are streamed one tensor at a time, each checked (finite, within its dtype's range) before it is written.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import json
import math
import os
import shutil
import struct
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import ml_dtypes
import numpy as np

from jax_erasepro.errors import SaveError

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
FLOAT_NAMES = ("F64", "F32", "F16", "BF16")
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own bound
WRITER_KEY, WRITER = "written_by", "jax_erasepro"  # in every safetensors header we write: marks our files
TEMP, OLD = "tmp", "old"  # hidden siblings: ``.NAME.tmp-<id>`` (being written), ``.NAME.old-<id>`` (replaced)


class DestinationExists(SaveError, FileExistsError):
    """``overwrite=False`` and the destination exists (or another writer put it there first)."""


class DestinationError(SaveError, ValueError):
    """A destination we refuse to write: the source model itself, or something we did not write."""


class HeaderEntry(NamedTuple):
    """One tensor of a safetensors header: dtype, shape and its absolute byte range in the file."""

    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def numpy_dtype(name: str) -> np.dtype:
    """A safetensors dtype name (``F16``) as numpy's dtype."""
    if not isinstance(name, str) or name not in SAFETENSORS_DTYPES:
        raise ValueError(f"unsupported safetensors dtype {name!r}")
    return SAFETENSORS_DTYPES[name]


# --- reading: a header is checked as strictly as the safetensors library checks it ----------------------


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"key {next(k for k in keys if keys.count(k) > 1)!r} appears twice")
    return dict(pairs)


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _entry(key: str, info: object) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """dtype, shape and relative [begin, end) of one header entry; ValueError naming ``key`` if malformed."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise ValueError(f"tensor {key!r}: an entry needs dtype, shape and data_offsets")
    dtype = numpy_dtype(info["dtype"])
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise ValueError(f"tensor {key!r}: shape {shape!r} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise ValueError(f"tensor {key!r}: data_offsets {offsets!r} is not [begin, end] >= 0")
    begin, end = offsets
    if end < begin or end - begin != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"tensor {key!r}: data_offsets {offsets} do not hold a {info['dtype']} {shape}")
    return dtype, tuple(shape), begin, end


def _check_layout(spans: list[tuple[int, int, str]], data_bytes: int) -> None:
    """The tensors must tile the data region exactly: no gap, no overlap, nothing after the last."""
    at = 0
    for begin, end, key in sorted(spans):
        if begin != at:
            raise ValueError(f"tensor {key!r}: data_offsets start at {begin}, expected {at} (gap or overlap)")
        at = end
    if at != data_bytes:
        raise ValueError(f"tensors cover {at} of the {data_bytes} data bytes")


def parse_header(path: Path) -> tuple[dict[str, HeaderEntry], dict[str, str]]:
    """The tensors and ``__metadata__`` of the safetensors file ``path``, validated as the safetensors library
    does (bounded UTF-8 JSON object, known dtypes, offsets tiling the data exactly); ValueError otherwise."""
    size = path.stat().st_size
    with path.open("rb") as f:
        if size < 8:
            raise ValueError(f"a {size}-byte file has no header")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise ValueError(f"header of {n} bytes in a {size}-byte file")
        text = f.read(n).decode("utf-8")
    if not text.startswith("{"):
        raise ValueError("the header is not a JSON object")
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise ValueError("the header nests too deeply to be a safetensors header") from None
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError("__metadata__ is not a mapping of strings to strings")
    entries = {key: _entry(key, info) for key, info in header.items()}
    _check_layout([(b, e, k) for k, (_, _, b, e) in entries.items()], size - 8 - n)
    start = 8 + n
    return {k: HeaderEntry(d, s, start + b, start + e) for k, (d, s, b, e) in entries.items()}, meta


# --- writing --------------------------------------------------------------------------------------------


def _checked(path: Path, key: str, arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``arr`` cast to ``dtype``, refusing NaN/inf and values the cast would overflow (key named)."""
    src = np.asarray(arr)
    floating = src.dtype.kind in "fc" or src.dtype == ml_dtypes.bfloat16
    if floating and not np.isfinite(src).all():
        raise ValueError(f"{path}: tensor {key!r} holds NaN or inf values; not written")
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if src.size and (src.min() < info.min or src.max() > info.max):
            raise ValueError(f"{path}: tensor {key!r} has values outside {dtype}'s range; not written")
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported just below, key named
        out = np.ascontiguousarray(src.astype(dtype, copy=False))
    if floating and SAFETENSORS_NAMES[dtype] in FLOAT_NAMES and not np.isfinite(out).all():
        top = float(np.abs(src.astype(np.float64)).max())
        raise ValueError(f"{path}: tensor {key!r} overflows {dtype} (|value| up to {top:.4g}); not written")
    return out


def write_safetensors(
    path: Path,
    header: Iterable[tuple[str, tuple[int, ...], np.dtype]],
    tensors: Callable[[], Iterator[tuple[str, np.ndarray]]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Stream a safetensors file: ``header`` gives every (key, shape, dtype) up front, ``tensors()`` then
    yields the arrays; each is cast, checked against its header entry and written straight to disk."""
    entries = sorted(header, key=lambda e: -np.dtype(e[2]).itemsize)  # keeps every tensor aligned
    head: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {}), WRITER_KEY: WRITER}}
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
            arr = _checked(path, key, arr, dtype)
            if arr.shape != shape:
                raise ValueError(f"{path}: tensor {key!r} has shape {arr.shape}, its header says {shape}")
            f.seek(start + off)
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))  # any dtype, bfloat16 included
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
    if not root.is_dir():
        _fsync_path(root)
        return
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync_path(Path(dirpath, name))
        _fsync_path(Path(dirpath))


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- what a destination may be ---------------------------------------------------------------------------


def foreign_file_reason(path: Path) -> str | None:
    """None when ``path`` is a safetensors file we wrote (its header carries our mark), else why not."""
    if path.is_dir():
        return "it is a folder"
    try:
        _, meta = parse_header(path)
    except (OSError, ValueError) as e:
        return f"it is not a safetensors file written by jax-erasepro ({e})"
    if meta.get(WRITER_KEY) != WRITER:
        return "it is a safetensors file that jax-erasepro did not write"
    return None


def _source_paths(src: Path) -> set[Path]:
    """``src`` and the real path of everything in it (symlinks followed, as in the Hugging Face cache), so a
    destination is checked against the files a loaded model actually came from."""
    paths = {src.resolve()}
    if src.is_dir():
        for dirpath, dirs, files in os.walk(src):
            paths.update(Path(dirpath, name).resolve() for name in dirs + files)
    return paths


def check_destination(
    out: Path,
    protected: Iterable[str | Path],
    overwrite: bool,
    replaceable: Callable[[Path], str | None] = foreign_file_reason,
) -> Path:
    """Refuse a destination that is, holds or lies inside a ``protected`` path (a source model) or a file in
    it; that exists non-empty without ``overwrite``; or that ``replaceable`` names a reason not to replace.
    Leftovers of killed saves to it are cleaned first (``clean_stale``). Returns the resolved path."""
    out = out.expanduser().resolve()
    for src in protected:
        for path in _source_paths(Path(src)):
            if out == path or path in out.parents or out in path.parents:
                msg = f"refusing to write to {out}: it would overwrite the source model {src}"
                raise DestinationError(msg)
    if out.parent.is_dir():
        clean_stale(out)
    if out.exists() and (out.is_file() or any(out.iterdir())):
        if not overwrite:
            raise DestinationExists(f"{out} exists and is not empty (pass overwrite=True to replace it)")
        reason = replaceable(out)
        if reason:
            raise DestinationError(f"refusing to overwrite {out}: {reason}")
    return out


# --- putting a finished temporary in place ---------------------------------------------------------------

_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
RENAME_NOREPLACE, RENAME_EXCHANGE, AT_FDCWD = 1, 2, -100


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2(2); False when this system or filesystem lacks it (the caller then falls back)."""
    fn = getattr(_LIBC, "renameat2", None)
    if fn is None:
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _sibling(out: Path, kind: str) -> Path:
    return out.parent / f".{out.name}.{kind}-{uuid.uuid4().hex[:8]}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _place_new(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out`` only if nothing is there (an empty folder may be replaced); atomic, so of two
    writers exactly one wins and the other gets DestinationExists."""
    taken = (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR)
    try:
        if tmp.is_dir():
            os.rename(tmp, out)  # rename(2) replaces an empty folder, never a file or a non-empty folder
            return
        try:
            os.link(tmp, out)  # fails if ``out`` exists
        except OSError as e:
            if e.errno in taken or not _renameat2(tmp, out, RENAME_NOREPLACE):
                raise
            return
        os.unlink(tmp)
    except OSError as e:
        if e.errno in taken:
            msg = f"{out} was written by another save meanwhile; this one was discarded"
            raise DestinationExists(msg) from None
        raise


def _replace(tmp: Path, out: Path) -> None:
    """Swap ``tmp`` with the existing ``out`` in one step and delete the old copy. Without renameat2, two
    renames; a crash between them leaves the old copy as ``.NAME.old-*``, which the next save restores."""
    if _renameat2(tmp, out, RENAME_EXCHANGE):
        _remove(tmp)  # holds the old copy now
        return
    old = _sibling(out, OLD)
    with _locked(out):  # so a concurrent save's cleanup does not take it for a killed save's leftover
        os.rename(out, old)
        try:
            _place_new(tmp, out)
        except BaseException:
            with contextlib.suppress(OSError):
                _place_new(old, out)
            raise
    _remove(old)


def _put_in_place(tmp: Path, out: Path, overwrite: bool, replaceable: Callable[[Path], str | None]) -> None:
    """``tmp`` becomes ``out``: a new one, or with ``overwrite`` one replacing what ``replaceable`` allows."""
    for _ in range(3):  # another writer may create or remove ``out`` between the check and the rename
        if not (overwrite and os.path.lexists(out)):
            try:
                return _place_new(tmp, out)
            except DestinationExists:
                if not overwrite:
                    raise
                continue
        reason = replaceable(out)
        if reason:
            raise DestinationError(f"refusing to overwrite {out}: {reason}")
        try:
            return _replace(tmp, out)
        except FileNotFoundError:
            continue
    raise SaveError(f"{out} kept changing while this save tried to put it in place; nothing was written")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[int]:
    """An exclusive flock on ``path`` (file or folder) for the block: marks a temporary as in use."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def _stale(path: Path) -> bool:
    """True when no live writer holds ``path``'s lock (its writer finished or was killed)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def clean_stale(out: Path) -> list[Path]:
    """Remove the temporaries killed saves to ``out`` left (``.NAME.tmp-*``); an old copy (``.NAME.old-*``)
    goes back to ``out`` if ``out`` is missing, else is removed. Returns what was cleaned."""
    cleaned = []
    for kind in (OLD, TEMP):
        for path in sorted(out.parent.glob(f".{glob.escape(out.name)}.{kind}-*")):
            if not _stale(path):
                continue
            if kind == OLD and not os.path.lexists(out):
                with contextlib.suppress(OSError):
                    _place_new(path, out)
            _remove(path)
            cleaned.append(path)
    return cleaned


def _new_temporary(out: Path, is_dir: bool) -> tuple[Path, int]:
    """A fresh, locked ``.NAME.tmp-<id>`` beside ``out`` and its lock's file descriptor. It is created under
    another name and renamed once locked, so a concurrent cleanup never sees it unlocked."""
    staging = _sibling(out, "new")
    if is_dir:
        staging.mkdir()
    else:
        os.close(os.open(staging, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    fd = os.open(staging, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    tmp = _sibling(out, TEMP)
    os.rename(staging, tmp)
    return tmp, fd


@contextlib.contextmanager
def atomic_output(
    out: Path,
    *,
    is_dir: bool,
    overwrite: bool = False,
    replaceable: Callable[[Path], str | None] = foreign_file_reason,
) -> Iterator[Path]:
    """Yield a fresh temporary beside ``out`` to write into; on success fsync it and put it in place (see
    ``_put_in_place``). On any error delete it and raise (OS errors as SaveError naming ``out``), leaving
    ``out`` as it was. Leftovers of killed saves to ``out`` are cleaned first."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(out)
        tmp, fd = _new_temporary(out, is_dir)
    except OSError as e:  # a read-only or missing place: name what the caller asked for, not our temporary
        raise SaveError(f"cannot write {out}: {e.strerror or e}; nothing was written there") from None
    try:
        yield tmp
        _fsync_tree(tmp)
        _put_in_place(tmp, out, overwrite, replaceable)
        _fsync_path(out.parent)
    except BaseException as e:
        if os.path.lexists(tmp):
            _remove(tmp)
        if isinstance(e, OSError) and not isinstance(e, SaveError):
            reason = e.strerror or str(e)  # not str(e): that names our hidden temporary
            raise SaveError(f"writing {out} failed ({reason}); nothing was written there") from e
        raise
    finally:
        os.close(fd)
