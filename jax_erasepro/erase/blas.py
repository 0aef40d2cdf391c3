"""One OpenBLAS thread while an erasure runs: jaxlib's CPU LAPACK (QR, SVD, eigh) calls scipy's OpenBLAS.

Its worker threads spin against XLA's own thread pool; on a small or busy CPU that makes a 768 x 64 QR take
~1 s instead of ~1 ms. The solvers' factorisations are small, so one thread is always the faster choice.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator
from pathlib import Path

_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads")


def _loaded_openblas() -> list[tuple[object, object]]:
    """(set_num_threads, get_num_threads) of every OpenBLAS mapped into this process (Linux; else none)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return []
    paths = {line.split()[-1] for line in maps.read_text().splitlines() if "openblas" in line.lower()}
    found = []
    for path in sorted(paths):
        with contextlib.suppress(OSError):
            lib = ctypes.CDLL(path)
            for setter in _SETTERS:
                getter = setter.replace("set_", "get_")
                if hasattr(lib, setter) and hasattr(lib, getter):
                    found.append((getattr(lib, setter), getattr(lib, getter)))
                    break
    return found


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run the block with one thread in each loaded OpenBLAS, restoring the previous counts after."""
    libs = _loaded_openblas()
    previous = [get() for _, get in libs]
    for set_threads, _ in libs:
        set_threads(1)
    try:
        yield
    finally:
        for (set_threads, _), n in zip(libs, previous, strict=True):
            set_threads(n)
