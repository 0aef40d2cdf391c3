"""A persistent XLA compilation cache for the command-line tools, so a second run does not compile again.

Every ``jax-erasepro`` run compiles the same programs: a load's layout kernels, the erase sweep, the
sampler, the VAE. On the tiny model that is about two thirds of the README's erase command (33 s without
the cache, 11 s on a second run with it, on a 2-core CPU). JAX keys each entry by the program, the
jax/jaxlib versions, the XLA flags and the device, so a stale entry is never used. Only the entry points
turn it on (library imports change no global JAX setting); ``use_compilation_cache`` is public for
scripts that want the same.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import jax

CHOICE = "JAX_ERASEPRO_COMPILATION_CACHE"  # a folder, or "off"; default: ~/.cache/jax-erasepro/xla
MAX_BYTES = 2 << 30  # least recently used entries are evicted beyond this (needs the filelock package)


def default_dir() -> Path:
    """``$XDG_CACHE_HOME/jax-erasepro/xla``, or ``~/.cache/jax-erasepro/xla``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jax-erasepro" / "xla"


def use_compilation_cache(path: str | Path | None = None) -> Path | None:
    """Keep compiled XLA programs in ``path`` (default: ``$JAX_ERASEPRO_COMPILATION_CACHE``, else
    ``default_dir()``) across processes, every program however quick its compile (the many small ones add
    up). Returns the folder, or None: when ``$JAX_ERASEPRO_COMPILATION_CACHE`` is ``off``, when JAX already
    has a cache folder (``JAX_COMPILATION_CACHE_DIR`` wins), or when the folder cannot be created.
    Call it before the first compile: JAX sets its cache up once per process.
    """
    if jax.config.jax_compilation_cache_dir:
        return None
    choice = os.environ.get(CHOICE, "")
    if path is None and choice.lower() == "off":
        return None
    folder = Path(path or choice or default_dir()).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if importlib.util.find_spec("filelock") is not None:
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return folder
