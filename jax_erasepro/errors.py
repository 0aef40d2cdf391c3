"""The library's error types: one per failure class, all under ``EraseProError``.

Each carries a one-line message naming the file, key or argument at fault. They subclass ``ValueError`` (or
``OSError`` for saving) so callers that caught those before still do; the command line catches
``EraseProError`` and prints the message without a traceback.
"""

from __future__ import annotations


class EraseProError(Exception):
    """Base of every error the library raises on bad input or a failed operation."""


class LoadError(EraseProError, ValueError):
    """A model, checkpoint or file that cannot be read (names the file and, where known, the key)."""


class ConfigError(LoadError):
    """A config file holds a key or value this implementation does not support."""


class EraseError(EraseProError, ValueError):
    """An erasure request that cannot be carried out (names the argument or concept)."""


class SaveError(EraseProError, OSError):
    """An export failed; nothing was left at the destination and the source is untouched."""


class EvaluationError(EraseProError, ValueError):
    """An evaluation request that cannot be carried out (names the culprit)."""
