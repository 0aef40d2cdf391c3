"""Frozen config dataclasses built from diffusers/transformers ``config.json`` files.

Every field mirrors a key of the JSON file. Keys we do not model are accepted only when they hold the
value our implementation assumes (``ACCEPTED``); anything else raises naming the key, so a config we
cannot run exactly is never silently approximated.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Self

from jax_erasepro.errors import ConfigError

# Sizes and counts that must be at least 1 wherever a config has them (0 divides by zero or builds nothing).
POSITIVE_KEYS = frozenset(
    {
        "in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
        "norm_num_groups", "cross_attention_dim", "attention_head_dim", "sample_size", "hidden_size",
        "intermediate_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
        "vocab_size", "num_channels", "image_size", "patch_size", "projection_dim", "num_train_timesteps",
    }
)


def read_json_object(path: str | Path) -> dict[str, Any]:
    """A JSON file that must hold one object; ConfigError naming the file when it is not UTF-8, not JSON,
    nested too deeply or not an object (FileNotFoundError when missing)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing config file: {path}")
    try:
        d = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ConfigError(f"{path}: JSON nested too deeply") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: holds a JSON {type(d).__name__}, not an object")
    return d


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a field's type hint (int, float, bool, str, None, tuple[X, ...], unions);
    other hints (nested configs, Any) are not checked here."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if origin is tuple:
        args = typing.get_args(hint)
        return isinstance(value, list | tuple) and all(_matches(v, args[0]) for v in value)
    if hint is int:
        return _is_int(value)
    if hint is float:
        return (_is_int(value) or isinstance(value, float)) and value == value  # NaN refused
    if hint is bool:
        return isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is type(None):
        return value is None
    return True


def _describe(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


@dataclasses.dataclass(frozen=True)
class JsonConfig:
    """Base for model configs: strict ``from_dict``/``to_dict`` round trip with the JSON on disk."""

    # key -> tuple of values we accept without modelling the key (the implementation's fixed behaviour)
    ACCEPTED: ClassVar[Mapping[str, tuple[Any, ...]]] = {}
    # keys ignored whatever their value (documentation, training-only settings)
    IGNORED: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    @functools.cache
    def _hints(cls) -> dict[str, Any]:
        return typing.get_type_hints(cls)

    @classmethod
    def _checked(cls, key: str, value: Any, source: str) -> Any:
        """``value`` of field ``key`` after a type check against its hint (and >= 1 for sizes and counts)."""
        hint = cls._hints().get(key)
        if not _matches(value, hint):
            raise ConfigError(f"{source}: {key}={value!r} has the wrong type (expected {_describe(hint)})")
        if key in POSITIVE_KEYS:
            for v in value if isinstance(value, list | tuple) else (value,):
                if _is_int(v) and v < 1:
                    raise ConfigError(f"{source}: {key}={value!r} must be at least 1")
        return tuple(value) if isinstance(value, list) else value

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "config") -> Self:
        if not isinstance(d, Mapping):
            raise ConfigError(f"{source}: holds a JSON {type(d).__name__}, not an object")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key.startswith("_") or key in cls.IGNORED:
                continue
            if key in fields:
                kwargs[key] = cls._checked(key, value, source)
            elif key in cls.ACCEPTED:
                if value not in cls.ACCEPTED[key]:
                    raise ConfigError(
                        f"{source}: unsupported value {key}={value!r} (supported: {cls.ACCEPTED[key]})"
                    )
            else:
                raise ConfigError(f"{source}: unsupported config key {key!r} for {cls.__name__}")
        try:
            cfg = cls(**kwargs)
        except TypeError as e:  # a required field missing
            raise ConfigError(f"{source}: {e}") from None
        try:
            cfg.validate(source)
        except (TypeError, ValueError, ZeroDivisionError, IndexError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{source}: inconsistent values ({e})") from None
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> Self:
        return cls.from_dict(read_json_object(path), source=str(path))

    def validate(self, source: str) -> None:
        """Raise ConfigError for a value outside what the model implements; subclasses extend."""

    def to_dict(self) -> dict[str, Any]:
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }
