"""The one two-way map between NNX params and diffusers/transformers state-dict keys.

A param path joined with dots *is* the state-dict key, up to a leaf table (``kernel``/``scale``/
``embedding`` <-> ``weight``) and two layout rules (linear kernels transposed, conv kernels HWIO <->
OIHW). Identical layers that a model stacks for ``scan`` (named in its ``STACKED`` class attribute)
keep per-layer keys on disk: ``encoder.layers`` with a leading axis L maps to ``encoder.layers.{i}.*``.
Bare params that the model names in its ``BARE`` class attribute (e.g. CLIP's ``logit_scale``) are keyed by
their path as it stands, with no leaf renaming.
Loading is strict: every missing, unexpected, mis-shaped or non-finite tensor raises, naming the key.
"""

from __future__ import annotations

import functools
import itertools
import zlib
from collections.abc import Callable, Container, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from jax_erasepro.errors import LoadError

LEAF_TO_HF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
FLOAT_DTYPES = tuple(np.dtype(d) for d in (np.float16, np.float32, np.float64, ml_dtypes.bfloat16))


class WeightsError(LoadError):
    """A checkpoint does not match the model it is loaded into (names the file and the key)."""


def to_hf_layout(leaf: str, arr: np.ndarray) -> np.ndarray:
    """An NNX param in PyTorch layout: the inverse of ``to_flax_layout``."""
    perm = _layout_perm(leaf, arr.ndim, 0)
    return arr if perm is None else arr.transpose(np.argsort(perm))


def to_flax_layout(leaf: str, arr: np.ndarray) -> np.ndarray:
    """A PyTorch-layout tensor in the layout of the NNX param whose leaf name is ``leaf``."""
    perm = _layout_perm(leaf, arr.ndim, 0)
    return arr if perm is None else arr.transpose(perm)


def hf_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch-layout shape of an NNX param of ``shape``."""
    perm = _layout_perm(leaf, len(shape), 0)
    return shape if perm is None else tuple(shape[i] for i in np.argsort(perm))


def _stacked_prefix(model: nnx.Module, path: tuple[Any, ...]) -> int:
    """Number of leading path parts that name a stacked layer list (0 if the path is not stacked)."""
    for prefix in getattr(type(model), "STACKED", ()):
        parts = tuple(prefix.split("."))
        if tuple(str(p) for p in path[: len(parts)]) == parts:
            return len(parts)
    return 0


def param_entries(model: nnx.Module) -> Iterator[tuple[tuple[Any, ...], str, int | None, str]]:
    """Yield (nnx path, hf key, layer index or None, leaf name) for every param, layers unstacked."""
    bare = set(getattr(type(model), "BARE", ()))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        leaf = str(path[-1])
        if ".".join(map(str, path)) in bare:
            yield path, ".".join(map(str, path)), None, leaf
            continue
        if leaf not in LEAF_TO_HF:
            raise WeightsError(f"param {'.'.join(map(str, path))}: leaf {leaf!r} has no state-dict name")
        rest = ".".join(str(p) for p in path[:-1]) + "." + LEAF_TO_HF[leaf]
        n = _stacked_prefix(model, path)
        if not n:
            yield path, rest, None, leaf
            continue
        head = ".".join(str(p) for p in path[:n])
        tail = rest[len(head) + 1 :]
        for i in range(var.shape[0]):
            yield path, f"{head}.{i}.{tail}", i, leaf


def state_dict_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """The diffusers/transformers key -> shape table of ``model`` (works on ``nnx.eval_shape`` models)."""
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    out = {}
    for path, key, i, leaf in param_entries(model):
        shape = tuple(flat[path].shape)
        out[key] = hf_shape(leaf, shape[1:] if i is not None else shape)
    return out


def iter_state_dict(
    model: nnx.Module, dtype: Any = None, keys: Container[str] | None = None
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (key, array in PyTorch layout, contiguous, optionally cast) one param at a time (low memory),
    only for ``keys`` when given."""
    flat = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    for path, key, i, leaf in param_entries(model):
        if keys is not None and key not in keys:
            continue
        arr = flat[path] if i is None else flat[path][i]
        arr = to_hf_layout(leaf, arr)
        arr = arr if dtype is None else arr.astype(dtype)
        yield key, np.ascontiguousarray(arr).reshape(arr.shape)  # keeps 0-d params (logit_scale) 0-d


def to_state_dict(model: nnx.Module, dtype: Any = None) -> dict[str, np.ndarray]:
    """Export params as a flat dict in PyTorch layout (numpy, contiguous), optionally cast."""
    return dict(iter_state_dict(model, dtype))


def load_state_dict(
    abstract: nnx.Module,
    tensors: Mapping[str, Any] | Callable[[str], np.ndarray],
    keys: set[str] | None = None,
    *,
    source: str = "checkpoint",
    dtype: Any = jnp.float32,
    ignore: Callable[[str], bool] = lambda k: False,
    check_finite: bool = True,
) -> nnx.Module:
    """Fill the ``nnx.eval_shape`` model ``abstract`` from ``tensors`` (key -> array, or a getter).

    Strict in the manner of big_vision's ``merge_params``: raises WeightsError naming ``source`` and
    the key on any missing, unexpected (not ``ignore``-d), mis-shaped or non-finite tensor. Stacked
    layers are written into one preallocated buffer per param.
    """
    get = tensors.__getitem__ if isinstance(tensors, Mapping) else tensors
    if keys is None:
        if not isinstance(tensors, Mapping):
            raise TypeError("keys= is required when tensors is a getter")
        keys = set(tensors.keys())
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    expected = {key for _, key, _, _ in param_entries(abstract)}
    unexpected = sorted(k for k in keys - expected if not ignore(k))
    missing = sorted(expected - keys)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(f"{source}: missing key {missing[0]!r}{more}")
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise WeightsError(f"{source}: unexpected key {unexpected[0]!r}{more}")
    np_dtype = np.dtype(dtype)
    staging = _Staging()
    buffers: dict[tuple[Any, ...], jax.Array] = {}
    for path, entries in itertools.groupby(param_entries(abstract), key=lambda e: e[0]):
        entries = list(entries)
        leaf, stacked = entries[0][3], entries[0][2] is not None
        target = flat[path]
        want = hf_shape(leaf, tuple(target.shape[1:]) if stacked else tuple(target.shape))
        sources = []  # arrays, or tensors that read themselves into a buffer (``loading.FileTensor``)
        for _, key, _, _ in entries:
            src = get(key)
            src = src if hasattr(src, "read_into") else np.asarray(src)
            kind = np.dtype(src.dtype)
            if kind not in FLOAT_DTYPES:  # a cast would silently turn ids or bytes into weights
                raise WeightsError(f"{source}: key {key!r} holds {kind.name} values, not float weights")
            if tuple(src.shape) != want:
                raise WeightsError(f"{source}: key {key!r} has shape {src.shape}, the config expects {want}")
            sources.append(src)
        shape = (len(sources), *want) if stacked else want
        dtype0 = np.dtype(sources[0].dtype)
        same = _layout_is_identity(leaf, len(want)) and dtype0 == np_dtype
        # NaN/inf survive any float cast; a narrowing cast may also overflow, so the check casts first
        narrowed = np_dtype.itemsize < dtype0.itemsize
        check = _finite_check(np_dtype if narrowed else None) if check_finite and dtype0.kind == "f" else None
        # The source is copied once, into a 64-byte aligned host buffer that XLA:CPU adopts without a
        # copy: a param already in its layout and dtype IS that buffer; the others are laid out and cast
        # from a reused staging buffer, by one XLA pass (numpy for small ones: no program per shape).
        slot, host = (None, _aligned_empty(shape, dtype0)) if same else staging.take(shape, dtype0)
        for n, (src, (_, key, _, _)) in enumerate(zip(sources, entries, strict=True)):
            if not _fill(host[n] if stacked else host, src, check):
                beyond = f", or values beyond {np_dtype.name}'s range" if narrowed else ""
                raise WeightsError(f"{source}: key {key!r} holds NaN or inf values{beyond}")
        if same:
            buffers[path] = jax.device_put(host)
        elif host.nbytes <= SMALL_BYTES:
            param = _aligned_empty(tuple(target.shape), np_dtype)
            perm = _layout_perm(leaf, len(want), int(stacked))
            with np.errstate(over="ignore"):  # an overflowing cast was refused by the check above
                np.copyto(param, host if perm is None else host.transpose(perm))
            buffers[path] = jax.device_put(param)
        else:
            buffers[path] = _to_param(jax.device_put(host), leaf, np_dtype, int(stacked))
            staging.release(slot, buffers[path])
    new = {path: var.replace(buffers[path]) if path in buffers else var for path, var in flat.items()}
    return nnx.merge(graphdef, nnx.from_flat_state(new))


ALIGN = 64  # XLA:CPU adopts a host buffer without copying it when its data is this aligned


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an ``ALIGN``-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(shape)


class _Staging:
    """Two reused aligned host buffers: the next source is copied into one while XLA still reads the other
    (a buffer is written again only once every array computed from it is ready)."""

    def __init__(self) -> None:
        self._buffers: list[np.ndarray | None] = [None, None]
        self._readers: list[list[jax.Array]] = [[], []]
        self._turn = 0

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> tuple[int, np.ndarray]:
        slot, self._turn = self._turn, self._turn ^ 1
        jax.block_until_ready(self._readers[slot])
        self._readers[slot] = []
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        buf = self._buffers[slot]
        if buf is None or buf.nbytes < nbytes:
            self._buffers[slot] = None
            buf = self._buffers[slot] = _aligned_empty((nbytes,), np.dtype(np.uint8))
        return slot, buf[:nbytes].view(dtype).reshape(shape)

    def release(self, slot: int, *readers: jax.Array) -> None:
        self._readers[slot].extend(readers)


SMALL_BYTES = 1 << 20  # tensors up to this size are laid out in numpy (no XLA program to compile per shape)


def _layout_is_identity(leaf: str, ndim: int) -> bool:
    return not (leaf == "kernel" and ndim in (2, 4))


def _layout_perm(leaf: str, core: int, batch: int) -> tuple[int, ...] | None:
    """The axis order taking ``batch`` stacked source tensors of ``core`` dims to their param layout (None:
    unchanged): linear (out, in) -> (in, out), conv OIHW -> HWIO."""
    if _layout_is_identity(leaf, core):
        return None
    lead = tuple(range(batch))
    return (*lead, batch + 1, batch) if core == 2 else (*lead, *(batch + a for a in (2, 3, 1, 0)))


@functools.partial(jax.jit, static_argnames=("leaf", "dtype", "batch"))
def _to_param(raw: jax.Array, leaf: str, dtype: np.dtype, batch: int) -> jax.Array:
    """Source tensors (``batch`` leading stacked axes) in their param's layout and dtype."""
    perm = _layout_perm(leaf, raw.ndim - batch, batch)
    return (raw if perm is None else jnp.transpose(raw, perm)).astype(dtype)


# 16-bit floats: numpy's isfinite on them runs at ~1.3 GB/s (converted one by one), so they are checked on
# their bits instead (finite iff |bits| is below the all-ones exponent), at ~12 GB/s like float32's isfinite
_HALF_INF_BITS = {np.dtype(np.float16): 0x7C00, np.dtype(ml_dtypes.bfloat16): 0x7F80}


def _all_finite(x: np.ndarray) -> bool:
    inf_bits = _HALF_INF_BITS.get(x.dtype)
    if inf_bits is None:
        return bool(np.isfinite(x).all())
    return int(np.bitwise_and(x.view(np.uint16), 0x7FFF).max(initial=0)) < inf_bits


CHUNK_BYTES = 1 << 20  # a source is copied and checked in pieces this size, each checked while in cache


def _finite_check(cast: np.dtype | None) -> Callable[[np.ndarray], bool]:
    """Whether a piece holds only finite values, once cast to ``cast`` if given."""

    def check(x: np.ndarray) -> bool:
        if cast is not None:
            with np.errstate(over="ignore"):
                x = x.astype(cast)
        return _all_finite(x)

    return check


def _fill(out: np.ndarray, src: Any, check: Callable[[np.ndarray], bool] | None) -> bool:
    """Copy one source tensor into the contiguous ``out`` piece by piece, running ``check`` on each piece
    just written (still in cache, so checking costs no second pass over memory); False at the first
    piece that fails. A ``FileTensor`` of ``out``'s dtype reads itself from its file."""
    if hasattr(src, "read_into") and src.dtype == out.dtype:
        return src.read_into(out, check, CHUNK_BYTES)
    src = np.asarray(src)
    if out.ndim == 0:
        np.copyto(out, src)
        return check is None or check(out)
    step = max(1, CHUNK_BYTES // max(1, out[0].nbytes))
    for i in range(0, out.shape[0], step):
        np.copyto(out[i : i + step], src[i : i + step])
        if check is not None and not check(out[i : i + step]):
            return False
    return True


class _ShapeOnlyRngs:
    """Stands in for ``nnx.Rngs`` under ``eval_shape``: hands out one fixed key and keeps no counter.

    flax 0.12 makes each traced RNG-counter update cost time that grows with the traced program, so
    building SD v1.4's UNet abstractly with real ``nnx.Rngs`` takes ~20 s instead of ~2 s.
    """

    def __getattr__(self, name: str) -> Callable[[], jax.Array]:
        return self

    def __call__(self) -> jax.Array:
        return jax.random.key(0)


def abstract_model(cls: Callable[..., nnx.Module], config: Any) -> nnx.Module:
    """``cls(config)``'s tree of shapes without allocating weights (``nnx.eval_shape``).

    Tracing the constructor costs ~0.65 s for SD v1.4, so the result is cached per (cls, config) and each
    call merges a fresh module from it (frozen configs are hashable; others are traced every time).
    """
    try:
        graphdef, state = _abstract_parts(cls, config)
    except TypeError:  # an unhashable config
        return _trace(cls, config)
    return nnx.merge(graphdef, state)


def _trace(cls: Callable[..., nnx.Module], config: Any) -> nnx.Module:
    return nnx.eval_shape(lambda: cls(config, rngs=_ShapeOnlyRngs()))


@functools.lru_cache(maxsize=32)
def _abstract_parts(cls: Callable[..., nnx.Module], config: Any) -> tuple[Any, nnx.State]:
    return nnx.split(_trace(cls, config))


def num_params(model: nnx.Module) -> int:
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))


def random_model(cls: Callable[..., nnx.Module], config: Any, seed: int = 0) -> nnx.Module:
    """``cls(config)`` with random weights of flax's default families, drawn by numpy key by key.

    Kernels are truncated-normal LeCun (variance 1 / fan-in), embeddings and other vectors normal(0.02),
    norm scales one, biases zero; each key's values depend only on (seed, key). Building the model eagerly
    instead compiles one XLA program per parameter shape (about 45 s for the tiny SD on 2 cores).
    """
    abstract = abstract_model(cls, config)
    leaves = {key: leaf for _, key, _, leaf in param_entries(abstract)}
    return load_state_dict(
        abstract, {k: _draw(k, leaves[k], s, seed) for k, s in state_dict_shapes(abstract).items()}
    )


def _draw(key: str, leaf: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """One state-dict tensor (PyTorch layout) of ``random_model``."""
    if leaf == "bias":
        return np.zeros(shape, np.float32)
    if leaf == "scale":
        return np.ones(shape, np.float32)
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    if leaf == "embedding" or len(shape) < 2:
        return (0.02 * rng.standard_normal(shape)).astype(np.float32)
    fan_in = int(np.prod(shape[1:]))  # (out, in) linear and (out, in, kh, kw) conv weights
    draw = rng.standard_normal(shape)
    while (far := np.abs(draw) > 2.0).any():  # truncate at two standard deviations, as flax does
        draw[far] = rng.standard_normal(int(far.sum()))
    return (draw * (fan_in**-0.5 / 0.87962566103423978)).astype(np.float32)
