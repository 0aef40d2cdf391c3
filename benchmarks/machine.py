"""What every benchmark names: the machine it ran on."""

from __future__ import annotations

from pathlib import Path


def machine() -> str:
    """The CPU model and its matrix/vector extensions, from /proc/cpuinfo."""
    import os
    import platform

    model, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("unknown CPU", "x86_64", ""):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    ext = sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma"))
    return f"{model}, {os.cpu_count()} cores, {' '.join(ext) or 'no AVX-512/AMX'}"
