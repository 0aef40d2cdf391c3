"""jemalloc for the long CPU runs (the shapes training scripts), chosen by re-executing the process once.

XLA:CPU allocates each step's temporaries afresh and glibc serves every block over 32 MB with a new
``mmap``, so every step faults in and zeroes its working memory again: 385k page faults (1.5 GB) and 0.8 s
of kernel time per CLIP training step on this 2-core CPU, 194k per f4w VAE step. jemalloc, told never to
give pages back (no decay, no separate oversize arena), keeps them mapped: CLIP step 1.72 -> 1.40 s, UNet
0.78 -> 0.73 s, VAE unchanged (``benchmarks/train_step.py --allocators``, torch beside it). glibc picks its
allocator at process start, so switching takes ``LD_PRELOAD`` and a re-exec of the same command line.
Set ``JAX_ERASEPRO_ALLOCATOR=system`` to keep glibc; a process already preloading jemalloc is left alone.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

JEMALLOC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",  # Debian/Ubuntu: apt install libjemalloc2
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",  # Fedora/RHEL
    "/usr/local/lib/libjemalloc.so.2",
    "/usr/lib/libjemalloc.so.2",
)
# never return pages (dirty/muzzy decay off); no oversize arena (it purges at once). Not thp:always: in an
# A/B it was within noise (VAE) or mixed (CLIP) and spent up to 1.9 s per CLIP step in huge-page compaction
MALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1,oversize_threshold:0"
CHOICE = "JAX_ERASEPRO_ALLOCATOR"  # "system": keep glibc malloc; "jemalloc" (default): use it when found


def find_jemalloc(paths: tuple[str, ...] = JEMALLOC_PATHS) -> str | None:
    """The first jemalloc shared library on ``paths`` that exists, or None."""
    return next((p for p in paths if os.path.isfile(p)), None)


def jemalloc_env(environ: Mapping[str, str], library: str | None) -> dict[str, str] | None:
    """The environment a re-exec under jemalloc needs, or None where none should happen (opted out, no
    library, or jemalloc already preloaded; a user's own ``MALLOC_CONF`` wins)."""
    if environ.get(CHOICE, "jemalloc") == "system" or library is None:
        return None
    preload = environ.get("LD_PRELOAD", "")
    if "jemalloc" in preload:
        return None
    env = dict(environ)
    env["LD_PRELOAD"] = f"{library}:{preload}" if preload else library
    env.setdefault("MALLOC_CONF", MALLOC_CONF)
    env[CHOICE] = "jemalloc"
    return env


def use_jemalloc() -> None:
    """Re-execute this process (same interpreter, same command line) under jemalloc when it is installed
    and not already in use; returns only where it does nothing. Call it first thing in a script's main."""
    env = jemalloc_env(os.environ, find_jemalloc())
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
