"""Resnet blocks and resamplers of the SD UNet and VAE (diffusers ``resnet.py``), on NHWC feature maps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def group_norm(channels: int, groups: int, eps: float, *, rngs: nnx.Rngs) -> nnx.GroupNorm:
    """torch ``GroupNorm`` over the last (channel) axis, two-pass variance as torch computes it."""
    return nnx.GroupNorm(channels, num_groups=groups, epsilon=eps, use_fast_variance=False, rngs=rngs)


# XLA:CPU's convolution is slow on small maps: a 3x3 conv on a 2x2 map (and its gradients) takes ~20x a
# matmul of the same size (19 ms vs 1 ms at batch 64, 192 channels), and SD's 8x8 and 16x16 maps with
# 640-2560 input channels run 1.4-3x slower than one im2col matmul (83 vs 28 ms for 8x8, 1280 -> 1280).
# On maps of 32x32 and more, or few channels, XLA's own convolution wins (it avoids im2col's 9x copy).
IM2COL_MAX_SIDE = 2  # always im2col at or below this side
IM2COL_MAX_PIXELS, IM2COL_MIN_CHANNELS = 256, 512  # ... and on maps this small with this many channels


def use_im2col(height: int, width: int, channels: int) -> bool:
    """Whether a stride-1 conv on this map runs faster as one im2col matmul (on the CPU backend)."""
    if jax.default_backend() != "cpu":
        return False
    small = min(height, width) <= IM2COL_MAX_SIDE
    return small or (height * width <= IM2COL_MAX_PIXELS and channels >= IM2COL_MIN_CHANNELS)


class Conv2d(nnx.Conv):
    """``nnx.Conv`` (NHWC, explicit padding) that computes small maps as one im2col matmul on CPU."""

    def __call__(self, x: jax.Array, out_sharding=None) -> jax.Array:  # noqa: ANN001
        kh, kw = self.kernel_size
        stride1 = self.strides in (1, (1, 1))
        if kh * kw == 1 and stride1 and self.padding == ((0, 0), (0, 0)):  # a 1x1 conv is a matmul
            y = x @ self.kernel[0, 0]
            return y + self.bias[...] if self.bias is not None else y
        if not use_im2col(x.shape[1], x.shape[2], x.shape[3]) or not stride1:
            return super().__call__(x, out_sharding=out_sharding)
        (top, bottom), (left, right) = self.padding
        h, w = x.shape[1] + top + bottom - kh + 1, x.shape[2] + left + right - kw + 1
        xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
        cols = jnp.concatenate([xp[:, i : i + h, j : j + w] for i in range(kh) for j in range(kw)], axis=-1)
        kernel = self.kernel[...]
        y = cols @ kernel.reshape(-1, kernel.shape[-1])
        return y + self.bias[...] if self.bias is not None else y


def conv(cin: int, cout: int, kernel: int, *, stride: int = 1, pad: int | tuple, rngs: nnx.Rngs) -> Conv2d:
    """torch ``Conv2d`` with explicit padding (``pad`` an int, or ((top, bottom), (left, right)))."""
    padding = ((pad, pad), (pad, pad)) if isinstance(pad, int) else pad
    return Conv2d(cin, cout, (kernel, kernel), strides=stride, padding=padding, rngs=rngs)


class ResnetBlock2D(nnx.Module):
    """GroupNorm-SiLU-conv twice, time embedding added between, 1x1 ``conv_shortcut`` when widths differ."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        temb_channels: int | None,
        groups: int,
        eps: float,
        output_scale_factor: float = 1.0,
        rngs: nnx.Rngs,
    ):
        self.norm1 = group_norm(in_channels, groups, eps, rngs=rngs)
        self.conv1 = conv(in_channels, out_channels, 3, pad=1, rngs=rngs)
        self.time_emb_proj = nnx.Linear(temb_channels, out_channels, rngs=rngs) if temb_channels else None
        self.norm2 = group_norm(out_channels, groups, eps, rngs=rngs)
        self.conv2 = conv(out_channels, out_channels, 3, pad=1, rngs=rngs)
        self.conv_shortcut = (
            conv(in_channels, out_channels, 1, pad=0, rngs=rngs) if in_channels != out_channels else None
        )
        self.output_scale_factor = output_scale_factor

    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        return out if self.output_scale_factor == 1 else out / self.output_scale_factor


class Downsample2D(nnx.Module):
    """Stride-2 3x3 ``conv``; padding 0 means one row/column of zeros at bottom/right (the VAE encoder)."""

    def __init__(self, channels: int, *, padding: int = 1, rngs: nnx.Rngs):
        pad = ((0, 1), (0, 1)) if padding == 0 else padding
        self.conv = conv(channels, channels, 3, stride=2, pad=pad, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


def upsample_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """torch ``F.interpolate(mode="nearest")`` to ``size`` on NHWC; exact 2x is a broadcast, not a gather."""
    b, h, w, c = x.shape
    if tuple(size) == (2 * h, 2 * w):
        return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
    rows = np.minimum(np.floor(np.arange(size[0], dtype=np.float32) * np.float32(h / size[0])), h - 1)
    cols = np.minimum(np.floor(np.arange(size[1], dtype=np.float32) * np.float32(w / size[1])), w - 1)
    return x[:, rows.astype(np.int32)][:, :, cols.astype(np.int32)]


class Upsample2D(nnx.Module):
    """Nearest-neighbour upsampling (2x, or to the skip connection's size) followed by a 3x3 ``conv``."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.conv = conv(channels, channels, 3, pad=1, rngs=rngs)

    def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        _, h, w, _ = x.shape
        return self.conv(upsample_nearest(x, size or (2 * h, 2 * w)))
