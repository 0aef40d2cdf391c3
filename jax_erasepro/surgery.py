"""Read and replace a model's tensors by diffusers key: the one way an edit gets into a ``StableDiffusion``.

Keys are ``<component>.<state-dict key>`` (``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k
.weight``, ``text_encoder.text_model.encoder.layers.3.self_attn.q_proj.weight``), the names an
``EraseReport`` lists and a delta or LoRA stores. ``select`` picks keys by glob pattern, ``read`` returns
tensors, ``replace`` returns a new model with tensors put in (out of place; untouched params are shared),
``param_filter`` turns a pattern into an NNX filter, so fine-tuning splits off exactly the keys it trains.
Tensors are in PyTorch layout (``layout="torch"``, (out, in) for a linear weight) or in the model's own
(``layout="flax"``, (in, out)), so closed-form solvers hand over their kernels without transposing twice.
The key map is ``weights.param_entries``; nothing else formats a key.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_erasepro.errors import EraseProError
from jax_erasepro.sd import StableDiffusion
from jax_erasepro.weights import hf_shape, param_entries, to_flax_layout, to_hf_layout

COMPONENTS = ("text_encoder", "unet", "vae")
LAYOUTS = ("torch", "flax")


class SurgeryError(EraseProError, ValueError):
    """A key the model does not have, or a tensor of the wrong shape (names both)."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """Where one key lives: its component, the NNX param path, its layer in a stacked param, the leaf name."""

    key: str
    component: str
    path: tuple[Any, ...]
    layer: int | None
    leaf: str


def entries(sd: StableDiffusion, components: Iterable[str] = COMPONENTS) -> dict[str, Entry]:
    """Every key of ``components`` -> where it lives, in the order of the model's flat NNX state."""
    out = {}
    for comp in components:
        for path, key, i, leaf in param_entries(getattr(sd, comp)):
            out[f"{comp}.{key}"] = Entry(f"{comp}.{key}", comp, path, i, leaf)
    return out


def select(sd: StableDiffusion, pattern: str | Callable[[str], bool]) -> list[str]:
    """Keys matching ``pattern`` (a glob such as ``"unet.*.attn2.to_[kv].weight"``, or a predicate)."""
    match = _matcher(pattern)
    return [k for k in entries(sd) if match(k)]


def param_filter(
    sd: StableDiffusion, pattern: str | Callable[[str], bool], component: str = "unet"
) -> nnx.filterlib.Filter:
    """An NNX filter selecting the params of ``component`` whose keys match ``pattern`` (as ``select``).

    ``nnx.split(getattr(sd, component), param_filter(...), ...)`` then splits off exactly those params. A
    stacked param is one array, so a pattern must take all of its layers or none; SurgeryError otherwise,
    and when the pattern matches no param of ``component``.
    """
    if component not in COMPONENTS:
        raise SurgeryError(f"unknown component {component!r} (choose from {', '.join(COMPONENTS)})")
    match = _matcher(pattern)
    hits: dict[tuple[Any, ...], list[bool]] = {}
    for key, e in entries(sd, [component]).items():
        hits.setdefault(e.path, []).append(match(key))
    paths = set()
    for path, flags in hits.items():
        if all(flags):
            paths.add(path)
        elif any(flags):
            name = ".".join(map(str, path))
            raise SurgeryError(
                f"pattern {_shown(pattern)} selects {sum(flags)} of the {len(flags)} stacked layers of "
                f"{component}.{name}; select all of them or none"
            )
    if not paths:
        raise SurgeryError(f"pattern {_shown(pattern)} matches no param of {component}")
    return nnx.All(nnx.Param, lambda path, _: tuple(path) in paths)


def _matcher(pattern: str | Callable[[str], bool]) -> Callable[[str], bool]:
    return pattern if callable(pattern) else (lambda k: fnmatch.fnmatchcase(k, pattern))


def _shown(pattern: str | Callable[[str], bool]) -> str:
    return getattr(pattern, "__name__", "predicate") if callable(pattern) else repr(pattern)


def _flat(module: nnx.Module) -> dict[tuple[Any, ...], Any]:
    return dict(nnx.to_flat_state(nnx.state(module, nnx.Param)))


def read(
    sd: StableDiffusion, keys: Iterable[str], *, layout: str = "torch", host: bool = True
) -> dict[str, Any]:
    """The tensors of ``keys`` in ``layout``: numpy arrays, or the device arrays with ``host=False``."""
    keys = list(keys)
    torch_layout = _check_layout(layout) == "torch"
    table = entries(sd, {k.split(".", 1)[0] for k in keys} & set(COMPONENTS))
    flats = {comp: _flat(getattr(sd, comp)) for comp in {_entry(table, k).component for k in keys}}
    out = {}
    for key in keys:
        e = table[key]
        flat = flats[e.component]
        arr = flat[e.path][...] if e.layer is None else flat[e.path][...][e.layer]
        if torch_layout:
            arr = to_hf_layout(e.leaf, np.asarray(arr))
        out[key] = np.asarray(arr) if host else arr
    return out


def replace(
    sd: StableDiffusion,
    tensors: Mapping[str, Any],
    *,
    layout: str = "torch",
    source: str = "replace",
) -> StableDiffusion:
    """A new model with ``tensors`` (key -> array in ``layout``) put in, cast to each param's dtype.

    Every key and shape is checked before anything changes; ``source`` names the caller in errors.
    Tensors for layers of one stacked param are written into one new stack.
    """
    _check_layout(layout)
    table = entries(sd, {k.split(".", 1)[0] for k in tensors} & set(COMPONENTS))
    by_component: dict[str, list[tuple[Entry, Any]]] = {}
    for key, value in tensors.items():
        e = _entry(table, key, source)
        by_component.setdefault(e.component, []).append((e, value))
    changes = {}
    for comp, items in by_component.items():
        module = getattr(sd, comp)
        graphdef, state = nnx.split(module)
        flat = dict(nnx.to_flat_state(state))
        stacks: dict[tuple[Any, ...], jax.Array] = {}
        for e, value in items:
            var = flat[e.path]
            want = tuple(var.shape[1:] if e.layer is not None else var.shape)
            got = tuple(np.shape(value))
            if layout == "torch":
                if got != hf_shape(e.leaf, want):
                    raise SurgeryError(
                        f"{source}: {e.key} has shape {got}, the model has {hf_shape(e.leaf, want)}"
                    )
                value = to_flax_layout(e.leaf, np.asarray(value))
            elif got != want:
                raise SurgeryError(f"{source}: {e.key} has shape {got}, the model has {want}")
            new = jnp.asarray(value, var.dtype)
            if e.layer is None:
                stacks[e.path] = new
            else:
                stacks[e.path] = stacks.get(e.path, var[...]).at[e.layer].set(new)
        for path, new in stacks.items():
            flat[path] = flat[path].replace(new)
        changes[comp] = nnx.merge(graphdef, nnx.from_flat_state(flat))
    return sd.replace(**changes)


def _entry(table: Mapping[str, Entry], key: str, source: str = "read") -> Entry:
    if key not in table:
        comp = key.split(".", 1)[0]
        hint = "" if comp in COMPONENTS else f" (keys start with one of {', '.join(COMPONENTS)})"
        raise SurgeryError(f"{source}: the model has no tensor {key!r}{hint}")
    return table[key]


def _check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise SurgeryError(f"unknown layout {layout!r} (choose from {', '.join(LAYOUTS)})")
    return layout
