"""XLA:CPU flags for the shapes training runs, set per process before JAX starts its backend.

jaxlib 0.10's CPU backend runs convolutions and their gradients through YNNPACK fusions by default. On
the shapes models' narrow convolutions (16-192 channels) their backward passes are slow; naming the YNN
fusion types explicitly (``dot`` alone) takes convolutions off that path. benchmarks/train_step.py has the
figures (f4 VAE step about 1.5x faster, f4 UNet step about 1.2x). SD v1.4's wide inference convolutions
are faster on the default path (its UNet step about 9% slower with the flag), so the library never sets
it; only train_vae and train_unet do (the CLIP step, all dense layers, gains nothing).
"""

from __future__ import annotations

import os

TRAINING_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=dot",)


def _backend_started() -> bool:
    from jax._src import xla_bridge  # no public API says whether the backends exist yet

    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started()) if started is not None else True


def use_training_flags() -> bool:
    """Add ``TRAINING_FLAGS`` to ``XLA_FLAGS`` for this process if JAX's backend has not started yet and the
    user has not set the same flags; returns whether they were added (flags read later would not apply)."""
    current = os.environ.get("XLA_FLAGS", "")
    names = [f.split("=")[0] for f in TRAINING_FLAGS]
    if any(name in current for name in names) or _backend_started():
        return False
    os.environ["XLA_FLAGS"] = " ".join([current, *TRAINING_FLAGS]).strip()
    return True
