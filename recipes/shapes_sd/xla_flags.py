"""XLA:CPU flags for the shapes training runs, set per process before JAX starts its backend.

jaxlib 0.10's CPU backend runs convolutions and their gradients through YNNPACK fusions by default. On
the shapes models' narrow convolutions (16-192 channels) their backward passes are slow; naming the YNN
fusion types explicitly (``dot`` alone) takes convolutions off that path. benchmarks/train_step.py has the
figures (f4 VAE step 1.4x faster, f4 UNet step 1.2x). SD v1.4's wide inference convolutions are faster on
the default path (its UNet step about 9% slower with the flag) and the CLIP training step is 2x slower, so
the library never sets it; only train_vae and train_unet do. The flag is experimental and XLA aborts on
flags it does not know, so it is set only on the jaxlib minor version it was measured on.
"""

from __future__ import annotations

import os

TRAINING_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=dot",)
MEASURED_ON = "0.10."  # jaxlib versions the flags are known to and measured on


def _backend_started() -> bool:
    from jax._src import xla_bridge  # no public API says whether the backends exist yet

    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started()) if started is not None else True


def use_training_flags() -> bool:
    """Add ``TRAINING_FLAGS`` to ``XLA_FLAGS`` for this process if JAX's backend has not started yet, the user
    has not set the same flags and jaxlib is the version they were measured on; returns whether they were
    added (flags read after the backend starts would not apply)."""
    import jaxlib.version

    current = os.environ.get("XLA_FLAGS", "")
    names = [f.split("=")[0] for f in TRAINING_FLAGS]
    if not jaxlib.version.__version__.startswith(MEASURED_ON):
        return False
    if any(name in current for name in names) or _backend_started():
        return False
    os.environ["XLA_FLAGS"] = " ".join([current, *TRAINING_FLAGS]).strip()
    return True
