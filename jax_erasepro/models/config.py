"""Frozen config dataclasses built from diffusers/transformers ``config.json`` files.

Every field mirrors a key of the JSON file. Keys we do not model are accepted only when they hold the
value our implementation assumes (``ACCEPTED``); anything else raises naming the key, so a config we
cannot run exactly is never silently approximated.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Self

from jax_erasepro.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class JsonConfig:
    """Base for model configs: strict ``from_dict``/``to_dict`` round trip with the JSON on disk."""

    # key -> tuple of values we accept without modelling the key (the implementation's fixed behaviour)
    ACCEPTED: ClassVar[Mapping[str, tuple[Any, ...]]] = {}
    # keys ignored whatever their value (documentation, training-only settings)
    IGNORED: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "config") -> Self:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key.startswith("_") or key in cls.IGNORED:
                continue
            if key in fields:
                kwargs[key] = tuple(value) if isinstance(value, list) else value
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
        cfg.validate(source)
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> Self:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"missing config file: {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=str(path))

    def validate(self, source: str) -> None:
        """Raise ConfigError for a value outside what the model implements; subclasses extend."""

    def to_dict(self) -> dict[str, Any]:
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }
