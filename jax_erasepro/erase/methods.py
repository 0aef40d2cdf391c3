"""The method contract: a request, a frozen options dataclass per method, and a registry by name.

A method is ``run(sd, request, options) -> (erased sd, EraseReport)``. Its options are a frozen dataclass
whose fields carry their help (and choices) in ``dataclasses.field(metadata=...)``, so ``erase()``, the
command line (``--option key=value``, ``jax-erasepro methods``) and the docs all read one definition.
Values given as text (command line, YAML) are converted by the field's declared type.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from jax_erasepro.errors import EraseError


@dataclasses.dataclass(frozen=True)
class Request:
    """What to erase: targets with one anchor each, concepts to keep, and the prompt templates (``{}``)."""

    targets: tuple[str, ...]
    anchors: tuple[str, ...]
    preserve: tuple[str, ...] = ()
    prompts: tuple[str, ...] | None = None  # None: the method's default templates


def option(default: Any, help: str, *, choices: tuple[Any, ...] | None = None) -> Any:
    """A dataclass field of an options class: its default, one line of help and, if closed, its choices."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def check_choices(options: Any) -> None:
    """EraseError for a field whose value is not among its declared choices (call from ``__post_init__``)."""
    for f in dataclasses.fields(options):
        choices = f.metadata.get("choices")
        value = getattr(options, f.name)
        if choices is not None and value not in choices:
            raise EraseError(f"unknown {f.name} {value!r} (choose from {', '.join(map(str, choices))})")


@dataclasses.dataclass(frozen=True)
class Method:
    """A registered erasure method."""

    name: str
    summary: str  # one line: what it edits and how
    paper: str  # citation, with the arXiv id where there is one
    options: type  # a frozen dataclass; every field made with ``option``
    run: Callable[..., Any]  # (sd, Request, options) -> (StableDiffusion, EraseReport)

    def make_options(self, values: Mapping[str, Any] | None = None) -> Any:
        """The options from ``values`` (names checked, text converted to each field's type, validated)."""
        values = dict(values or {})
        fields = {f.name: f for f in dataclasses.fields(self.options)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise EraseError(
                f"unknown option(s) for method {self.name!r}: {', '.join(unknown)} "
                f"(options: {', '.join(fields)})"
            )
        hints = typing.get_type_hints(self.options)
        typed = {k: convert(v, hints[k], k) for k, v in values.items()}
        return self.options(**typed)

    def describe(self) -> list[dict[str, Any]]:
        """One row per option: name, type, default, choices and help (for the command line and docs)."""
        hints = typing.get_type_hints(self.options)
        return [
            {
                "name": f.name,
                "type": _type_name(hints[f.name]),
                "default": f.default,
                "choices": f.metadata.get("choices"),
                "help": f.metadata.get("help", ""),
            }
            for f in dataclasses.fields(self.options)
        ]


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry under its name (a later registration of the name replaces it)."""
    REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method called ``name``; EraseError listing the choices otherwise."""
    if name not in REGISTRY:
        raise EraseError(f"unknown method {name!r} (choose from {', '.join(REGISTRY)})")
    return REGISTRY[name]


def parse_assignment(text: str) -> tuple[str, str]:
    """``"key=value"`` as (key, value text); EraseError naming the text otherwise."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise EraseError(f"--option {text!r}: expected key=value")
    return key.strip(), value.strip()


_TRUE, _FALSE = {"true", "yes", "1", "on"}, {"false", "no", "0", "off"}


def convert(value: Any, hint: Any, name: str) -> Any:
    """``value`` as the declared type ``hint`` (str, int, float, bool, tuple[str, ...], another class whose
    instances pass as they are, or a union of them with None: the first member that fits).

    Text (from the command line or YAML, where ``1e-2`` reads as a string) is parsed; other values must
    already have the type (an int is accepted for a float). EraseError naming the option otherwise.
    """
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        for inner in (a for a in args if a is not type(None)):  # the first declared type that fits
            try:
                return convert(value, inner, name)
            except EraseError:
                pass
        raise EraseError(f"option {name}: expected {_type_name(hint)}, got {value!r}")
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
                return value.lower() in _TRUE
        elif hint is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, str):
                return int(value)
        elif hint is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool) or isinstance(value, str):
                out = float(value)
            else:
                out = None
            if out is not None and math.isfinite(out):
                return out
        elif hint is str:
            if isinstance(value, str):
                return value
            if isinstance(value, int) and not isinstance(value, bool):  # YAML's bare ``variant: 2023``
                return str(value)
        elif typing.get_origin(hint) is tuple:
            if isinstance(value, str):
                value = json.loads(value)  # a JSON list from the command line
            if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                return tuple(value)
        elif isinstance(hint, type) and isinstance(value, hint):  # a Python object (an array), as declared
            return value
    except ValueError:
        pass
    raise EraseError(f"option {name}: expected {_type_name(hint)}, got {value!r}")


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return "list[str]"
    return "none" if hint is type(None) else getattr(hint, "__name__", str(hint))
