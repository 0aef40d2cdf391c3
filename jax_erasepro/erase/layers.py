"""The U-Net cross-attention projections a closed-form erasure edits, grouped into same-shape buckets."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class Bucket:
    """attn2 ``to_k``/``to_v`` kernels of one shape (SD 1.x: 768->320, ->640, ->1280), solved as one batch."""

    shape: tuple[int, int]  # Flax kernel shape (d_in, d_out)
    paths: tuple[tuple[Any, ...], ...]  # NNX param paths
    kernels: tuple[Any, ...]

    @property
    def keys(self) -> list[str]:
        """The diffusers keys, prefixed with the component: ``unet.<...>.attn2.to_k.weight``."""
        return ["unet." + ".".join(str(p) for p in path[:-1]) + ".weight" for path in self.paths]

    def stack(self) -> jnp.ndarray:
        return jnp.stack(self.kernels)


def unet_cross_attention(unet: nnx.Module) -> list[Bucket]:
    """Every ``attn2.to_k``/``attn2.to_v`` kernel of ``unet``, bucketed by shape (in model order)."""
    found: dict[tuple[int, int], list] = {}
    for path, var in nnx.to_flat_state(nnx.state(unet, nnx.Param)):
        names = tuple(str(p) for p in path[-3:])
        if names in (("attn2", "to_k", "kernel"), ("attn2", "to_v", "kernel")):
            found.setdefault(tuple(var.shape), []).append((path, var[...]))
    return [
        Bucket(shape, tuple(p for p, _ in items), tuple(k for _, k in items))
        for shape, items in found.items()
    ]
