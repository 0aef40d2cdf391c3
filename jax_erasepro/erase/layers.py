"""The weights a closed-form erasure edits: the U-Net's cross-attention projections in same-shape buckets,
and the text encoder's q/k/v, all named by their diffusers keys (``surgery``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jax_erasepro import surgery
from jax_erasepro.sd import StableDiffusion

CROSS_ATTENTION = "unet.*.attn2.to_[kv].weight"
QKV = ("q_proj", "k_proj", "v_proj")


@dataclasses.dataclass(frozen=True)
class Bucket:
    """attn2 ``to_k``/``to_v`` kernels of one shape (SD 1.x: 768->320, ->640, ->1280), solved as one batch."""

    shape: tuple[int, int]  # Flax kernel shape (d_in, d_out)
    keys: tuple[str, ...]  # ``unet.<diffusers key>`` of each kernel
    kernels: tuple[Any, ...]

    def stack(self) -> jnp.ndarray:
        return jnp.stack(self.kernels)


def unet_cross_attention(sd: StableDiffusion) -> list[Bucket]:
    """Every ``attn2.to_k``/``attn2.to_v`` kernel of the U-Net, bucketed by shape (in model order)."""
    kernels = surgery.read(sd, surgery.select(sd, CROSS_ATTENTION), layout="flax", host=False)
    found: dict[tuple[int, int], list] = {}
    for key, k in kernels.items():
        found.setdefault(tuple(k.shape), []).append((key, k))
    return [
        Bucket(shape, tuple(k for k, _ in items), tuple(v for _, v in items))
        for shape, items in found.items()
    ]


def replace_buckets(
    sd: StableDiffusion, buckets: Sequence[Bucket], kernels: Sequence[jax.Array]
) -> tuple[StableDiffusion, list[str]]:
    """``sd`` with each bucket's kernels replaced by the matching (n, d_in, d_out) stack; the keys edited."""
    new = {
        key: k
        for b, stack in zip(buckets, kernels, strict=True)
        for key, k in zip(b.keys, stack, strict=True)
    }
    return surgery.replace(sd, new, layout="flax", source="erase"), list(new)


def qkv_keys(sd: StableDiffusion, start: int) -> list[list[str]]:
    """The q/k/v weight keys of text-encoder layers [start, L) (0-based), one list per projection."""
    return [surgery.select(sd, f"text_encoder.*.self_attn.{name}.weight")[start:] for name in QKV]


def replace_qkv(
    sd: StableDiffusion, start: int, qkv: Sequence[jax.Array]
) -> tuple[StableDiffusion, list[str]]:
    """``sd`` whose q/k/v kernels of encoder layers [start, L) are ``qkv``: three (L - start, d_in, d_out)."""
    keys = qkv_keys(sd, start)
    new = {
        key: k for names, stack in zip(keys, qkv, strict=True) for key, k in zip(names, stack, strict=True)
    }
    return surgery.replace(sd, new, layout="flax", source="erase"), list(new)
